"""Minimal Impact's balancing on transformer block residuals (``mmdit.Balanced``): with both parts
off it is the plain sum (diffusers' Multi ControlNet); two identical ControlNets combine to their
sum; the injection adds ``λ c`` after exactly the blocks where diffusers' transformers add ``c``, with
the closed-form λ of eq. 8-10 computed from the block's own output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack import Control, Pipeline
from controlstack.mmdit import Balanced, flux_plan, sd3_plan
from tests.parity import assert_same_image

SIZE = 32
KW = {"steps": 3, "seed": 1, "width": SIZE, "height": SIZE, "progress": False, "output_type": "np"}


@pytest.fixture(scope="module")
def models():
    from controlstack.models.tiny_mmdit import tiny_flux, tiny_flux_controlnet, tiny_sd3, tiny_sd3_controlnet

    sd3, flux = tiny_sd3(seed=0, with_t5=False), tiny_flux(seed=0)
    return {"sd3": (sd3, [tiny_sd3_controlnet(sd3.unet, seed=s) for s in (5, 6)], 5.0),
            "flux": (flux, [tiny_flux_controlnet(flux.unet, seed=s) for s in (5, 6)], 3.5)}


@pytest.fixture(scope="module")
def hints():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_mi_with_both_parts_off_is_the_plain_sum_and_on_it_changes_the_image(family, models, hints):
    c, cns, cfg = models[family]
    pipe = Pipeline(c)
    controls = [Control(cn, h) for cn, h in zip(cns, hints)]
    plain = pipe("a red cube", controls, cfg=cfg, mode="balanced", **KW)
    off = pipe("a red cube", controls, cfg=cfg, mode="mi", mode_options={"combine": False, "inject": False}, **KW)
    assert_same_image(off, plain)
    on = pipe("a red cube", controls, cfg=cfg, mode="mi", mode_options={"lambda_max": 20.0}, **KW)
    assert np.abs(on - plain).max() > 1e-3


def test_two_identical_controlnets_combine_to_their_sum(models, hints):
    c, cns, cfg = models["sd3"]
    pipe = Pipeline(c)
    twice = [Control(cns[0], hints[0]), Control(cns[0], hints[0])]
    assert_same_image(pipe("a red cube", twice, cfg=cfg, mode="mi", mode_options={"inject": False}, **KW),
                      pipe("a red cube", twice, cfg=cfg, mode="balanced", **KW))


@pytest.mark.parametrize("reduce", ["layer", "position"])
def test_the_injection_adds_the_closed_form_lambda_where_diffusers_adds_the_residual(models, hints, monkeypatch, reduce):
    c, cns, cfg = models["sd3"]
    seen = []
    original = Balanced.lam

    def record(self, h, r):
        lam = original(self, h, r)
        seen.append((h.detach().double(), r.detach().double(), lam))
        return lam

    monkeypatch.setattr(Balanced, "lam", record)
    Pipeline(c)("a red cube", [Control(cns[0], hints[0])], cfg=cfg, mode="mi",
                mode_options={"reduce": reduce, "lambda_max": 20.0}, **KW)
    # 4 joint blocks, the last one's context stream ends there (diffusers adds no residual after it): 3 per step
    assert len(seen) == 3 * KW["steps"]
    for h, r, lam in seen:
        dims = (1, 2) if reduce == "layer" else (2,)
        hh, hc, cc = (h * h).sum(dims), (h * r).sum(dims), (r * r).sum(dims)
        gamma = ((cc - hc) / (hh + cc - 2 * hc)).clamp(0, 1)
        want = torch.where(gamma > 0, ((1 - gamma) / gamma).clamp(0, 20), torch.ones_like(gamma))
        torch.testing.assert_close(lam.reshape(want.shape), want, rtol=1e-6, atol=1e-9)


def test_the_plans_follow_diffusers_block_to_residual_mapping(models):
    c, _, _ = models["sd3"]
    t = c.unet  # 4 joint blocks; a 2-residual ControlNet spreads each over 2 blocks
    res = [torch.zeros(1), torch.ones(1)]
    assert [float(r) for _, r in sd3_plan(t, res)] == [0.0, 0.0, 1.0]  # the last block gets none
    from controlstack.models.tiny_mmdit import tiny_flux

    f = tiny_flux(seed=0, num_layers=3, num_single_layers=4).unet
    d, s = [torch.zeros(1), torch.ones(1)], [torch.full((1,), 2.0)]
    assert [float(r) for _, r in flux_plan(f, d, s, False)] == [0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]  # ceil(3 / 2) = 2
    assert [float(r) for _, r in flux_plan(f, d, None, True)] == [0.0, 1.0, 0.0]  # XLabs: repeat
