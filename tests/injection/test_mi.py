"""Minimal Impact injection (``mi``): MGDA closed form, Frank-Wolfe, balanced injection/combination."""

from __future__ import annotations

import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.injection import Residuals, make_injection
from controlstack.injection.base import sum_residuals
from controlstack.injection.mi import (
    MinimalImpact,
    balanced_combination,
    balanced_lambda,
    combination_weights,
    frank_wolfe_min_norm,
    min_norm_2,
)


def vec(*rows):
    """Vectors as (B, C, 1, 1) features, one row per sample."""
    return torch.tensor(rows, dtype=torch.float32)[:, :, None, None]


# ------------------------------------------------------------------------------ two-vector MGDA


def test_min_norm_2_hand_computed():
    # γ* = clip(((v2 − v1)·v2) / ||v1 − v2||², 0, 1), one row per case:
    v1 = torch.tensor([[1.0, 0], [2, 0], [1, 0], [3, 0], [1, 1], [0, 0], [1, 2]])
    v2 = torch.tensor([[0.0, 1], [1, 0], [2, 0], [0, 1], [1, -1], [0, 1], [1, 2]])
    expected = [
        0.5,  # 1 / 2
        0.0,  # −1 / 1 -> clipped: the min-norm point is v2
        1.0,  # 2 / 1 -> clipped: the min-norm point is v1
        0.1,  # 1 / 10: min of 9γ² + (1 − γ)²
        0.5,  # 2 / 4
        1.0,  # v1 = 0 is the min-norm point
        0.5,  # v1 = v2: undefined, 0.5 by convention
    ]
    assert min_norm_2(v1, v2).tolist() == pytest.approx(expected, abs=1e-12)


def test_min_norm_2_is_the_minimiser():
    torch.manual_seed(0)
    v1, v2 = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4) + 0.5
    gamma = min_norm_2(v1, v2)
    grid = torch.linspace(0, 1, 2001, dtype=torch.float64)
    a, b = v1.double().flatten(1), v2.double().flatten(1)
    norms = (grid[:, None, None] * a + (1 - grid[:, None, None]) * b).norm(dim=-1)  # (G, B)
    best = grid[norms.argmin(0)]
    assert torch.allclose(gamma, best, atol=1e-3)
    assert gamma.shape == (6,)


def test_min_norm_2_explicit_dim_keeps_shape():
    torch.manual_seed(1)
    v1, v2 = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    gamma = min_norm_2(v1, v2, dim=1)
    assert gamma.shape == (2, 1, 4, 5)
    assert gamma[1, 0, 2, 3].item() == pytest.approx(
        min_norm_2(v1[1:2, :, 2, 3], v2[1:2, :, 2, 3]).item(), abs=1e-12
    )


# ------------------------------------------------------------------------------ Frank-Wolfe


def brute_force_min_norm(vs: list[torch.Tensor], steps: int = 300) -> torch.Tensor:
    """Smallest ||Σ α_k v_k|| over a simplex grid of step 1/steps, per sample (K = 3); 300 is a
    multiple of 3 so that the barycentre (the interior case below) lies on the grid."""
    pts = [
        (i / steps, j / steps, (steps - i - j) / steps)
        for i in range(steps + 1)
        for j in range(steps + 1 - i)
    ]
    alpha = torch.tensor(pts, dtype=torch.float64)  # (P, 3)
    stack = torch.stack([v.double().flatten(1) for v in vs], 1)  # (B, 3, D)
    return torch.einsum("pk,bkd->bpd", alpha, stack).norm(dim=-1).amin(1)  # (B,)


def test_frank_wolfe_matches_brute_force():
    torch.manual_seed(2)
    vs = [torch.randn(5, 4) + s for s in (0.3, -0.2, 0.1)]
    # plus a sample whose hull contains the origin (min norm 0, interior solution)
    extra = [
        torch.tensor([[1.0, 0, 0, 0]]),
        torch.tensor([[-0.5, 0.8, 0, 0]]),
        torch.tensor([[-0.5, -0.8, 0, 0]]),
    ]
    vs = [torch.cat([v, e]) for v, e in zip(vs, extra)]
    alpha = frank_wolfe_min_norm(vs)
    assert alpha.shape == (6, 3)
    assert (alpha >= 0).all()
    assert torch.allclose(alpha.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    fw = torch.einsum("bk,bkd->bd", alpha, torch.stack([v.double() for v in vs], 1)).norm(dim=-1)
    brute = brute_force_min_norm(vs)
    assert (fw - brute).abs().max().item() < 1e-3
    assert (fw <= brute + 1e-5).all()  # never worse than the grid (up to the 1e-5 stop)
    assert fw[-1].item() < 1e-3


def test_frank_wolfe_two_vectors_equals_closed_form():
    torch.manual_seed(3)
    v1, v2 = torch.randn(4, 6), torch.randn(4, 6)
    alpha = frank_wolfe_min_norm([v1, v2])
    assert torch.allclose(alpha[:, 0], min_norm_2(v1, v2), atol=1e-12)


def test_frank_wolfe_per_position_shape():
    torch.manual_seed(4)
    vs = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    alpha = frank_wolfe_min_norm(vs, dim=1)
    assert alpha.shape == (2, 1, 4, 5, 3)
    one = frank_wolfe_min_norm([v[1:2, :, 3, 2] for v in vs])
    assert torch.allclose(alpha[1, 0, 3, 2], one[0], atol=1e-12)


# ------------------------------------------------------------------------------ balanced injection


def test_lambda_hand_computed():
    h = vec([1, 0], [2, 0], [1, 0], [1, 0], [1, 0], [1, 0])
    c = vec([0, 1], [0, 1], [0, 3], [0, 0.1], [0.5, 0], [2, 0])
    lam = balanced_lambda(h, c).flatten().tolist()
    expected = [
        1.0,  # γ = 1/2
        4.0,  # γ = 1/5, closed form (4 − 0) / (1 − 0)
        1 / 9,  # γ = 9/10
        20.0,  # closed form 100 -> clipped to λ_max
        1.0,  # c·c ≤ h·c: γ = 0 -> saturated_lambda (plain sum)
        0.0,  # h·h ≤ h·c: γ = 1 -> λ = 0
    ]
    assert lam == pytest.approx(expected, abs=1e-12)
    assert balanced_lambda(h, c, saturated_lambda=20.0).flatten()[4].item() == 20.0
    assert balanced_lambda(h, c, lambda_max=5.0).flatten()[3].item() == 5.0


def test_lambda_equals_closed_form_where_defined():
    torch.manual_seed(5)
    h = torch.randn(64, 8, 2, 2)
    c = 0.7 * torch.randn(64, 8, 2, 2) - 0.3 * h
    lam = balanced_lambda(h, c).flatten()
    hd, cd = h.double().flatten(1), c.double().flatten(1)
    hh, hc, cc = (hd * hd).sum(1), (hd * cd).sum(1), (cd * cd).sum(1)
    closed = (hh - hc) / (cc - hc)
    defined = (cc - hc > 0) & (hh - hc > 0) & (closed <= 20)
    assert defined.sum() > 40  # the comparison covers most samples
    assert torch.allclose(lam[defined], closed[defined], rtol=1e-9, atol=0)
    assert ((lam >= 0) & (lam <= 20)).all()


def test_lambda_per_position_shape_and_values():
    torch.manual_seed(6)
    h, c = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    lam = balanced_lambda(h, c, reduce="position")
    assert lam.shape == (2, 1, 3, 5)
    assert balanced_lambda(h, c).shape == (2, 1, 1, 1)
    single = balanced_lambda(h[1:2, :, 2:3, 4:5], c[1:2, :, 2:3, 4:5])
    assert lam[1, 0, 2, 4].item() == pytest.approx(single.item(), abs=1e-12)
    # the per-position maps are not all the same value
    assert lam.std().item() > 0.1


@pytest.mark.parametrize("reduce", ["layer", "position"])
def test_lambda_degenerate_inputs_finite(reduce):
    torch.manual_seed(7)
    h = torch.randn(2, 4, 3, 3)
    zero = torch.zeros_like(h)
    nan_h = h.clone()
    nan_h[0, 0, 0, 0] = float("nan")
    # h == c and c == 0: plain sum (λ = 1); h == 0: λ = 0; NaN input: fallback λ = 1
    assert (balanced_lambda(h, h.clone(), reduce) == 1).all()
    assert (balanced_lambda(h, zero, reduce) == 1).all()
    assert (balanced_lambda(zero, h, reduce) == 0).all()
    assert (balanced_lambda(zero, zero, reduce) == 1).all()
    lam_nan = balanced_lambda(nan_h, h * 0.5 + 1, reduce)
    assert torch.isfinite(lam_nan).all()
    assert lam_nan.flatten(1)[0, 0].item() == 1.0
    # huge / tiny values (squares overflow / underflow float32): same λ as at unit scale
    c = torch.randn(2, 4, 3, 3)
    ref = balanced_lambda(h, c, reduce)
    for s in (1e30, 1e-30):
        lam = balanced_lambda(h * s, c * s, reduce)
        assert torch.isfinite(lam).all()
        assert torch.allclose(lam, ref, rtol=1e-5)
    half = balanced_lambda(h.half() * 6e4, c.half() * 6e4, reduce)
    assert torch.isfinite(half).all()


# ------------------------------------------------------------------------------ balanced combination


def test_combination_identical_controls_is_plain_sum():
    torch.manual_seed(8)
    c1 = torch.randn(2, 3, 4, 4)
    for reduce in ("layer", "position"):
        assert torch.equal(balanced_combination([c1, c1.clone()], reduce), c1 + c1)


def test_combination_two_controls_hand_computed():
    c1, c2 = vec([1, 0], [0, 1]), vec([0, 1], [0, 0.5])
    out = balanced_combination([c1, c2]).flatten(1)
    # sample 0: γ = 1/2 -> c1 + c2; sample 1: γ = 0 (c2 is the min-norm point) -> 2 c2
    assert out.tolist() == [[1.0, 1.0], [0.0, 1.0]]


def test_combination_k3_uses_frank_wolfe_times_k():
    torch.manual_seed(9)
    cs = [torch.randn(2, 3, 2, 2) for _ in range(3)]
    alpha = frank_wolfe_min_norm(cs)
    expected = sum(3 * alpha[:, k, None, None, None].float() * cs[k] for k in range(3))
    assert torch.allclose(balanced_combination(cs), expected, atol=1e-6)
    assert torch.allclose(balanced_combination([cs[0]] * 3), 3 * cs[0], atol=1e-6)


def test_combination_single_control_unchanged():
    c = torch.randn(1, 2, 3, 3)
    assert balanced_combination([c]) is c


def test_combination_zero_residual_is_absent():
    torch.manual_seed(10)
    c1 = torch.randn(2, 3, 4, 4)
    zero = torch.zeros_like(c1)
    # a zero residual would be the min-norm point and erase c1; it is left out instead
    assert torch.equal(balanced_combination([c1, zero]), c1)
    assert torch.equal(balanced_combination([zero, c1, zero], "position"), c1)
    w = combination_weights([c1, zero, c1.clone()])
    assert [x.flatten().tolist() for x in w] == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    # disjoint spatial masks, per position: each half keeps its own control
    left, right = c1.clone(), c1.clone() * 2
    left[..., 2:] = 0
    right[..., :2] = 0
    assert torch.equal(balanced_combination([left, right], "position"), left + right)


# ------------------------------------------------------------------------------ the strategy


def feats(seed, b=2, shapes=((4, 8, 8), (4, 4, 4), (8, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *s, generator=g) for s in shapes]


def test_registered_as_mi():
    strategy = make_injection("mi")
    assert isinstance(strategy, MinimalImpact)
    assert strategy.name == "mi" and strategy.cond_only is False and strategy.reduce == "layer"
    assert make_injection("mi", cond_only=True).cond_only is True
    assert MinimalImpact.cond_only is False
    with pytest.raises(ControlstackError, match="reduce"):
        make_injection("mi", reduce="channel")
    with pytest.raises(ControlstackError, match="lambda_max"):
        make_injection("mi", lambda_max=-1)


def test_strategy_hand_computed():
    # one layer, h = (0, 0, 3); c1 = (1, 0, 0), c2 = (0, 1, 0): combination γ = 1/2 -> c = (1, 1, 0);
    # injection h·h = 9, h·c = 0, c·c = 2 -> λ = 9 / 2.
    h = [vec([0, 0, 3])]
    mid = vec([1, 0])
    branches = [Residuals([vec([1, 0, 0])], vec([1, 0])), Residuals([vec([0, 1, 0])], vec([0, 1]))]
    out = make_injection("mi")(h, mid, branches)
    assert out.downs[0].flatten().tolist() == [4.5, 4.5, 0.0]
    # mid: c = (1, 1); h = (1, 0): γ = ((c − h)·c) / ||h − c||² = 1 -> λ = 0, no control
    assert out.mid.flatten().tolist() == [0.0, 0.0]


def test_strategy_switches_and_none():
    h, mid = feats(11)[:2], feats(12)[2]
    branches = [Residuals(feats(s)[:2], feats(s + 1)[2]) for s in (13, 15, 17)]
    assert make_injection("mi")(h, mid, []) is None
    plain = make_injection("mi", combine=False, inject=False)(h, mid, branches)
    ref = sum_residuals(branches)
    assert all(torch.equal(a, b) for a, b in zip(plain.downs + [plain.mid], ref.downs + [ref.mid]))
    combined = make_injection("mi", inject=False)(h, mid, branches)
    assert torch.allclose(combined.downs[1], balanced_combination([b.downs[1] for b in branches]))
    injected = make_injection("mi", combine=False)(h, mid, branches)
    lam = balanced_lambda(mid, ref.mid)
    assert torch.equal(injected.mid, lam.float() * ref.mid)
    assert not torch.allclose(lam, torch.ones_like(lam))  # the check is not vacuous
    full = make_injection("mi", reduce="position")(h, mid, branches)
    c_pos = balanced_combination([b.downs[0] for b in branches], "position")
    lam_pos = balanced_lambda(h[0], c_pos, "position")
    assert lam_pos.shape == (2, 1, 8, 8)
    assert torch.equal(full.downs[0], lam_pos.float() * c_pos)


def test_zero_branch_adds_exactly_zero():
    h, mid = feats(20)[:2], feats(21)[2]
    zero = Residuals([torch.zeros_like(t) for t in h], torch.zeros_like(mid))
    live = Residuals(feats(22)[:2], feats(23)[2])
    for reduce in ("layer", "position"):
        strategy = make_injection("mi", reduce=reduce)
        out = strategy(h, mid, [zero])
        assert all(torch.equal(t, torch.zeros_like(t)) for t in out.downs + [out.mid])
        out = strategy(h, mid, [zero, zero, zero])
        assert all(torch.equal(t, torch.zeros_like(t)) for t in out.downs + [out.mid])
        # a fully masked branch next to a live one changes nothing
        alone, both = strategy(h, mid, [live]), strategy(h, mid, [live, zero])
        assert all(torch.equal(a, b) for a, b in zip(alone.downs + [alone.mid], both.downs + [both.mid]))


def test_gradients_finite_through_degenerate_cases():
    h = torch.randn(2, 3, 4, 4)
    c = torch.randn(2, 3, 4, 4, requires_grad=True)
    for grad in (False, True):
        strategy = MinimalImpact(reduce="position", grad_through_coefficients=grad)
        c2 = c.detach().clone().requires_grad_(True)
        cz = torch.zeros(2, 3, 4, 4, requires_grad=True)
        out = strategy([h], h.clone(), [Residuals([c2], c2), Residuals([cz], cz)])
        (out.downs[0].sum() + out.mid.sum()).backward()
        assert torch.isfinite(c2.grad).all() and torch.isfinite(cz.grad).all()
