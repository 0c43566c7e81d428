"""Photographs that ship inside scikit-image, and synthetic shapes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def coffee_small() -> Image.Image:
    """coffee (400x600) downscaled to 128x192: real content, fast tests."""
    from skimage import data

    return Image.fromarray(data.coffee()).resize((192, 128), Image.Resampling.BILINEAR)


@pytest.fixture(scope="session")
def step_image() -> Image.Image:
    """64x64: black left half, white right half (the step sits between columns 31 and 32)."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[:, 32:] = 255
    return Image.fromarray(a)
