"""``controlstack demo``: the main job on the embedded default model, as one labelled grid PNG.

Conditions come from held-out procedural world scenes (seeds ``1_000_000 + i``, never used in
training; exact ground truth of each condition type) and from a real photograph that ships with
scikit-image (``skimage.data.astronaut``, canny extracted by the ``canny`` annotator). Rows:

* one per bundled ControlNet: condition | generated | the scene's real render | no control;
* two controls combined (depth + pose of one scene, summed as diffusers' Multi-ControlNet does);
* the photograph: its canny map | generated | the photograph | no control;
* OmniControlNet's whole pipeline on the photograph: depth (the bundled multi-task predictor) and
  canny made from it, then one Omni ControlNet for both (``Pipeline.from_image``).

Writes ``<out>/demo.png`` (generation parameters in its PNG text, sd-webui's ``parameters`` chunk)
and prints its path.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from controlstack import annotators
from controlstack.cli.text import DefaultsFormatter
from controlstack.io.images import resize_image

PHOTO_PROMPT = "a standing person in white on grass"  # world words only: the bundle's tokenizer
OMNI_TASKS = ("depth", "canny")  # the demo's from-image row


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the bundled default model on every bundled control",
                       description="Run the bundled default model on every bundled control; write one labelled "
                                   "grid PNG.", formatter_class=DefaultsFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (the grid is <out>/demo.png)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--seed", type=int, default=0, help="seed of every row")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    # the bundle's recommended setting (docs/training.md): control on the conditional CFG half
    p.add_argument("--mode", default="controlnet", help="control mode (default: the bundle's, controlnet)")
    p.add_argument("--layer-weights", default="uniform", choices=("resolution", "soft", "uniform"),
                   help="with --mode controlnet")
    p.add_argument("--optimize", default="parity", choices=("parity", "compiled", "fast"),
                   help="speed tier (docs/speed.md); the first compiled run compiles every model once")
    p.set_defaults(func=run)


def scene(index: int, size: int) -> dict:
    """A held-out world scene rendered at ``size``: condition images, the real render, its caption."""
    from controlstack.world import (  # local: keeps CLI start-up light
        HELD_OUT_SEED,
        WorldConfig,
        render,
        sample_scene,
    )

    return render(sample_scene([HELD_OUT_SEED, index], WorldConfig(size=size)), size)


def photo_canny(size: int) -> tuple[Image.Image, Image.Image]:
    """scikit-image's astronaut photograph, centre-cropped to ``size``, and its canny map."""
    photo = resize_image(Image.fromarray(skimage.data.astronaut()), size, size, "crop_and_resize")
    return photo, annotators.get("canny")(photo)


def as_image(array) -> Image.Image:
    return Image.fromarray(np.asarray(array)).convert("RGB")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # local: keeps CLI start-up light

    from controlstack import Control, Pipeline, assets  # local: keeps CLI start-up light
    from controlstack.io.png import atomic_save, make_labelled_grid  # local: keeps CLI start-up light
    from controlstack.prompting import project_prompts  # local: keeps CLI start-up light
    from controlstack.world import HELD_OUT_SEED  # local: keeps CLI start-up light

    pipe = Pipeline.from_pretrained().optimize(args.optimize)
    size = pipe.native_size
    # MI models are measured elsewhere; the Omni ControlNet gets the from-image row below
    names = sorted(n for n in pipe.controlnets if not n.startswith("mi-") and n != "omni")
    kw = dict(steps=args.steps, seed=args.seed, cfg=args.cfg, width=size, height=size, progress=False)
    options = {"layer_weights": args.layer_weights} if args.mode == "controlnet" else None

    # (label, prompt, controls, condition tile, reference tile)
    jobs: list[tuple[str, str, list, Image.Image, Image.Image]] = []
    for i, name in enumerate(names):
        s = scene(i, size)
        if name in s:
            jobs.append((name, s["text"], [Control(name, as_image(s[name]))], as_image(s[name]), as_image(s["image"])))
    pair = [n for n in ("depth", "pose") if n in names]
    if len(pair) == 2:
        s = scene(len(names), size)
        blend = Image.blend(as_image(s[pair[0]]), as_image(s[pair[1]]), 0.5)
        jobs.append((" + ".join(pair), s["text"], [Control(n, as_image(s[n])) for n in pair], blend,
                     as_image(s["image"])))
    if "canny" in names:
        photo, edges = photo_canny(size)
        jobs.append(("photo canny", PHOTO_PROMPT, [Control("canny", edges)], edges, photo))

    if "omni" in pipe.controlnets and assets.predictor_folder() is not None:
        photo, _ = photo_canny(size)
        jobs.append(("photo -> depth + canny (omni)", PHOTO_PROMPT, OMNI_TASKS, None, photo))

    rows, started = [], time.perf_counter()
    # every prompt here is the project's own (world captions, PHOTO_PROMPT): no length warnings
    with project_prompts():
        for label, prompt, controls, condition, reference in tqdm(jobs, desc="demo", unit="row", dynamic_ncols=True):
            if controls is OMNI_TASKS:  # the integrated path: conditions made from the photograph in the call
                result = pipe.from_image(reference, list(OMNI_TASKS), prompt, mode=args.mode, mode_options=options,
                                         return_result=True, **kw)
                generated, condition = result.images[0], Image.blend(*result.conditions, 0.5)
                rows.append((label, [condition, generated, reference, pipe(prompt, **kw)[0]]))
                continue
            generated = pipe(prompt, controls=controls, mode=args.mode, mode_options=options, **kw)[0]
            plain = pipe(prompt, **kw)[0]
            rows.append((label, [condition, generated, reference, plain]))
    seconds = time.perf_counter() - started
    images = 2 * len(rows)
    grid = make_labelled_grid(rows, ["condition", "generated", "real", "no control"])
    params = {"prompt": " | ".join(f"{label}: {prompt}" for label, prompt, *_ in jobs), "steps": args.steps, "seed": args.seed,
              "cfg": args.cfg, "mode": args.mode, **({"mode_options": options} if options else {}),
              "model": pipe.name, "width": size, "height": size, "scheduler": "unipc",
              "held_out_scenes": f"world seeds [{HELD_OUT_SEED}, i]", "photo": "skimage.data.astronaut"}
    out = atomic_save(grid, Path(args.out) / "demo.png", params)
    if assets.is_placeholder():
        print("note: no trained bundle in this checkout; the demo ran on a tiny random placeholder model")
    print(f"{images} images in {seconds:.1f} s ({seconds / images:.2f} s per image, {pipe.tier.describe()})")
    print(out)
    return 0
