"""Whole-image annotators: content shuffle, tile/blur, binary, invert, inpaint mask.

* ``shuffle`` -- ControlNet 1.1's content shuffle (lllyasviel/ControlNet-v1-1-nightly,
  ``annotator/shuffle``): a random smooth flow field (uniform noise on a grid of ``f`` px cells,
  bicubic upsampled, stretched to the full image) is used as a ``cv2.remap`` lookup, scattering the
  image's content while keeping its colours and local textures. Seeded: same seed, same warp.
* ``tile``    -- sd-webui-controlnet "tile_resample" (downsample by ``down_sampling_rate``, here
  resampled back up so the condition keeps the detect size) and "blur_gaussian" (``blur_sigma``).
* ``binary``  -- sd-webui "binary": grey threshold, 0 = Otsu's automatic threshold.
* ``invert``  -- sd-webui "invert (from white bg & black line)": 255 - image, so a line drawing on
  white paper becomes the white-on-black condition line models were trained on.
* ``inpaint`` -- ControlNet 1.1 inpaint: masked pixels carry no colour. The inpaint model reads a
  float hint with masked pixels set to -1 (diffusers' ``make_inpaint_condition``);
  :meth:`Inpaint.hint` returns exactly that, while ``__call__`` returns the RGB preview with the
  masked area painted ``fill``. The mask is ``mask=`` (a path, PIL image or array; white = inpaint)
  or, when absent, the image's transparency (transparent = inpaint, the editor's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from controlstack.annotators.base import Annotator, param
from controlstack.errors import ControlstackError
from controlstack.io.images import load_image, mask_to_array, resize_image, validate_image


def noise_disk(rng: np.random.Generator, h: int, w: int, f: int) -> np.ndarray:
    """ControlNet's ``make_noise_disk``: smooth noise normalised to exactly [0, 1], shape (h, w)."""
    noise = rng.uniform(0.0, 1.0, size=(h // f + 2, w // f + 2))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
    noise = noise - noise.min()
    return noise / max(float(noise.max()), 1e-12)


@dataclass(kw_only=True)
class Shuffle(Annotator):
    NAME = "shuffle"
    f: int = param(256, "flow cell size (px): larger = bigger coherent pieces", lo=8, hi=4096)
    seed: int = param(0, "random seed of the flow field", lo=0, hi=2**31 - 1)

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        rng = np.random.default_rng(self.seed)
        x = noise_disk(rng, h, w, self.f) * float(w - 1)
        y = noise_disk(rng, h, w, self.f) * float(h - 1)
        return cv2.remap(rgb, x.astype(np.float32), y.astype(np.float32), cv2.INTER_LINEAR)


@dataclass(kw_only=True)
class Tile(Annotator):
    NAME = "tile"
    down_sampling_rate: float = param(1.0, "downsample by this factor and back (tile_resample)", lo=1, hi=8)
    blur_sigma: float = param(0.0, "Gaussian blur sigma (px) applied after (blur_gaussian)", lo=0, hi=64)

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        out = rgb
        if self.down_sampling_rate > 1:
            sw = max(1, round(w / self.down_sampling_rate))
            sh = max(1, round(h / self.down_sampling_rate))
            small = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
            out = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        if self.blur_sigma > 0:
            out = cv2.GaussianBlur(out, (0, 0), self.blur_sigma)
        return out


@dataclass(kw_only=True)
class Binary(Annotator):
    NAME = "binary"
    threshold: int = param(0, "grey level (0-255) above which a pixel is white; 0 = Otsu", lo=0, hi=255)

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if self.threshold in (0, 255):  # sd-webui treats both ends as "automatic"
            _, out = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        else:
            _, out = cv2.threshold(g, self.threshold, 255, cv2.THRESH_BINARY)
        return out


@dataclass(kw_only=True)
class Invert(Annotator):
    NAME = "invert"

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        return 255 - rgb


@dataclass(kw_only=True)
class Inpaint(Annotator):
    NAME = "inpaint"
    mask: str | None = param(None, "mask image path (white = inpaint); none = use the image's transparency")
    threshold: float = param(0.5, "mask level above which a pixel is inpainted", lo=0.0, hi=1.0)
    fill: int = param(0, "grey level the masked area shows in the RGB preview", lo=0, hi=255)

    def _mask(self, image: Image.Image, mask, size: tuple[int, int]) -> np.ndarray:
        m = mask if mask is not None else self.mask
        if m is None:
            if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
                raise ControlstackError("inpaint: no mask; pass mask=PATH (white = inpaint) or an image "
                                        "with transparency (transparent = inpaint)")
            alpha = np.asarray(image.convert("RGBA"))[..., 3].astype(np.float32) / 255.0
            m = 1.0 - alpha
        elif isinstance(m, (str, Path)):
            m = mask_to_array(load_image(m), "inpaint mask")
        else:
            m = mask_to_array(m, "inpaint mask")
        if m.shape[::-1] != tuple(image.size):
            raise ControlstackError(f"inpaint: mask is {m.shape[1]}x{m.shape[0]} but the image is "
                                    f"{image.size[0]}x{image.size[1]}; pass a mask of the same size")
        big = Image.fromarray((m > self.threshold).astype(np.uint8) * 255, "L")
        return np.asarray(resize_image(big, *size, "just_resize")) >= 128

    def hint(self, image, mask=None) -> np.ndarray:
        """The inpaint ControlNet's input: float32 HxWx3 in [0, 1], masked pixels = -1."""
        image = validate_image(image)
        rgb = self.prepare(image)
        m = self._mask(image, mask, (rgb.shape[1], rgb.shape[0]))
        out = rgb.astype(np.float32) / 255.0
        out[m] = -1.0
        return out

    def __call__(self, image, mask=None) -> Image.Image:
        image = validate_image(image)
        rgb = self.prepare(image).copy()
        m = self._mask(image, mask, (rgb.shape[1], rgb.shape[0]))
        rgb[m] = self.fill
        return Image.fromarray(rgb, "RGB")
