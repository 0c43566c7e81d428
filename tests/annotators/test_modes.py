"""Odd PIL modes, 16-bit, tiny and huge images: every image annotator returns RGB or fails in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlstack import annotators
from controlstack.errors import ControlstackError

IMAGE_ANNOTATORS = ["canny", "lines", "softedge", "scribble", "lineart", "shuffle", "tile", "normal",
                    "binary", "invert"]


def _modes(base: Image.Image) -> dict[str, Image.Image]:
    grey16 = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    return {"L": base.convert("L"), "LA": base.convert("LA"), "P": base.convert("P"),
            "RGBA": base.convert("RGBA"), "I;16": grey16, "CMYK": base.convert("CMYK"),
            "1": base.convert("1"), "F": base.convert("F")}


@pytest.mark.parametrize("name", IMAGE_ANNOTATORS)
def test_every_mode_gives_rgb(name, coffee_small):
    small = coffee_small.resize((48, 32))
    if name == "normal":  # it reads a depth map: a grey image in every mode (a colour one is refused)
        small = small.convert("L").convert("RGB")
    a = annotators.get(name, resolution=None)
    for mode, img in _modes(small).items():
        out = a(img)
        assert out.mode == "RGB" and out.size == (48, 32), (name, mode)


def test_sixteen_bit_keeps_its_range():
    ramp = (np.arange(64, dtype=np.uint32)[None, :].repeat(8, 0) * 1000).astype(np.uint16)
    out = np.asarray(annotators.get("invert", resolution=None)(Image.fromarray(ramp)))
    # 63000/65535 -> 245 after to_rgb, so the inverted right end is 10, not 0 (no clipping at 255)
    assert out[0, 0, 0] == 255 and out[0, -1, 0] == 255 - round(63000 / 65535 * 255)


@pytest.mark.parametrize("name", IMAGE_ANNOTATORS)
def test_tiny_images(name):
    a = annotators.get(name, resolution=None)
    for shape in [(1, 1, 3), (2, 3, 3), (5, 7, 3)]:
        out = a(np.full(shape, 128, np.uint8))
        assert out.size == (shape[1], shape[0])


def test_huge_and_empty_images_fail_in_one_line():
    with pytest.raises(ControlstackError, match=r"image is 5000x8, larger than 4096x4096"):
        annotators.get("canny")(np.zeros((8, 5000), np.uint8))
    with pytest.raises(ControlstackError, match="zero size"):
        annotators.get("canny")(np.zeros((0, 5), np.uint8))
    with pytest.raises(ControlstackError, match="must be a PIL image or a numpy array"):
        annotators.get("canny")("photo.png")
