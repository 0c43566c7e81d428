"""Few-step generation with controls: the bundled teacher at 20 steps against its LCM student
(``--model lcm``) at 1, 2, 4 and 8 steps, in the parity and compiled tiers, in one run.

On ``--scenes`` held-out world scenes (seeds 1_000_000 + i, never trained on), fixed sampling seeds,
for each control setup -- the bundled canny, depth, pose and seg ControlNets and two at once
(canny + depth) -- and each sampler: seconds per image (median over ``--timing-scenes``, per tier),
structure fidelity (canny: edge F1 at 2 px against the input edges; the others: canny of the image
against canny of the scene's real render, ``benchmarks/fidelity.py``'s protocol), FID / KID against
the real renders and CLIP score against the captions with the project's evaluation networks
(``evaluation/networks.py``). Each student row also gives its ratio to the teacher: F1 kept, KID
relative, images per second gained (same tier). The teacher samples as the bundled base recommends
(UniPC, CFG 7, its ControlNets' mode); the student with the lcm sampler at the same CFG, embedded.

Writes the table into docs/speed.md, the numbers to ``--json`` and a figure (images per steps for
one scene and control) to docs/images/fewstep.png.

    .venv/bin/python benchmarks/fewstep.py --scenes 200            # the table (~1 h on 2 cores)
    .venv/bin/python benchmarks/fewstep.py --scenes 8 --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from controlstack import Control, Pipeline, assets
from controlstack.evaluation.metrics import edge_f1, edges
from controlstack.evaluation.networks import ClipScorer, load_feature_extractor
from controlstack.evaluation.quality import FidKid, clip_score
from controlstack.io.png import make_labelled_grid
from controlstack.training.bundle import machine
from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene
from docblock import write_block

SETUPS = {"canny": ("canny",), "depth": ("depth",), "pose": ("pose",), "seg": ("seg",), "canny+depth": ("canny", "depth")}


def structure_f1(name: str, cond: Image.Image, real_edges: np.ndarray, image: np.ndarray) -> float:
    ref = edges(cond, is_edge_map=True) if name == "canny" else real_edges
    return edge_f1(ref, edges(Image.fromarray(image)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--timing-scenes", type=int, default=8, help="scenes timed per tier (after one warm-up)")
    ap.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--tiers", nargs="+", default=["parity", "compiled"], choices=["parity", "compiled", "fast"])
    ap.add_argument("--quick", action="store_true", help="2 student step counts, parity only, no doc update")
    ap.add_argument("--json", default="outputs/fewstep/fewstep.json")
    ap.add_argument("--doc", default="docs/speed.md")
    args = ap.parse_args()
    if args.quick:
        args.student_steps, args.tiers = [1, 4], ["parity"]
    teacher = {tier: Pipeline.from_pretrained().optimize(tier) for tier in args.tiers}
    student = {tier: Pipeline.from_pretrained("lcm").optimize(tier) for tier in args.tiers}
    size = teacher[args.tiers[0]].native_size
    scenes = [sample_scene([HELD_OUT_SEED, i], WorldConfig(size=size)) for i in range(args.scenes)]
    rows = [render(s, size) for s in scenes]
    real = [np.asarray(r["image"]) for r in rows]
    real_edges = [edges(Image.fromarray(a)) for a in real]
    captions = [r["text"] for r in rows]
    quality = FidKid(load_feature_extractor(), real)
    scorer = ClipScorer.load()
    as_uint8 = lambda a: (a * 255).round().astype(np.uint8)
    samplers = [("teacher", args.teacher_steps)] + [("student", n) for n in args.student_steps]
    report: dict = {"cpu": machine(), "threads": torch.get_num_threads(), "scenes": args.scenes, "rows": []}
    figure: list = []
    for setup in args.setups:
        names = SETUPS[setup]
        conds = [[Image.fromarray(np.asarray(r[n])).convert("RGB") for n in names] for r in rows]
        for who, steps in samplers:
            pipes = teacher if who == "teacher" else student
            kw = dict(steps=steps, width=size, height=size, progress=False, output_type="np")
            call = lambda pipe, i: as_uint8(pipe(captions[i], [Control(n, c) for n, c in zip(names, conds[i])],
                                                  seed=i, **kw)[0])
            seconds = {}
            for tier, pipe in pipes.items():
                call(pipe, 0)  # warm-up: compiles (or loads) the tier's graphs
                times = []
                for i in range(min(args.timing_scenes, args.scenes)):
                    t = time.perf_counter()
                    call(pipe, i)
                    times.append(time.perf_counter() - t)
                seconds[tier] = statistics.median(times)
            images = [call(pipes[args.tiers[0]], i) for i in tqdm(range(args.scenes), desc=f"{setup} {who} {steps}")]
            f1 = float(np.mean([structure_f1(names[0], conds[i][0], real_edges[i], images[i]) for i in range(len(rows))]))
            row = {"setup": setup, "sampler": who, "steps": steps, "seconds": seconds, "f1": f1,
                   **quality(images), "clip": clip_score(scorer, images, captions)}
            report["rows"].append(row)
            print(json.dumps(row))
            if setup == args.setups[0]:
                figure.append((f"{who}, {steps} steps", [Image.fromarray(images[i]) for i in range(4)]))
    teacher_rows = {r["setup"]: r for r in report["rows"] if r["sampler"] == "teacher"}
    for r in report["rows"]:
        t = teacher_rows[r["setup"]]
        r["f1_kept"] = r["f1"] / max(t["f1"], 1e-9)
        # KID is an unbiased estimate: on few scenes a close match can come out <= 0, and a ratio then means nothing
        r["kid_relative"] = r["kid"] / t["kid"] if t["kid"] > 0 else None
        r["speedup"] = {tier: t["seconds"][tier] / r["seconds"][tier] for tier in r["seconds"]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    lines = table(report, args.tiers)
    print("\n".join(lines))
    if not args.quick:
        write_block(Path(args.doc), "<!-- fewstep:start -->", "<!-- fewstep:end -->", lines)
        Path("docs/images").mkdir(parents=True, exist_ok=True)
        make_labelled_grid(figure, ["scene 0", "scene 1", "scene 2", "scene 3"]).save("docs/images/fewstep.png")


def table(report: dict, tiers: list[str]) -> list[str]:
    head = "| control | sampler | steps | " + " | ".join(f"s/img {t}" for t in tiers) + \
        " | F1 | F1 kept | FID | KID | KID rel. | CLIP | " + " | ".join(f"img/s gain {t}" for t in tiers) + " |"
    lines = [f"{report['scenes']} held-out scenes; {report['cpu']}, {report['threads']} threads.", "", head,
             "|" + " --- |" * (head.count("|") - 1)]
    for r in report["rows"]:
        lines.append(f"| {r['setup']} | {r['sampler']} | {r['steps']} | "
                     + " | ".join(f"{r['seconds'][t]:.3f}" for t in tiers)
                     + f" | {r['f1']:.3f} | {r['f1_kept']:.0%} | {r['fid']:.2f} | {r['kid']:.4f} | "
                     + ("n/a" if r["kid_relative"] is None else f"{r['kid_relative']:.2f}x") + f" | {r['clip']:.1f} | "
                     + " | ".join(f"{r['speedup'][t]:.1f}x" for t in tiers) + " |")
    return lines


if __name__ == "__main__":
    main()
