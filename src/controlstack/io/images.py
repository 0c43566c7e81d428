"""The one place where user images become validated arrays.

Everything behind this module trusts its inputs: images here come out as RGB (or L) ``PIL.Image``
objects of sane size, or ``ControlstackError`` is raised with a one-line message.

Resize modes follow sd-webui-controlnet (the names its users know):

* ``just_resize``     -- stretch to the target size, aspect ratio not kept (diffusers' behaviour);
* ``crop_and_resize`` -- scale so the image covers the target, then centre-crop;
* ``resize_and_fill`` -- scale so the image fits inside the target, then pad (edge colour: black).

"Pixel perfect" picks the annotator resolution from the target size so that the condition is
computed at the resolution it will be used at (sd-webui-controlnet's rule, see
:func:`pixel_perfect_resolution`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from controlstack.errors import ControlstackError

MAX_SIDE = 4096


@dataclass(frozen=True)
class ResizeMode:
    """One resize mode: our name, sd-webui-controlnet's label, its index (``resize_mode`` 0-2)."""

    name: str
    webui: str
    index: int


#: THE resize-mode table (in sd-webui's index order); every other view derives from it.
RESIZE_TABLE: tuple[ResizeMode, ...] = (
    ResizeMode("just_resize", "Just Resize", 0),
    ResizeMode("crop_and_resize", "Crop and Resize", 1),
    ResizeMode("resize_and_fill", "Resize and Fill", 2),
)
RESIZE_MODES = tuple(r.name for r in RESIZE_TABLE)

# Truncated files must fail loudly, never decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully (decode now, so corrupt data fails here) and validate its size."""
    path = Path(path)
    if path.is_dir():
        raise ControlstackError(f"image '{path}' is a folder; pass an image file")
    if not path.is_file():
        raise ControlstackError(f"image '{path}' does not exist; check the path")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except UnidentifiedImageError:
        raise ControlstackError(f"'{path}' is not an image PIL can read; pass a PNG, JPEG or WebP file")
    except (OSError, SyntaxError, ValueError) as exc:
        raise ControlstackError(f"image '{path}' is corrupt or truncated ({exc}); re-export the file")
    except Image.DecompressionBombError:
        raise ControlstackError(f"image '{path}' is larger than {MAX_SIDE}x{MAX_SIDE}; downscale it first")
    return validate_image(image, name=str(path))


def validate_image(image, name: str = "image") -> Image.Image:
    """Accept a PIL image or an array (HxW, HxWxC, uint8 or float in [0,1]) and check its size."""
    if isinstance(image, np.ndarray):
        image = array_to_pil(image, name)
    if not isinstance(image, Image.Image):
        raise ControlstackError(f"{name} must be a PIL image or a numpy array, got {type(image).__name__}")
    w, h = image.size
    if w == 0 or h == 0:
        raise ControlstackError(f"{name} has zero size ({w}x{h}); pass a non-empty image")
    if w > MAX_SIDE or h > MAX_SIDE:
        raise ControlstackError(f"{name} is {w}x{h}, larger than {MAX_SIDE}x{MAX_SIDE}; downscale it first")
    return image


def array_to_pil(array: np.ndarray, name: str = "image") -> Image.Image:
    """uint8 / bool / float-in-[0,1] arrays of shape HxW or HxWxC (C in 1,3,4) to PIL."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ControlstackError(f"{name} has shape {a.shape}; expected HxW or HxWx3 / HxWx4")
    if a.size == 0:
        raise ControlstackError(f"{name} has zero size {a.shape}; pass a non-empty image")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ControlstackError(f"{name} contains NaN or infinite values")
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a user expects.

    * alpha (RGBA, LA, PA, P with transparency) is composited over black: a transparent area of a
      condition means "no signal", and for edge/pose maps black is the no-signal colour;
    * 16/32-bit greyscale (I;16, I, F) is rescaled from its own range, not clipped at 255;
    * CMYK, YCbCr, LAB, HSV go through PIL's converters.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 65535.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.round(a * 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just_resize") -> Image.Image:
    """Resize to ``width`` x ``height`` with one of :data:`RESIZE_MODES`."""
    if mode not in RESIZE_MODES:
        raise ControlstackError(f"unknown resize mode '{mode}'; choose one of {', '.join(RESIZE_MODES)}")
    if image.size == (width, height):
        return image
    resample = Image.Resampling.LANCZOS
    w, h = image.size
    if mode == "just_resize":
        return image.resize((width, height), resample)
    if mode == "crop_and_resize":
        # Crop in source coordinates first, then resize: nothing outside the kept region can
        # ring into it through the Lanczos kernel (and it is cheaper than resizing everything).
        scale = max(width / w, height / h)
        cw, ch = min(w, max(1, round(width / scale))), min(h, max(1, round(height / scale)))
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch)).resize((width, height), resample)
    scale = min(width / w, height / h)
    nw, nh = max(1, min(width, round(w * scale))), max(1, min(height, round(h * scale)))
    scaled = image.resize((nw, nh), resample)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(scaled, ((width - nw) // 2, (height - nh) // 2))
    return canvas


def pixel_perfect_resolution(image_size: tuple[int, int], width: int, height: int, mode: str) -> int:
    """The annotator resolution (short side) that maps the input onto the target 1:1.

    sd-webui-controlnet's rule: with the image of size (w, h) going to (width, height), the
    annotator should run at ``min(h, w) * k`` where k is the scale the resize mode applies:
    ``max`` of the two ratios for crop_and_resize (the image is scaled to cover), ``min`` for
    resize_and_fill (scaled to fit); just_resize uses the cover rule too.
    """
    w, h = image_size
    k_h, k_w = height / h, width / w
    k = min(k_h, k_w) if mode == "resize_and_fill" else max(k_h, k_w)
    return int(round(min(h, w) * k))


def image_to_tensor(image: Image.Image):
    """PIL RGB -> float32 tensor (1, 3, H, W) in [0, 1] (the ControlNet hint convention)."""
    import torch  # local: heavy, only this path needs it

    a = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).contiguous()


def mask_to_array(mask, name: str = "mask") -> np.ndarray:
    """A PIL image or array mask -> float32 HxW in [0, 1] (soft masks kept soft)."""
    if isinstance(mask, Image.Image):
        validate_image(mask, name)
        m = mask
        if m.mode in ("RGBA", "LA", "PA"):
            a = np.asarray(m.convert("RGBA"), dtype=np.float32)
            # a mask with real transparency means "where it is opaque"; otherwise its brightness
            alpha = a[..., 3] / 255.0
            return alpha if alpha.min() < 1.0 else a[..., :3].mean(-1) / 255.0
        if m.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(m, dtype=np.float32) / 65535.0
        return np.asarray(to_rgb(m).convert("L"), dtype=np.float32) / 255.0
    a = np.asarray(mask)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., :3].mean(-1) if a.shape[-1] != 1 else a[..., 0]
    if a.ndim != 2 or a.size == 0:
        raise ControlstackError(f"{name} must be a 2-D array or an image, got shape {a.shape}")
    if a.dtype == bool:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float32) / (65535.0 if a.dtype == np.uint16 else 255.0)
    a = a.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ControlstackError(f"{name} values must be finite and in [0, 1]")
    return a
