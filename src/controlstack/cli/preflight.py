"""``controlstack generate``'s checks that need a model's files but not its weights.

Loading a base takes seconds to half a minute on a CPU; a misspelt control name, an Omni task the
model does not have, a size the VAE cannot take or a batch that cannot fit must fail before that.
Everything here reads config / JSON files and safetensors headers only. The pipeline checks the
same rules again when it runs; these are the CLI's early copies, with its flag names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from controlstack import annotators, assets
from controlstack.errors import ControlstackError
from controlstack.io.settings import controlnets_root, read_settings
from controlstack.tasks import BASE_CONDITION

VAE_FACTOR = 8  # every supported family's (SD-1.x / 2.x, SDXL), where no VAE config says otherwise


def controlnet_folders(model: str | None) -> dict[str, Path | None]:
    """The ControlNet names the base ``--model`` answers, as ``Pipeline.from_pretrained`` gives them
    (a folder in the bundle's layout brings its own, anything else the bundled ones), each with its
    folder; None where it is built in memory (the placeholder's)."""
    root = controlnets_root(model)
    if root != assets.BUNDLE_DIR / "controlnets":  # the base folder's own
        return {name: root / name for name in assets.trained_controlnets(root.parent)}
    return {name: root / name if (root / name).is_dir() else None for name in assets.bundled_controlnets()}


def omni_tasks(folder: Path) -> list[str] | None:
    """An Omni ControlNet folder's tasks: the task tokens it carries (the header of its tokens file,
    what the loaded model checks against), else its ``controlstack.json`` ``omni.tasks``; None
    for a folder with neither (a plain or ControlNet-Union model)."""
    from controlstack.models.task_tokens import TOKENS_FILE  # local: keeps CLI start-up light

    tokens = folder / TOKENS_FILE
    if tokens.is_file():
        try:
            with safe_open(str(tokens), framework="pt") as f:
                return [key.strip("<>") for key in f.keys()]  # noqa: SIM118 -- safe_open is not iterable
        except Exception:  # noqa: BLE001 -- a broken file: loading it reports that, in its own words
            return None
    tasks = (read_settings(folder).get("omni") or {}).get("tasks")
    return [str(t) for t in tasks] if isinstance(tasks, list) and tasks else None


def resolve(base: str | None, model: str) -> tuple[Path | None, bool]:
    """``model`` (a control's ControlNet) -> (its folder or None, whether it is one the base brings);
    a one-line error when it is neither such a name nor an existing path."""
    known = controlnet_folders(base)
    if model in known:  # names first, as Pipeline.controlnet resolves them
        return known[model], True
    if os.path.exists(model):
        return (Path(model) if Path(model).is_dir() else None), False
    names = ", ".join(sorted(known)) or "none bundled"
    raise ControlstackError(f"control model '{model}' is neither a bundled ControlNet ({names}) nor an existing path")


def check_control(base: str | None, model: str, task: str | None) -> None:
    """``--control MODEL[/TASK]:...`` names a ControlNet that exists and, for an Omni one, a task it has."""
    if model == BASE_CONDITION:  # the base reads it (a Flux Control model): the pipeline checks the base
        return
    folder, bundled = resolve(base, model)
    tasks = omni_tasks(folder) if folder is not None else None
    if tasks is None:
        # the base's own ControlNets are plain or Omni; a path may be a ControlNet-Union model,
        # whose tasks only its weights tell -- the pipeline checks those
        if bundled and task is not None:
            raise ControlstackError(f"control model '{model}' has no task tokens; '{model}/{task}' is for an Omni "
                                    "ControlNet (e.g. omni/depth)")
        return
    if task is None:
        raise ControlstackError(f"Omni ControlNet '{model}' needs a task: --control {model}/TASK:IMAGE with TASK one "
                                f"of {', '.join(tasks)}")
    if task not in tasks:
        raise ControlstackError(f"Omni ControlNet '{model}' has no task '{task}'; choose one of {', '.join(tasks)}")


def check_from_image(base: str | None, model: str, tasks: list[str]) -> None:
    """``--from-image ... --tasks T,... --omni MODEL``: an Omni ControlNet with these tasks, each made
    by an annotator."""
    folder, _ = resolve(base, model)
    known = omni_tasks(folder) if folder is not None else None
    if known is None:  # only a folder carries task tokens (a single file never does)
        raise ControlstackError(f"--omni '{model}' is not an Omni ControlNet (it has no task tokens)")
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ControlstackError(f"unknown task(s) {', '.join(unknown)}; the Omni ControlNet has {', '.join(known)}")
    for task in tasks:
        annotators.for_task(task)


def base_configs(model: str | None, config: str | None) -> tuple[dict, dict] | None:
    """The base's U-Net and VAE configs from its folder (the bundle, a diffusers folder, a single
    file's ``--config``); None where only loading would tell (a bare single file, the placeholder)."""
    if model is None:
        folder = None if assets.is_placeholder() else assets.BUNDLE_DIR
    elif Path(model).is_dir():
        folder = Path(model)
    elif config is not None:
        folder = Path(config) if Path(config).is_dir() else Path(config).parent
    else:
        folder = None
    try:
        return tuple(json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae"))
    except (TypeError, OSError, ValueError):  # no folder, or no / a broken config: the loader says which
        return None


def check_sizes(args, configs: tuple[dict, dict] | None) -> None:
    """--width / --height / --batch / --hires / --hires-strength, as the pipeline will check them."""
    from controlstack.hires import MAX_HIRES, hires_size  # local: keeps CLI start-up light
    from controlstack.limits import MAX_SIZE, check_memory, memory_needed  # local: keeps CLI start-up light

    unet, vae = configs or ({}, {})
    f = 2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else VAE_FACTOR
    for name in ("width", "height"):
        v = getattr(args, name)
        if v is not None and not (f <= v <= MAX_SIZE and v % f == 0):
            raise ControlstackError(f"--{name} must be a multiple of {f} between {f} and {MAX_SIZE}, got {v}")
    if args.batch < 1:
        raise ControlstackError(f"--batch must be a positive integer, got {args.batch}")
    if not 0.0 <= args.hires_strength <= 1.0:
        raise ControlstackError(f"--hires-strength must be in [0, 1], got {args.hires_strength}")
    scale = args.hires
    if scale is not None and not 1.0 <= scale <= MAX_HIRES:
        raise ControlstackError(f"--hires must be an upscale factor in [1, {MAX_HIRES:g}], got {scale}")
    native = int(unet["sample_size"]) * f if "sample_size" in unet else None
    width, height = args.width or native, args.height or native
    if width is None or height is None:
        return
    if scale is not None:  # the second pass's size, as the pipeline computes it
        w2, h2 = hires_size(width, height, scale, f)
        if max(w2, h2) > MAX_SIZE:
            raise ControlstackError(f"--hires {scale:g} takes {width}x{height} to {w2}x{h2}, over {MAX_SIZE}; lower "
                                    "--hires, --width or --height")
    if "block_out_channels" in unet and "block_out_channels" in vae:  # the pipeline's own estimate and message
        w, h = width * (scale or 1), height * (scale or 1)
        check_memory(memory_needed(unet["block_out_channels"][0], vae["block_out_channels"][0], f, args.batch, w, h),
                     args.batch, w, h)
