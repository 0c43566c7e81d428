"""What the Generate, Interrupt and Skip buttons call: the widgets' values -> a :class:`~..spec.JobSpec`
(:func:`job_spec`), a job of the server's queue waited for with live progress (:func:`generate`), its
PNGs saved to the outputs folder (:func:`save_outputs`). Plain functions, tested without a browser."""

from __future__ import annotations

import base64
import datetime
import io
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from controlstack import annotators
from controlstack.errors import ControlstackError
from controlstack.hires import MAX_HIRES, UPSCALER_BY_LABEL
from controlstack.injection.modes import CONTROL_MODE_TABLE
from controlstack.inpaint import FILL_BY_LABEL, MAX_BLUR, MAX_PADDING, InpaintOptions
from controlstack.sampling.schedulers import SAMPLER_BY_LABEL
from controlstack.serve.ui.units import RESIZE_BY_LABEL, omni_task, pixel_perfect

RECOMMENDED = "(model's recommendation)"
DEFAULT_RESIZE = "Crop and Resize"  # sd-webui's API default (resize_mode 1), as /sdapi/v1 takes it


class Unit(NamedTuple):
    """One ControlNet unit's widget values (labels as sd-webui-controlnet's); ``params``: the
    preprocessor's own parameters by name (:func:`.units.annotator_values`)."""

    enabled: bool
    image: Any
    preprocessor: str = "none"
    model: str | None = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    resize_mode: str = DEFAULT_RESIZE
    pixel_perfect: bool = True
    resolution: int = 512
    params: dict | None = None


class Hires(NamedTuple):
    """The Hires. fix accordion (enabled): upscaler label, Upscale by, Hires steps (0: as the first
    pass), Denoising strength."""

    upscaler: str = "Latent"
    scale: float = 2.0
    steps: int = 0
    strength: float = 0.7


class Img2img(NamedTuple):
    """The img2img / inpaint tab: the init image (an ImageMask value: a drawn mask inpaints), Denoising
    strength, Mask blur, Inpaint area, Only masked padding, Masked content, Mask mode."""

    image: Any
    strength: float = 0.75
    mask_blur: int = 4
    area: str = "Whole picture"
    padding: int = 32
    fill: str = "original"
    mask_mode: str = "Inpaint masked"


def split_mask(value) -> tuple[Image.Image | None, np.ndarray | None]:
    """A gradio ImageMask value -> (the image, the drawn mask or None: drawn = 1)."""
    if value is None:
        return None, None
    if isinstance(value, dict):
        background = value.get("background")
        layers = [layer for layer in value.get("layers") or [] if layer is not None]
        image = Image.fromarray(np.asarray(background)).convert("RGB") if background is not None else None
        mask = None
        for layer in layers:
            a = np.asarray(layer)
            drawn = a[..., 3] > 0 if a.ndim == 3 and a.shape[2] == 4 else a.max(-1) > 0 if a.ndim == 3 else a > 0
            mask = drawn if mask is None else mask | drawn
        return image, (mask.astype(np.float32) if mask is not None and mask.any() else None)
    if isinstance(value, Image.Image):
        return value.convert("RGB"), None
    return Image.fromarray(np.asarray(value)).convert("RGB"), None


def mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray((mask * 255).astype(np.uint8), "L")


def unit_resolution(unit: Unit, image: Image.Image, width: int, height: int) -> int:
    """The Preprocessor Resolution a unit runs at: pixel perfect's (sd-webui-controlnet's rule, from the
    image and the output size) or the slider's."""
    return pixel_perfect(image.size, width, height, unit.resize_mode) if unit.pixel_perfect else int(unit.resolution)


def preview(unit_image, preprocessor: str, resolution: int = 512, params: dict | None = None):
    """The condition a preprocessor makes from a unit's image (what the unit will use)."""
    image, _ = split_mask(unit_image)
    if image is None:
        raise ControlstackError("upload an image to the unit first")
    if preprocessor in (None, "", "none"):
        return image
    return annotators.get(preprocessor, **{**(params or {}), "resolution": int(resolution)})(image)


#: the JobSpec field -> the widget's label, for messages
LABELS = {"prompt": "Prompt", "negative_prompt": "Negative prompt", "steps": "Sampling steps", "cfg": "CFG Scale",
          "seed": "Seed", "width": "Width", "height": "Height", "batch": "Batch size", "scheduler": "Sampling method",
          "n_iter": "Batch count", "hires": "Upscale by", "hires_steps": "Hires steps",
          "hires_strength": "Hires Denoising strength", "hires_upscaler": "Upscaler", "init_image": "img2img image",
          "strength": "Denoising strength", "inpaint_mask": "inpaint mask"}


def control_spec(i: int, unit: Unit, base, limits, width, height):
    """One enabled unit -> its :class:`~..spec.ControlSpec` (messages name "ControlNet Unit i")."""
    from controlstack.serve.spec import ControlSpec, number  # local: heavy, only this path needs it

    image, mask = split_mask(unit.image)
    where = f"ControlNet Unit {i}"
    if image is None:
        raise ControlstackError(f"{where} is enabled but has no image")
    if not unit.model:
        raise ControlstackError(f"{where}: choose a model")
    if max(image.size) > limits.max_side * 4:  # the cap decode_image puts on an uploaded image
        raise ControlstackError(f"{where}: the image is {image.size[0]}x{image.size[1]}; at most "
                                f"{limits.max_side * 4} px a side")
    if unit.resize_mode not in RESIZE_BY_LABEL:
        raise ControlstackError(f"{where}: Resize Mode {unit.resize_mode!r} is unknown")
    pre = unit.preprocessor if unit.preprocessor and unit.preprocessor != "none" else None
    params = {}
    if pre is not None:  # the annotator's own parameters and the resolution it runs at, as previewed
        params = {**(unit.params or {}), "resolution": unit_resolution(unit, image, width, height)}
    return ControlSpec(
        unit.model, image, weight=number(unit.weight, f"{where} Control Weight", -10, 10),
        start=number(unit.start, f"{where} Starting Control Step", 0, 1),
        end=number(unit.end, f"{where} Ending Control Step", 0, 1),
        mask=None if mask is None else mask_image(mask), resize_mode=RESIZE_BY_LABEL[unit.resize_mode],
        preprocess=pre or False, annotator_params=params, task=omni_task(base, unit.model, pre, where))


def image_prompt_spec(i: int, unit: Unit):
    """A unit whose model is an IP-Adapter -> an image prompt: its image the reference, its weight the
    adapter's scale, its drawn mask the region (sd-webui-controlnet's ip-adapter units)."""
    from controlstack.serve.spec import ImagePromptSpec, number  # local: heavy, only this path needs it

    image, mask = split_mask(unit.image)
    if image is None:
        raise ControlstackError(f"ControlNet Unit {i} is enabled but has no image")
    return ImagePromptSpec(unit.model, image, scale=number(unit.weight, f"ControlNet Unit {i} Control Weight", -10, 10),
                           mask=None if mask is None else mask_image(mask))


def job_spec(backend, limits, prompt, negative, sampler, steps, cfg, seed, width, height, batch, control_mode, units,
             *, n_iter=1, hires: Hires | None = None, img2img: Img2img | None = None):
    """The widgets' values -> the validated :class:`~..spec.JobSpec` ``/v1/generate`` would build (the
    same checks, the widgets' labels in messages). ``units``: :class:`Unit` values (or tuples of its
    first fields); ``hires``: the Hires. fix when enabled; ``img2img``: the img2img tab's values when
    it generates. The seed is drawn now (-1), so the job records the one used."""
    from controlstack.serve.spec import (  # local: heavy, only this path needs it
        MAX_N_ITER,
        JobSpec,
        check_spec,
        draw_seed,
        number,
        text,
    )

    name, base = backend.ui_base()
    width = number(width, "Width", 8, limits.max_side, integer=True)
    height = number(height, "Height", 8, limits.max_side, integer=True)
    controls, names, prompts = [], {}, []
    ip_names = getattr(base, "ip_adapter_names", [])  # a unit whose model is an IP-Adapter: an image prompt
    for i, unit in enumerate(Unit(*u) if not isinstance(u, Unit) else u for u in units):
        if unit.enabled and unit.model in ip_names:
            prompts.append(image_prompt_spec(i, unit))
        elif unit.enabled:
            names[f"controls[{len(controls)}]"] = f"ControlNet Unit {i}"
            controls.append(control_spec(i, unit, base, limits, width, height))
    if len(controls) > limits.max_controls:
        raise ControlstackError(f"{len(controls)} units enabled; this server takes at most {limits.max_controls}")
    extra = {"n_iter": number(n_iter, "Batch count", 1, MAX_N_ITER, integer=True)}
    if hires is not None:
        extra.update(hires_fields(hires, limits))
    if img2img is not None:
        extra.update(img2img_fields(img2img, limits))
    spec = JobSpec(
        prompt=text(prompt or "", "Prompt", limits.max_prompt),
        negative_prompt=text(negative or "", "Negative prompt", limits.max_prompt),
        steps=number(steps, "Sampling steps", 1, limits.max_steps, integer=True),
        cfg=number(cfg, "CFG Scale", 0, 30), seed=draw_seed(int(seed) if seed is not None else -1, "Seed"),
        width=width, height=height, batch=number(batch, "Batch size", 1, limits.max_batch, integer=True),
        scheduler=SAMPLER_BY_LABEL[sampler], controls=controls, image_prompts=prompts,
        mode=None if control_mode == RECOMMENDED else {m.webui: m.name for m in CONTROL_MODE_TABLE}[control_mode],
        base=name, **extra)
    check_spec(spec, base, limits, {**LABELS, **names})
    return spec


def hires_fields(h: Hires, limits) -> dict:
    """The Hires. fix accordion -> JobSpec's hires fields."""
    from controlstack.serve.spec import number  # local: heavy, only this path needs it

    if h.upscaler not in UPSCALER_BY_LABEL:
        raise ControlstackError(f"Upscaler {h.upscaler!r} is unknown; choose one of {', '.join(UPSCALER_BY_LABEL)}")
    steps = number(h.steps, "Hires steps", 0, limits.max_steps, integer=True)
    return {"hires": number(h.scale, "Upscale by", 1, MAX_HIRES), "hires_upscaler": UPSCALER_BY_LABEL[h.upscaler],
            "hires_steps": steps or None, "hires_strength": number(h.strength, "Hires Denoising strength", 0, 1)}


def img2img_fields(v: Img2img, limits) -> dict:
    """The img2img / inpaint tab -> JobSpec's init_image, strength, inpaint_mask and inpaint (sd-webui's
    options, pasted back) -- the last two only where a mask is drawn."""
    from controlstack.serve.spec import number  # local: heavy, only this path needs it

    image, mask = split_mask(v.image)
    if image is None:
        raise ControlstackError("img2img: upload an image to the img2img / inpaint tab first")
    if max(image.size) > limits.max_side * 4:
        raise ControlstackError(f"img2img: the image is {image.size[0]}x{image.size[1]}; at most "
                                f"{limits.max_side * 4} px a side")
    out = {"init_image": image, "strength": number(v.strength, "Denoising strength", 0, 1)}
    if mask is not None:
        if v.fill not in FILL_BY_LABEL:
            raise ControlstackError(f"Masked content {v.fill!r} is unknown; choose one of {', '.join(FILL_BY_LABEL)}")
        out["inpaint_mask"] = mask_image(mask)
        out["inpaint"] = InpaintOptions(
            mask_blur=number(v.mask_blur, "Mask blur", 0, MAX_BLUR, integer=True),
            invert=v.mask_mode == "Inpaint not masked", full_res=v.area == "Only masked",
            padding=number(v.padding, "Only masked padding, pixels", 0, MAX_PADDING, integer=True),
            fill=FILL_BY_LABEL[v.fill], paste_back=True)
    return out


def generate(backend, limits, *values, progress=None, outputs=None, **options):
    """Generate button: the widgets' JobSpec (:func:`job_spec`: ``values`` and ``options`` are its
    arguments after ``limits``) as a job of the server's one queue, waited for while ``progress`` shows
    its steps. Returns (gallery items, parameters text); with ``outputs`` the PNGs are saved there
    first (:func:`save_outputs`) and the gallery shows those files. The queue's bound, the time limit,
    cancelling, Interrupt / Skip and ``/sdapi/v1/progress`` apply as to ``/v1`` and sd-webui's jobs."""
    from controlstack.serve.jobs import Busy  # local: heavy, only this path needs it

    spec = job_spec(backend, limits, *values, **options)
    try:
        job_id = backend.submit(spec, priority=1)  # someone waits at the page: before batch /v1 jobs
    except Busy:
        raise ControlstackError("the queue is full, try again") from None
    report = None
    if progress is not None:  # `is not None`: gr.Progress has a __len__ of 0, so it is falsy
        progress(0.0, desc=f"{job_id} queued")
        report = lambda done, total: progress(done / total if total else 0.0, desc=f"{job_id} step {done}/{total}")
    record = backend.wait(job_id, report)
    if record["status"] != "done":  # the time limit, a cancel (DELETE /v1/jobs/{id}), a bug
        raise ControlstackError(f"{job_id}: {record.get('error') or 'the job was ' + record['status']}")
    if progress is not None:
        progress(1.0, desc=f"{job_id} done")
    pngs = [base64.b64decode(png) for png in record["images"]]
    if outputs is not None:
        kind = "img2img" if spec.init_image is not None else "txt2img"
        # each image's own seed (its Batch count call's seed + its batch position), as sd-webui names files
        calls = (record.get("parameters") or {}).get("all_seeds") or [spec.seed] * len(pngs)
        seeds = [s + k % spec.batch for k, s in enumerate(calls)]
        files = save_outputs(pngs, Path(outputs), kind, seeds)
        images = [(load(path), path.name) for path in files]
    else:
        images = [load(io.BytesIO(png)) for png in pngs]
    first = images[0][0] if images and isinstance(images[0], tuple) else images[0] if images else None
    # the first PNG's infotext: what the job's PNGs carry (sd-webui's "parameters" text)
    return images, f"{job_id}\n{first.info.get('parameters', '') if first is not None else ''}"


def load(source) -> Image.Image:
    """A PNG, loaded, its text chunks in ``.info`` (gradio's PNG encoding writes them back)."""
    with Image.open(source) as im:
        im.load()
        return im.copy()


_numbering = threading.Lock()  # two Generate clicks finishing at once must not take the same number


def save_outputs(pngs: list[bytes], folder: Path, kind: str, seeds: list[int]) -> list[Path]:
    """The job's PNGs (their infotext as the server made them) as sd-webui names them:
    ``folder/{kind}-images/YYYY-MM-DD/NNNNN-SEED.png``, written atomically (temp file + rename)."""
    day = folder / f"{kind}-images" / datetime.date.today().isoformat()
    try:
        day.mkdir(parents=True, exist_ok=True)
        with _numbering:
            taken = [int(m.group(1)) for p in day.iterdir() if (m := re.match(r"(\d{5,})-", p.name))]
            number = max(taken, default=-1) + 1
            paths = []
            for k, png in enumerate(pngs):
                path = day / f"{number + k:05d}-{seeds[k] if k < len(seeds) else seeds[-1]}.png"
                fd, tmp = tempfile.mkstemp(suffix=".png.tmp", dir=day)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(png)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                paths.append(path)
    except OSError as exc:  # a full disk, a read-only folder: say where, not a traceback
        raise ControlstackError(f"could not save the images to {day}: {exc.strerror or exc}") from None
    return paths


def job_control(backend, action: str) -> str:
    """Interrupt / Skip buttons: ``backend.interrupt()`` (the running jobs stop after their step, keeping
    the images so far) or ``backend.skip()`` (the current Batch count iteration ends); a line saying
    which jobs it reached."""
    if not callable(getattr(backend, action, None)):
        raise ControlstackError(f"this server cannot {action} jobs")
    jobs = getattr(backend, action)()
    verb = {"interrupt": "interrupted", "skip": "skipped"}[action]
    return f"{verb} {', '.join(jobs)}" if jobs else f"nothing to {action}: no job of this page is running"
