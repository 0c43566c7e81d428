"""``seg``: render a label map with the ADE20K palette, and read a palette image back to labels.

ControlNet's segmentation models were trained on ADE20K-style maps coloured with the 150-class
palette of mmsegmentation / UniFormer (the ``ade_palette()`` table in lllyasviel/ControlNet and
controlnet_aux); the table below is that palette, class ``i`` -> ``ADE20K_PALETTE[i]``.

The standard palette gives classes 6 (road) and 48 (skyscraper) the same grey (140, 140, 140); we
keep it (it is what the models saw), so reading a palette image back maps that grey to 6. Every
other label round-trips exactly. Label 255 (``IGNORE``, "unlabelled") renders black and reads back
from black.

Label maps are L / P / I / I;16 images (or integer arrays) whose pixel values are class indices; an
RGB image given to ``seg`` must already use palette colours (it is checked and passed through).
Resizing uses nearest-neighbour so no invented classes appear at boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from controlstack.annotators.base import Annotator, param
from controlstack.errors import ControlstackError
from controlstack.io.images import validate_image

IGNORE = 255

ADE20K_PALETTE = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),], dtype=np.uint8)

# colour (packed as r<<16 | g<<8 | b) -> label; the first class wins on the one duplicate (6 vs 48)
_KEYS = (ADE20K_PALETTE.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))
_ORDER = np.argsort(_KEYS, kind="stable")
_UNIQ, _FIRST = np.unique(_KEYS[_ORDER], return_index=True)
_LABEL_OF_KEY = _ORDER[_FIRST]


def labels_to_palette(labels: np.ndarray) -> np.ndarray:
    """Integer HxW labels (0-149, 255 = unlabelled) -> uint8 HxWx3 ADE20K colours."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ControlstackError(f"seg: labels must be integers, got {labels.dtype}")
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= len(ADE20K_PALETTE)))
    if bad.any():
        v = int(labels[bad].flat[0])
        raise ControlstackError(f"seg: label {v} is outside the ADE20K classes; use 0-149 (255 = unlabelled)")
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(ADE20K_PALETTE)] = ADE20K_PALETTE
    return lut[labels.astype(np.int64) & 255]


def palette_to_labels(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 ADE20K-coloured image -> uint8 HxW labels (black -> 255); other colours fail."""
    rgb = np.asarray(rgb)[..., :3].astype(np.int64)
    keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pos = np.clip(np.searchsorted(_UNIQ, keys), 0, len(_UNIQ) - 1)
    found = _UNIQ[pos] == keys
    labels = np.where(found, _LABEL_OF_KEY[pos], IGNORE).astype(np.uint8)
    unknown = ~found & (keys != 0)
    if unknown.any():
        y, x = (int(v[0]) for v in np.nonzero(unknown))
        r, g, b = (int(c) for c in rgb[y, x])
        raise ControlstackError(
            f"seg: colour ({r}, {g}, {b}) at x={x}, y={y} is not in the ADE20K palette; pass a label map "
            "(L/P/I image of class indices) or use seg_estimate for photographs")
    return labels


def image_to_labels(image: Image.Image) -> np.ndarray:
    """A user label image (index modes) or palette image (RGB) -> uint8 labels."""
    mode = image.mode
    if mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        a = np.asarray(image)
        if a.dtype != np.uint8:
            a = a.astype(np.int64)
            bad = (a != IGNORE) & ((a < 0) | (a >= len(ADE20K_PALETTE)))
            if bad.any():
                raise ControlstackError(f"seg: label {int(a[bad].flat[0])} is outside the ADE20K classes; "
                                        "use 0-149 (255 = unlabelled)")
            a = a.astype(np.uint8)
        return a
    if mode == "LA":
        return np.asarray(image.getchannel("L"))
    if mode in ("RGB", "RGBA"):
        return palette_to_labels(np.asarray(image.convert("RGB")))
    raise ControlstackError(f"seg: cannot read labels from a {mode} image; pass an L/P/I label map or "
                            "an RGB ADE20K palette image")


@dataclass(kw_only=True)
class Seg(Annotator):
    NAME = "seg"
    palette: str = param("ade20k", "colour table", choices=("ade20k",))

    def prepare(self, image) -> np.ndarray:
        image = validate_image(image)
        labels = image_to_labels(image)
        tw, th = self.target_size(image.size)
        if (tw, th) != image.size:
            labels = np.asarray(Image.fromarray(labels, "L").resize((tw, th), Image.Resampling.NEAREST))
        labels = labels.copy()
        bad = (labels != IGNORE) & (labels >= len(ADE20K_PALETTE))
        if bad.any():
            raise ControlstackError(f"seg: label {int(labels[bad].flat[0])} is outside the ADE20K classes; "
                                    "use 0-149 (255 = unlabelled)")
        return labels

    def detect(self, labels: np.ndarray) -> np.ndarray:
        return labels_to_palette(labels)
