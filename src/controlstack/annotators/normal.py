"""``normal``: a surface-normal condition computed from a depth map (no network).

ControlNet 1.0's "normal" annotator (lllyasviel/ControlNet ``annotator/midas``, kept in
controlnet_aux's ``MidasDetector``) derives normals from MiDaS depth this way:
``n = normalise(Sobel_x(d), Sobel_y(d), a)`` with ``a = 2*pi``, flat (0, 0, 1) wherever the
normalised depth is below a background threshold, then ``rgb = n * 127.5 + 127.5``. Depth follows the
ControlNet convention (near = bright), so R grows where the surface faces left, G where it faces up,
B towards the viewer -- the protocol ControlNet 1.1's normal models use.

Depth here is read at full precision (16-bit and float images are not squeezed to 8 bits first) and
expressed in 0-255 units so ``z_scale`` keeps its meaning whatever the file's bit depth;
``smooth`` removes 8-bit quantisation steps that would otherwise show as stripes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from controlstack.annotators.base import Annotator, param
from controlstack.errors import ControlstackError
from controlstack.io.images import to_rgb, validate_image


def looks_coloured(image: Image.Image, tolerance: int = 12, share: float = 0.05) -> bool:
    """True for an image that is not grey: more than ``share`` of its pixels have channels that
    differ by more than ``tolerance`` (a depth map, even a coloured-in JPEG, has R = G = B)."""
    if image.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return False
    a = np.asarray(to_rgb(image), dtype=np.int16)
    spread = a.max(-1) - a.min(-1)
    return float((spread > tolerance).mean()) > share


def depth_to_array(image: Image.Image) -> np.ndarray:
    """A depth image in any PIL mode -> float32 HxW in [0, 1] (near = 1), full precision."""
    if image.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.asarray(to_rgb(image).convert("L"), dtype=np.float32) / 255.0


@dataclass(kw_only=True)
class NormalFromDepth(Annotator):
    NAME = "normal"
    bg_threshold: float = param(0.4, "normalised depth below which the surface is flat background",
                                lo=0.0, hi=1.0)
    z_scale: float = param(2.0 * np.pi, "normal z component before normalising (depth in 0-255 units); "
                                        "larger = flatter", lo=0.01, hi=1000)
    smooth: float = param(1.0, "Gaussian sigma (px) applied to the depth first; 0 = none", lo=0, hi=16)

    def prepare(self, image) -> np.ndarray:
        image = validate_image(image)
        if looks_coloured(image):
            raise ControlstackError("normal: expects a depth map (grey, near = bright) but got a colour image; "
                                    "for a photograph use normal_estimate (or make a depth map with depth first)")
        d = depth_to_array(image)
        tw, th = self.target_size(image.size)
        if (tw, th) != image.size:
            interp = cv2.INTER_AREA if tw < image.size[0] else cv2.INTER_CUBIC
            d = cv2.resize(d, (tw, th), interpolation=interp)
        return d.astype(np.float32)

    def detect(self, depth: np.ndarray) -> np.ndarray:
        d = depth * 255.0
        if self.smooth > 0:
            d = cv2.GaussianBlur(d, (0, 0), self.smooth)
        x = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
        y = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
        lo, hi = float(depth.min()), float(depth.max())
        dn = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
        bg = dn < self.bg_threshold
        x[bg] = 0.0
        y[bg] = 0.0
        n = np.stack([x, y, np.full_like(x, self.z_scale)], axis=2)
        n /= np.sqrt((n ** 2).sum(axis=2, keepdims=True))
        return (n * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
