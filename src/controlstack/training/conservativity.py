"""The conservativity term of Minimal Impact ControlNet (Sec. 4.3, eq. 13-19), estimated with
Hutchinson probes.

A score field ``s(x)`` is conservative (the gradient of a log-density) iff its Jacobian
``J = ∂s/∂x`` is symmetric. Chao et al. (2022, "On investigating the conservative property of
score-based generative models"; reference code chen-hao-chao/qcsbm, ``real_world/losses.py``)
measure the asymmetry

    Asym = ½ ||J − Jᵀ||²_F = tr(J Jᵀ) − tr(J J),      NAsym = ½ (tr(JJᵀ) − tr(JJ)) / tr(JJᵀ)

with Rademacher probes v (E[v vᵀ] = I):  ``a = Jᵀ v`` (a vector-Jacobian product) gives
``tr(JJᵀ) ≈ ||a||²`` and ``b = Jᵀ a`` gives ``tr(JJ) ≈ v · b`` (since v·Jᵀ Jᵀ v = vᵀ(J J)ᵀ v).

**The part the ControlNet adds.** With the U-Net split into encoder E, decoder D and the ControlNet
C, the noise prediction is ``ε(x) = D(E(x) + C(x))`` (every U-Net feature plus its injected
residual), so ``J = ∂D·∂E + ∂D·∂C = J_unet + J_cn`` (the paper's Proposition 4.1). MIControlNet
penalises only ``J_cn``: its Assumption 4.1 leaves ``J_unet``'s asymmetry to the locked U-Net, and
its simplified loss (eq. 18) drops the cross terms, which Theorem 4.1 bounds by
``||J_unet||_F · ||J_cn − J_cnᵀ||_F`` -- zero when ``Asym(J_cn)`` is. ``J_cn`` is the Jacobian of ε
along the ControlNet's path only (the paper's red line in Fig. 2): the recipe feeds the U-Net's
encoder a *detached* copy of x and the ControlNet the differentiable one, so every vector-Jacobian
product below runs through ``C`` and then ``D`` (at the same operating point), never through E.
The MI injection's coefficients λ count as constants there (as in MGDA and at inference).

For a v-prediction model the field is the ε the model implies, ``ε = α_t v + σ_t x_t``; the σ_t x_t
term is the identity (symmetric) and does not pass through the ControlNet, so ``J_cn = α_t ∂v_cn/∂x``.

**Gradients.** ``tr(JJᵀ) = ||a||²`` is differentiated exactly (``a`` is kept in the graph,
``create_graph=True``). ``tr(JJ)`` is computed as qcsbm does, through a detached copy of ``a``
(``b = Jᵀ stopgrad(a)``), which differentiates only one of its two equal factors; qcsbm adds the
other factor with a second backward pass (``gvs.backward(gvs_detach.grad)``). Both factors have the
same expected gradient (``E ∂(vᵀ Jᵀ Jᵀ v) = tr(∂Jᵀ Jᵀ) + tr(Jᵀ ∂Jᵀ)``, two equal traces), so here
the one computed factor counts twice: ``2 (v·b) − stopgrad(v·b)`` -- the value of the estimate, an
unbiased estimate of the gradient of ``tr(JJ)``, and one backward pass instead of two. Only the
ControlNet's parameters receive gradients (the base is locked: ``requires_grad=False``).

The per-sample traces are sums over the latent's dimensions (the paper's Asym is a trace), then
averaged over the batch and the probes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def twice_differentiable(device: torch.device | str):
    """Context for a forward whose graph will be differentiated twice: the fused CPU attention
    kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no double backward, the math
    kernel has; elsewhere nothing changes."""
    return sdpa_kernel(SDPBackend.MATH) if torch.device(device).type == "cpu" else contextlib.nullcontext()


def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±1 with equal probability, shaped like ``like``, drawn on the CPU generator."""
    v = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8).to(like.device)
    return (v.to(like.dtype) * 2 - 1).detach()


@dataclass
class Traces:
    """Per-sample Hutchinson estimates (B,) of ``tr(J Jᵀ)`` and ``tr(J J)``."""

    jjt: torch.Tensor
    jj: torch.Tensor

    @property
    def asym(self) -> torch.Tensor:
        """``tr(JJᵀ) − tr(JJ) = ½ ||J − Jᵀ||²_F`` per sample."""
        return self.jjt - self.jj


def hutchinson_traces(out: torch.Tensor, x: torch.Tensor, v: torch.Tensor, create_graph: bool) -> Traces:
    """``tr(JJᵀ)`` and ``tr(JJ)`` of ``J = ∂out/∂x`` from one probe ``v`` (per sample).

    ``out`` must have been computed from ``x`` (``x.requires_grad``); samples must not mix (each
    row of ``out`` depends on its own row of ``x`` only), so the sums over a row are its traces.
    ``out`` may be the first rows of a larger batch ``x`` (the estimate on a sub-batch).
    ``create_graph``: keep the estimate differentiable w.r.t. the parameters (training)."""
    n = out.shape[0]
    (a,) = torch.autograd.grad(out, x, grad_outputs=v, create_graph=create_graph, retain_graph=True)
    a = a[:n]
    (b,) = torch.autograd.grad(out, x, grad_outputs=a.detach(), create_graph=create_graph, retain_graph=True)
    return Traces(a.pow(2).flatten(1).sum(1), (v * b[:n]).flatten(1).sum(1))


def conservativity_loss(out: torch.Tensor, x: torch.Tensor, probes: int, generator: torch.Generator) -> tuple[
        torch.Tensor, torch.Tensor]:
    """(loss, Asym estimate) for training: the batch mean over ``probes`` Rademacher probes of
    ``tr(JJᵀ) − tr(JJ)``, with ``tr(JJ)``'s computed factor counted twice in the gradient (see the
    module docstring). The estimate is returned detached, for logging."""
    total, estimate = 0.0, 0.0
    for _ in range(probes):
        tr = hutchinson_traces(out, x, rademacher(out, generator), create_graph=True)
        jj = 2 * tr.jj - tr.jj.detach()  # value tr(JJ), gradient of both factors in expectation
        total = total + (tr.jjt - jj).mean()
        estimate = estimate + tr.asym.detach().mean()
    return total / probes, estimate / probes


def epsilon_part(out: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """The network output's contribution to the implied ε: itself for ε-models, ``α_t · v`` for
    v-models (α_t = sqrt(ᾱ_t); the σ_t x_t term does not depend on the ControlNet)."""
    if scheduler.config.prediction_type != "v_prediction":
        return out
    alpha = scheduler.alphas_cumprod.to(out.device)[t.long()].sqrt().to(out.dtype)
    return out * alpha.view(-1, *([1] * (out.dim() - 1)))
