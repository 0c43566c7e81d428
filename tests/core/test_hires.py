"""The hires fix (``controlstack/hires.py``): pixel and latent upscalers, second-pass steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.hires import UPSCALER_BY_LABEL, UPSCALER_TABLE, Upscaler, upscale_latents


@pytest.fixture(scope="module")
def pipe(tiny_components):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={}, name="tiny")


def run(pipe, **kw):
    return pipe("a cube", steps=4, seed=2, width=32, height=32, hires=2, progress=False, return_result=True, **kw)


def test_latent_upscale_never_decodes_between_the_passes(pipe):
    lanczos, latent = run(pipe), run(pipe, hires_upscaler="latent")
    assert lanczos.images[0].size == latent.images[0].size == (64, 64)
    assert np.abs(np.asarray(lanczos.images[0], int) - np.asarray(latent.images[0], int)).mean() > 1
    assert latent.parameters["hires"] == {"scale": 2, "strength": 0.5, "upscaler": "latent", "first_pass": [32, 32]}
    assert "Hires upscale: 2, Hires upscaler: Latent" in latent.images[0].info["parameters"]


def test_second_pass_steps_are_their_own_and_recorded(pipe):
    calls = []
    result = run(pipe, hires_steps=10, step_callback=lambda done, total: calls.append(total))
    assert calls.count(4) == 4 and calls.count(5) == 5  # 4 first-pass steps, then int(10 * 0.5)
    assert result.parameters["hires"]["steps"] == 10 and "Hires steps: 10" in result.images[0].info["parameters"]


def test_latent_modes_interpolate_as_torch_does():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    up = upscale_latents(x, (8, 8), Upscaler("latent_bicubic", "Latent (bicubic)", "latent", "bicubic"))
    assert torch.equal(up, torch.nn.functional.interpolate(x, size=(8, 8), mode="bicubic"))
    assert set(UPSCALER_BY_LABEL) >= {"Latent", "Lanczos", "Nearest", "None", "Latent (nearest-exact)"}
    assert len({u.name for u in UPSCALER_TABLE}) == len(UPSCALER_TABLE)


@pytest.mark.parametrize("kw, message", [({"hires_upscaler": "R-ESRGAN 4x+"}, "hires upscaler"),
                                         ({"hires_steps": 0}, "hires_steps"), ({"hires_steps": 2.5}, "hires_steps")])
def test_bad_hires_arguments_are_one_line_errors(pipe, kw, message):
    with pytest.raises(ControlstackError, match=message):
        run(pipe, **kw)
