"""Control modes: plain sum and the three modes of sd-webui-controlnet.

* ``sum`` / ``balanced`` -- every branch added on both CFG halves, every layer weight 1
  (diffusers' semantics; with no branch the U-Net is run unchanged).
* ``prompt`` ("My prompt is more important") -- both halves, layer weights
  ``0.825 ** (N - 1 - i)`` over the N = skips + middle residuals (sd-webui-controlnet).
* ``controlnet`` ("ControlNet is more important") -- the paper's CFG resolution weighting
  (ControlNet, Sec. 3.4; docs/method.md §1): control on the conditional half only and
  ``w_i = 64 / h_i`` with h_i the block's resolution, normalised so the lowest resolution gets 1.
  Deriving the weights from the residual shapes (not from the constant 13 of SD-1.x) makes the
  mode work for models with other block counts, like the bundled 16x16-latent model.
  ``layer_weights="soft"`` gives sd-webui's curve, ``"uniform"`` weight 1 everywhere.
* ``guess`` -- diffusers' ``guess_mode=True`` exactly: conditional half only,
  ``torch.logspace(-1, 0, N)`` layer weights. Same intent as ``controlnet``, kept for bit-level
  parity with ``StableDiffusionControlNetPipeline``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from controlstack.errors import ControlstackError
from controlstack.injection.base import Injection, register, sum_residuals


@dataclass(frozen=True)
class WebuiMode:
    """One of sd-webui-controlnet's control modes: our (registry) name, its label, its index."""

    name: str
    webui: str
    index: int


#: THE control-mode table (sd-webui's three, in its index order); io.png.CONTROL_MODES and the
#: server's label -> name / index -> name derive from it. Our other modes (sum, guess, mi) have no
#: sd-webui spelling and are written as they are.
CONTROL_MODE_TABLE: tuple[WebuiMode, ...] = (
    WebuiMode("balanced", "Balanced", 0),
    WebuiMode("prompt", "My prompt is more important", 1),
    WebuiMode("controlnet", "ControlNet is more important", 2),
)


def resolution_weights(h: list[torch.Tensor], mid: torch.Tensor) -> list[float]:
    """``w_i = 64 / h_i`` normalised to max 1, i.e. ``min_res / res_i`` for each skip and the middle."""
    sizes = [t.shape[-2] for t in h] + [mid.shape[-2]]
    smallest = min(sizes)
    return [smallest / s for s in sizes]


def soft_weights(n: int, base: float = 0.825) -> list[float]:
    """sd-webui-controlnet's soft injection curve: ``base ** (n - 1 - i)`` for i = 0..n-1."""
    return [base ** float(n - 1 - i) for i in range(n)]


def logspace_weights(n: int) -> torch.Tensor:
    """diffusers' guess-mode curve 0.1 -> 1.0 (a tensor, as diffusers multiplies by tensor elements)."""
    return torch.logspace(-1, 0, n)


@register("sum", "balanced")
class Sum(Injection):
    """Composition by addition, on both CFG halves."""

    name = "sum"

    def __call__(self, h, mid, branches):
        return sum_residuals(branches) if branches else None


class _LayerWeighted(Injection):
    """Sum of branches times one weight per layer."""

    def layer_weights(self, h, mid):
        raise NotImplementedError

    def __call__(self, h, mid, branches):
        if not branches:
            return None
        weights = self.layer_weights(h, mid)
        return sum_residuals([b.scaled(weights) for b in branches])


@register("prompt")
class PromptMoreImportant(_LayerWeighted):
    name = "prompt"

    def layer_weights(self, h, mid):
        return soft_weights(len(h) + 1)


@register("controlnet")
class ControlNetMoreImportant(_LayerWeighted):
    """Control on the conditional half only, so CFG amplifies the control as it does the prompt.

    ``layer_weights``: ``resolution`` (the paper's CFG resolution weighting, default), ``soft``
    (sd-webui's 0.825 curve) or ``uniform`` (every layer 1). ``uniform`` is the one for the
    bundled model: its ControlNets follow their condition at weight 1 but too softly when the
    control is on both halves (held-out depth structure F1 0.46 with ``balanced``, 0.57 with
    ``resolution``, 0.66 with ``uniform`` -- the VAE's own ceiling; docs/training.md).
    """

    name = "controlnet"
    cond_only = True
    KINDS = ("resolution", "soft", "uniform")

    def __init__(self, layer_weights: str = "resolution"):
        if layer_weights not in self.KINDS:
            raise ControlstackError(f"layer_weights must be one of {', '.join(self.KINDS)}, got {layer_weights!r}")
        self.kind = layer_weights

    def layer_weights(self, h, mid):
        if self.kind == "resolution":
            return resolution_weights(h, mid)
        if self.kind == "soft":
            return soft_weights(len(h) + 1)
        return [1.0] * (len(h) + 1)


@register("guess")
class GuessMode(_LayerWeighted):
    name = "guess"
    cond_only = True

    def layer_weights(self, h, mid):
        return logspace_weights(len(h) + 1)
