"""Controls on transformer (MMDiT) bases -- SD3 / SD3.5 and Flux.1: their ControlNet branches and
the denoisers the one loop calls for such a base (the U-Net's is ``denoiser.ControlledDenoiser``;
:data:`TRANSFORMER_DENOISERS` is the pipeline's table by ``BaseFamily.network``).

An SD3 ControlNet (diffusers' ``SD3ControlNetModel``; InstantX's and Stability's SD3 / SD3.5
ControlNets) is a copy of the first joint blocks of the transformer that reads the noisy latents
plus the *VAE latents* of the condition image (through a zero-initialised patch embedding) and
returns one residual per copied block, each through a zero-initialised linear layer; the
transformer adds residual ``int(i / interval)`` after its block ``i`` (``interval`` = blocks per
residual), which is how a short ControlNet spreads over a deep transformer. Several ControlNets
add their residuals (diffusers' ``SD3MultiControlNetModel``).

What carries over from the U-Net's controls: the weight (a number or a schedule, diffusers'
``controlnet_conditioning_scale``), the window (start / end: outside it the branch is skipped, as
diffusers' ``controlnet_keep``). The modes keep their meaning on the
list of block residuals (:func:`block_weights`: ``prompt`` weakens the early blocks, ``controlnet`` /
``guess`` act on the conditional CFG half only); Minimal Impact's balancing is built on a U-Net's
skips and is refused here.

A Flux ControlNet (InstantX's, Shakker's Union, XLabs') returns residuals for the double- and the
single-stream blocks; a Flux *Control* base (Canny-dev / Depth-dev) reads its condition's latents
concatenated to its input instead (:class:`InputCondition`).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from controlstack.control import RegionMask, in_window, weight_at
from controlstack.errors import ControlstackError
from controlstack.injection.mi import balanced_combination, balanced_lambda
from controlstack.models.families.flux import written
from controlstack.models.vae import latent_stats
from controlstack.sampling.loop import Step
from controlstack.tasks import BASE_CONDITION


def check_mode(injection) -> None:
    """The modes that have a meaning on per-block residuals: the weighted sums and Minimal Impact's
    balancing (:class:`Balanced`)."""
    if not (injection.name in ("sum", "mi") or hasattr(injection, "layer_weights")):
        raise ControlstackError(f"mode '{injection.name}' acts on a U-Net's skip residuals; on a transformer base "
                                "use balanced, prompt, controlnet, guess or mi")


def block_weights(injection, residuals: list[torch.Tensor]) -> list:
    """The mode's weight per block residual, as its per-layer weights over a U-Net's skips + middle
    (``injection/modes.py``): balanced 1; prompt ``0.825 ** (N - 1 - i)``; controlnet's
    ``resolution`` weighting is 1 everywhere here (every block works at one token resolution),
    its ``soft`` the prompt curve; guess diffusers' logspace 0.1 -> 1."""
    if not hasattr(injection, "layer_weights"):
        return [1.0] * len(residuals)
    return list(injection.layer_weights(residuals[:-1], residuals[-1]))


def weighted(injection, residuals, cfg: bool):
    """The residuals with the mode applied: its block weights, and for the modes that act on the
    conditional CFG half only (controlnet, guess), zeros on the unconditional half."""
    if residuals is None:
        return None
    out = [r * w for r, w in zip(residuals, block_weights(injection, residuals))]
    if injection.cond_only and cfg:
        out = [torch.cat([torch.zeros_like(r[: len(r) // 2]), r[len(r) // 2:]]) for r in out]
    return out


def _as_channels_first(x: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, N, D)`` as ``(B, D, N)``: the MI helpers reduce over dim 1 for ``position``."""
    return x.transpose(1, 2)


class Balanced:
    """Minimal Impact ControlNet's balancing on a transformer's block residuals (``injection/mi.py``,
    MIControlNet Sec. 4.2): the *combination* of several ControlNets' residuals for one block
    (eq. 11-12: min-norm weights instead of their sum), then the *injection* ``h + λ c`` with
    ``λ = clip((1 - γ*) / γ*, 0, λ_max)``, ``γ* = MGDA(h, c)`` (eq. 8-10), where ``h`` is the image
    tokens the block wrote -- the feature the residual is added to, as a U-Net skip is the feature
    its residual joins. ``reduce="layer"``: one λ per sample and block; ``"position"``: per token.

    The injection needs ``h``, which exists only inside the transformer's forward: forward hooks on
    the blocks add ``λ c`` where diffusers' transformers add ``c`` (the same block-to-residual
    mapping), so the transformer runs eagerly under this mode (the compiled graphs never see hooks)."""

    def __init__(self, injection):
        self.mi = injection

    def _tokens(self, fn, xs: list[torch.Tensor]) -> torch.Tensor:
        """``fn(xs)`` with the tokens as the MI helpers read them: for ``position`` the width must be
        their channel dim (dim 1), so ``(B, N, D)`` goes in and comes back as ``(B, D, N)``."""
        if self.mi.reduce == "position":
            return _as_channels_first(fn([_as_channels_first(x) for x in xs]))
        return fn(xs)

    def combine(self, per_branch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """One residual per block from every branch's (eq. 11-12, or their sum with ``combine=False``)."""
        if not self.mi.combine or len(per_branch) == 1:
            return summed(per_branch)
        return [self._tokens(lambda xs: balanced_combination(xs, self.mi.reduce, False), list(cs))
                for cs in zip(*per_branch)]

    def lam(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self._tokens(lambda hc: balanced_lambda(*hc, self.mi.reduce, self.mi.lambda_max,
                                                       self.mi.saturated_lambda), [h, c])

    @contextlib.contextmanager
    def injected(self, plan: list[tuple[torch.nn.Module, torch.Tensor]]):
        """Hooks adding ``λ c`` to each planned block's image tokens for the duration of one call."""
        def hook(c):
            def add(module, args, output):
                encoder, hidden = output
                return encoder, hidden + self.lam(hidden, c).to(hidden.dtype) * c
            return add

        handles = [block.register_forward_hook(hook(c)) for block, c in plan]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def run_transformer(transformer, balanced: Balanced | None, kw: dict, per_branch: dict[str, list], plan):
    """The transformer's call (its tier's ``ModelCall``) with the active branches' residuals under
    each keyword (``per_branch``: keyword -> one residual list per branch): summed in branch order as
    diffusers' Multi ControlNets add them, or under ``mi`` combined (:meth:`Balanced.combine`) and,
    with its injection, added as ``h + λ c`` by hooks placed by ``plan(module, *residual lists)``."""
    if balanced is None or not any(per_branch.values()):
        return transformer(**kw, **{k: summed(v) for k, v in per_branch.items()})[0]
    combined = {k: balanced.combine(v) if v else None for k, v in per_branch.items()}
    if not balanced.mi.inject:
        return transformer(**kw, **combined)[0]
    module = transformer.module  # hooks: eager (Balanced)
    with balanced.injected(plan(module, *combined.values())):
        return module(**kw, **dict.fromkeys(combined), return_dict=False)[0]


def sd3_plan(transformer, residuals: list[torch.Tensor]) -> list:
    """(block, residual) pairs as ``SD3Transformer2DModel.forward`` adds them: residual
    ``int(i / interval)`` after block ``i``, except after a block whose context stream ends there."""
    blocks = transformer.transformer_blocks
    interval = len(blocks) / len(residuals)
    return [(b, residuals[int(i / interval)]) for i, b in enumerate(blocks) if b.context_pre_only is False]


def flux_plan(transformer, double: list | None, single: list | None, repeat: bool) -> list:
    """(block, residual) pairs as ``FluxTransformer2DModel.forward`` adds them (XLabs' repeat too)."""
    plan = []
    for blocks, res in ((transformer.transformer_blocks, double), (transformer.single_transformer_blocks, single)):
        if not res:
            continue
        interval = int(np.ceil(len(blocks) / len(res)))
        plan += [(b, res[i % len(res)] if repeat and res is double else res[i // interval]) for i, b in enumerate(blocks)]
    return plan


def is_mmdit_controlnet(model) -> bool:
    """Whether a control model is an SD3 ControlNet (diffusers' ``SD3ControlNetModel``)."""
    return type(model).__name__ == "SD3ControlNetModel"


def token_mask(mask, rows: int, cols: int) -> torch.Tensor | None:
    """A control's region mask on the token grid (``rows`` x ``cols`` patches, row-major as the
    transformers flatten them), area-averaged as the U-Net's residuals get it: ``(1, tokens, 1)``."""
    region = RegionMask(mask)
    if region.mask is None:
        return None
    return region.at(torch.zeros(1, 1, rows, cols)).reshape(1, rows * cols, 1)


def masked(residuals, mask: torch.Tensor | None):
    return residuals if mask is None or residuals is None else [r * mask.to(r) for r in residuals]


def attach(controlnet, transformer):
    """SD3.5's own ControlNets have no position embedding: they share the transformer's (set once,
    as diffusers' pipeline constructor does)."""
    if controlnet.config.get("use_pos_embed") is False and controlnet.pos_embed is None:
        pos = controlnet._get_pos_embed_from_transformer(transformer)
        controlnet.pos_embed = pos.to(controlnet.device, controlnet.dtype)
    return controlnet


def reads_mask(controlnet) -> bool:
    """An inpainting ControlNet (Alimama's SD3 one): its input is the masked image's latents plus
    the mask, one extra channel."""
    return controlnet.config.get("extra_conditioning_channels", 0) == 1


@torch.no_grad()
def inpaint_latents(vae, hint: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An inpainting ControlNet's input, as ``StableDiffusion3ControlNetInpaintingPipeline`` makes it: the
    image with the masked pixels (``mask`` > 0.5, binarised at the output size) at -1, its VAE latents
    (posterior mean, shifted and scaled), and ``1 - mask`` at the latent size (nearest)."""
    image = (hint * 2 - 1).to(vae.device, vae.dtype)
    mask = mask.to(image)
    image = torch.where(mask > 0.5, torch.full_like(image, -1.0), image)
    z = vae.encode(image).latent_dist.mean
    z = (z - latent_stats(vae.config, z)[0]) * vae.config.scaling_factor
    small = torch.nn.functional.interpolate(mask, size=tuple(z.shape[-2:]))
    return torch.cat([z, 1 - small], dim=1)


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
    """One SD3 ControlNet with its condition latents (CFG-batched), weight and window. ``call`` is the
    ControlNet's call in the pipeline's tier (``models/tiers.py``): run at weight 1, the weight applied
    after, so the fast tier can reuse the unweighted residuals of its last key step."""

    point = "blocks"

    def __init__(self, controlnet, latents: torch.Tensor, weight, start: float, end: float, mask=None, call=None):
        self.controlnet, self.latents = controlnet, latents
        self.call = call or controlnet
        self.weight, self.start, self.end = weight, start, end
        self.mask = token_mask(mask, latents.shape[-2] // controlnet.config.patch_size,
                               latents.shape[-1] // controlnet.config.patch_size)
        self.reads_mask = reads_mask(controlnet)
        self.last = None  # the last residuals, unweighted (models.tiers.Reuse)

    def active(self, step: Step) -> bool:
        return in_window(self.start, self.end, step)

    def __call__(self, x, timestep, hidden, pooled, step: Step, reuse: bool = False) -> list[torch.Tensor]:
        if not (reuse and self.last is not None):
            config = self.controlnet.config
            if config.get("force_zeros_for_pooled_projection"):
                pooled = torch.zeros_like(pooled)
            if config.get("joint_attention_dim") is None:  # SD3.5's official ControlNets read no text
                hidden = None
            self.last = self.call(hidden_states=x, timestep=timestep, encoder_hidden_states=hidden,
                                  pooled_projections=pooled, controlnet_cond=self.latents.to(x.dtype),
                                  conditioning_scale=1.0)[0]
        w = weight_at(self.weight, step.progress)
        return masked([r * w for r in self.last], self.mask)


class MMDiTDenoiser:
    """The denoiser of a transformer base: ``v`` from the transformer with the active ControlNets'
    block residuals summed in, then classifier-free guidance. The fast tier's reuse runs the
    ControlNets at its key steps only (``models.tiers.Reuse``)."""

    def __init__(self, pipe, branches, injection, cond, uncond, guidance_scale: float, added, latent_size):
        check_mode(injection)
        self.transformer, self.branches, self.injection = pipe.runners.transformer, branches, injection
        self.balanced = Balanced(injection) if injection.name == "mi" else None
        self.reuse = pipe.tier.reuse
        self.cfg = uncond is not None
        self.guidance_scale = guidance_scale
        self.hidden = torch.cat([uncond, cond]) if self.cfg else cond
        self.pooled = torch.cat([added[0]["pooled"], added[1]["pooled"]]) if self.cfg else added[1]["pooled"]
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        x_in = torch.cat([x, x]) if self.cfg else x
        timestep = t.expand(x_in.shape[0])
        outs = []
        for branch in (b for b in self.branches if b.active(step)):
            reuse = reused(self.reuse, step, branch)
            self.calls += not reuse
            outs.append(weighted(self.injection, branch(x_in, timestep, self.hidden, self.pooled, step, reuse), self.cfg))
        kw = dict(hidden_states=x_in, timestep=timestep, encoder_hidden_states=self.hidden,
                  pooled_projections=self.pooled)
        v = run_transformer(self.transformer, self.balanced, kw, {"block_controlnet_hidden_states": outs}, sd3_plan)
        if self.cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
        return v


def summed(outs: list[list[torch.Tensor]]) -> list[torch.Tensor] | None:
    """Several branches' residual lists added block by block, in branch order (diffusers' Multi
    ControlNets add them one after the other: the same rounding)."""
    total = None
    for out in outs:
        total = list(out) if total is None else [a + b for a, b in zip(total, out)]
    return total


def reused(reuse, step: Step, branch) -> bool:
    """Whether a branch takes its last residuals at this step: the fast tier, between key steps."""
    return reuse is not None and not reuse.fresh(step) and branch.last is not None


# -- Flux ------------------------------------------------------------------------------------------

def is_flux_controlnet(model) -> bool:
    """Whether a control model is a Flux ControlNet (diffusers' ``FluxControlNetModel``: InstantX's,
    Shakker's Union, XLabs')."""
    return type(model).__name__ == "FluxControlNetModel"


def flux_control_input(pipe, controlnet, hint: torch.Tensor, batch: int, generator) -> torch.Tensor:
    """What a Flux ControlNet reads: the condition image in [-1, 1] for one with its own hint encoder
    (XLabs' ``input_hint_block``), else its VAE latents -- a posterior *sample* drawn from the call's
    generator, before the noise, as diffusers' ``FluxControlNetPipeline`` draws it -- shifted, scaled
    and packed into 2x2 patches."""
    image = (hint * 2 - 1).to(pipe.vae.device, pipe.vae.dtype).repeat(batch, 1, 1, 1)
    if controlnet.input_hint_block is not None:
        return image
    z = pipe.vae.encode(image).latent_dist.sample(generator)
    return pipe.family.pack((z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor)


#: InstantX / Shakker's Flux ControlNet-Union: condition type -> its control mode id (their model card)
FLUX_UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}


def flux_mode(controlnet, control) -> int | None:
    """A Union model's mode id for ``control.task`` (None for a single-condition ControlNet)."""
    if controlnet.config.get("num_mode") is None:
        if control.task is not None:
            raise ControlstackError(f"this Flux ControlNet takes one condition type; task='{control.task}' is for "
                                    "a ControlNet-Union")
        return None
    if control.task not in FLUX_UNION_MODES:
        raise ControlstackError(f"a Flux ControlNet-Union needs task= one of {', '.join(FLUX_UNION_MODES)}, got "
                                f"{control.task!r}")
    return FLUX_UNION_MODES[control.task]




def reads_condition(transformer) -> bool:
    """A Flux Control base: it reads twice the channels it writes (latents + the condition's latents)."""
    return transformer.config.in_channels == 2 * written(transformer)


class InputCondition:
    """The condition of a Flux Control base, packed and concatenated to the latents at every step
    (diffusers' ``FluxControlPipeline``); it has no weight or window: the model was trained with it
    in its input."""

    point = "input"

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def active(self, step: Step) -> bool:
        return False  # not a residual branch


def input_condition(pipe, control, hint: torch.Tensor, batch: int, generator) -> InputCondition:
    if not reads_condition(pipe.unet):
        raise ControlstackError(f"Control('{BASE_CONDITION}', image) is for a Flux Control base (Canny-dev, "
                                "Depth-dev), which reads the condition itself; this base does not")
    if control.weight != 1.0 or control.start not in (None, 0.0) or control.end not in (None, 1.0):
        raise ControlstackError("a Flux Control base reads its condition at every step at weight 1 (it is part "
                                "of its input); leave weight, start and end unset")
    image = (hint * 2 - 1).to(pipe.vae.device, pipe.vae.dtype).repeat(batch, 1, 1, 1)
    z = pipe.vae.encode(image).latent_dist.sample(generator)
    return InputCondition(pipe.family.pack((z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor))


class FluxBranch:
    """One Flux ControlNet: its input, weight, window and (a Union model's) control mode; run at
    weight 1 through ``call`` (its tier's), the weight applied after, as :class:`MMDiTBranch`."""

    point = "blocks"

    def __init__(self, controlnet, cond: torch.Tensor, weight, start: float, end: float, mode: int | None = None,
                 mask=None, latent_size: tuple[int, int] = (2, 2), call=None):
        self.controlnet, self.cond, self.mode = controlnet, cond, mode
        self.call = call or controlnet
        self.weight, self.start, self.end = weight, start, end
        self.mask = token_mask(mask, latent_size[0] // 2, latent_size[1] // 2)  # 2x2 patches
        self.last = None  # the last (double, single) residuals, unweighted

    def active(self, step: Step) -> bool:
        return in_window(self.start, self.end, step)

    def __call__(self, x, timestep, kw: dict, guidance_scale: float, step: Step, reuse: bool = False):
        if not (reuse and self.last is not None):
            guidance = (torch.full([x.shape[0]], guidance_scale, device=x.device)
                        if self.controlnet.config.guidance_embeds else None)
            mode = None if self.mode is None else torch.tensor([[self.mode]] * x.shape[0], device=x.device)
            self.last = self.call(hidden_states=x, controlnet_cond=self.cond.to(x.dtype), controlnet_mode=mode,
                                  conditioning_scale=1.0, timestep=timestep, guidance=guidance, **kw)
        w = weight_at(self.weight, step.progress)
        double, single = ([r * w for r in rs] if rs is not None else None for rs in self.last)
        return masked(double, self.mask), masked(single, self.mask)


class FluxDenoiser:
    """The denoiser of a Flux base: the transformer on packed latents with its position ids, the
    guidance embedded (no CFG batch), the active ControlNets' double- and single-block residuals
    summed in (diffusers' ``FluxMultiControlNetModel``)."""

    def __init__(self, pipe, branches, injection, cond, uncond, guidance_scale: float, added, latent_size):
        check_mode(injection)  # no CFG batch: the cond-half modes differ from the others by their weights alone
        inputs = [b.latents for b in branches if b.point == "input"]
        self.extra = inputs[0] if inputs else None  # a Flux Control base's condition (concatenated)
        branches = [b for b in branches if b.point != "input"]
        self.transformer, self.branches, self.injection = pipe.runners.transformer, branches, injection
        self.balanced = Balanced(injection) if injection.name == "mi" else None
        self.reuse = pipe.tier.reuse
        self.guidance_embeds = pipe.unet.config.guidance_embeds
        self.guidance_scale = guidance_scale
        self.kw = {"pooled_projections": added[1]["pooled"], "encoder_hidden_states": cond,
                   "txt_ids": torch.zeros(cond.shape[1], 3, device=cond.device, dtype=cond.dtype),
                   "img_ids": pipe.family.image_ids(*latent_size, cond)}
        # XLabs' ControlNets (own hint encoder) have few blocks that repeat over the transformer's
        self.repeat = any(b.controlnet.input_hint_block is not None for b in branches)
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: Step) -> torch.Tensor:
        timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
        doubles, singles = [], []
        for branch in (b for b in self.branches if b.active(step)):
            reuse = reused(self.reuse, step, branch)
            self.calls += not reuse
            d, s = branch(x, timestep, self.kw, self.guidance_scale, step, reuse)
            doubles.append(weighted(self.injection, d, False))
            if s is not None:
                singles.append(weighted(self.injection, s, False))
        guidance = torch.full([x.shape[0]], self.guidance_scale, device=x.device) if self.guidance_embeds else None
        x_in = x if self.extra is None else torch.cat([x, self.extra.to(x)], dim=2)
        kw = dict(hidden_states=x_in, timestep=timestep, guidance=guidance, controlnet_blocks_repeat=self.repeat,
                  **self.kw)
        return run_transformer(self.transformer, self.balanced, kw, {"controlnet_block_samples": doubles,
                                                                     "controlnet_single_block_samples": singles},
                               functools.partial(flux_plan, repeat=self.repeat))


#: the pipeline's denoiser per transformer network kind (``BaseFamily.network``)
TRANSFORMER_DENOISERS = {"mmdit": MMDiTDenoiser, "flux": FluxDenoiser}
