"""Proof that control works: condition fidelity, prompt fidelity and FID of the bundled model.

On ``--scenes`` held-out world scenes (seeds 1_000_000 + i: never used in training, which uses
seed 0), fixed sampling seeds, the bundled base with and without each bundled ControlNet:

* canny: F1 (2-px tolerance) between the input edge map and canny of the generated image;
* depth, seg, pose (and any other bundled control): structure F1 between canny of the generated
  image and canny of the scene's real render;
  each against the no-control baseline (same prompt, same seed);
* two reference points: the VAE round trip of the real render (the ceiling: the decoder's
  sharpness) and another scene's real edges (chance: the world's shared layout);
* prompt fidelity: with the seg control, the colour inside each *object's* instance mask (the lit
  half's chromaticity and level, ``evaluation.metrics.colour_feature``) is named by the nearest
  colour prototype -- that name's median over 300 other held-out scenes' real renders, i.e. the
  world's own lighting -- and must match the colour the caption names; plain and speckled objects
  only (a striped or checkered one is half an unnamed colour); CFG 1 vs 7, the real renders
  themselves as the metric's ceiling, and their VAE round trips as the ceiling of anything that
  decodes through the bundled VAE;
* image quality: FID between generated and real images on features of a network the project
  trains itself: the bundled VAE's encoder (posterior mean, average-pooled to 4x4 -> 64 numbers).

The headline numbers use ``--mode`` (default: ``controlnet`` with ``--layer-weights uniform``,
the bundle's recommended setting: control on the conditional CFG half, so guidance amplifies it);
a second column repeats each control in diffusers' default ``balanced`` mode (both halves) on the
first ``--balanced-scenes``.

Prints a table and writes one grid per condition (condition | generated | real | no control)
to ``--out``.

    .venv/bin/python benchmarks/fidelity.py --scenes 200 --steps 20
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
from controlstack.evaluation.metrics import edge_f1, edges, frechet_distance
from controlstack.evaluation.mi import to_vae_input, vae_features
from controlstack.evaluation.report import fidelity_table
from controlstack.io.png import make_labelled_grid
from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene


def vae_roundtrip(pipe: Pipeline, images: list[np.ndarray]) -> list[np.ndarray]:
    """decode(encode(x)) with the posterior mean: what the generator can at best reproduce."""
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(to_vae_input(images)).latent_dist.mode()).sample
    return list(((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def update_readme(readme: Path, report: dict, grids: Path, names: list[str]) -> None:
    """Put the table and one grid per condition between the README's ``fidelity`` markers (grids
    copied to ``docs/images/fidelity-<name>.png`` beside it)."""
    import shutil

    start, end = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"fidelity: {readme} has no {start} ... {end} block")
    images = readme.parent / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    block = ["`benchmarks/fidelity.py` (numbers from the last run; F1 has a 2 px tolerance):", "",
             *fidelity_table(report), ""]
    for name in names:
        shutil.copy(grids / f"{name}.png", images / f"fidelity-{name}.png")
        block.append(f"![{name}: condition | generated | real | no control](docs/images/fidelity-{name}.png)")
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n" + "\n".join(block) + "\n" + end + rest.split(end, 1)[1])
    print(f"updated {readme}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--bundle", default=None,
                    help="a bundle folder to measure (default: the shipped one, src/controlstack/assets/bundle; "
                         "e.g. bundle-v2 while it is built)")
    ap.add_argument("--conditions", nargs="+", default=None,
                    help="only these bundled ControlNets (default: all; seg gives the prompt fidelity)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--out", default="outputs/fidelity")
    ap.add_argument("--json", default=None, help="also write the numbers here (the bundle's fidelity.json)")
    ap.add_argument("--readme", default=None, help="put the table and grids into this README's fidelity block")
    ap.add_argument("--mode", default="controlnet", help="control mode of the headline numbers")
    ap.add_argument("--layer-weights", default="uniform", help="with --mode controlnet (the bundle's choice)")
    ap.add_argument("--balanced-scenes", type=int, default=50,
                    help="scenes for the second column, the same controls in diffusers' default 'balanced' "
                         "mode (the first N; 0 = skip)")
    args = ap.parse_args()
    if args.scenes < 2:
        raise SystemExit("fidelity: --scenes must be at least 2 (FID needs a covariance)")
    bundle = Path(args.bundle) if args.bundle else assets.BUNDLE_DIR
    trained = assets.has_trained_base(bundle)
    if args.bundle and not trained:
        raise SystemExit(f"fidelity: no trained base (model_index.json) in {bundle}")
    if not trained:
        print("note: no trained bundle in this checkout; numbers below are for the random placeholder")
    # the bundle folder itself: its trained ControlNets even while some stages are pending
    pipe = Pipeline.from_pretrained(bundle if trained else None)
    size = pipe.native_size
    # Minimal Impact ControlNets (mi-*) are measured by benchmarks/mi_tables.py, the Omni ControlNet by
    # benchmarks/omni_tables.py, each in its own protocol
    names = sorted(n for n in pipe.controlnets if not n.startswith("mi-") and n != "omni")
    if args.conditions:
        unknown = sorted(set(args.conditions) - set(names))
        if unknown:
            raise SystemExit(f"fidelity: no ControlNet {', '.join(unknown)} in the bundle (it has {', '.join(names)})")
        names = [n for n in names if n in args.conditions]
    kw = dict(steps=args.steps, width=size, height=size, progress=False, output_type="np")
    options = {"layer_weights": args.layer_weights} if args.mode == "controlnet" else None
    mode = dict(mode=args.mode, mode_options=options)

    scenes = [sample_scene([HELD_OUT_SEED, i], WorldConfig(size=size)) for i in range(args.scenes)]
    rows = [render(s, size) for s in scenes]
    real = [np.asarray(r["image"]) for r in rows]
    as_uint8 = lambda a: (a * 255).round().astype(np.uint8)

    base = [as_uint8(pipe(r["text"], cfg=args.cfg, seed=i, **kw)[0])
            for i, r in enumerate(tqdm(rows, desc="no control", unit="scene"))]
    # canny of each real render and each no-control image: computed once, used by every control
    real_edges = [edges(Image.fromarray(a)) for a in real]
    base_edges = [edges(Image.fromarray(b)) for b in base]
    table, generated_by = [], {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in rows[0]:
            continue
        gen, f1, f1_base, f1_balanced = [], [], [], []
        for i, r in enumerate(tqdm(rows, desc=name, unit="scene")):
            cond = Image.fromarray(np.asarray(r[name])).convert("RGB")
            g = as_uint8(pipe(r["text"], controls=[Control(name, cond)], cfg=args.cfg, seed=i, **mode, **kw)[0])
            gen.append(g)
            ref = edges(cond, is_edge_map=True) if name == "canny" else real_edges[i]
            f1.append(edge_f1(ref, edges(Image.fromarray(g))))
            f1_base.append(edge_f1(ref, base_edges[i]))
            if i < args.balanced_scenes and args.mode != "balanced":
                g = as_uint8(pipe(r["text"], controls=[Control(name, cond)], cfg=args.cfg, seed=i, **kw)[0])
                f1_balanced.append(edge_f1(ref, edges(Image.fromarray(g))))
        generated_by[name] = gen
        table.append((name, float(np.mean(f1)), float(np.mean(f1_base)),
                      float(np.mean(f1_balanced)) if f1_balanced else None))
        grid_rows = [(f"scene {i}", [Image.fromarray(np.asarray(rows[i][name])).convert("RGB"),
                                     Image.fromarray(gen[i]), Image.fromarray(real[i]), Image.fromarray(base[i])])
                     for i in range(min(6, len(rows)))]
        make_labelled_grid(grid_rows, [name, "generated", "real", "no control"]).save(out / f"{name}.png")

    # the ceiling: canny of the real render vs canny of its VAE round trip (the decoder's sharpness)
    roundtrip = vae_roundtrip(pipe, real)
    ceiling = float(np.mean([edge_f1(e, edges(Image.fromarray(r))) for e, r in zip(real_edges, roundtrip)]))
    # chance: each scene's real edges against the next scene's -- what the world's shared layout
    # (horizon, floor, figures at similar places) scores with no information about the scene
    chance = float(np.mean([edge_f1(real_edges[i], real_edges[(i + 1) % len(real)]) for i in range(len(real))]))
    report: dict = {"scenes": args.scenes, "steps": args.steps, "cfg": args.cfg, "mode": args.mode,
                    **({"layer_weights": args.layer_weights} if args.mode == "controlnet" else {}),
                    "f1": {}, "prompt_fidelity": {},
                    "fid": {}, "vae_roundtrip_f1": round(ceiling, 4), "chance_f1": round(chance, 4)}
    print(f"\n{'condition':10s} {'F1 control':>10s} {'F1 no control':>14s} {'ratio':>6s}")
    for name, f, b, bal in table:
        balanced = f"   balanced mode {bal:.3f}" if bal is not None else ""
        print(f"{name:10s} {f:10.3f} {b:14.3f} {f / max(b, 1e-9):6.2f}{balanced}")
        report["f1"][name] = {"control": round(f, 4), "no_control": round(b, 4),
                              **({"balanced": round(bal, 4)} if bal is not None else {})}
    if any(bal is not None for *_, bal in table):
        report["balanced_scenes"] = min(args.balanced_scenes, args.scenes)
    print(f"{'VAE round trip (ceiling)':25s} {ceiling:.3f}")
    print(f"{'another scene (chance)':25s} {chance:.3f}")

    # prompt fidelity with the seg control, CFG 1 vs --cfg; the real renders score the metric itself
    objects = named_objects(scenes, rows)
    prototypes = colour_prototypes(size)
    report["prompt_fidelity_objects"] = len(objects)
    report["prompt_fidelity_real"] = round(colour_hits(objects, rows, real, prototypes), 4)
    report["prompt_fidelity_vae"] = round(colour_hits(objects, rows, roundtrip, prototypes), 4)
    print(f"prompt fidelity of the real renders (the metric's ceiling): {report['prompt_fidelity_real']:.1%} "
          f"of {len(objects)} objects, of their VAE round trips {report['prompt_fidelity_vae']:.1%}; "
          f"chance {1 / len(prototypes):.1%}")
    if "seg" in names:
        for cfg in (1.0, args.cfg):
            # at the table's CFG the seg images are the ones generated above (same prompt, seed, control)
            images: dict[int, np.ndarray] = dict(enumerate(generated_by["seg"])) if cfg == args.cfg else {}
            for i in tqdm(sorted({i for i, _ in objects} - set(images)), desc=f"seg, CFG {cfg:g}", unit="scene"):
                cond = Image.fromarray(np.asarray(rows[i]["seg"])).convert("RGB")
                images[i] = as_uint8(pipe(rows[i]["text"], controls=[Control("seg", cond)], cfg=cfg, seed=i,
                                          **mode, **kw)[0])
            rate = colour_hits(objects, rows, images, prototypes)
            print(f"prompt fidelity (seg control, CFG {cfg:g}): {rate:.1%} of {len(objects)} objects")
            report["prompt_fidelity"][f"cfg {cfg:g}"] = round(rate, 4)

    real_f = vae_features(pipe, real)
    for name, gen in [("no control", base), *generated_by.items()]:
        fid = frechet_distance(vae_features(pipe, gen), real_f)
        report["fid"][name] = round(fid, 4)
        print(f"FID (bundled VAE-encoder features), {name:10s}: {fid:.3f}")
    print("\n" + "\n".join(fidelity_table(report)))
    if args.readme:
        update_readme(Path(args.readme), report, out, [name for name, *_ in table])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        if Path(args.json).resolve().parent == assets.BUNDLE_DIR.resolve():  # the bundle's numbers: refresh its cards
            from controlstack.training.bundle import write_model_card

            print(write_model_card())


if __name__ == "__main__":
    from controlstack.prompting import project_prompts

    with project_prompts():  # world captions run past the 32-token window by design: no warning
        main()
