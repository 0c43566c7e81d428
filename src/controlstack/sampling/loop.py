"""The one sampling loop (k-diffusion style: it sees a callable, never a model).

Single control, several controls, guess mode / CFG resolution weighting, Minimal Impact and
OmniControlNet all go through :func:`sample`; what differs between them lives in the denoiser
passed in (``controlstack.denoiser``) and the injection strategy it holds. The loop reproduces
``StableDiffusionControlNetPipeline.__call__``'s denoising loop step for step (scale the input,
predict ε, ``scheduler.step`` with the same ``eta`` / ``generator`` keyword rules), which is what
makes seeds mean what they mean in diffusers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Step:
    """Where the loop is: step ``index`` of ``count`` at scheduler timestep ``timestep`` (and the
    next one, None at the last step: inpainting re-noises the known region to it)."""

    index: int
    count: int
    timestep: torch.Tensor
    next_timestep: torch.Tensor | None = None

    @property
    def progress(self) -> float:
        """Sampling progress in [0, 1]: 0 at the first step, 1 at the last."""
        return self.index / (self.count - 1) if self.count > 1 else 0.0


Denoiser = Callable[[torch.Tensor, torch.Tensor, Step], torch.Tensor]


def step_kwargs(scheduler, generator: torch.Generator | None, eta: float) -> dict:
    """Keyword arguments ``scheduler.step`` accepts (diffusers' ``prepare_extra_step_kwargs``)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


class StopSampling(Exception):
    """Raised by a step ``callback``: the loop ends after that step and returns the latents reached
    (``latents`` when the raiser sets them, else the step's own) -- sd-webui's interrupt and skip,
    which keep the partly denoised image rather than nothing."""

    latents: torch.Tensor | None = None


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler,
    latents: torch.Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    progress: bool = True,
    callback: Callable[[Step, torch.Tensor], torch.Tensor | None] | None = None,
    start: Callable[[object, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    schedule: Callable[[object, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoise ``latents`` (pure noise, *not* yet scaled by ``init_noise_sigma``) in ``steps`` steps.

    ``denoiser(x, t, step) -> ε`` receives the scheduler-scaled input. ``generator`` must be the
    generator the noise was drawn from: ancestral schedulers keep drawing from it, as diffusers does.
    ``start(scheduler, steps, noise) -> (latents, timesteps)`` moves where the loop starts (img2img:
    the init image's latents noised to a later timestep, ``sampling.img2img.Img2ImgStart``);
    ``callback(step, latents)`` runs after every step and may return new latents (inpainting's blend).
    ``schedule(scheduler, steps, latents)`` lays out the timesteps where ``set_timesteps(steps)`` does
    not (Flux: its sigmas and resolution shift).
    """
    if schedule is None:
        scheduler.set_timesteps(steps, device=latents.device)
    else:
        schedule(scheduler, steps, latents)
    if start is None:
        timesteps = scheduler.timesteps
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching's have none: 1
    else:
        latents, timesteps = start(scheduler, steps, latents)
    extra = step_kwargs(scheduler, generator, eta)
    n = len(timesteps)
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching: the input as it is
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        step = Step(i, n, t, timesteps[i + 1] if i + 1 < n else None)
        x = scale_input(latents, t)
        eps = denoiser(x, t, step)
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
        if callback is not None:
            try:
                out = callback(step, latents)
            except StopSampling as stop:
                return latents if stop.latents is None else stop.latents
            latents = latents if out is None else out
    return latents
