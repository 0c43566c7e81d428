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
  reused by the decoder in between (:class:`Reuse`); and token downsampling
  (Smith et al., 2024, "ToDo"): self-attention over >= 4096 tokens takes its keys and values from
  the 2 x 2-pooled map (:mod:`controlstack.models.token_downsampling`).

The runners here have the interface of :class:`UNetRunner` / :class:`ControlNetRunner`, so the
denoiser, the injection strategies, masks, schedules and windows work unchanged; a call the graph
cannot serve (attention masks, class labels) runs the parity path and says so once; SDXL's added
conditions (pooled text, size ids) are two more graph inputs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass

import torch

from controlstack.errors import ControlstackError
from controlstack.models.compiled import CompiledGraph
from controlstack.models.families import family_of
from controlstack.models.graphs import (
    call_graph,
    call_structure,
    controlnet_graph,
    decode_graph,
    encode_graph,
    exact_positions,
    vae_decode_graph,
)
from controlstack.models.runner import ControlNetRunner, UNetContext, UNetRunner
from controlstack.models.speed import bf16_is_fast
from controlstack.models.token_downsampling import MIN_TOKENS
from controlstack.models.union import UnionRunner, is_union
from controlstack.residuals import Residuals
from controlstack.sampling.loop import Step

log = logging.getLogger("controlstack")

TIERS = ("parity", "compiled", "fast")


@dataclass(frozen=True)
class Reuse:
    """Key steps: every step during the first ``after`` of the run, then every ``every``-th."""

    every: int = 1      # the U-Net encoder and the ControlNets run at every ``every``-th step
    after: float = 0.0  # fraction of the steps at the start that always run (the layout forms there)

    def fresh(self, step: Step) -> bool:
        first = math.ceil(self.after * step.count)
        return self.every <= 1 or step.index < first or (step.index - first) % self.every == 0


@dataclass(frozen=True)
class Tier:
    """What a tier does: whether the models are compiled, in which precision, and which reuse."""

    name: str = "parity"
    compiled: bool = False
    precision: str = "fp32"            # "fp32" | "bf16" (fast tier, where measured faster)
    reuse: Reuse | None = None         # U-Net encoder / ControlNet reuse between key steps (fast tier)
    token_downsampling: int = 1        # self-attention keys / values pooled this much at >= MIN_TOKENS (fast)

    def describe(self) -> str:
        if not self.compiled:
            return "parity (float32 eager, as diffusers)"
        parts = [f"compiled ({self.precision}, AOTInductor)"]
        if self.reuse is not None:
            parts.append(f"encoder + ControlNets every {self.reuse.every} steps after {self.reuse.after:.0%}")
        if self.token_downsampling > 1:
            parts.append(f"self-attention keys / values pooled {self.token_downsampling}x{self.token_downsampling} "
                         f"at >= {MIN_TOKENS} tokens")
        return ", ".join(parts)


#: the fast tier's reuse and token downsampling: chosen on the bench model and the bundled one (docs/speed.md)
FAST_REUSE = Reuse(every=2, after=0.25)
FAST_TOKEN_DOWNSAMPLING = 2


def make_tier(name: str, precision: str | None = None) -> Tier:
    """The tier called ``name``; ``fast`` measures whether bf16 is faster here unless given."""
    if name not in TIERS:
        raise ControlstackError(f"unknown optimisation tier '{name}'; choose one of {', '.join(TIERS)}")
    if name == "parity":
        return Tier()
    if name == "compiled":
        return Tier("compiled", compiled=True)
    if precision is None:
        precision = "bf16" if bf16_is_fast() else "fp32"
    return Tier("fast", compiled=True, precision=precision, reuse=FAST_REUSE,
                token_downsampling=FAST_TOKEN_DOWNSAMPLING)


class _Once:
    """Log a fallback reason once per object (not once per step)."""

    def __init__(self):
        self.said: set[str] = set()

    def __call__(self, reason: str) -> None:
        if reason not in self.said:
            self.said.add(reason)
            log.warning(f"this call runs in parity: {reason}")


# ---------------------------------------------------------------------------- graphs
def _pooled(size, pool: int) -> bool:
    """Whether token downsampling ``pool`` changes a graph at latent ``size``: only there is it
    compiled as a graph of its own (below, the plain graphs and their packages serve)."""
    return pool > 1 and size[-2] * size[-1] >= MIN_TOKENS


def _split(kw: dict) -> tuple[tuple, str | None]:
    """The graph's extra inputs from keyword arguments -- SDXL's added conditions, then an LCM
    student's ``timestep_cond`` (``graphs.split_extra``) -- and why the rest keeps a call off the
    graph (None: nothing does)."""
    kw = {k: v for k, v in kw.items() if v is not None}
    added = kw.pop("added_cond_kwargs", None)
    cond = kw.pop("timestep_cond", None)
    extra = ()
    if added is not None and set(added) == {"text_embeds", "time_ids"}:
        extra = (added["text_embeds"], added["time_ids"])
    elif added is not None:
        kw["added_cond_kwargs"] = added
    if cond is not None:
        extra += (cond,)
    return extra, (f"{', '.join(kw)} are not compiled" if kw else None)


class CompiledUNetRunner(UNetRunner):
    def __init__(self, unet, precision: str = "fp32", pool: int = 1):
        super().__init__(unet)
        self.pool = pool
        self.encoder = CompiledGraph("unet-encode", "U-Net encoder", unet, encode_graph, precision, exact=(1, 4))
        self.decoder = CompiledGraph("unet-decode", "U-Net decoder", unet, decode_graph, precision, same_weights_as=self.encoder)
        self.pooled = (CompiledGraph(f"unet-encode-todo{pool}", "U-Net encoder", unet,
                                     functools.partial(encode_graph, pool=pool), precision, self.encoder, exact=(1, 4)),
                       CompiledGraph(f"unet-decode-todo{pool}", "U-Net decoder", unet,
                                     functools.partial(decode_graph, pool=pool), precision, self.encoder)) if pool > 1 else ()
        self.fallback = _Once()

    def graphs(self, size) -> tuple[CompiledGraph, CompiledGraph]:
        return self.pooled if _pooled(size, self.pool) else (self.encoder, self.decoder)

    def encode(self, sample, timestep, encoder_hidden_states, **kw):
        extra, reason = _split(kw)
        if reason:
            self.fallback(reason)
            return super().encode(sample, timestep, encoder_hidden_states, **kw)
        timestep = torch.as_tensor(timestep)
        *h, mid, emb, text = self.graphs(sample.shape)[0](sample, timestep, encoder_hidden_states, *extra)
        up_factor = 2**self.unet.num_upsamplers
        ctx = UNetContext(emb, text, any(d % up_factor for d in sample.shape[-2:]), None, None, None)
        return list(h), mid, ctx

    def decode(self, h, mid, ctx, adds: Residuals | None = None):
        if ctx.attention_mask is not None or ctx.encoder_attention_mask is not None or ctx.cross_attention_kwargs:
            return super().decode(h, mid, ctx, adds)
        if adds is not None:
            h = [a + b for a, b in zip(h, adds.downs)]
            mid = mid + adds.mid
        return self.graphs(h[0].shape)[1](*h, mid, ctx.emb, ctx.encoder_hidden_states)[0]


class CompiledControlNetRunner(ControlNetRunner):
    def __init__(self, controlnet, precision: str = "fp32", pool: int = 1):
        super().__init__(controlnet)
        self.pool = pool
        self.graph = CompiledGraph("controlnet", "ControlNet", controlnet, controlnet_graph, precision, exact=(1, 5))
        self.pooled = CompiledGraph(f"controlnet-todo{pool}", "ControlNet", controlnet,
                                    functools.partial(controlnet_graph, pool=pool), precision, self.graph,
                                    exact=(1, 5)) if pool > 1 else None
        self.fallback = _Once()

    def __call__(self, sample, timestep, encoder_hidden_states, hint_features, **kw) -> Residuals:
        extra, reason = _split(kw)
        if reason:
            self.fallback(reason)
            return super().__call__(sample, timestep, encoder_hidden_states, hint_features, **kw)
        if hint_features.shape[0] != sample.shape[0]:
            hint_features = hint_features.expand(sample.shape[0], -1, -1, -1).contiguous()
        graph = self.pooled if _pooled(sample.shape, self.pool) else self.graph
        *downs, mid = graph(sample, torch.as_tensor(timestep), encoder_hidden_states, hint_features, *extra)
        return Residuals(list(downs), mid)


class CompiledVAEDecoder:
    def __init__(self, vae, precision: str = "fp32"):
        self.graph = CompiledGraph("vae-decode", "VAE decoder", vae, vae_decode_graph, precision)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graph(latents)[0]


class ModelCall:
    """A transformer or its ControlNet called with keyword arguments (parity: the module itself)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw, return_dict=False)

    def graphs(self) -> list[CompiledGraph]:
        return []


class CompiledModelCall(ModelCall):
    """The same call through one :class:`CompiledGraph` per call structure (which arguments are
    tensors, lists of n tensors, or constants: :func:`~controlstack.models.graphs.call_structure`).
    Its output's layout (diffusers' tuples of lists, None where a ControlNet has no single blocks) is
    taken from the first call of each structure, which runs eagerly."""

    def __init__(self, kind: str, label: str, module, precision: str = "fp32"):
        super().__init__(module)
        self.kind, self.label, self.precision = kind, label, precision
        self._graphs: dict[tuple, CompiledGraph] = {}
        self._layouts: dict[tuple, object] = {}

    def __call__(self, **kw):
        structure, tensors = call_structure(kw)
        if structure not in self._layouts:
            out = super().__call__(**kw)
            leaves, layout = torch.utils._pytree.tree_flatten(out)  # None is a leaf: a graph cannot return it
            self._layouts[structure] = layout, [i for i, leaf in enumerate(leaves) if leaf is None]
            return out
        graph = self._graphs.get(structure)
        if graph is None:
            tag = hashlib.sha256(repr(structure).encode()).hexdigest()[:8]
            first = next(iter(self._graphs.values()), None)  # hashes the weights once for every structure
            graph = self._graphs[structure] = CompiledGraph(
                f"{self.kind}-{tag}", self.label, self.module, functools.partial(call_graph, structure=structure),
                self.precision, first, exact=exact_positions(structure))
        layout, nones = self._layouts[structure]
        leaves = list(graph(*tensors))
        for i in nones:  # in increasing order: each lands where the eager output had it
            leaves.insert(i, None)
        return torch.utils._pytree.tree_unflatten(leaves, layout)

    def graphs(self) -> list[CompiledGraph]:
        return list(self._graphs.values())


class Runners:
    """What a pipeline calls in one tier: the U-Net's runner, each ControlNet's (kept per model: a
    compiled one holds its loaded graphs) and the VAE decoder."""

    def __init__(self, unet, vae, tier: Tier):
        self.tier, self.vae = tier, vae
        pool = tier.token_downsampling
        self.transformer = None  # a transformer base's call (mmdit.py's denoisers); None for a U-Net
        if family_of(unet).network != "unet":
            self.unet = None
            self.transformer = self._call("transformer", "transformer", unet)
        else:
            self.unet = CompiledUNetRunner(unet, tier.precision, pool) if tier.compiled else UNetRunner(unet)
        self.vae_decoder = CompiledVAEDecoder(vae, tier.precision) if tier.compiled else None
        self._controlnets: dict[int, CompiledControlNetRunner] = {}  # id(ControlNet) -> its runner
        self._calls: dict[int, ModelCall] = {}  # id(transformer ControlNet) -> its call
        self.fallback = _Once()

    def _call(self, kind: str, label: str, module) -> ModelCall:
        if not self.tier.compiled:
            return ModelCall(module)
        return CompiledModelCall(kind, label, module, self.tier.precision)

    def transformer_controlnet(self, controlnet) -> ModelCall:
        """An SD3 / Flux ControlNet's call (kept per model: a compiled one holds its graphs)."""
        if id(controlnet) not in self._calls:
            self._calls[id(controlnet)] = self._call("controlnet-mmdit", "transformer ControlNet", controlnet)
        return self._calls[id(controlnet)]

    def controlnet(self, controlnet) -> ControlNetRunner:
        if is_union(controlnet):  # its fusion of a varying number of conditions is not compiled
            if self.tier.compiled:
                self.fallback("ControlNet-Union models are not compiled")
            return UnionRunner(controlnet)
        if not self.tier.compiled:
            return ControlNetRunner(controlnet)
        if id(controlnet) not in self._controlnets:
            self._controlnets[id(controlnet)] = CompiledControlNetRunner(
                controlnet, self.tier.precision, self.tier.token_downsampling)
        return self._controlnets[id(controlnet)]

    def decode_vae(self, latents: torch.Tensor, generator=None) -> torch.Tensor:
        if self.vae_decoder is not None:
            return self.vae_decoder(latents)
        return self.vae.decode(latents, return_dict=False, generator=generator)[0]

    def graphs(self) -> list[CompiledGraph]:
        """Every compiled graph (their ``seconds`` say how long compiling / loading took)."""
        if not self.tier.compiled:
            return []
        if self.transformer is not None:
            graphs = [*self.transformer.graphs(), self.vae_decoder.graph]
        else:
            graphs = [self.unet.encoder, self.unet.decoder, *self.unet.pooled, self.vae_decoder.graph]
        for call in self._calls.values():
            graphs += call.graphs()
        for r in self._controlnets.values():
            graphs += [r.graph] + ([r.pooled] if r.pooled else [])
        return graphs
