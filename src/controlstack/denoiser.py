"""The controlled denoiser: one step of generation as data (see DESIGN.md).

``ControlledDenoiser(x, t, step) -> ε`` is what the sampling loop calls. Per step it

1. runs the locked U-Net's encoder once on the CFG batch ``[uncond; cond]`` -> ``h, mid``;
2. runs every *active* branch (a control outside its start/end window is not computed at all);
   strategies with ``cond_only`` (guess mode, the paper's CFG resolution weighting) run the
   branches on the conditional half only and give the unconditional half no control;
3. lets the injection strategy turn ``h, mid`` and the branch residuals into what is added;
4. runs the U-Net's decoder and applies classifier-free guidance
   ``ε = ε_uc + β (ε_c − ε_uc)`` (ControlNet paper, Sec. 3.4).

With no active branch nothing is added and the result is the plain U-Net's, bit for bit.
"""

from __future__ import annotations

import torch

from controlstack.control import Branch
from controlstack.injection.base import Injection, Residuals
from controlstack.models.runner import UNetRunner
from controlstack.sampling.loop import Step


def _pad_uncond(res: Residuals) -> Residuals:
    """Zero residuals for the unconditional half, as diffusers' guess mode does."""
    return Residuals(
        [torch.cat([torch.zeros_like(d), d]) for d in res.downs],
        torch.cat([torch.zeros_like(res.mid), res.mid]),
    )


class ControlledDenoiser:
    def __init__(
        self,
        unet: UNetRunner,
        branches: list[Branch],
        injection: Injection,
        cond: torch.Tensor,               # text embedding of the prompt, (B, L, D)
        uncond: torch.Tensor | None,      # of the negative prompt; None = no CFG
        guidance_scale: float,
        unet_extra: torch.Tensor | None = None,  # extra U-Net input channels (9-channel inpainting), CFG-batched
    ):
        self.unet = unet
        self.branches = branches
        self.injection = injection
        self.cond, self.uncond = cond, uncond
        self.cfg = uncond is not None
        self.guidance_scale = guidance_scale
        self.emb = torch.cat([uncond, cond]) if self.cfg else cond
        self.unet_extra = unet_extra
        self.calls = 0  # ControlNet forward passes, for tests and benchmarks

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        x_in = torch.cat([x, x]) if self.cfg else x
        # an inpainting U-Net also reads the mask and the masked image's latents; the ControlNets read
        # the latents alone (diffusers' StableDiffusionControlNetInpaintPipeline)
        unet_in = x_in if self.unet_extra is None else torch.cat([x_in, self.unet_extra.to(x_in.dtype)], 1)
        h, mid, ctx = self.unet.encode(unet_in, t, self.emb)
        active = [b for b in self.branches if b.active(step)]
        residuals = []
        for branch in active:
            self.calls += 1
            if self.injection.cond_only and self.cfg:
                residuals.append(_pad_uncond(branch(x, t, self.cond, step, cond_only=True)))
            else:
                residuals.append(branch(x_in, t, self.emb, step))
        adds = self.injection(h, mid, residuals) if residuals else None
        eps = self.unet.decode(h, mid, ctx, adds)
        if self.cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        return eps
