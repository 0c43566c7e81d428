"""The one sampling loop (``sampling/loop.py``): StopSampling ends it with the latents reached."""

from __future__ import annotations

import torch

from controlstack.sampling import make_scheduler, sample
from controlstack.sampling.loop import StopSampling


def denoiser(x, t, step):
    return 0.1 * x


def test_stop_sampling_returns_the_latents_of_the_step_it_was_raised_after():
    x = torch.ones(1, 4, 8, 8)
    seen = []

    def record(step, latents):
        seen.append(latents.clone())
        if step.index == 2:
            raise StopSampling()

    stopped = sample(denoiser, make_scheduler("ddim"), x, 10, progress=False, callback=record)
    assert len(seen) == 3 and torch.equal(stopped, seen[-1])
    full = sample(denoiser, make_scheduler("ddim"), x, 10, progress=False)
    assert not torch.allclose(stopped, full)


def test_a_stop_carrying_latents_returns_those():
    marker = torch.full((1, 4, 8, 8), 7.0)

    def stop(step, latents):
        error = StopSampling()
        error.latents = marker
        raise error

    assert torch.equal(sample(denoiser, make_scheduler("euler"), torch.ones(1, 4, 8, 8), 5, progress=False,
                              callback=stop), marker)
