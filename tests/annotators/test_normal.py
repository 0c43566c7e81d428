"""normal from depth: known slopes give known normals (ControlNet's midas-normal formula)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from controlstack import annotators


def test_flat_depth_faces_the_viewer():
    out = np.asarray(annotators.get("normal", resolution=None)(np.full((32, 32), 200, np.uint8)))
    assert (out == np.array([127, 127, 255])).all()


def test_ramp_depth_gives_the_formula_normal():
    # 16-bit ramp: depth (near = bright) grows to the right by 0.25 grey levels (0-255 units) per px
    w = 64
    ramp = (np.arange(w, dtype=np.float64)[None, :].repeat(32, 0) * 0.25 + 100) / 255.0 * 65535.0
    img = Image.fromarray(np.round(ramp).astype(np.uint16))
    assert img.mode.startswith("I;16")
    out = np.asarray(annotators.get("normal", resolution=None, bg_threshold=0.0)(img)).astype(float)
    sx = 8 * 0.25  # Sobel(ksize=3) of a slope s reads 8 s
    n = np.array([sx, 0.0, 2 * np.pi]) / np.hypot(sx, 2 * np.pi)
    expect = np.clip(n * 127.5 + 127.5, 0, 255).astype(np.uint8)
    centre = out[8:24, 8:56]
    assert np.abs(centre - expect).max() <= 1  # faces left: red above 128, green flat, blue < 255


def test_background_threshold_flattens_far_pixels():
    d = np.zeros((32, 64), np.uint8)
    d[:, 32:] = np.linspace(150, 255, 32).astype(np.uint8)
    d[:, :32] = np.linspace(0, 40, 32).astype(np.uint8)  # far: below 0.4 after normalising
    out = np.asarray(annotators.get("normal", resolution=None, smooth=0)(d))
    assert (out[:, 2:28] == np.array([127, 127, 255])).all()
    assert (out[4:28, 36:60, 0] > 140).all()
