"""The controlled denoiser: one step of generation as data (docs/design.md, "One generation").

``ControlledDenoiser(x, t, step) -> ε`` is what the sampling loop calls. Per step it

1. runs the locked U-Net's encoder once on the CFG batch ``[uncond; cond]`` -> ``h, mid``;
2. runs every *active* branch (a control outside its start/end window is not computed at all);
   strategies with ``cond_only`` (guess mode, the paper's CFG resolution weighting) run the
   branches on the conditional half only and give the unconditional half no control;
3. lets the injection strategy turn ``h, mid`` and the branch residuals into what is added;
4. runs the U-Net's decoder and applies classifier-free guidance
   ``ε = ε_uc + β (ε_c − ε_uc)`` (ControlNet paper, Sec. 3.4).

With no active branch nothing is added and the result is the plain U-Net's, bit for bit.

SDXL bases also read *added conditions* (the pooled text embedding and the micro-conditioning
ids, ``models/sdxl.py``): they are batched like the text embedding and go with it to the U-Net
and to every branch (the conditional half alone for ``cond_only`` strategies, as diffusers' SDXL
pipelines do in guess mode).

:class:`~controlstack.models.tiers.Reuse` (the ``fast`` tier) skips steps 1-2 for some steps: FasterDiffusion (Li et al., 2023,
"Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models", Sec. 3.2: encoder
features change little between adjacent steps while decoder features change much) runs the
encoder at key steps and lets the decoder reuse its features in between with the current time
embedding; the ControlNets are encoders too and follow the same key steps.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from controlstack.control import Branch
from controlstack.injection.base import Injection
from controlstack.models.runner import UNetRunner
from controlstack.models.tiers import Reuse
from controlstack.residuals import Residuals
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
        reuse: Reuse | None = None,       # fast tier: encoder / ControlNet features reused between key steps
        added: tuple[dict | None, dict] | None = None,  # SDXL: (uncond, cond) added conditions; None: SD-1.x
        image_embeds: list[torch.Tensor] | None = None,  # IP-Adapters: the U-Net's alone, CFG-batched
        ip_masks: list[torch.Tensor] | None = None,      # ... and their region masks, one per adapter
        timestep_cond: torch.Tensor | None = None,       # a guidance-embedded U-Net's (LCM student's) w embedding
    ):
        self.unet = unet
        # T2I-Adapters add inside the encoder; every other branch to the skips (its ``point``)
        self.adapters = [b for b in branches if getattr(b, "point", "skips") == "intrablock"]
        self.branches = [b for b in branches if getattr(b, "point", "skips") == "skips"]
        self.injection = injection
        self.cond, self.uncond = cond, uncond
        self.cfg = uncond is not None
        self.guidance_scale = guidance_scale
        self.emb = torch.cat([uncond, cond]) if self.cfg else cond
        self.added_cond = added[1] if added else None
        self.added = {k: torch.cat([added[0][k], v]) for k, v in added[1].items()} if added and self.cfg \
            else self.added_cond
        self.unet_kw = {"added_cond_kwargs": self.added} if self.added else {}
        if image_embeds is not None:  # the ControlNets keep reading the text alone (diffusers' pipelines)
            self.unet_kw = {"added_cond_kwargs": {**(self.added or {}), "image_embeds": image_embeds}}
        if timestep_cond is not None:  # the U-Net's alone: diffusers' ControlNet pipelines give the ControlNets none
            self.unet_kw = {**self.unet_kw, "timestep_cond": timestep_cond}
        # the encoder's alone: the decoder reads them from its context, the time embedding never
        self.encode_kw = {"cross_attention_kwargs": {"ip_adapter_masks": ip_masks}} if ip_masks else {}
        self.unet_extra = unet_extra
        self.reuse = reuse
        self._encoded = None  # the last key step's (h, mid, ctx)
        self.calls = 0  # ControlNet forward passes, for tests and benchmarks
        self.encoder_calls = 0

    def intrablock(self, step: Step) -> dict:
        """The active T2I-Adapters' features at this step, summed per level (diffusers' MultiAdapter
        order), for the encoder; ``{}`` without any."""
        active = [b.intrablock(step) for b in self.adapters if b.active(step)]
        if not active:
            return {}
        total = active[0]
        for more in active[1:]:
            total = [a + b for a, b in zip(total, more)]
        return {"intrablock": total}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        x_in = torch.cat([x, x]) if self.cfg else x
        # an inpainting U-Net also reads the mask and the masked image's latents; the ControlNets read
        # the latents alone (diffusers' StableDiffusionControlNetInpaintPipeline)
        unet_in = x_in if self.unet_extra is None else torch.cat([x_in, self.unet_extra.to(x_in.dtype)], 1)
        fresh = self.reuse is None or self.reuse.fresh(step)
        if fresh or self._encoded is None:
            self.encoder_calls += 1
            h, mid, ctx = self.unet.encode(unet_in, t, self.emb, **self.unet_kw, **self.encode_kw,
                                           **self.intrablock(step))
            if self.reuse is not None:
                self._encoded = h, mid, ctx
        else:  # the decoder reads the key step's features at this step's time embedding
            h, mid, ctx = self._encoded
            ctx = replace(ctx, emb=self.unet.time_embed(unet_in, t, self.emb, **self.unet_kw))
        active = [b for b in self.branches if b.active(step)]
        residuals = []
        for branch in active:
            reuse = not fresh and branch.last is not None
            self.calls += not reuse
            if self.injection.cond_only and self.cfg:
                residuals.append(_pad_uncond(branch(x, t, self.cond, step, cond_only=True, reuse=reuse,
                                                    added=self.added_cond)))
            else:
                residuals.append(branch(x_in, t, self.emb, step, reuse=reuse, added=self.added))
        adds = self.injection(h, mid, residuals) if residuals else None
        eps = self.unet.decode(h, mid, ctx, adds)
        if self.cfg:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        return eps
