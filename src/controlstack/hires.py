"""sd-webui's hires fix: a first pass at the asked size, an upscale, and img2img at the larger size.

The upscale is in pixels (``Lanczos``, ``Nearest``; ``None`` is sd-webui's plain resize, Lanczos
too) or in latents (the ``Latent ...`` rows: the first pass's latents interpolated, never decoded
in between -- sd-webui's default, sharper detail for the second pass to work on). Each image of
the batch gets its own second pass with seed ``seed + i``; ``steps`` of the second pass default to
the first's (sd-webui's ``hr_second_pass_steps`` 0), of which img2img runs ``int(steps * strength)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

from controlstack.errors import ControlstackError

MAX_HIRES = 8.0  # the largest upscale factor


class Upscaler(NamedTuple):
    """One upscaler: our name, sd-webui's label, and how it scales (``space`` pixel / latent)."""

    name: str
    webui: str
    space: str
    mode: str            # PIL resampling name, or torch interpolate's mode
    antialias: bool = False


UPSCALER_TABLE = (
    Upscaler("lanczos", "Lanczos", "pixel", "LANCZOS"),
    Upscaler("nearest", "Nearest", "pixel", "NEAREST"),
    Upscaler("none", "None", "pixel", "LANCZOS"),
    Upscaler("latent", "Latent", "latent", "bilinear"),
    Upscaler("latent_antialiased", "Latent (antialiased)", "latent", "bilinear", True),
    Upscaler("latent_bicubic", "Latent (bicubic)", "latent", "bicubic"),
    Upscaler("latent_bicubic_antialiased", "Latent (bicubic antialiased)", "latent", "bicubic", True),
    Upscaler("latent_nearest", "Latent (nearest)", "latent", "nearest"),
    Upscaler("latent_nearest_exact", "Latent (nearest-exact)", "latent", "nearest-exact"),
)
UPSCALERS = {u.name: u for u in UPSCALER_TABLE}
UPSCALER_BY_LABEL = {u.webui: u.name for u in UPSCALER_TABLE}


def upscaler(name: str) -> Upscaler:
    if name not in UPSCALERS:
        raise ControlstackError(f"hires upscaler {name!r} is unknown; choose one of {', '.join(UPSCALERS)}")
    return UPSCALERS[name]


def hires_size(width: int, height: int, scale: float, factor: int) -> tuple[int, int]:
    """The second pass's size: each side scaled, rounded to the VAE's factor."""
    return (max(factor, round(width * scale / factor) * factor), max(factor, round(height * scale / factor) * factor))


def upscale_latents(latents, size: tuple[int, int], up: Upscaler):
    """(B, C, h, w) latents to ``size`` = (h2, w2), as sd-webui's latent upscale modes."""
    import torch  # local: keeps CLI start-up light (generate's --help reads UPSCALERS, not torch)

    antialias = up.antialias and up.mode in ("bilinear", "bicubic")
    return torch.nn.functional.interpolate(latents.float(), size=size, mode=up.mode,
                                           antialias=antialias).to(latents.dtype)


def check(scale, steps_second, upscaler_name) -> Upscaler:
    """The hires arguments' types and ranges; the upscaler's row."""
    if isinstance(scale, bool) or not (isinstance(scale, (int, float)) and 1.0 <= scale <= MAX_HIRES):
        raise ControlstackError(f"hires must be an upscale factor in [1, {MAX_HIRES:g}], got {scale!r}")
    if steps_second is not None and (isinstance(steps_second, bool) or not isinstance(steps_second, int)
                                     or steps_second < 1):
        raise ControlstackError(f"hires_steps must be a positive integer, got {steps_second!r}")
    return upscaler(upscaler_name)


def run_hires(pipe, scale, hires_strength, prompt, controls, *, steps_second, upscaler_name, output_type, **kw):
    """The hires fix on ``pipe`` (module docstring; :func:`check` passed); ``kw``: the first pass's
    ``Pipeline.__call__`` arguments, their values resolved. Returns ``(images, parameters)``."""
    up = upscaler(upscaler_name)
    f = pipe.vae_scale_factor
    w2, h2 = hires_size(kw["width"], kw["height"], scale, f)
    latent = up.space == "latent"
    first = pipe(prompt, controls, output_type="latent" if latent else "pil", return_result=True, **kw)
    seed = kw["seed"]
    second = {**kw, "width": w2, "height": h2, "batch": 1, "strength": hires_strength, "inpaint_mask": None,
              "inpaint": None, "steps": steps_second or kw["steps"]}
    if latent:
        starts = list(upscale_latents(first.images, (h2 // f, w2 // f), up).split(1))
    else:
        resample = getattr(Image.Resampling, up.mode)
        starts = [image.resize((w2, h2), resample) for image in first.images]
    images = [pipe(prompt, controls, **{**second, "seed": None if seed is None else seed + i, "init_image": start},
                   output_type=output_type)[0] for i, start in enumerate(starts)]
    if output_type == "np":
        images = np.stack(images)
    params = {**first.parameters, "width": w2, "height": h2,
              "hires": {"scale": scale, "strength": hires_strength, "upscaler": up.name, "first_pass": [kw["width"],
                                                                                                   kw["height"]],
                        **({"steps": steps_second} if steps_second else {})}}
    return images, params
