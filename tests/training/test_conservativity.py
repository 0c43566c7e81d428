"""The Hutchinson estimate of Asym = ½||J − Jᵀ||²_F and MIControlNet's stage-2 term."""

from __future__ import annotations

import torch

from controlstack.training.conservativity import (
    conservativity_loss,
    hutchinson_traces,
    rademacher,
    twice_differentiable,
)


def _exact_asym(f, x0):
    j = torch.autograd.functional.jacobian(f, x0)
    return 0.5 * float(((j - j.T) ** 2).sum()), float((j * j).sum())


def test_hutchinson_matches_the_exact_asymmetry_within_sampling_error():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(6, 6, generator=g, dtype=torch.float64)
    w2 = torch.randn(6, 6, generator=g, dtype=torch.float64)

    def f(x):  # a small explicit network with a non-symmetric Jacobian
        return torch.tanh(x @ w1.T) @ w2.T

    x0 = 0.1 * torch.randn(6, generator=g, dtype=torch.float64)  # tanh near its linear part
    exact, exact_jjt = _exact_asym(f, x0)
    n = 20000  # probes, as a batch of identical samples (rows do not mix)
    x = x0.expand(n, 6).clone().requires_grad_(True)
    tr = hutchinson_traces(f(x), x, rademacher(x, g), create_graph=False)
    est, se = float(tr.asym.mean()), float(tr.asym.std() / n**0.5)
    assert exact > 1.0
    assert abs(est - exact) < 4 * se, (est, exact, se)
    assert abs(float(tr.jjt.mean()) - exact_jjt) < 4 * float(tr.jjt.std() / n**0.5)


def test_asymmetry_is_zero_for_a_gradient_field():
    """f = ∇φ has a symmetric Jacobian (a Hessian): every probe gives tr(JJᵀ) = tr(JJ)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64)

    def f(x):
        y = x.detach().requires_grad_(True) if not x.requires_grad else x
        phi = torch.nn.functional.softplus(y @ a).sum()
        return torch.autograd.grad(phi, y, create_graph=True)[0]

    x = torch.randn(64, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tr = hutchinson_traces(f(x), x, rademacher(x, g), create_graph=False)
    assert float(tr.jjt.min()) > 0
    assert float(tr.asym.abs().max()) <= 1e-12 * float(tr.jjt.max())
    # and a diagonal linear map gives exactly 0 (same sums in the same order)
    d = torch.randn(5, generator=g, dtype=torch.float64)
    tr = hutchinson_traces(x * d, x, rademacher(x, g), create_graph=False)
    assert torch.equal(tr.asym, torch.zeros(64, dtype=torch.float64))


def test_the_term_follows_the_controlnet_path_and_trains_only_the_controlnet():
    from controlstack.injection import make_injection
    from controlstack.models.tiny import tiny_controlnet, tiny_sd
    from controlstack.training.controlnet import build_controlnet, controlnet_eps

    sd = tiny_sd(seed=0, max_length=8)
    sd.unet.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x0, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    emb, hint = torch.randn(2, 8, 32, generator=g), torch.rand(2, 3, 64, 64, generator=g)

    # a fresh ControlNet (zero convolutions) adds nothing, so its part of the Jacobian is exactly 0,
    # although the whole model's Jacobian is not
    fresh = build_controlnet(sd.unet, sd.vae, (8, 16, 32, 32))
    x = x0.clone().requires_grad_(True)
    tr = hutchinson_traces(controlnet_eps(sd.unet, fresh, x0, t, emb, hint, control_input=x), x,
                           rademacher(x, g), create_graph=False)
    assert torch.equal(tr.jjt, torch.zeros(2)) and torch.equal(tr.jj, torch.zeros(2))
    y = x0.clone().requires_grad_(True)
    whole = hutchinson_traces(controlnet_eps(sd.unet, fresh, y, t, emb, hint), y, rademacher(y, g), False)
    assert float(whole.jjt.min()) > 0

    cn = tiny_controlnet(sd.unet, seed=1, randomize=True).train()
    for mode in ("sum", "mi"):
        cn.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with twice_differentiable("cpu"):
            out = controlnet_eps(sd.unet, cn, x0, t, emb, hint, make_injection(mode), control_input=x)
            loss, asym = conservativity_loss(out, x, probes=2, generator=g)
        assert torch.isfinite(loss) and float(asym) != 0.0
        loss.backward()
        grads = [p.grad for p in cn.parameters()]
        assert sum(gr is not None and bool(gr.abs().sum() > 0) for gr in grads) > len(grads) // 2
        assert all(p.grad is None for p in sd.unet.parameters())
        assert x.grad is not None  # (the input is a leaf here; in training it is a fresh copy per step)
