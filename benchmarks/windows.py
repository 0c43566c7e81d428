"""Control windows on the bundled model: structure F1 per start/end window, and when the layout forms.

A ``Control(start=s, end=e)`` is active at step i of N iff not (i/N < s or (i+1)/N > e), diffusers'
rule; outside its window the ControlNet is not computed at all, so a narrower window is faster.
SD users know windows from Stable Diffusion 1.5, where the early steps fix the layout: an
early window (0-0.5) keeps the structure, a late one (0.5-1) mostly loses it. This measures
what the bundled 128 px model does instead, on held-out world scenes (seeds 1_000_000 + i, never
used in training), fixed sampling seeds, the bundle's recommended settings (20 UniPC steps,
CFG 7, ``controlnet`` mode with uniform layer weights; the ControlNets declare it):

* structure F1 per window and condition, exactly as ``benchmarks/fidelity.py`` computes it
  (canny: the input edge map vs canny of the generated image; depth, seg, pose: canny of the
  real render vs canny of the generated image; 2 px tolerance), with the no-control baseline;
  every window is measured on the same scenes and seeds, so the paired difference to 0-1 and its
  standard error say whether two windows really differ;
* when the layout forms: at every step the sampler's prediction of the clean latents (UniPC's
  ``x0``) is decoded, and its canny compared with the final image's (how much of the final
  structure is already fixed) and with the scene's reference (how much is right), without
  control and with each control over the whole run;
* the noise level of each step (``sqrt(alpha_bar)``, the signal's share of the latents), which
  is where the 16x16 latents of a 128 px model differ from SD's 64x64 (see docs/windows.md).

Prints a table and a recommended window per ControlNet (the fewest ControlNet steps whose F1 is
within ``--tolerance`` of the full window's), writes ``<tag>.json``, a grid of one scene under
every window (``<tag>-grid.png``), the x0 trajectory of one scene (``<tag>-x0.png``) and a plot of
both measurements (``<tag>-plot.png``) to ``--out``; ``--images`` copies the PNGs there
(docs/images), ``--doc`` puts the tables into the file's ``<tag>`` block. The two runs of
docs/windows.md: every window on a few dozen scenes, then the candidates for a faster window
(late starts) on more scenes, without the x0 part:

    .venv/bin/python benchmarks/windows.py --scenes 24 --json src/controlstack/assets/bundle/windows.json \
        --images docs/images --doc docs/windows.md
    .venv/bin/python benchmarks/windows.py --scenes 64 --windows 0-1 0.25-1 0.4-1 0.5-1 0.6-1 0.75-1 \
        --x0-scenes 0 --tag windows-candidates --json src/controlstack/assets/bundle/windows-candidates.json \
        --images docs/images --doc docs/windows.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from docblock import write_block
from PIL import Image
from tqdm.auto import tqdm

import controlstack.pipeline as pipeline_module
from controlstack import Control, Pipeline
from controlstack.evaluation.metrics import edge_f1, edges
from controlstack.io.png import make_labelled_grid
from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene

# prefixes (control early, skip the end), quarters (control in one quarter only) and suffixes
# (skip the first steps): the suffixes are the candidates for a faster window
WINDOWS = ["0-1", "0-0.25", "0.25-0.5", "0.5-0.75", "0.75-1", "0-0.5", "0-0.75", "0-0.9",
           "0.1-1", "0.25-1", "0.4-1", "0.5-1", "0.6-1"]

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--scenes", type=int, default=24)
ap.add_argument("--steps", type=int, default=None, help="default: the bundle's recommended 20")
ap.add_argument("--windows", nargs="+", default=WINDOWS, help="START-END pairs; 0-1 is always measured")
ap.add_argument("--conditions", nargs="+", default=["canny", "depth", "seg", "pose"])
ap.add_argument("--x0-scenes", type=int, default=8,
                help="scenes whose x0 trajectory is decoded at every step (0: skip that part)")
ap.add_argument("--grid-scene", type=int, default=3, help="the scene shown in the grids")
ap.add_argument("--tolerance", type=float, default=0.01,
                help="a window is 'near full' if its mean F1 is at most this much below 0-1's")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--out", default="outputs/windows")
ap.add_argument("--json", default=None, help="also write the numbers here")
ap.add_argument("--images", default=None, help="copy the PNGs here (docs/images)")
ap.add_argument("--doc", default=None, help="put the tables into this file's <tag> block (docs/windows.md)")
ap.add_argument("--tag", default="windows", help="names the outputs (<tag>.json, <tag>-*.png) and the doc block")
args = ap.parse_args()
torch.set_num_threads(args.threads)
windows = ["0-1"] + [w for w in args.windows if w != "0-1"]
span = {w: tuple(float(x) for x in w.split("-")) for w in windows}
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

# ----------------------------------------------------------------------------- model and scenes
pipe = Pipeline.from_pretrained()
size = pipe.native_size
steps = pipe.settings([], args.steps, None, None, None)["steps"]  # the number the windows divide
scenes = [render(sample_scene([HELD_OUT_SEED, i], WorldConfig(size=size)), size) for i in range(args.scenes)]
as_uint8 = lambda a: (a * 255).round().astype(np.uint8)
condition = lambda r, name: Image.fromarray(np.asarray(r[name])).convert("RGB")


def reference(r: dict, name: str) -> np.ndarray:
    """fidelity.py's reference edges: the input edge map for canny, else canny of the real render."""
    return edges(condition(r, name), is_edge_map=True) if name == "canny" else edges(Image.fromarray(np.asarray(r["image"])))


def active_steps(start: float, end: float, n: int) -> int:
    """How many of n steps compute the ControlNet (the README's window rule)."""
    return sum(not (i / n < start or (i + 1) / n > end) for i in range(n))


def generate(r: dict, seed: int, controls=()) -> np.ndarray:
    # steps, cfg, mode left unset: the bundle's recommendation (controlnet + uniform, CFG 7, 20 steps)
    return as_uint8(pipe(r["text"], controls=list(controls), steps=args.steps, seed=seed, progress=False,
                         output_type="np")[0])


# ----------------------------------------------------------------------------- F1 per window
# the no-control image is the same for every condition and window: generated once per scene
seconds: dict[str, list[float]] = {w: [] for w in [*windows, "none"]}  # the speed a window buys
base = []
for i, r in enumerate(tqdm(scenes, desc="no control", unit="scene")):
    t = time.perf_counter()
    base.append(generate(r, i))
    seconds["none"].append(time.perf_counter() - t)
base_edges = [edges(Image.fromarray(b)) for b in base]
f1: dict[str, dict[str, list[float]]] = {}
grid_images: dict[str, dict[str, np.ndarray]] = {}
for name in args.conditions:
    f1[name] = {"none": [edge_f1(reference(r, name), b) for r, b in zip(scenes, base_edges)]}
    f1[name].update({w: [] for w in windows})
    grid_images[name] = {"none": base[min(args.grid_scene, len(scenes) - 1)]}
    for i, r in enumerate(tqdm(scenes, desc=name, unit="scene")):
        ref = reference(r, name)
        for w in windows:
            s, e = span[w]
            t = time.perf_counter()
            g = generate(r, i, [Control(name, condition(r, name), start=s, end=e)])
            seconds[w].append(time.perf_counter() - t)
            f1[name][w].append(edge_f1(ref, edges(Image.fromarray(g))))
            if i == min(args.grid_scene, len(scenes) - 1):
                grid_images[name][w] = g

# ----------------------------------------------------------------------------- when the layout forms
# UniPC keeps the model's data prediction (x0, the clean latents it currently expects) in
# model_outputs; the pipeline builds its scheduler inside __call__, so catch it on the way out
made = []
real_make_scheduler = pipeline_module.make_scheduler


def catching_make_scheduler(*a, **kw):
    made.append(real_make_scheduler(*a, **kw))
    return made[-1]


def x0_trajectory(r: dict, seed: int, controls=()) -> list[np.ndarray]:
    """The decoded x0 prediction after every step (the last one is the output image's latents'
    prediction at the final step)."""
    latents = []
    pipeline_module.make_scheduler = catching_make_scheduler
    try:
        pipe(r["text"], controls=list(controls), steps=args.steps, seed=seed, progress=False, output_type="np",
             step_callback=lambda done, total: latents.append(made[-1].model_outputs[-1].clone()))
    finally:
        pipeline_module.make_scheduler = real_make_scheduler
    return [as_uint8(pipe.decode(z)[0]) for z in latents]


x0_scenes = min(args.x0_scenes, len(scenes))
runs = ["none", *args.conditions] if x0_scenes else []
trajectory: dict[str, dict[str, list[list[float]]]] = {}  # run -> {"to_final", "to_reference"} -> scene -> step
x0_grid: dict[str, list[np.ndarray]] = {}
for run in runs:
    trajectory[run] = {"to_final": [], "to_reference": []}
    for i in tqdm(range(x0_scenes), desc=f"x0 trajectory, {run}", unit="scene"):
        r = scenes[i]
        controls = [] if run == "none" else [Control(run, condition(r, run), start=0.0, end=1.0)]
        frames = x0_trajectory(r, i, controls)
        final = edges(Image.fromarray(frames[-1]))
        # canny: against its input edge map; otherwise (no control too) the real render's edges
        ref = reference(r, run)
        trajectory[run]["to_final"].append([edge_f1(final, edges(Image.fromarray(f))) for f in frames])
        trajectory[run]["to_reference"].append([edge_f1(ref, edges(Image.fromarray(f))) for f in frames])
        if i == min(args.grid_scene, x0_scenes - 1):
            x0_grid[run] = frames

# the signal's share of the latents at each step's timestep (what the sampler starts the step from)
sched = real_make_scheduler("unipc", pipe.scheduler_config)
sched.set_timesteps(steps)
alpha_bar = sched.alphas_cumprod[sched.timesteps.long()]
signal = alpha_bar.sqrt().tolist()
snr = (alpha_bar / (1 - alpha_bar)).tolist()

# ----------------------------------------------------------------------------- table
mean = lambda v: float(np.mean(v))
sem = lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
report: dict = {"scenes": len(scenes), "steps": steps, "settings": pipe.settings(
    [Control(args.conditions[0], condition(scenes[0], args.conditions[0]))], args.steps, None, None, None),
    "tolerance": args.tolerance, "threads": args.threads, "f1": {}, "recommended": {},
    "seconds_per_image": {w: round(mean(v), 4) for w, v in seconds.items()},
    "noise": {"timesteps": sched.timesteps.tolist(), "sqrt_alpha_bar": [round(s, 4) for s in signal],
              "snr": [round(s, 5) for s in snr]},
    "x0": {"scenes": x0_scenes, **{run: {k: [round(mean(col), 4) for col in zip(*v)] for k, v in d.items()}
                                   for run, d in trajectory.items()}}}
header = f"{'condition':9s} {'window':9s} {'CN steps':>8s} {'F1':>6s} {'+-se':>6s} {'vs 0-1':>7s} {'+-se':>6s} {'gain kept':>9s}"
print("\n" + header)
for name in args.conditions:
    full, none = np.array(f1[name]["0-1"]), np.array(f1[name]["none"])
    rows = {}
    for w in [*windows, "none"]:
        v = np.array(f1[name][w])
        cn = 0 if w == "none" else active_steps(*span[w], steps)
        gain = (v.mean() - none.mean()) / max(full.mean() - none.mean(), 1e-9)  # share of the control's effect
        rows[w] = {"cn_steps": cn, "f1": round(mean(v), 4), "se": round(sem(v), 4),
                   "diff_to_full": round(mean(v - full), 4), "diff_se": round(sem(v - full), 4),
                   "gain_kept": round(float(gain), 4)}
        print(f"{name:9s} {w:9s} {cn:8d} {v.mean():6.3f} {sem(v):6.3f} {mean(v - full):+7.3f} {sem(v - full):6.3f} "
              f"{gain:9.0%}")
    report["f1"][name] = rows
    # the fewest ControlNet steps within tolerance of 0-1 (ties: the higher F1); 0-1 itself qualifies
    ok = [w for w in windows if rows[w]["diff_to_full"] >= -args.tolerance]
    best = min(ok, key=lambda w: (rows[w]["cn_steps"], -rows[w]["f1"]))
    report["recommended"][name] = {"start": span[best][0], "end": span[best][1], "window": best,
                                   "cn_steps": rows[best]["cn_steps"], "f1": rows[best]["f1"],
                                   "diff_to_full": rows[best]["diff_to_full"]}
    print()
print(f"recommended (fewest ControlNet steps within {args.tolerance} F1 of 0-1): "
      + ", ".join(f"{n} {v['window']} ({v['cn_steps']}/{steps} steps, {v['diff_to_full']:+.3f})"
                  for n, v in report["recommended"].items()))
print("seconds per image (1 thread, shared CPU): "
      + ", ".join(f"{w} {s:.2f}" for w, s in report["seconds_per_image"].items()))
if x0_scenes:
    print(f"\n{'step':>4s} {'t':>4s} {'sqrt(a)':>7s}  x0 F1 to final: " + " ".join(f"{r:>6s}" for r in trajectory)
          + "   x0 F1 to reference: " + " ".join(f"{r:>6s}" for r in trajectory))
    for k in range(steps):
        print(f"{k:4d} {int(sched.timesteps[k]):4d} {signal[k]:7.3f}  {'':16s}"
              + " ".join(f"{report['x0'][r]['to_final'][k]:6.3f}" for r in trajectory) + f"   {'':20s}"
              + " ".join(f"{report['x0'][r]['to_reference'][k]:6.3f}" for r in trajectory))

# ----------------------------------------------------------------------------- pictures
tag = args.tag
pngs = [f"{tag}-grid.png", f"{tag}-plot.png", *([f"{tag}-x0.png"] if x0_scenes else [])]
g = min(args.grid_scene, len(scenes) - 1)
grid_rows = [(name, [condition(scenes[g], name), *(Image.fromarray(grid_images[name][w]) for w in [*windows, "none"])])
             for name in args.conditions]
make_labelled_grid(grid_rows, ["condition", *windows, "none"]).save(out / f"{tag}-grid.png")
if x0_scenes:
    shown = list(range(0, steps, max(1, steps // 10)))[:10] + [steps - 1]
    make_labelled_grid([(run if run == "none" else f"{run} 0-1", [Image.fromarray(x0_grid[run][k]) for k in shown])
                        for run in x0_grid], [f"step {k + 1}" for k in shown]).save(out / f"{tag}-x0.png")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2 if x0_scenes else 1, figsize=(13 if x0_scenes else 7, 4.6), squeeze=False)
a = axes[0][0]
x = np.arange(len(windows) + 1)
for name in args.conditions:
    rows = report["f1"][name]
    a.errorbar(x, [rows[w]["f1"] for w in [*windows, "none"]], yerr=[rows[w]["se"] for w in [*windows, "none"]],
               marker="o", capsize=2, label=name)
a.set_xticks(x, [f"{w}\n{report['f1'][args.conditions[0]][w]['cn_steps']}" for w in [*windows, "none"]], fontsize=7,
             rotation=45)
a.set_xlabel(f"window (start-end) / ControlNet steps of {steps}")
a.set_ylabel("structure F1 (fidelity.py)")
a.set_title(f"F1 per window, {len(scenes)} held-out scenes (mean +- s.e.)")
a.grid(alpha=0.3)
a.legend(fontsize=8)
if x0_scenes:
    b = axes[0][1]
    k = np.arange(1, steps + 1)
    for run in trajectory:
        b.plot(k, report["x0"][run]["to_final"], marker=".",
               label=f"x0 vs final, {run if run == 'none' else run + ' 0-1'}")
    b.plot(k, signal, "k--", label="sqrt(alpha_bar) of the step's input")
    b.set_xlabel("sampling step")
    b.set_ylabel("canny F1 of the decoded x0 prediction vs the final image")
    b.set_title(f"when the layout forms ({x0_scenes} scenes)")
    b.set_ylim(0, 1.02)
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / f"{tag}-plot.png", dpi=110)

(out / f"{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
if args.images:
    Path(args.images).mkdir(parents=True, exist_ok=True)
    for png in pngs:
        shutil.copy(out / png, Path(args.images) / png)
if args.doc:
    # rows: windows; columns: each condition's F1 and its paired difference to 0-1 (+- standard error)
    st = report["settings"]
    command = "benchmarks/windows.py" + (f" --tag {tag}" if tag != "windows" else "")
    lines = [(f"`{command}` (numbers from the last run): {len(scenes)} held-out scenes, "
             f"{steps} UniPC steps, CFG {st['cfg']:g}, mode `{st['mode']}` "
             f"({', '.join(f'{k}={v}' for k, v in (st['mode_options'] or {}).items())}), fixed seeds, "
             f"{args.threads} thread. Structure F1 as `benchmarks/fidelity.py` computes it; in brackets the paired "
             "difference to the full window 0-1 +- its standard error."), "",
             "| window | ControlNet steps | " + " | ".join(args.conditions) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in args.conditions) + " |"]
    for w in [*windows, "none"]:
        cells = []
        for name in args.conditions:
            r = report["f1"][name][w]
            cells.append(f"{r['f1']:.3f}" if w == "0-1" else f"{r['f1']:.3f} ({r['diff_to_full']:+.3f} +- {r['diff_se']:.3f})")
        label = "no control" if w == "none" else w
        lines.append(f"| {label} | {report['f1'][args.conditions[0]][w]['cn_steps']} | " + " | ".join(cells) + " |")
    lines += ["", f"Fewest ControlNet steps within {args.tolerance} F1 of 0-1: "
              + ", ".join(f"**{n}** {v['window']} ({v['cn_steps']} of {steps} steps, {v['diff_to_full']:+.3f})"
                          for n, v in report["recommended"].items()) + "."]
    if x0_scenes:
        lines += ["", (f"When the layout forms ({x0_scenes} scenes): canny F1 of the decoded x0 prediction after "
                       "each step against the final image, and against the reference (the input edge map for canny, "
                       "the real render's edges otherwise); `sqrt(a)` is the signal's share of the step's input "
                       "latents."), "",
                  "| step | t | sqrt(a) | " + " | ".join(f"to final, {r}" for r in trajectory) + " | "
                  + " | ".join(f"to reference, {r}" for r in trajectory) + " |",
                  "| ---: | ---: | ---: | " + " | ".join("---:" for _ in range(2 * len(trajectory))) + " |"]
        for k in range(steps):
            lines.append(f"| {k + 1} | {int(sched.timesteps[k])} | {signal[k]:.3f} | "
                         + " | ".join(f"{report['x0'][r]['to_final'][k]:.3f}" for r in trajectory) + " | "
                         + " | ".join(f"{report['x0'][r]['to_reference'][k]:.3f}" for r in trajectory) + " |")
    rel = lambda png: os.path.relpath(Path(args.images or out) / png, Path(args.doc).parent)
    lines += ["", f"![F1 per window{'; x0 structure over the steps' if x0_scenes else ''}]({rel(f'{tag}-plot.png')})",
              "", f"![scene {g}: condition | each window | no control]({rel(f'{tag}-grid.png')})"]
    if x0_scenes:
        lines += ["", f"![scene {g}: the decoded x0 prediction after each step]({rel(f'{tag}-x0.png')})"]
    write_block(Path(args.doc), f"<!-- {tag}:start -->", f"<!-- {tag}:end -->", lines)
print(f"wrote {out}/{tag}.json, " + ", ".join(pngs))
