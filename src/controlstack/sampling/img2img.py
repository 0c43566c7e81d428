"""img2img and inpainting as changes to the one loop: where it starts, and what follows each step.

Both follow diffusers' ControlNet pipelines step for step (``StableDiffusionControlNetImg2ImgPipeline``,
``StableDiffusionControlNetInpaintPipeline``), so the same weights, seed, scheduler, strength and
mask give the same image:

* :class:`Img2ImgStart` -- SDEdit (Meng et al. 2022): of the ``steps`` timesteps only the last
  ``int(steps * strength)`` run (``get_timesteps``), and the loop starts from the init image's
  latents noised to the first of them, ``q(z_t | z_0)``. Strength 0 runs no step and returns the
  init latents. Inpainting at strength 1 starts from pure noise (``is_strength_max``).
* :class:`InpaintBlend` -- after each step, outside the mask the latents are replaced by the init
  image's latents noised to the *next* timestep (RePaint-style blending as diffusers does it for a
  4-channel U-Net); a 9-channel inpainting U-Net instead sees the mask and the masked image's
  latents as extra input channels (the denoiser's ``unet_extra``) and needs no blend.

Pure tensor / scheduler code: the pipeline encodes images and masks and hands the latents in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Start:
    """Where one run of the loop starts, typed: the initial latents (pure noise for txt2img, the
    noise img2img adds), the loop's ``start`` (None: from pure noise), the ``blend`` after each step
    (4-channel inpainting) and a 9-channel inpainting U-Net's extra input channels."""

    latents: torch.Tensor
    start: Callable | None = None
    blend: Callable | None = None
    unet_extra: torch.Tensor | None = None
    latent_size: tuple[int, int] | None = None  # (h, w) of latents the network reads packed (Flux)


def noised(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``latents`` moved to timestep ``t`` of the forward process: ``q(z_t | z_0)`` (``add_noise``), or
    on a flow-matching schedule the straight path ``(1 - σ) z_0 + σ ε`` (``scale_noise``)."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(latents, t, noise)
    return scheduler.add_noise(latents, noise, t)


def truncated_timesteps(scheduler, steps: int, strength: float, flow: bool = False) -> torch.Tensor:
    """diffusers' ``get_timesteps``: the last ``int(steps * strength)`` steps of the schedule (the
    scheduler's begin index is set so multistep schedulers count from there). The flow-matching
    pipelines (SD3, Flux) round the other way: they skip ``int(steps - steps * strength)`` steps."""
    init_timestep = min(steps * strength if flow else int(steps * strength), steps)
    t_start = int(max(steps - init_timestep, 0))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler.timesteps[t_start * scheduler.order:]


@dataclass
class Img2ImgStart:
    init_latents: torch.Tensor          # the init image's scaled VAE latents, (B, C, h, w)
    strength: float                     # 0: return the init image; 1: all steps
    pure_noise_at_full: bool = False    # inpainting: strength 1 starts from noise alone
    flow: bool = False                  # a flow-matching base (its pipelines' step rounding)

    def __call__(self, scheduler, steps: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = truncated_timesteps(scheduler, steps, self.strength, self.flow)
        if len(timesteps) == 0:
            return self.init_latents, timesteps
        if self.pure_noise_at_full and self.strength == 1.0:
            return noise * getattr(scheduler, "init_noise_sigma", 1.0), timesteps
        t0 = timesteps[:1].repeat(noise.shape[0])
        return noised(scheduler, self.init_latents, noise, t0), timesteps


@dataclass
class InpaintBlend:
    scheduler: object
    image_latents: torch.Tensor         # the init image's latents (the known region's truth)
    noise: torch.Tensor                 # the start's noise, reused as diffusers does
    mask: torch.Tensor                  # (B, 1, h, w), 1 = repaint, at latent resolution

    def __call__(self, step, latents: torch.Tensor) -> torch.Tensor:
        known = self.image_latents
        if step.next_timestep is not None:
            known = noised(self.scheduler, known, self.noise, torch.tensor([step.next_timestep]))
        return (1 - self.mask) * known + self.mask * latents
