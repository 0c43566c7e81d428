"""Minimal Impact ControlNet injection (``mi``): MGDA-balanced combination and injection.

Reference: *Minimal Impact ControlNet: Advancing Multi-ControlNet Integration* (MIControlNet),
Sec. 4.2 "balanced feature injection" (eq. 8-10) and "balanced feature combination" (eq. 11-12),
Appendix E. The forms below are the project's reading of those equations (docs/method.md §2),
built on the closed form of MGDA for two vectors and the Frank-Wolfe min-norm solver of Sener &
Koltun, *Multi-Task Learning as Multi-Objective Optimization* (NeurIPS 2018;
``MinNormSolver._min_norm_element_from2`` and ``find_min_norm_element_FW`` in
``intel-isl/MultiObjectiveOptimization``).

Forms implemented (dot products per sample over (C, H, W) with ``reduce="layer"``, or per sample
and spatial position over C with ``reduce="position"``):

* Min-norm weight of two vectors: ``γ* = clip(((v2 − v1)·v2) / ||v1 − v2||², 0, 1)``, the weight of
  v1 in the min-norm point ``γ* v1 + (1 − γ*) v2`` of the segment [v1, v2].
* Balanced injection (eq. 8-10), per layer: ``γ* = MGDA(h, c)``, ``λ = clip((1 − γ*) / γ*, 0, λ_max)``
  (λ_max = 20, the paper's range) and the injected feature is ``h + λ c``: the coefficient of the
  U-Net's own feature stays 1 (the paper's "restricted" MGDA). Where 0 < γ* < 1 this is the closed
  form ``λ = (h·h − h·c) / (c·c − h·c)``. The strategy returns ``λ c``.
* Balanced combination (eq. 11-12) of K control residuals before injection: K = 1: ``c = c1``;
  K = 2: ``c = 2 (γ* c1 + (1 − γ*) c2)`` with ``γ* = MGDA(c1, c2)``; K > 2: Frank-Wolfe weights α on
  the simplex and ``c = K Σ α_k c_k``. For identical controls this is exactly ``c1 + c2`` (the plain
  sum it replaces), so the total control "mass" matches ControlNet's sum of K residuals.

Degenerate cases (all finite, never NaN):

* ``||v1 − v2||² ≤ 1e-12 · max(||v1||², ||v2||²)`` (v1 ≈ v2, including both zero) or a non-finite
  dot product (NaN/inf in the input): ``γ* = 0.5``. In the injection this gives ``λ = 1``, the
  plain sum ``h + c``; in the combination ``c = c1 + c2``.
* ``γ* = 0`` in the injection (``c·c ≤ h·c``: the min-norm point of [h, c] is c itself, so the
  coefficient of h cannot be normalised to 1): ``λ = saturated_lambda``, default 1 (the plain sum:
  the control is neither dropped nor amplified). Sener & Koltun's solver returns 0.001 there, which would give λ_max; the raw
  closed form would give a negative value clipped to 0 -- the knob lets measurement decide.
* ``γ* = 1`` (``h·h ≤ h·c``, including h = 0): ``λ = 0``, the defined value of the formula.
* c = 0: ``λ c`` is exactly 0 whatever λ is.
* In the combination, a residual that is exactly zero over a reduction group (a branch masked out
  there, or the unconditional half padded with zeros by ``cond_only``) is treated as *absent*:
  it is left out of the min-norm problem and of the count K. Without this a zero vector would be
  the min-norm point of the hull and would erase every other control. So a fully masked branch
  adds exactly nothing, and with all branches zero the strategy adds exactly zero.

The coefficients (γ*, α, λ) are computed in float64 on copies rescaled by their common max-abs
value (γ* and α are scale-invariant), so fp16 features, huge and tiny values neither overflow nor
underflow. As in MGDA they are constants in the backward pass unless ``grad_through_coefficients``.
"""

from __future__ import annotations

from typing import Literal

import torch

from controlstack.errors import ControlstackError
from controlstack.injection.base import Injection, register
from controlstack.residuals import Residuals

Reduce = Literal["layer", "position"]

#: Sener & Koltun's Frank-Wolfe limits.
MAX_ITER = 250
STOP_CRIT = 1e-5
#: Relative threshold below which two vectors count as equal (γ* undefined).
_EPS = 1e-12


# --------------------------------------------------------------------------------------- helpers


def _reduce_dims(x: torch.Tensor, reduce: Reduce) -> tuple[int, ...]:
    """Dims the dot products run over: (C, H, W) per sample, or C per spatial position."""
    return tuple(range(1, x.dim())) if reduce == "layer" else (1,)


def _as_dims(x: torch.Tensor, dim: int | tuple[int, ...] | None) -> tuple[tuple[int, ...], bool]:
    """``dim=None``: every dim but the leading (batch) one, dropped from the result."""
    if dim is None:
        return tuple(range(1, x.dim())), False
    return ((dim,) if isinstance(dim, int) else tuple(dim)), True


def _rescaled(vectors: list[torch.Tensor], dims: tuple[int, ...], grad: bool = False) -> list[torch.Tensor]:
    """float64 copies divided by their common max-abs value per group (1 where it is 0 or not
    finite). With ``grad`` they stay differentiable (the scale is a constant), else detached."""
    vs = [(v if grad else v.detach()).to(torch.float64) for v in vectors]
    scale = torch.stack([v.detach().abs().amax(dim=dims, keepdim=True) for v in vs]).amax(0)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return [v / scale for v in vs]


def _gamma_from_dots(v1v1, v1v2, v2v2, degenerate: float) -> torch.Tensor:
    """``_min_norm_element_from2`` on dot products, clipped to [0, 1] (Sener & Koltun)."""
    denom = v1v1 + v2v2 - 2 * v1v2
    num = v2v2 - v1v2
    bad = ~(denom > _EPS * torch.maximum(v1v1, v2v2)) | ~torch.isfinite(num) | ~torch.isfinite(denom)
    gamma = (num / torch.where(bad, torch.ones_like(denom), denom)).clamp(0.0, 1.0)
    return torch.where(bad, torch.full_like(gamma, degenerate), gamma)


def _gamma2(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """γ* of two rescaled vectors, keepdim. The difference is formed before squaring: the
    Gram-matrix route ``aa + bb − 2ab`` loses all precision when a ≈ b."""
    diff = a - b
    denom = (diff * diff).sum(dims, keepdim=True)
    num = -(diff * b).sum(dims, keepdim=True)  # (b − a)·b
    ref = torch.maximum((a * a).sum(dims, keepdim=True), (b * b).sum(dims, keepdim=True))
    bad = ~(denom > _EPS * ref) | ~torch.isfinite(num) | ~torch.isfinite(denom)
    gamma = (num / torch.where(bad, torch.ones_like(denom), denom)).clamp(0.0, 1.0)
    return torch.where(bad, torch.full_like(gamma, 0.5), gamma)


# ------------------------------------------------------------------------------- min-norm solvers


def min_norm_2(v1: torch.Tensor, v2: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Weight γ* of v1 in the min-norm point ``γ* v1 + (1 − γ*) v2`` of the segment [v1, v2].

    ``γ* = clip(((v2 − v1)·v2) / ||v1 − v2||², 0, 1)``; 0.5 where v1 ≈ v2 or a dot product is not
    finite. ``dim=None``: one γ* per sample (dot products over all but the leading dim), shape (B,);
    an explicit ``dim`` keeps the reduced dims with size 1, so γ* broadcasts against the inputs.
    """
    dims, keep = _as_dims(v1, dim)
    a, b = _rescaled([v1, v2], dims)
    gamma = _gamma2(a, b, dims)
    return gamma if keep else gamma.flatten(1)[:, 0]


def _gram(vectors: list[torch.Tensor], dims: tuple[int, ...]) -> torch.Tensor:
    """Gram matrices of rescaled vectors per group: shape (*keepdim_shape, K, K), float64."""
    k = len(vectors)
    rows = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            rows[i][j] = rows[j][i] = (vectors[i] * vectors[j]).sum(dims, keepdim=True)
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def _frank_wolfe(gram: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Sener & Koltun's ``find_min_norm_element_FW`` batched over rows of ``gram`` (N, K, K).

    Only the ``active`` (N, K) vectors take part; rows with one active vector put weight 1 on it,
    rows with none get all-zero weights. Returns (N, K) weights on the (active) simplex.
    """
    n, k = active.shape
    rows = torch.arange(n, device=gram.device)
    diag = gram.diagonal(dim1=-2, dim2=-1)

    # Initialisation: the best pair (``_min_norm_2d``), pairs in the original's (i, j>i) order so
    # that torch.argmin's first-minimum rule breaks ties the same way.
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    ii = torch.tensor([p[0] for p in pairs], device=gram.device)
    jj = torch.tensor([p[1] for p in pairs], device=gram.device)
    gii, gjj, gij = diag[:, ii], diag[:, jj], gram[:, ii, jj]
    g = _gamma_from_dots(gii, gij, gjj, degenerate=0.5)
    cost = g * g * gii + 2 * g * (1 - g) * gij + (1 - g) * (1 - g) * gjj
    cost = torch.where(active[:, ii] & active[:, jj] & torch.isfinite(cost), cost, torch.inf)
    best = cost.argmin(-1)
    sol = torch.zeros(n, k, dtype=gram.dtype, device=gram.device)
    sol[rows, ii[best]] = g[rows, best]
    sol[rows, jj[best]] = 1 - g[rows, best]
    n_active = active.sum(-1)
    single = n_active == 1
    sol[single] = active[single].to(sol.dtype)
    sol[n_active == 0] = 0
    done = n_active < 2

    for _ in range(MAX_ITER):
        if bool(done.all()):
            break
        grad = (gram @ sol.unsqueeze(-1)).squeeze(-1)  # G α
        t = grad.masked_fill(~active, torch.inf).argmin(-1)  # vertex with the smallest gradient
        v1v1 = (sol * grad).sum(-1)
        v1v2 = grad[rows, t]
        v2v2 = diag[rows, t]
        # Line search between α and e_t; when α ≈ e_t in feature space there is nothing to gain.
        nc = _gamma_from_dots(v1v1, v1v2, v2v2, degenerate=1.0).unsqueeze(-1)
        new = nc * sol
        new[rows, t] += 1 - nc.squeeze(-1)
        done = done | ((new - sol).abs().sum(-1) < STOP_CRIT)
        sol = torch.where(done.unsqueeze(-1), sol, new)
    return sol


def frank_wolfe_min_norm(
    vectors: list[torch.Tensor], dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Weights α on the simplex minimising ``||Σ α_k v_k||`` (Sener & Koltun's MinNormSolver, FW).

    Frank-Wolfe started from the best pair, at most 250 iterations, stopping when the weights
    change by less than 1e-5 (L1). ``dim=None``: per sample, shape (B, K); an explicit ``dim``
    keeps the reduced dims with size 1 and puts K last, e.g. (B, 1, H, W, K) for ``dim=1``.
    """
    if len(vectors) < 2:
        raise ValueError("frank_wolfe_min_norm needs at least two vectors")
    dims, keep = _as_dims(vectors[0], dim)
    gram = _gram(_rescaled(vectors, dims), dims)
    group_shape = gram.shape[:-2]
    k = len(vectors)
    flat = gram.reshape(-1, k, k)
    active = torch.ones(flat.shape[0], k, dtype=torch.bool, device=flat.device)
    alpha = _frank_wolfe(flat, active).reshape(*group_shape, k)
    return alpha if keep else alpha.reshape(alpha.shape[0], k)


# --------------------------------------------------------------------------- balanced operations


def balanced_lambda(
    h: torch.Tensor,
    c: torch.Tensor,
    reduce: Reduce = "layer",
    lambda_max: float = 20.0,
    saturated_lambda: float = 1.0,
    grad: bool = False,
) -> torch.Tensor:
    """λ of the balanced injection ``h + λ c`` (eq. 8-10): ``clip((1 − γ*) / γ*, 0, λ_max)`` with
    ``γ* = MGDA(h, c)``; ``saturated_lambda`` where γ* = 0. Float64, shape (B, 1, 1, 1) for
    ``reduce="layer"`` and (B, 1, H, W) for ``reduce="position"``."""
    dims = _reduce_dims(h, reduce)
    a, b = _rescaled([h, c], dims, grad)
    gamma = _gamma2(a, b, dims)
    positive = gamma > 0
    # Divide by a safe value so that no inf appears even in the unselected branch of the where
    # (its zero gradient times an infinite local derivative would be NaN in backward).
    ratio = (1 - gamma) / torch.where(positive, gamma, torch.ones_like(gamma))
    lam = ratio.clamp(0.0, lambda_max)
    return torch.where(positive, lam, torch.full_like(lam, saturated_lambda))


def combination_weights(
    cs: list[torch.Tensor], reduce: Reduce = "layer", grad: bool = False
) -> list[torch.Tensor]:
    """Coefficients w_k of the balanced combination ``c = Σ w_k c_k`` (eq. 11-12), float64, each
    shaped to broadcast against c_k: ``K' α_k`` over the K' residuals that are not exactly zero in
    the group (α: two-vector closed form for K' = 2, Frank-Wolfe beyond), 0 for the zero ones."""
    dims = _reduce_dims(cs[0], reduce)
    active = [(c != 0).any(dim=dims, keepdim=True) for c in cs]
    vs = _rescaled(cs, dims, grad)
    if len(cs) == 2:
        a1, a2 = active
        both = a1 & a2
        gamma = _gamma2(vs[0], vs[1], dims)
        w1 = torch.where(both, 2 * gamma, a1.to(gamma.dtype))
        w2 = torch.where(both, 2 * (1 - gamma), a2.to(gamma.dtype))
        return [w1, w2]
    k = len(cs)
    gram = _gram([v.detach() for v in vs], dims)
    group_shape = gram.shape[:-2]
    act = torch.stack(active, dim=-1)
    alpha = _frank_wolfe(gram.reshape(-1, k, k), act.reshape(-1, k)).reshape(*group_shape, k)
    weights = act.sum(-1, keepdim=True).to(alpha.dtype) * alpha
    return [weights[..., i] for i in range(k)]


def balanced_combination(
    cs: list[torch.Tensor], reduce: Reduce = "layer", grad: bool = False
) -> torch.Tensor:
    """``Σ w_k c_k`` with the weights of :func:`combination_weights`; ``c1`` itself for K = 1."""
    if len(cs) == 1:
        return cs[0]
    weights = combination_weights(cs, reduce, grad)
    out = weights[0].to(cs[0].dtype) * cs[0]
    for w, c in zip(weights[1:], cs[1:]):
        out = out + w.to(c.dtype) * c
    return out


# -------------------------------------------------------------------------------------- strategy


@register("mi")
class MinimalImpact(Injection):
    """Balanced combination of the branches' residuals, then balanced injection, for every skip
    residual and the middle one. ``combine=False`` sums the residuals in branch order instead;
    ``inject=False`` adds the combined residual with λ = 1 (both off: exactly the ``sum`` mode)."""

    name = "mi"

    def __init__(
        self,
        reduce: str = "layer",
        lambda_max: float = 20.0,
        combine: bool = True,
        inject: bool = True,
        cond_only: bool = False,
        saturated_lambda: float = 1.0,
        grad_through_coefficients: bool = False,
    ):
        if reduce not in ("layer", "position"):
            raise ControlstackError(f"mi: reduce must be 'layer' or 'position', got {reduce!r}")
        if not (isinstance(lambda_max, (int, float)) and 0 <= float(lambda_max) < float("inf")):
            raise ControlstackError(f"mi: lambda_max must be a finite number >= 0, got {lambda_max!r}")
        if not (
            isinstance(saturated_lambda, (int, float)) and 0 <= float(saturated_lambda) <= float(lambda_max)
        ):
            raise ControlstackError(
                f"mi: saturated_lambda must be a number in [0, lambda_max], got {saturated_lambda!r}"
            )
        self.reduce: Reduce = reduce  # type: ignore[assignment]
        self.lambda_max = float(lambda_max)
        self.saturated_lambda = float(saturated_lambda)
        self.combine = bool(combine)
        self.inject = bool(inject)
        self.cond_only = bool(cond_only)
        self.grad = bool(grad_through_coefficients)

    def _one(self, feature: torch.Tensor, cs: list[torch.Tensor]) -> torch.Tensor:
        if self.combine:
            c = balanced_combination(cs, self.reduce, self.grad)
        else:
            c = cs[0]
            for e in cs[1:]:
                c = c + e
        if not self.inject:
            return c
        lam = balanced_lambda(feature, c, self.reduce, self.lambda_max, self.saturated_lambda, self.grad)
        return lam.to(c.dtype) * c

    def __call__(self, h, mid, branches):
        if not branches:
            return None
        downs = [self._one(f, [b.downs[i] for b in branches]) for i, f in enumerate(h)]
        return Residuals(downs, self._one(mid, [b.mid for b in branches]))
