"""Controls on a transformer (MMDiT) base: the SD3 ControlNet branch and the denoiser the one loop
calls for such a base (the U-Net's is ``denoiser.ControlledDenoiser``).

An SD3 ControlNet (diffusers' ``SD3ControlNetModel``; InstantX's and Stability's SD3 / SD3.5
ControlNets) is a copy of the first joint blocks of the transformer that reads the noisy latents
plus the *VAE latents* of the condition image (through a zero-initialised patch embedding) and
returns one residual per copied block, each through a zero-initialised linear layer; the
transformer adds residual ``int(i / interval)`` after its block ``i`` (``interval`` = blocks per
residual), which is how a short ControlNet spreads over a deep transformer. Several ControlNets
add their residuals (diffusers' ``SD3MultiControlNetModel``).

What carries over from the U-Net's controls: the weight (a number or a schedule, diffusers'
``controlnet_conditioning_scale``), the window (start / end: outside it the branch is skipped, as
diffusers' ``controlnet_keep``). The mode is diffusers' ``balanced`` (both CFG halves); the U-Net's
other modes and the Minimal Impact injection act on skip residuals and are refused here.
"""

from __future__ import annotations

import torch

from controlstack.control import in_window, weight_at
from controlstack.errors import ControlstackError
from controlstack.models.vae import latent_stats
from controlstack.sampling.loop import Step

MODES = ("balanced",)


def is_mmdit_controlnet(model) -> bool:
    """Whether a control model is an SD3 ControlNet (diffusers' ``SD3ControlNetModel``)."""
    return type(model).__name__ == "SD3ControlNetModel"


def attach(controlnet, transformer):
    """SD3.5's own ControlNets have no position embedding: they share the transformer's (set once,
    as diffusers' pipeline constructor does)."""
    if controlnet.config.get("use_pos_embed") is False and controlnet.pos_embed is None:
        pos = controlnet._get_pos_embed_from_transformer(transformer)
        controlnet.pos_embed = pos.to(controlnet.device, controlnet.dtype)
    return controlnet


@torch.no_grad()
def control_latents(vae, controlnet, hint: torch.Tensor) -> torch.Tensor:
    """The condition image (``hint`` in [0, 1]) as the ControlNet reads it: the VAE posterior's mean,
    shifted and scaled as the base's latents -- except for ControlNets that zero the pooled
    projection (InstantX's SD3 ones), which were trained without the shift (diffusers' rule).

    diffusers' SD3 ControlNet pipelines take a *sample* of the posterior drawn from torch's global
    generator, so their image varies from run to run by that noise; the mean is what a seeded,
    reproducible generation can use (identical where the posterior is sharp)."""
    z = vae.encode((hint * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mean
    shift = 0.0 if controlnet.config.get("force_zeros_for_pooled_projection") else latent_stats(vae.config, z)[0]
    return (z - shift) * vae.config.scaling_factor


class MMDiTBranch:
    """One SD3 ControlNet with its condition latents (CFG-batched), weight and window."""

    point = "blocks"

    def __init__(self, controlnet, latents: torch.Tensor, weight, start: float, end: float):
        self.controlnet, self.latents = controlnet, latents
        self.weight, self.start, self.end = weight, start, end
        self.last = None

    def active(self, step: Step) -> bool:
        return in_window(self.start, self.end, step)

    def __call__(self, x, timestep, hidden, pooled, step: Step) -> list[torch.Tensor]:
        config = self.controlnet.config
        if config.get("force_zeros_for_pooled_projection"):
            pooled = torch.zeros_like(pooled)
        if config.get("joint_attention_dim") is None:  # SD3.5's official ControlNets read no text
            hidden = None
        return self.controlnet(hidden_states=x, timestep=timestep, encoder_hidden_states=hidden, pooled_projections=pooled,
                               controlnet_cond=self.latents.to(x.dtype),
                               conditioning_scale=weight_at(self.weight, step.progress), return_dict=False)[0]


class MMDiTDenoiser:
    """The denoiser of a transformer base: ``v`` from the transformer with the active ControlNets'
    block residuals summed in, then classifier-free guidance."""

    def __init__(self, transformer, branches, injection, cond, uncond, guidance_scale: float, added):
        if injection.name not in ("sum", "balanced"):
            raise ControlstackError("on a transformer base the controls act in diffusers' balanced mode; "
                                    f"mode '{injection.name}' is for U-Net bases")
        self.transformer, self.branches = transformer, branches
        self.cfg = uncond is not None
        self.guidance_scale = guidance_scale
        self.hidden = torch.cat([uncond, cond]) if self.cfg else cond
        self.pooled = torch.cat([added[0]["pooled"], added[1]["pooled"]]) if self.cfg else added[1]["pooled"]
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        x_in = torch.cat([x, x]) if self.cfg else x
        timestep = t.expand(x_in.shape[0])
        residuals = None
        for branch in (b for b in self.branches if b.active(step)):
            self.calls += 1
            out = branch(x_in, timestep, self.hidden, self.pooled, step)
            residuals = list(out) if residuals is None else [a + b for a, b in zip(residuals, out)]
        v = self.transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=self.hidden,
                             pooled_projections=self.pooled, block_controlnet_hidden_states=residuals,
                             return_dict=False)[0]
        if self.cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
        return v
