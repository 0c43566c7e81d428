"""The PNG Info tab: a dropped image's generation parameters (the ``parameters`` text chunk
:mod:`controlstack.io.png` writes, sd-webui's layout) read back, and the values "Send to txt2img" puts
in the txt2img widgets."""

from __future__ import annotations

import json

from PIL import Image, UnidentifiedImageError

from controlstack.errors import ControlstackError
from controlstack.hires import UPSCALER_BY_LABEL


def read_info(path) -> tuple[str, dict]:
    """An image file -> (its parameters text, the fields :func:`~controlstack.io.png.parse_parameters`
    reads from it). An image without them (not made by controlstack or sd-webui, or re-encoded) is a
    one-line error."""
    from controlstack.io.png import parse_parameters, read_parameters  # local: heavy, only this path needs it

    if not path:
        raise ControlstackError("drop a PNG made by controlstack or sd-webui")
    try:
        chunks = read_parameters(path)
    except (UnidentifiedImageError, OSError, json.JSONDecodeError):
        raise ControlstackError("not an image PIL can read, or its parameters are damaged") from None
    text = chunks.get("parameters")
    if not isinstance(text, str) or not text.strip():
        with Image.open(path) as im:
            kind = im.format
        raise ControlstackError(f"this {kind} image has no generation parameters (a PNG saved by controlstack or "
                                "sd-webui has them; a re-encoded copy, a WebP or JPEG download, loses them)")
    return text, parse_parameters(text)


def txt2img_values(fields: dict, samplers: list[str]) -> dict:
    """Parsed parameters -> what "Send to txt2img" sets: prompt, negative, steps, sampler (a label the
    Sampling method list has), cfg, seed, width, height, and the Hires. fix where the image had one
    (its Upscale by, Upscaler, Hires steps, Denoising strength; Size is the first pass's, as sd-webui
    writes it). A field the image lacks is left out (the widget keeps its value)."""
    out = {"prompt": fields.get("prompt", ""), "negative": fields.get("negative_prompt", "")}
    for name, key, kind in (("steps", "Steps", int), ("cfg", "CFG scale", float), ("seed", "Seed", int)):
        if isinstance(fields.get(key), (int, float)):
            out[name] = kind(fields[key])
    if fields.get("Sampler") in samplers:
        out["sampler"] = fields["Sampler"]
    scale = number(fields.get("Hires upscale"))
    if scale is not None:
        out.update(hires=True, hires_scale=scale)
        if fields.get("Hires upscaler") in UPSCALER_BY_LABEL:
            out["hires_upscaler"] = fields["Hires upscaler"]
        for name, key, kind in (("hires_steps", "Hires steps", int), ("hires_strength", "Denoising strength", float)):
            if number(fields.get(key)) is not None:
                out[name] = kind(number(fields[key]))
    if "width" in fields and "height" in fields:
        out["width"], out["height"] = fields["width"], fields["height"]
    return out


def number(value) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
