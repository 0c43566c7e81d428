"""``controlstack generate``: text-to-image with any number of controls.

Flags are a contract (scripts and other tools rely on them): --model --prompt --negative --steps
--cfg --scheduler --seed --width --height --batch --mode --layer-weights --out, repeatable
``--control MODEL:IMAGE[:WEIGHT[:START[:END]]]`` (WEIGHT a number or a strength schedule
``P@W,P@W,...``) and ``--mask I:FILE``, ``--preprocess`` (every control through the annotator of the
condition its ControlNet takes), ``--module I:NAME[,k=v...]`` (one control's annotator), ``--init IMAGE --strength S
--inpaint-mask FILE`` (img2img / inpainting). An Omni ControlNet
takes its task after a slash: ``--control omni/depth:depth.png:0.8``.
OmniControlNet's integrated path: ``--from-image photo.png --tasks depth,canny`` makes the
conditions from the photo and generates from them in the same call (``Pipeline.from_image``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
from pathlib import Path

from controlstack import annotators, assets
from controlstack.cli.annotate import parse_pairs
from controlstack.cli.text import DefaultsFormatter
from controlstack.errors import ControlstackError
from controlstack.hires import UPSCALERS
from controlstack.inpaint import FILLS, InpaintOptions
from controlstack.io.images import load_image
from controlstack.io.paths import output_folder
from controlstack.lora import read

MAX_SEED = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images with controls",
                       description="Generate images from a prompt and any number of controls.",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--model", default=None, help="diffusers SD folder or single-file checkpoint (default: bundled)")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="with a single-file --model: a diffusers SD folder (or its model_index.json's folder) for "
                        "the architecture")
    p.add_argument("--prompt", required=True, help="what to generate")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommendation, else 20)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's recommendation, else 7.5)")
    p.add_argument("--scheduler", default=None,
                   help="ddim, euler, euler_a, dpmpp_2m, unipc, ... (default: unipc) -- on a flow-matching base "
                        "(SD3): euler, its default")
    p.add_argument("--seed", type=int, default=-1, help="seed (-1: random, recorded in the PNG)")
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--original-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL micro-conditioning: the size the image claims to come from (default: the output size)")
    p.add_argument("--crops-coords-top-left", type=int, nargs=2, default=None, metavar=("TOP", "LEFT"),
                   help="SDXL micro-conditioning: the crop's top-left corner (default: 0 0)")
    p.add_argument("--target-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                   help="SDXL micro-conditioning: the intended size (default: the output size)")
    p.add_argument("--batch", type=int, default=1, help="images per run (one generator, as diffusers)")
    p.add_argument("--mode", default=None,
                   help="control mode: balanced, prompt, controlnet, mi (also sum, guess); default: what the "
                        "ControlNets recommend (the bundled ones: controlnet), else balanced")
    p.add_argument("--layer-weights", default=None, choices=("resolution", "soft", "uniform"),
                   help="with --mode controlnet: per-layer weights (default: the ControlNets' recommendation -- the "
                        "bundled ones: uniform -- else resolution)")
    p.add_argument("--control", action="append", default=[], metavar="MODEL:IMAGE[:WEIGHT[:START[:END]]]",
                   help="a ControlNet (bundled name or path; an Omni ControlNet with its task: omni/depth) "
                        "and its condition image; WEIGHT is a number or a strength schedule P@W,P@W,... (weight W "
                        "at sampling progress P in [0, 1], linear between, e.g. canny:edges.png:0@1,1@0.3:0:0.8); "
                        "START / END left out: the ControlNet's recommended window, else 0 and 1; repeatable")
    p.add_argument("--init", default=None, metavar="IMAGE", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=0.75,
                   help="with --init: denoising strength in [0, 1]: the last int(steps * S) steps run, from the "
                        "image noised to that point; 0 (or under 1/steps) runs none and returns the image's VAE "
                        "round trip at the output size, not the image -- on the bundled model's small VAE a photo "
                        "already loses detail there, and every step repaints it towards the bundle's world "
                        "(docs/img2img.md); 1 repaints all")
    p.add_argument("--inpaint-mask", default=None, metavar="FILE",
                   help="with --init: repaint where this mask is white (inpainting)")
    p.add_argument("--hires", type=float, default=None, metavar="SCALE",
                   help="hires fix: generate, upscale by SCALE, img2img at the larger size with the same controls")
    p.add_argument("--hires-strength", type=float, default=0.5, help="with --hires: the second pass's strength")
    p.add_argument("--hires-steps", type=int, default=None,
                   help="with --hires: the second pass's steps (default: --steps; img2img runs int(steps * strength))")
    p.add_argument("--hires-upscaler", default="lanczos", choices=list(UPSCALERS),
                   help="with --hires: lanczos / nearest upscale the first pass's pixels, latent* its latents "
                        "(sd-webui's default 'Latent', never decoded in between)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA to the base (kohya / sd-webui, diffusers or PEFT .safetensors) at WEIGHT "
                        "(default 1); repeatable, each with its own weight")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="where sd-webui's prompt syntax <lora:NAME:WEIGHT> finds NAME.safetensors")
    p.add_argument("--ip-adapter", action="append", default=[], metavar="FILE",
                   help="load an IP-Adapter (diffusers / original .safetensors); repeatable, one --image-prompt each")
    p.add_argument("--image-encoder", default=None, metavar="DIR",
                   help="with --ip-adapter: its CLIP image encoder (a transformers CLIPVisionModelWithProjection folder)")
    p.add_argument("--image-prompt", action="append", default=[], metavar="IMAGE[:SCALE]",
                   help="a reference image at SCALE (default 1), one per --ip-adapter, in order; without "
                        "--ip-adapter on the bundled base: the bundled IP-Adapter")
    p.add_argument("--mask-blur", type=int, default=4, help="with --inpaint-mask: blur the mask by this radius (px)")
    p.add_argument("--mask-invert", action="store_true", help="with --inpaint-mask: repaint where it is black")
    p.add_argument("--inpaint-full-res", action="store_true",
                   help="with --inpaint-mask: sd-webui's 'Only masked' -- generate the mask's region (plus "
                        "--inpaint-padding) at the full output size and paste it back into the init image")
    p.add_argument("--inpaint-padding", type=int, default=32, help="with --inpaint-full-res: pixels around the mask")
    p.add_argument("--inpainting-fill", default="original", choices=list(FILLS),
                   help="with --inpaint-mask: what the masked region starts from (sd-webui's 'Masked content')")
    p.add_argument("--no-paste-back", action="store_true",
                   help="with --inpaint-mask: keep the decoded image as it is (diffusers' output) instead of "
                        "pasting the init image back outside the mask, as sd-webui does")
    p.add_argument("--from-image", default=None, metavar="PHOTO",
                   help="make the --tasks conditions from this photo, then generate with the Omni ControlNet")
    p.add_argument("--tasks", default=None, help="with --from-image: comma-separated tasks, e.g. depth,canny")
    p.add_argument("--omni", default="omni", help="with --from-image: the Omni ControlNet (bundled name or path)")
    p.add_argument("--mask", action="append", default=[], metavar="I:FILE",
                   help="region mask for control I (0-based); repeatable")
    p.add_argument("--preprocess", action="store_true",
                   help="run each control's image through the annotator of the condition its ControlNet takes first "
                        "(its training record, else its name: mi-canny -> canny; an Omni task's own)")
    p.add_argument("--module", action="append", default=[], metavar="I:NAME[,k=v...]",
                   help="sd-webui's preprocessor module for control I (0-based): run annotator NAME with these "
                        "parameters on its image first, e.g. 0:canny,low_threshold=50; repeatable")
    p.add_argument("--resize-mode", default="just_resize",
                   help="just_resize, crop_and_resize or resize_and_fill")
    p.add_argument("--out", default="outputs", help="output folder (files are never overwritten)")
    p.add_argument("--grid", action="store_true",
                   help="also write a grid of the batch (with --from-image: photo | each condition | generated)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints you trust")
    p.add_argument("--optimize", default="parity", choices=("parity", "compiled", "fast"),
                   help="speed tier: parity (float32, as diffusers), compiled (same math, compiled once per size "
                        "and cached), fast (compiled + measured approximations); docs/speed.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


CONTROL_SYNTAX = "MODEL:IMAGE[:WEIGHT[:START[:END]]]"
FIELDS = ("weight", "start", "end")
# what someone typing a number or a P@W schedule writes (and a file name rarely is, whole)
NUMBER_LIKE = re.compile(r"[-+0-9.,@eE ]*[0-9@][-+0-9.,@eE ]*")


def parse_schedule(text: str) -> tuple[tuple[float, float], ...] | None:
    """``P@W,P@W,...`` -> keyframes ((progress, weight), ...); None when ``text`` is not written as one."""
    try:
        return tuple((float(p), float(w)) for p, w in (item.split("@") for item in text.split(",")))
    except ValueError:  # a non-number, or an item without exactly one '@'
        return None


def parse_field(text: str) -> float | tuple[tuple[float, float], ...] | None:
    """A WEIGHT / START / END field: a number, a schedule (WEIGHT only; checked by the caller), or None."""
    try:
        return float(text)
    except ValueError:
        return parse_schedule(text) if "@" in text else None


def field_error(spec: str, position: int, text: str) -> ControlstackError:
    """The one-line error for field ``text`` at WEIGHT / START / END ``position``."""
    name = FIELDS[position] if position < len(FIELDS) else None
    if name is None:
        return ControlstackError(f"--control '{spec}' has too many fields; use {CONTROL_SYNTAX}")
    if position == 0 and "@" in text:
        return ControlstackError(f"--control '{spec}': weight schedule '{text}' must be PROGRESS@WEIGHT pairs "
                                 "separated by commas, e.g. 0@1,1@0.3")
    schedule = " (a P@W schedule goes in the WEIGHT field)" if "@" in text else ""
    return ControlstackError(f"--control '{spec}': {name} '{text}' is not a number{schedule}; use {CONTROL_SYNTAX}")


def parse_control(spec: str) -> tuple[str, str, float | tuple, float | None, float | None]:
    """``MODEL:IMAGE[:WEIGHT[:START[:END]]]``; WEIGHT is a number or a strength schedule ``P@W,P@W,...``
    (keyframes in sampling progress, as ``Control(weight=[(P, W), ...])``). Fields are taken from the
    right so paths may hold ':'."""
    parts = spec.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ControlstackError(f"--control '{spec}' must look like {CONTROL_SYNTAX}")
    model, rest, fields = parts[0], parts[1:], []
    while len(rest) > 1 and len(fields) < 3 and parse_field(rest[-1]) is not None:
        fields.insert(0, rest.pop())
    image = ":".join(rest)
    if len(rest) > 1 and not os.path.exists(image):
        # 'edges.png:abc': a prefix of the image exists, or the tail was meant as a number -- name the
        # bad field rather than say that 'edges.png:abc' does not exist
        cut = next((k for k in range(len(rest) - 1, 0, -1) if os.path.isfile(":".join(rest[:k]))), None)
        if cut is None and NUMBER_LIKE.fullmatch(rest[-1]):
            cut = len(rest) - 1
        if cut is not None:  # then a field below fails: the one that stopped the scan from the right
            fields = rest[cut:] + fields
    if len(fields) > 3:
        raise field_error(spec, 3, fields[3])
    values = [parse_field(text) for text in fields]
    for position, (text, value) in enumerate(zip(fields, values)):
        if value is None or (position > 0 and isinstance(value, tuple)):
            raise field_error(spec, position, text)
    # an unset START / END stays None: the pipeline gives it the ControlNet's recommended window
    weight, start, end = values + [1.0, None, None][len(values):]
    if isinstance(weight, tuple):
        from controlstack.control import validate_weight  # local: keeps CLI start-up light

        try:
            weight = validate_weight(weight)
        except ControlstackError as exc:
            raise ControlstackError(f"--control '{spec}': {exc}; e.g. 0@1,1@0.3") from None
    return model, image, weight, start, end


def split_task(model: str) -> tuple[str, str | None]:
    """``omni/depth`` -> ("omni", "depth"); a path that exists as given keeps its slashes
    (``models/omni/depth`` is a task of ``models/omni`` unless ``models/omni/depth`` itself exists)."""
    if "/" not in model or os.path.exists(model):
        return model, None
    base, task = model.rsplit("/", 1)
    if not base or not task:
        raise ControlstackError(f"--control model '{model}' must look like MODEL or MODEL/TASK (e.g. omni/depth)")
    return base, task


def parse_modules(specs: list[str], n_controls: int) -> dict[int, tuple[str, dict]]:
    """``I:NAME[,k=v...]`` -> {I: (NAME, typed params)}; names and parameters are checked now."""
    out: dict[int, tuple[str, dict]] = {}
    for spec in specs:
        index, _, rest = spec.partition(":")
        name, *pairs = rest.split(",")
        if not index.isdigit() or not name:
            raise ControlstackError(f"--module '{spec}' must look like I:NAME[,k=v...] with I a control index")
        if int(index) >= n_controls:
            raise ControlstackError(f"--module {index} refers to control {index}, but only {n_controls} given")
        params = annotators.annotator_class(name).parse(parse_pairs(pairs)) if pairs else {}
        annotators.get(name, **params)  # unknown parameters / bad values fail here, in one line
        out[int(index)] = (name, params)
    return out


def parse_masks(specs: list[str], n_controls: int) -> dict[int, str]:
    masks = {}
    for spec in specs:
        index, _, path = spec.partition(":")
        if not index.isdigit() or not path:
            raise ControlstackError(f"--mask '{spec}' must look like I:FILE with I a control index")
        if int(index) >= n_controls:
            raise ControlstackError(f"--mask {index} refers to control {index}, but only {n_controls} given")
        masks[int(index)] = path
    return masks


def next_index(out: Path) -> int:
    """sd-webui numbering: continue after the highest NNNNN- prefix already in the folder."""
    nums = [int(p.name[:5]) for p in out.glob("*.png") if p.name[:5].isdigit()]
    return max(nums, default=-1) + 1


def run(args: argparse.Namespace) -> int:
    from controlstack import Control, Pipeline  # local: keeps CLI start-up light
    from controlstack.injection import available as available_modes  # local: keeps CLI start-up light
    from controlstack.sampling import SCHEDULERS  # local: keeps CLI start-up light

    # Validate everything cheap before loading any model.
    if args.scheduler is not None and args.scheduler not in SCHEDULERS:
        raise ControlstackError(f"unknown scheduler '{args.scheduler}'; choose one of {', '.join(SCHEDULERS)}")
    if args.mode is not None and args.mode not in available_modes():
        raise ControlstackError(f"unknown mode '{args.mode}'; choose one of {', '.join(available_modes())}")
    if args.layer_weights is not None and args.mode not in (None, "controlnet"):
        raise ControlstackError(f"--layer-weights applies to --mode controlnet, not '{args.mode}'")
    if args.layer_weights is not None:
        args.mode = "controlnet"
    if args.steps is not None and args.steps < 1:
        raise ControlstackError(f"--steps must be >= 1, got {args.steps}")
    if args.cfg is not None and not args.cfg >= 0:
        raise ControlstackError(f"--cfg must be >= 0, got {args.cfg}")
    if args.seed >= MAX_SEED:
        raise ControlstackError(f"--seed must be below {MAX_SEED} (2**63), or -1 for a random seed; got {args.seed}")
    specs = [parse_control(s) for s in args.control]
    if (args.from_image is None) != (args.tasks is None):
        raise ControlstackError("--from-image and --tasks go together: --from-image photo.png --tasks depth,canny")
    if args.from_image is not None and specs:
        raise ControlstackError("--from-image makes its own controls; drop --control (or --from-image)")
    from controlstack.cli import preflight  # local: keeps CLI start-up light

    preflight.check_sizes(args, preflight.base_configs(args.model, args.config))
    output_folder(args.out)  # a bad --out fails now, not after the generation
    if args.from_image is not None:
        return run_from_image(args, seed=args.seed if args.seed >= 0 else random.randrange(2**32))
    if args.inpaint_mask is not None and args.init is None:
        raise ControlstackError("--inpaint-mask needs --init (the image to repaint)")
    if not 0.0 <= args.strength <= 1.0:
        raise ControlstackError(f"--strength must be in [0, 1], got {args.strength}")
    models = [split_task(m) for m, *_ in specs]
    for name, task in models:
        preflight.check_control(args.model, name, task)
    masks = parse_masks(args.mask, len(specs))
    modules = parse_modules(args.module, len(specs))
    if args.preprocess:  # the annotator follows each control's condition type (mi-canny -> canny)
        for i, (name, task) in enumerate(models):
            if i not in modules:
                annotators.for_control(name, task, args.model)
    mask_images = {i: load_image(p) for i, p in masks.items()}
    # Controls validate their image, weight, window, mask and resize mode: all before the model loads
    controls = [
        Control(name, load_image(image), weight=w, start=s, end=e, mask=mask_images.get(i),
                resize_mode=args.resize_mode, task=task, preprocess=modules[i][0] if i in modules else args.preprocess,
                annotator_params=modules[i][1] if i in modules else {})
        for i, ((name, task), (_, image, w, s, e)) in enumerate(zip(models, specs))
    ]
    img2img = {}
    if args.init is not None:
        img2img = {"init_image": load_image(args.init), "strength": args.strength,
                   "inpaint_mask": load_image(args.inpaint_mask) if args.inpaint_mask else None}
        if args.inpaint_mask:
            img2img["inpaint"] = InpaintOptions(mask_blur=args.mask_blur, invert=args.mask_invert,
                                                full_res=args.inpaint_full_res, padding=args.inpaint_padding,
                                                fill=args.inpainting_fill, paste_back=not args.no_paste_back)
    seed = args.seed if args.seed >= 0 else random.randrange(2**32)

    loras, prompts = parse_loras(args), image_prompts(args)
    pipe = Pipeline.from_pretrained(args.model, allow_pickle=args.allow_pickle, config=args.config)
    with_loras(pipe, args, loras)
    pipe.optimize(args.optimize)
    result = pipe(args.prompt, controls=controls, return_result=True, **img2img, **sampling_options(args, seed),
                  **({"image_prompts": prompts} if prompts else {}))
    return write_outputs(args, result, seed)


def parse_loras(args) -> list[tuple[str, float]]:
    """``--lora FILE[:WEIGHT]`` -> (file, weight), each file read and checked now (format, layout),
    before the model loads; ``--lora-dir`` must be a folder."""
    out = []
    for spec in args.lora:
        path, _, tail = spec.rpartition(":")
        try:
            weight = float(tail) if path else 1.0
        except ValueError:  # a ':' inside the path, no weight
            path, weight = spec, 1.0
        path = path or spec
        read(path, args.allow_pickle)
        out.append((path, weight))
    if args.lora_dir is not None and not os.path.isdir(args.lora_dir):
        raise ControlstackError(f"--lora-dir '{args.lora_dir}' is not a folder")
    return out


def with_loras(pipe, args, loras) -> None:
    for path, weight in loras:
        pipe.load_lora(path, weight, allow_pickle=args.allow_pickle)
    pipe.lora_dir = args.lora_dir
    for i, path in enumerate(args.ip_adapter):
        pipe.load_ip_adapter(path, image_encoder=args.image_encoder if i == 0 else None, allow_pickle=args.allow_pickle)


def image_prompts(args) -> list:
    """``--image-prompt IMAGE[:SCALE]`` -> ImagePrompts, checked before the model loads."""
    from controlstack.ip_adapter import ImagePrompt  # local: keeps CLI start-up light

    bundled = assets.ip_adapter_files() if args.model is None else None
    if args.image_prompt and not args.ip_adapter and bundled is not None:  # the bundled base's own adapter
        args.ip_adapter, args.image_encoder = [str(bundled[0])], str(bundled[1])
    if len(args.image_prompt) != len(args.ip_adapter):
        raise ControlstackError(f"{len(args.image_prompt)} --image-prompt for {len(args.ip_adapter)} --ip-adapter; "
                                "give one image per adapter")
    if args.ip_adapter and args.image_encoder is None:
        raise ControlstackError("--ip-adapter needs --image-encoder DIR (its CLIP image encoder)")
    out = []
    for spec in args.image_prompt:
        path, _, tail = spec.rpartition(":")
        try:
            scale = float(tail) if path else 1.0
        except ValueError:
            path, scale = spec, 1.0
        out.append(ImagePrompt(load_image(path or spec), scale))
    return out


def sampling_options(args, seed: int) -> dict:
    return {"steps": args.steps, "cfg": args.cfg, "seed": seed, "width": args.width, "height": args.height,
            "scheduler": args.scheduler, "mode": args.mode,
            "mode_options": {"layer_weights": args.layer_weights} if args.layer_weights else None,
            "negative_prompt": args.negative, "batch": args.batch, "progress": not args.no_progress,
            **{k: tuple(v) for k in ("original_size", "crops_coords_top_left", "target_size")
               if (v := getattr(args, k, None)) is not None},
            **({"hires": args.hires, "hires_strength": args.hires_strength, "hires_steps": args.hires_steps,
                "hires_upscaler": args.hires_upscaler} if args.hires is not None else {})}


def run_from_image(args, seed: int) -> int:
    """OmniControlNet's integrated path: photo -> conditions -> image, one call."""
    from controlstack import Pipeline  # local: keeps CLI start-up light

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ControlstackError("--tasks is empty; name at least one task, e.g. --tasks depth")
    from controlstack.cli.preflight import check_from_image  # local: keeps CLI start-up light

    check_from_image(args.model, args.omni, tasks)
    photo = load_image(args.from_image)
    loras = parse_loras(args)
    pipe = Pipeline.from_pretrained(args.model, allow_pickle=args.allow_pickle, config=args.config)
    with_loras(pipe, args, loras)
    pipe.optimize(args.optimize)
    result = pipe.from_image(photo, tasks, args.prompt, model=args.omni, resize_mode=args.resize_mode,
                             return_result=True, **sampling_options(args, seed))
    return write_outputs(args, result, seed, photo)


def write_outputs(args, result, seed: int, photo=None) -> int:
    from controlstack.io.png import atomic_save, make_grid  # local: keeps CLI start-up light

    out = Path(args.out)
    index = next_index(out) if out.is_dir() else 0
    written = []
    for pos, image in enumerate(result.images):
        params = dict(result.parameters, batch_pos=pos)
        written.append(atomic_save(image, out / f"{index + pos:05d}-{seed}.png", params))
    if args.grid and photo is not None:  # one row per image: photo | each condition | generated
        size = result.images[0].size
        row = [photo.convert("RGB").resize(size)] + [c.resize(size) for c in result.conditions]
        cells = [im for g in result.images for im in (*row, g)]
        written.append(atomic_save(make_grid(cells, cols=len(row) + 1), out / f"grid-{index:05d}-{seed}.png",
                                   result.parameters))
    elif args.grid and len(result.images) > 1:
        written.append(atomic_save(make_grid(result.images), out / f"grid-{index:05d}-{seed}.png",
                                   result.parameters))
    for path in written:
        print(path)
    return 0
