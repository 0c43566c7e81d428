"""Schedulers built from a model's config: SD's latent-space defaults, loud unknown names."""

from __future__ import annotations

import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.sampling import make_scheduler
from controlstack.sampling.schedulers import SD_SCHEDULER_CONFIG


def test_ddim_never_clamps_latents_unless_the_config_says_so():
    # a PNDM config (SD-1.5's scheduler/ class) has no clip_sample key: DDIM's default would be True
    pndm = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"}
    ddim = make_scheduler("ddim", pndm)
    assert ddim.config.clip_sample is False
    ddim.set_timesteps(2)
    z0 = torch.full((1, 4, 2, 2), 1.6)  # a latent beyond [-1, 1], like the bundle's channel means
    x = ddim.add_noise(z0, torch.zeros_like(z0), ddim.timesteps[:1])
    # the model predicts the noise exactly (zero): the step must move towards 1.6, not a clamped 1.0
    prev = ddim.step(torch.zeros_like(z0), ddim.timesteps[0], x).pred_original_sample
    assert torch.allclose(prev, z0, atol=1e-4)
    assert make_scheduler("ddim", {**pndm, "clip_sample": True}).config.clip_sample is True


def test_unknown_scheduler_name_fails_loudly():
    with pytest.raises(ControlstackError, match="unknown scheduler 'warp'"):
        make_scheduler("warp")
