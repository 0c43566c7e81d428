"""Shared fixtures: tiny seeded SD-layout models built once per session (no downloads)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # xdist runs two workers on two cores
# and so do the subprocesses the CLI tests start: two workers each starting a two-thread torch on
# two cores oversubscribe them (measured several times slower on a loaded machine)
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_components():
    from controlstack.models.tiny import tiny_sd

    return tiny_sd(seed=0, max_length=16)


@pytest.fixture(scope="session")
def tiny_controlnets(tiny_components):
    from controlstack.models.tiny import tiny_controlnet

    return [tiny_controlnet(tiny_components.unet, seed=s) for s in (1, 2, 3)]


@pytest.fixture(scope="session")
def hint_images():
    """Two deterministic 64x64 condition images (a box edge map and a disc)."""
    a = np.zeros((64, 64, 3), np.uint8)
    a[16:48, 16] = a[16:48, 47] = a[16, 16:48] = a[47, 16:48] = 255
    yy, xx = np.mgrid[:64, :64]
    b = (((yy - 30) ** 2 + (xx - 34) ** 2) < 15**2)[..., None].repeat(3, -1).astype(np.uint8) * 255
    return [Image.fromarray(a), Image.fromarray(b)]


@pytest.fixture(scope="session")
def pipe(tiny_components):
    from controlstack import Pipeline

    return Pipeline(tiny_components, name="tiny")


@pytest.fixture(scope="session")
def xl():
    """A tiny seeded SDXL-layout base (two text encoders, the text-time embedding)."""
    from controlstack.models.tiny import tiny_sdxl

    return tiny_sdxl(seed=0)


@pytest.fixture(scope="session")
def xl_controlnets(xl):
    from controlstack.models.tiny import tiny_controlnet

    return [tiny_controlnet(xl.unet, seed=s) for s in (5, 7)]


@pytest.fixture(scope="session")
def xl_union(xl):
    """A tiny ControlNet-Union (ProMax layout, 8 control types) over the tiny SDXL base."""
    from controlstack.models.tiny import tiny_union_controlnet

    return tiny_union_controlnet(xl.unet, seed=9)


@pytest.fixture(scope="session")
def xl_pipe(xl):
    from controlstack import Pipeline

    return Pipeline(xl, name="tiny-xl")
