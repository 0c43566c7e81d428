"""Does an image prompt carry what text cannot? The bundled IP-Adapter, measured on held-out scenes.

The bundled base ignores colour words (its prompt fidelity is near chance, README). On
``--scenes`` held-out world scenes (seeds ``HELD_OUT_SEED, i``: never trained on), each generated
from its caption with the same seed in every row, the reference image is another view of the
scene: a square crop of 70% of its real render's area at a seeded position (the recipe trains on
random 50-90% crops). Rows:

* ``text``: the caption alone;             ``text + image``: with the reference as image prompt;
* ``canny``: the caption and the bundled canny ControlNet on the real render's edges;
* ``canny + image``: both;                 ``image``: the reference alone (empty prompt).

Each row gets the project's own measures:

* **colour** -- prompt fidelity (``evaluation/colours.py``): the fraction of plain / speckled
  objects whose colour in the generated image is the one the caption names, read inside each
  object's mask. With the canny control the objects are where the masks are; without it the
  number also asks the layout to have transferred;
* **structure F1** -- canny of the generated image against canny of the real render (2 px), what
  ``benchmarks/fidelity.py`` reports for depth / seg / pose: how much of the layout came across;
* **CLIP score** against the reference's (= the scene's) caption, through the world CLIP.

The real renders and another scene's edges give the ceilings and the chance levels. Writes a grid
(reference | real | every row) and, with ``--json``, the numbers (the bundle's ``ip_adapter.json``).

    .venv/bin/python benchmarks/ip_adapter.py --scenes 200 --json src/controlstack/assets/bundle/ip_adapter.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from controlstack import Control, Pipeline, assets
from controlstack.evaluation.colours import colour_hits, colour_prototypes, named_objects
from controlstack.evaluation.metrics import edge_f1, edges
from controlstack.evaluation.networks import ClipScorer
from controlstack.io.png import make_labelled_grid
from controlstack.ip_adapter import ImagePrompt
from controlstack.training.ip_adapter import reference_views
from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene

ROWS = ("text", "text + image", "canny", "canny + image", "image")
REFERENCE_AREA = 0.7


def reference(real: np.ndarray, seed: int, size: int) -> Image.Image:
    """The scene's reference: a square crop of REFERENCE_AREA of the render at a seeded place, unflipped."""
    x = torch.from_numpy(real).permute(2, 0, 1)[None].float() / 127.5 - 1
    view = reference_views(x, (REFERENCE_AREA, REFERENCE_AREA), 0.0, size, torch.Generator().manual_seed(seed))
    return Image.fromarray((view[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--scale", type=float, default=1.0, help="the image prompt's scale")
    ap.add_argument("--out", default="outputs/ip_adapter")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    if args.scenes < 1:
        raise SystemExit("ip_adapter: --scenes must be at least 1")
    files = assets.ip_adapter_files()
    if files is None or not assets.has_trained_base():
        raise SystemExit("ip_adapter: this checkout has no bundled IP-Adapter (make bundle STAGES=ip-adapter)")
    pipe = Pipeline.from_pretrained()
    pipe.load_ip_adapter(files[0], image_encoder=files[1], name="bundled")
    size = pipe.native_size
    mode = dict(mode="controlnet", mode_options={"layer_weights": "uniform"})  # the bundle's recommendation
    kw = dict(steps=args.steps, cfg=args.cfg, width=size, height=size, progress=False, output_type="np")
    as_uint8 = lambda a: (a * 255).round().astype(np.uint8)

    scenes = [sample_scene([HELD_OUT_SEED, i], WorldConfig(size=size)) for i in range(args.scenes)]
    rows = [render(s, size) for s in scenes]
    real = [np.asarray(r["image"]) for r in rows]
    refs = [reference(a, i, size) for i, a in enumerate(real)]
    texts = [r["text"] for r in rows]

    def generate(name: str, i: int) -> np.ndarray:
        prompt = [ImagePrompt(refs[i], args.scale)] if "image" in name else None
        controls = [Control("canny", Image.fromarray(np.asarray(rows[i]["canny"])).convert("RGB"))] \
            if name.startswith("canny") else []
        text = "" if name == "image" else texts[i]
        return as_uint8(pipe(text, controls, image_prompts=prompt, seed=i, **mode, **kw)[0])

    generated = {name: [generate(name, i) for i in tqdm(range(args.scenes), desc=name, unit="scene")] for name in ROWS}

    objects = named_objects(scenes, rows)
    prototypes = colour_prototypes(size)
    real_edges = [edges(Image.fromarray(a)) for a in real]
    scorer = ClipScorer.load()
    report: dict = {"scenes": args.scenes, "steps": args.steps, "cfg": args.cfg, "scale": args.scale,
                    "reference": f"a square crop of {REFERENCE_AREA:.0%} of the real render's area, seeded place",
                    "objects": len(objects), "rows": {}}
    for name, images in generated.items():
        report["rows"][name] = {
            "colour": round(colour_hits(objects, rows, images, prototypes), 4),
            "structure_f1": round(float(np.mean([edge_f1(e, edges(Image.fromarray(g)))
                                                 for e, g in zip(real_edges, images)])), 4),
            "clip_score": round(float(scorer.scores(images, texts).mean()), 3)}
    report["real"] = {"colour": round(colour_hits(objects, rows, real, prototypes), 4),
                      "clip_score": round(float(scorer.scores(real, texts).mean()), 3)}
    report["reference_clip_score"] = round(float(scorer.scores(refs, texts).mean()), 3)
    n = len(real)
    report["chance"] = {"colour": round(1 / len(prototypes), 4),
                        "structure_f1": round(float(np.mean([edge_f1(real_edges[i], real_edges[(i + 1) % n])
                                                             for i in range(n)])), 4)}

    print(f"\n{'row':15s} {'colour':>7s} {'structure F1':>13s} {'CLIP score':>11s}   ({len(objects)} objects)")
    for name, m in report["rows"].items():
        print(f"{name:15s} {m['colour']:7.1%} {m['structure_f1']:13.3f} {m['clip_score']:11.2f}")
    print(f"{'real renders':15s} {report['real']['colour']:7.1%} {'':13s} {report['real']['clip_score']:11.2f}")
    print(f"{'chance':15s} {report['chance']['colour']:7.1%} {report['chance']['structure_f1']:13.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [(f"scene {i}", [refs[i], Image.fromarray(real[i]), *[Image.fromarray(generated[r][i]) for r in ROWS]])
            for i in range(min(6, n))]
    make_labelled_grid(grid, ["reference", "real", *ROWS]).save(out / "ip_adapter.png")
    print(f"grid: {out / 'ip_adapter.png'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"numbers: {args.json}")


if __name__ == "__main__":
    main()
