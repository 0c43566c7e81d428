"""Structure fidelity of the bundled SD3-layout base's canny ControlNet, beside the U-Net bundle's.

On ``--scenes`` held-out world scenes (seeds 1_000_000 + i, never trained on), fixed sampling
seeds, the bundled transformer base (``assets/bundle/sd3``) with and without its canny ControlNet
(``sd3/controlnets/canny``): edge F1 (2-px tolerance) between the input edge map and canny of the
generated image -- the protocol of ``benchmarks/fidelity.py`` -- in diffusers' ``balanced`` mode and in
``controlnet`` mode (the residuals on the conditional CFG half only, so guidance amplifies them, as
the U-Net bundle's headline numbers). The U-Net bundle's numbers are read from its ``fidelity.json``.
Writes the bundle's ``sd3_fidelity.json``, a grid (edges | balanced | controlnet mode | real | no control) and
the table into docs/transformers.md.

    .venv/bin/python benchmarks/sd3_fidelity.py --scenes 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from controlstack import Control, Pipeline, assets
from controlstack.evaluation.metrics import edge_f1, edges
from controlstack.io.png import make_labelled_grid
from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene
from docblock import write_block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--out", default="outputs/sd3_fidelity")
    ap.add_argument("--doc", default="docs/transformers.md")
    args = ap.parse_args()
    folder = assets.BUNDLE_DIR / "sd3"
    cn = folder / "controlnets" / "canny"
    if not (cn / "config.json").is_file():
        raise SystemExit(f"sd3_fidelity: no bundled SD3 ControlNet in {cn}; run `make bundle STAGES=sd3-controlnet-canny`")
    pipe = Pipeline.from_pretrained(folder)
    size = pipe.native_size
    kw = dict(steps=args.steps, cfg=args.cfg, width=size, height=size, progress=False, output_type="np")
    rows = [render(sample_scene([HELD_OUT_SEED, i], WorldConfig(size=size)), size) for i in range(args.scenes)]
    as_uint8 = lambda a: (a * 255).round().astype(np.uint8)
    f1 = {"balanced": [], "controlnet": [], "no_control": []}
    grid = []
    for i, r in enumerate(tqdm(rows, desc="sd3 canny", unit="scene")):
        cond = Image.fromarray(np.asarray(r["canny"])).convert("RGB")
        ref = edges(cond, is_edge_map=True)
        images = {
            "balanced": pipe(r["text"], [Control(str(cn), cond)], seed=i, mode="balanced", **kw)[0],
            "controlnet": pipe(r["text"], [Control(str(cn), cond)], seed=i, mode="controlnet",
                               mode_options={"layer_weights": "uniform"}, **kw)[0],
            "no_control": pipe(r["text"], seed=i, **kw)[0],
        }
        for k, im in images.items():
            f1[k].append(edge_f1(ref, edges(Image.fromarray(as_uint8(im)))))
        if i < 6:
            grid.append((f"scene {i}", [cond, *(Image.fromarray(as_uint8(images[k])) for k in ("balanced", "controlnet")),
                                        Image.fromarray(np.asarray(r["image"])),
                                        Image.fromarray(as_uint8(images["no_control"]))]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    make_labelled_grid(grid, ["edges", "balanced", "controlnet mode", "real", "no control"]).save(out / "sd3-canny.png")
    report = {"scenes": args.scenes, "steps": args.steps, "cfg": args.cfg, "sampler": "euler (flow)",
              "f1": {k: round(float(np.mean(v)), 4) for k, v in f1.items()}}
    (assets.BUNDLE_DIR / "sd3_fidelity.json").write_text(json.dumps(report, indent=2) + "\n")  # not a model file
    unet = json.loads((assets.BUNDLE_DIR / "fidelity.json").read_text())
    u = unet["f1"]["canny"]
    s = report["f1"]
    lines = ["| base | canny F1, balanced | canny F1, controlnet mode | no control | ratio (best / none) |",
             "| --- | --- | --- | --- | --- |",
             f"| U-Net bundle ({unet['scenes']} scenes, {unet['steps']} steps UniPC, CFG {unet['cfg']:g}) | "
             f"{u.get('balanced', float('nan')):.3f} | {u['control']:.3f} | {u['no_control']:.3f} | "
             f"{u['control'] / u['no_control']:.2f}x |",
             f"| SD3-layout bundle ({args.scenes} scenes, {args.steps} steps flow Euler, CFG {args.cfg:g}) | "
             f"{s['balanced']:.3f} | {s['controlnet']:.3f} | {s['no_control']:.3f} | "
             f"{max(s['balanced'], s['controlnet']) / s['no_control']:.2f}x |"]
    print("\n".join(lines))
    write_block(Path(args.doc), "<!-- sd3-fidelity:start -->", "<!-- sd3-fidelity:end -->", lines)


if __name__ == "__main__":
    main()
