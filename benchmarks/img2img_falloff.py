"""img2img on the bundled model: how fast the init image is lost as the strength grows.

``pipe(prompt, controls, init_image=photo, strength=s)`` is SDEdit as diffusers runs it: the photo
is resized to the output size and encoded (``latent_dist.sample``: one draw from the VAE's
posterior, from the seed's generator), and of ``steps`` steps only the last ``int(steps * s)`` run,
from those latents noised to the first of them. ``int(steps * s) == 0`` (strength 0, or any
strength below 1 / steps) runs no step at all and decodes the encoded latents: the photo's VAE
round trip, not the photo. This measures, on held-out world scenes (seeds 1_000_000 + i, never used
in training) and on a real photograph (scikit-image's astronaut, centre-cropped to 128 px as the
demo does), the similarity of the output to the init image per strength:

* mean absolute difference (/255) and PSNR (dB) of the pixels, SSIM (scikit-image, RGB);
* structure: F1 (2 px tolerance, ``evaluation.metrics.edge_f1``) of the output's canny vs the
  init image's canny;

without a control and with the init's own canny map through the bundled canny ControlNet (the
bundle's recommended settings: 20 UniPC steps, CFG 7, ``controlnet`` mode, uniform layer
weights), next to the VAE round trip alone (encode, posterior mean, decode): the ceiling of
anything that decodes through the bundled 8-channel VAE.

Prints a table, writes ``img2img.json``, a plot (``img2img-plot.png``) and a grid (``img2img-grid.png``:
init | VAE round trip | each strength) to ``--out``; ``--images`` copies the PNGs there and ``--doc``
puts the table into a file's ``img2img`` block (docs/img2img.md).

    .venv/bin/python benchmarks/img2img_falloff.py --scenes 48 --doc docs/img2img.md --images docs/images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import skimage.data
import torch
from docblock import write_block
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm.auto import tqdm

from controlstack import Control, Pipeline, annotators
from controlstack.evaluation.metrics import edge_f1, edges
from controlstack.evaluation.mi import to_vae_input
from controlstack.io.images import resize_image
from controlstack.io.png import make_labelled_grid
from controlstack.sampling import make_scheduler
from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene

PHOTO_PROMPT = "a standing person in white on grass"  # the demo's: world words only (the bundle's tokenizer)

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--scenes", type=int, default=48, help="held-out world scenes")
ap.add_argument("--photo-seeds", type=int, default=8, help="seeds the photograph is run with (one image, so average seeds)")
ap.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0])
ap.add_argument("--steps", type=int, default=None, help="default: the bundle's recommended 20")
ap.add_argument("--grid-scenes", type=int, default=2, help="world scenes in the grid (the photo is added)")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--out", default="outputs/img2img")
ap.add_argument("--json", default=None, help="also write the numbers here")
ap.add_argument("--images", default=None, help="copy the PNGs here (docs/images)")
ap.add_argument("--doc", default=None, help="put the table into this file's img2img block (docs/img2img.md)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

# ----------------------------------------------------------------------------- model and inputs
pipe = Pipeline.from_pretrained()
size = pipe.native_size
steps = pipe.settings([], args.steps, None, None, None)["steps"]
canny = annotators.get("canny")
# (source, prompt, init image, seed): the photo once per seed, each scene with its own seed
scenes = [render(sample_scene([HELD_OUT_SEED, i], WorldConfig(size=size)), size) for i in range(args.scenes)]
inputs = [("world", r["text"], Image.fromarray(np.asarray(r["image"])).convert("RGB"), i) for i, r in enumerate(scenes)]
photo = resize_image(Image.fromarray(skimage.data.astronaut()), size, size, "crop_and_resize")
inputs += [("photo", PHOTO_PROMPT, photo, seed) for seed in range(args.photo_seeds)]


def similarity(init: np.ndarray, image: np.ndarray) -> dict[str, float]:
    """How close ``image`` is to ``init`` (both uint8 HxWx3): pixels, SSIM, and canny structure."""
    diff = np.abs(init.astype(np.float64) - image.astype(np.float64))
    return {"mad": float(diff.mean() / 255),
            "psnr": float(peak_signal_noise_ratio(init, image, data_range=255)),
            "ssim": float(structural_similarity(init, image, channel_axis=2, data_range=255)),
            "f1": float(edge_f1(edges(Image.fromarray(init)), edges(Image.fromarray(image))))}


def vae_roundtrip(image: Image.Image) -> np.ndarray:
    """decode(encode(x)) with the posterior mean: the best the VAE gives back."""
    with torch.no_grad():
        rec = pipe.vae.decode(pipe.vae.encode(to_vae_input([np.asarray(image)])).latent_dist.mode()).sample
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------- measure
runs = ["no control", "canny"]
scores: dict = {src: {run: {s: [] for s in args.strengths} for run in runs} for src in ("world", "photo")}
ceiling: dict = {"world": [], "photo": []}
grid: list[tuple[str, list[Image.Image]]] = []
shown = set(range(min(args.grid_scenes, args.scenes))) | {args.scenes}  # a few scenes and the photo's first seed
for k, (src, prompt, init, seed) in enumerate(tqdm(inputs, desc="img2img", unit="image")):
    a = np.asarray(init)
    rt = vae_roundtrip(init)
    if src == "world" or seed == 0:  # the round trip is deterministic: once per image
        ceiling[src].append(similarity(a, rt))
    for run in runs:
        # the whole window, explicitly: a window counts the steps that run, and a recommended one would
        # change these numbers whenever the bundle's recommendation does
        controls = [] if run == "no control" else [Control("canny", canny(init), start=0.0, end=1.0)]
        row = [init, Image.fromarray(rt)]
        for s in args.strengths:
            # steps / cfg / mode unset: the bundle's recommendation (20 UniPC steps, CFG 7, controlnet + uniform)
            g = (pipe(prompt, controls=controls, init_image=init, strength=s, steps=args.steps, seed=seed,
                      progress=False, output_type="np")[0] * 255).round().astype(np.uint8)
            scores[src][run][s].append(similarity(a, g))
            row.append(Image.fromarray(g))
        if k in shown:
            grid.append((f"{'photo' if src == 'photo' else f'scene {k}'}, {run}", row))

# the noise level each strength starts from: the first timestep that runs and its signal share
sched = make_scheduler("unipc", pipe.scheduler_config)
sched.set_timesteps(steps)
alpha_bar = sched.alphas_cumprod
schedule = {}
for s in args.strengths:
    n = min(int(steps * s), steps)
    t = int(sched.timesteps[steps - n]) if n else None
    schedule[s] = {"steps_run": n, "first_timestep": t,
                   "sqrt_alpha_bar": round(float(alpha_bar[t].sqrt()), 4) if n else 1.0}

# ----------------------------------------------------------------------------- table
metrics = ("mad", "psnr", "ssim", "f1")
mean = lambda rows, m: float(np.mean([r[m] for r in rows]))
report: dict = {"scenes": args.scenes, "photo_seeds": args.photo_seeds, "steps": steps, "threads": args.threads,
                "settings": pipe.settings([Control("canny", photo)], args.steps, None, None, None),
                "photo": "skimage.data.astronaut, centre-cropped to the native size", "schedule": schedule,
                "vae_roundtrip": {src: {m: round(mean(v, m), 4) for m in metrics} for src, v in ceiling.items()},
                "similarity": {src: {run: {str(s): {m: round(mean(v, m), 4) for m in metrics} for s, v in d.items()}
                                     for run, d in by.items()} for src, by in scores.items()}}
table = ["| init | control | strength | steps run | first t | sqrt(a) | abs diff /255 | PSNR dB | SSIM | canny F1 |",
         "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for src in ("world", "photo"):
    c = report["vae_roundtrip"][src]
    table.append(f"| {src} | VAE round trip (posterior mean) | | | | | {c['mad']:.4f} | {c['psnr']:.2f} | {c['ssim']:.3f} | "
                 f"{c['f1']:.3f} |")
    for run in runs:
        for s in args.strengths:
            v, sc = report["similarity"][src][run][str(s)], schedule[s]
            table.append(f"| {src} | {run} | {s:g} | {sc['steps_run']} | {sc['first_timestep'] or '-'} | "
                         f"{sc['sqrt_alpha_bar']:.3f} | {v['mad']:.4f} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['f1']:.3f} |")
print("\n" + "\n".join(table))

# ----------------------------------------------------------------------------- pictures
columns = ["init", "VAE round trip", *(f"strength {s:g}" for s in args.strengths)]
make_labelled_grid(grid, columns).save(out / "img2img-grid.png")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 4, figsize=(16, 4))
labels = {"mad": "mean abs diff to init (/255)", "psnr": "PSNR to init (dB)", "ssim": "SSIM to init",
          "f1": "canny F1 vs init's canny"}
for ax, m in zip(axes, metrics):
    for (src, colour) in (("world", "tab:blue"), ("photo", "tab:orange")):
        for run, style in (("no control", "-o"), ("canny", "--s")):
            ax.plot(args.strengths, [report["similarity"][src][run][str(s)][m] for s in args.strengths], style,
                    color=colour, label=f"{src} ({args.scenes if src == 'world' else 'astronaut'}), {run}")
        ax.axhline(report["vae_roundtrip"][src][m], color=colour, ls=":", lw=1,
                   label=f"{src}: VAE round trip")
    ax.set_xlabel(f"strength ({steps} steps: int(steps*strength) run)")
    ax.set_title(labels[m], fontsize=10)
    ax.grid(alpha=0.3)
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "img2img-plot.png", dpi=110)

(out / "img2img.json").write_text(json.dumps(report, indent=2) + "\n")
if args.json:
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
if args.images:
    Path(args.images).mkdir(parents=True, exist_ok=True)
    for png in ("img2img-plot.png", "img2img-grid.png"):
        shutil.copy(out / png, Path(args.images) / png)
if args.doc:
    rel = lambda png: os.path.relpath(Path(args.images or out) / png, Path(args.doc).parent)
    st = report["settings"]
    lines = [(f"`benchmarks/img2img_falloff.py` (numbers from the last run): {args.scenes} held-out world scenes "
             f"(seed i each) and the astronaut photograph ({args.photo_seeds} seeds), {steps} UniPC steps, "
             f"CFG {st['cfg']:g}, the canny rows in mode `{st['mode']}` "
             f"({', '.join(f'{k}={v}' for k, v in (st['mode_options'] or {}).items())}) with the init's own canny map (window 0-1); "
             "every number compares the output with the init image. `first t` is the timestep the run starts "
             "from, `sqrt(a)` the init's share of the latents there."), "", *table, "",
             f"![init | VAE round trip | strength {' | '.join(f'{s:g}' for s in args.strengths)}]({rel('img2img-grid.png')})",
             "", f"![similarity to the init image per strength]({rel('img2img-plot.png')})"]
    write_block(Path(args.doc), "<!-- img2img:start -->", "<!-- img2img:end -->", lines)
print(f"wrote {out}/img2img.json, img2img-plot.png, img2img-grid.png")
