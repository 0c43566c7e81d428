"""Speed tiers: ``parity``, ``compiled`` and ``fast`` (``Pipeline.optimize(TIER)``, ``--optimize``).

* ``parity``   -- float32 eager torch, the numbers of diffusers' pipelines (the default).
* ``compiled`` -- the same math through AOTInductor (:mod:`controlstack.models.compiled`): the
  U-Net halves, every ControlNet and the VAE decoder, float32, static shapes, cached on disk.
  Differences to parity are float rounding (~3e-6 on ε).
* ``fast``     -- ``compiled`` plus approximations, each measured (docs/speed.md): bf16 graphs
  where the CPU runs bf16 natively (:func:`controlstack.models.speed.bf16_speedup` times a model-
  shaped workload; AVX2-only CPUs stay float32), and FasterDiffusion-style reuse (Li et al., 2023,
  "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models"): after the first
  steps the U-Net encoder and every ControlNet run only every ``every``-th step, their features
  reused by the decoder in between (:class:`controlstack.denoiser.Reuse`).

The runners here have the interface of :class:`UNetRunner` / :class:`ControlNetRunner`, so the
denoiser, the injection strategies, masks, schedules and windows work unchanged; a call the graph
cannot serve (attention masks, class labels, SDXL's added conditions) runs the parity path and
says so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from controlstack.denoiser import Reuse
from controlstack.errors import ControlstackError
from controlstack.injection.base import Residuals
from controlstack.models.compiled import CompiledGraph
from controlstack.models.runner import ControlNetRunner, UNetContext, UNetRunner

log = logging.getLogger("controlstack")

TIERS = ("parity", "compiled", "fast")


@dataclass(frozen=True)
class Tier:
    """What a tier does: whether the models are compiled, in which precision, and which reuse."""

    name: str = "parity"
    compiled: bool = False
    precision: str = "fp32"            # "fp32" | "bf16" (fast tier, where measured faster)
    reuse: Reuse | None = None         # U-Net encoder / ControlNet reuse between key steps (fast tier)

    def describe(self) -> str:
        if not self.compiled:
            return "parity (float32 eager, as diffusers)"
        parts = [f"compiled ({self.precision}, AOTInductor)"]
        if self.reuse is not None:
            parts.append(f"encoder + ControlNets every {self.reuse.every} steps after {self.reuse.after:.0%}")
        return ", ".join(parts)


#: the fast tier's reuse: chosen on the bench model and the bundled one (docs/speed.md)
FAST_REUSE = Reuse(every=2, after=0.25)


def make_tier(name: str, precision: str | None = None) -> Tier:
    """The tier called ``name``; ``fast`` measures whether bf16 is faster here unless given."""
    if name not in TIERS:
        raise ControlstackError(f"unknown optimisation tier '{name}'; choose one of {', '.join(TIERS)}")
    if name == "parity":
        return Tier()
    if name == "compiled":
        return Tier("compiled", compiled=True)
    if precision is None:
        from controlstack.models.speed import bf16_is_fast

        precision = "bf16" if bf16_is_fast() else "fp32"
    return Tier("fast", compiled=True, precision=precision, reuse=FAST_REUSE)


class _Once:
    """Log a fallback reason once per object (not once per step)."""

    def __init__(self):
        self.said: set[str] = set()

    def __call__(self, reason: str) -> None:
        if reason not in self.said:
            self.said.add(reason)
            log.warning(f"this call runs in parity: {reason}")


# ---------------------------------------------------------------------------- graph functions
def _encode(unet, sample, timestep, text):
    h, mid, ctx = UNetRunner(unet).encode(sample, timestep, text)
    return (*h, mid, ctx.emb, ctx.encoder_hidden_states)


def _decode(unet, *tensors):
    *h, mid, emb, text = tensors
    up_factor = 2**unet.num_upsamplers
    ctx = UNetContext(emb, text, any(d % up_factor for d in h[0].shape[-2:]), None, None, None)
    return (UNetRunner(unet).decode(list(h), mid, ctx),)


def _controlnet(controlnet, sample, timestep, text, features):
    res = ControlNetRunner(controlnet)(sample, timestep, text, features)
    return (*res.downs, res.mid)


def _vae_decode(vae, latents):
    return (vae.decode(latents, return_dict=False)[0],)


def _plain(kwargs: dict) -> str | None:
    """Why keyword arguments keep a call off the graph (None: they do not)."""
    given = [k for k, v in kwargs.items() if v is not None]
    return f"{', '.join(given)} are not compiled" if given else None


class CompiledUNetRunner(UNetRunner):
    def __init__(self, unet, precision: str = "fp32"):
        super().__init__(unet)
        self.encoder = CompiledGraph("unet-encode", "U-Net encoder", unet, _encode, precision)
        self.decoder = CompiledGraph("unet-decode", "U-Net decoder", unet, _decode, precision,
                                     same_weights_as=self.encoder)
        self.fallback = _Once()

    def encode(self, sample, timestep, encoder_hidden_states, **kw):
        reason = _plain(kw)
        if reason:
            self.fallback(reason)
            return super().encode(sample, timestep, encoder_hidden_states, **kw)
        timestep = torch.as_tensor(timestep)
        *h, mid, emb, text = self.encoder(sample, timestep, encoder_hidden_states)
        up_factor = 2**self.unet.num_upsamplers
        ctx = UNetContext(emb, text, any(d % up_factor for d in sample.shape[-2:]), None, None, None)
        return list(h), mid, ctx

    def decode(self, h, mid, ctx, adds: Residuals | None = None):
        if ctx.attention_mask is not None or ctx.encoder_attention_mask is not None or ctx.cross_attention_kwargs:
            return super().decode(h, mid, ctx, adds)
        if adds is not None:
            h = [a + b for a, b in zip(h, adds.downs)]
            mid = mid + adds.mid
        return self.decoder(*h, mid, ctx.emb, ctx.encoder_hidden_states)[0]


class CompiledControlNetRunner(ControlNetRunner):
    def __init__(self, controlnet, precision: str = "fp32", graph: CompiledGraph | None = None):
        super().__init__(controlnet)
        self.graph = graph or CompiledGraph("controlnet", "ControlNet", controlnet, _controlnet, precision)
        self.fallback = _Once()

    def __call__(self, sample, timestep, encoder_hidden_states, hint_features, **kw) -> Residuals:
        reason = _plain(kw)
        if reason:
            self.fallback(reason)
            return super().__call__(sample, timestep, encoder_hidden_states, hint_features, **kw)
        if hint_features.shape[0] != sample.shape[0]:
            hint_features = hint_features.expand(sample.shape[0], -1, -1, -1).contiguous()
        *downs, mid = self.graph(sample, torch.as_tensor(timestep), encoder_hidden_states, hint_features)
        return Residuals(list(downs), mid)


class CompiledVAEDecoder:
    def __init__(self, vae, precision: str = "fp32"):
        self.graph = CompiledGraph("vae-decode", "VAE decoder", vae, _vae_decode, precision)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graph(latents)[0]


class Runners:
    """What a pipeline calls in one tier: the U-Net's runner, each ControlNet's (kept per model: a
    compiled one holds its loaded graphs) and the VAE decoder."""

    def __init__(self, unet, vae, tier: Tier):
        self.tier, self.vae = tier, vae
        self.unet = CompiledUNetRunner(unet, tier.precision) if tier.compiled else UNetRunner(unet)
        self.vae_decoder = CompiledVAEDecoder(vae, tier.precision) if tier.compiled else None
        self._controlnets: dict[int, CompiledControlNetRunner] = {}  # id(ControlNet) -> its runner

    def controlnet(self, controlnet) -> ControlNetRunner:
        if not self.tier.compiled:
            return ControlNetRunner(controlnet)
        if id(controlnet) not in self._controlnets:
            self._controlnets[id(controlnet)] = CompiledControlNetRunner(controlnet, self.tier.precision)
        return self._controlnets[id(controlnet)]

    def decode_vae(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        if self.vae_decoder is not None:
            return self.vae_decoder(latents)
        return self.vae.decode(latents, return_dict=False, generator=generator)[0]

    def graphs(self) -> list[CompiledGraph]:
        """Every compiled graph (their ``seconds`` say how long compiling / loading took)."""
        if not self.tier.compiled:
            return []
        return [self.unet.encoder, self.unet.decoder, self.vae_decoder.graph,
                *(r.graph for r in self._controlnets.values())]
