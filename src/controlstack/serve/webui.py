"""sd-webui's API payloads <-> the Python API: the subset clients of sd-webui-controlnet send.

``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` bodies (``prompt``, ``negative_prompt``, ``steps``,
``cfg_scale``, ``sampler_name``, ``seed``, ``width``, ``height``, ``batch_size``, ``init_images``,
``denoising_strength``, ``mask``) with ControlNet units in ``alwayson_scripts.ControlNet.args``
(also ``controlnet``): ``image``, ``mask``, ``module``, ``model``, ``weight``, ``resize_mode``,
``processor_res``, ``threshold_a``, ``threshold_b``, ``guidance_start``, ``guidance_end``,
``control_mode``, ``pixel_perfect``, ``enabled``. Spellings are sd-webui's (``io/png.py``).

Everything a client sends is validated here, once: unknown samplers / modes name the choices,
images are decoded from base64 under size caps, and **models are addressed by registered name
only** -- sd-webui's ``"control_v11p_sd15_canny [d14c016b]"`` resolves to the registered name it
contains, and a path is never opened.
"""

from __future__ import annotations

import base64
import binascii
import io
import random
import re
from dataclasses import dataclass, field

from PIL import Image

from controlstack.errors import ControlstackError
from controlstack.io.images import validate_image
from controlstack.io.png import CONTROL_MODES, RESIZE_MODES, SAMPLERS

WEBUI_SAMPLERS = {v: k for k, v in SAMPLERS.items()}
WEBUI_CONTROL_MODES = {v: k for k, v in CONTROL_MODES.items()}
WEBUI_RESIZE_MODES = {v: k for k, v in RESIZE_MODES.items()}
MODE_BY_INDEX = ["balanced", "prompt", "controlnet"]
RESIZE_BY_INDEX = ["just_resize", "crop_and_resize", "resize_and_fill"]


@dataclass
class Limits:
    """What one request may ask for (the server's caps)."""

    max_side: int = 1024        # width / height of the output and of every uploaded image
    max_steps: int = 150
    max_batch: int = 8
    max_controls: int = 4
    max_bytes: int = 20 * 2**20  # one decoded base64 image
    job_seconds: float = 600.0   # a generation running longer is stopped between steps


@dataclass
class Job:
    """A validated generation: ``Pipeline.__call__`` keyword arguments plus the controls' specs."""

    kwargs: dict
    controls: list = field(default_factory=list)  # (model name, image, weight, start, end, mode, module, params)


def decode_image(data, what: str, limits: Limits) -> Image.Image:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> a loaded PIL image."""
    if not isinstance(data, str) or not data:
        raise ControlstackError(f"{what}: expected a base64-encoded image string")
    data = data.split(",", 1)[1] if data.startswith("data:") else data
    if len(data) * 3 // 4 > limits.max_bytes:
        raise ControlstackError(f"{what}: image larger than {limits.max_bytes // 2**20} MiB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ControlstackError(f"{what}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if max(im.size) > limits.max_side * 4 or im.size[0] * im.size[1] > (limits.max_side * 4) ** 2:
                raise ControlstackError(f"{what}: {im.size[0]}x{im.size[1]} is too large (max side "
                                        f"{limits.max_side * 4})")
            im.load()
            return validate_image(im.copy(), what)  # the project's own checks (empty images, odd modes)
    except ControlstackError:
        raise
    except Image.DecompressionBombError:  # PIL refuses it at open: a small file claiming a huge image
        raise ControlstackError(f"{what}: the image is too large (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError):
        raise ControlstackError(f"{what}: not an image PIL can read (PNG, JPEG or WebP)") from None


def encode_png(image: Image.Image) -> str:
    """PIL -> base64 PNG, the infotext in its ``parameters`` chunk (as sd-webui's API returns)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def resolve_model(name, registered, what: str = "model") -> str:
    """A registered name from a client's model string (sd-webui sends file names with a hash)."""
    if not isinstance(name, str) or not name.strip():
        raise ControlstackError(f"{what}: give a model name, one of {', '.join(sorted(registered))}")
    text = name.strip()
    if text in registered:
        return text
    stem = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", text)  # "control_v11p_sd15_canny [d14c016b]"
    candidates = [r for r in registered if re.search(rf"(^|[_\-.]){re.escape(r)}($|[_\-.])", stem)]
    if len(candidates) == 1 and "/" not in text and "\\" not in text and ".." not in text:
        return candidates[0]
    raise ControlstackError(f"{what} '{name}' is not a registered model; choose one of {', '.join(sorted(registered))}")


def _number(payload: dict, key: str, default, lo=None, hi=None, kind=float):
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ControlstackError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ControlstackError(f"'{key}' must be in [{lo}, {hi}], got {value}")
    return kind(value)


def _choice(value, table: dict, by_index: list, key: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(by_index):
        return by_index[value]
    if isinstance(value, str) and value in table:
        return table[value]
    if isinstance(value, str) and value in by_index:
        return value
    raise ControlstackError(f"'{key}' {value!r} is unknown; choose one of {', '.join(table)} (or 0-{len(by_index) - 1})")


def units(payload: dict) -> list[dict]:
    scripts = payload.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise ControlstackError("'alwayson_scripts' must be an object")
    entry = scripts.get("ControlNet", scripts.get("controlnet")) or {}
    args = entry.get("args", []) if isinstance(entry, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
        raise ControlstackError("'alwayson_scripts.ControlNet.args' must be a list of unit objects")
    return [a for a in args if a.get("enabled", True)]


def parse_generation(payload, registered_controlnets, limits: Limits, img2img: bool = False) -> Job:
    """An sd-webui txt2img / img2img body -> a validated :class:`Job`."""
    if not isinstance(payload, dict):
        raise ControlstackError("the request body must be a JSON object")
    prompt = payload.get("prompt", "")
    negative = payload.get("negative_prompt", "")
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise ControlstackError("'prompt' and 'negative_prompt' must be strings")
    sampler = payload.get("sampler_name") or payload.get("sampler_index") or "Euler a"
    if sampler not in WEBUI_SAMPLERS and sampler not in SAMPLERS:
        raise ControlstackError(f"'sampler_name' {sampler!r} is unknown; choose one of {', '.join(WEBUI_SAMPLERS)}")
    seed = _number(payload, "seed", -1, -1, 2**63 - 1, int)
    kwargs = {
        "prompt": prompt, "negative_prompt": negative,
        "steps": _number(payload, "steps", 20, 1, limits.max_steps, int),
        "cfg": _number(payload, "cfg_scale", 7.0, 0, 30),
        "width": _number(payload, "width", 512, 8, limits.max_side, int),
        "height": _number(payload, "height", 512, 8, limits.max_side, int),
        "batch": _number(payload, "batch_size", 1, 1, limits.max_batch, int),
        "scheduler": WEBUI_SAMPLERS.get(sampler, sampler),
        "seed": random.randrange(2**32) if seed == -1 else seed,
    }
    if img2img:
        images = payload.get("init_images")
        if not isinstance(images, list) or not images:
            raise ControlstackError("img2img needs 'init_images': a list with one base64 image")
        kwargs["init_image"] = decode_image(images[0], "init_images[0]", limits)
        kwargs["strength"] = _number(payload, "denoising_strength", 0.75, 0, 1)
        if payload.get("mask"):
            kwargs["inpaint_mask"] = decode_image(payload["mask"], "mask", limits)
    controls = []
    us = units(payload)
    if len(us) > limits.max_controls:
        raise ControlstackError(f"{len(us)} ControlNet units; at most {limits.max_controls}")
    modes = set()
    for i, u in enumerate(us):
        where = f"ControlNet unit {i}"
        if "image" not in u and "input_image" not in u:
            raise ControlstackError(f"{where}: 'image' is missing (a base64 condition or photo)")
        raw = u.get("image", u.get("input_image"))
        raw = raw.get("image") if isinstance(raw, dict) else raw  # sd-webui also sends {"image": ..., "mask": ...}
        image = decode_image(raw, f"{where}.image", limits)
        model = resolve_model(u.get("model"), registered_controlnets, f"{where}.model")
        module = u.get("module", "none") or "none"
        if not isinstance(module, str):
            raise ControlstackError(f"{where}.module must be a string")
        if "control_mode" in u:  # absent: the models' recommended mode, as the Python API does
            modes.add(_choice(u["control_mode"], WEBUI_CONTROL_MODES, MODE_BY_INDEX, f"{where}.control_mode"))
        # unset: the model's recommended window (sd-webui's clients usually send both)
        start = _number(u, "guidance_start", 0.0, 0, 1) if "guidance_start" in u else None
        end = _number(u, "guidance_end", 1.0, 0, 1) if "guidance_end" in u else None
        if start is not None and end is not None and start > end:
            raise ControlstackError(f"{where}: guidance_start {start} is after guidance_end {end}")
        params: dict = {}
        if module.startswith("canny"):
            params = {"low_threshold": int(_number(u, "threshold_a", 100, 1, 255)),
                      "high_threshold": int(_number(u, "threshold_b", 200, 1, 255))}
        if "processor_res" in u and not u.get("pixel_perfect", False):
            params["resolution"] = int(_number(u, "processor_res", 512, 64, limits.max_side * 2))
        controls.append({
            "model": model, "image": image, "weight": _number(u, "weight", 1.0, -10, 10), "start": start, "end": end,
            "resize_mode": _choice(u.get("resize_mode", 1), WEBUI_RESIZE_MODES, RESIZE_BY_INDEX, f"{where}.resize_mode"),
            "module": None if module in ("none", "None") else module, "params": params,
            "mask": decode_image(u["mask"], f"{where}.mask", limits) if u.get("mask") else None,
        })
    if len(modes) > 1:
        raise ControlstackError(f"ControlNet units ask for different control modes ({', '.join(sorted(modes))}); "
                                "this server applies one mode per generation: give them the same one")
    if modes:
        kwargs["mode"] = modes.pop()
    return Job(kwargs, controls)
