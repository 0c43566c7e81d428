"""The ControlNet recipe's forward: zero convolutions, the locked base and the runner path."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def parts():
    from controlstack.models.tiny import tiny_controlnet, tiny_sd

    sd = tiny_sd(seed=0, max_length=8)
    sd.unet.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
              torch.randn(2, 8, 32, generator=g), torch.rand(2, 3, 64, 64, generator=g))
    return sd, tiny_controlnet(sd.unet, seed=1, randomize=True), inputs


def test_fresh_controlnet_is_an_exact_no_op(parts):
    """Zero convolutions: at step 0 the controlled model equals the locked base bit for bit."""
    from controlstack.training.controlnet import build_controlnet, controlnet_eps

    sd, _, (x, t, emb, hint) = parts
    cn = build_controlnet(sd.unet, sd.vae, (8, 16, 32, 32))
    with torch.no_grad():
        assert torch.equal(controlnet_eps(sd.unet, cn, x, t, emb, hint), sd.unet(x, t, emb).sample)


def test_runner_path_matches_diffusers_controlnet_forward(parts):
    from controlstack.training.controlnet import controlnet_eps

    sd, cn, (x, t, emb, hint) = parts
    with torch.no_grad():
        downs, mid = cn(x, t, emb, hint, return_dict=False)
        ref = sd.unet(x, t, emb, down_block_additional_residuals=downs, mid_block_additional_residual=mid).sample
        ours = controlnet_eps(sd.unet, cn, x, t, emb, hint)
    assert not torch.equal(ref, sd.unet(x, t, emb).sample)  # the randomised control does something
    assert torch.allclose(ours, ref, atol=1e-6)


def test_assert_locked_rejects_a_trainable_base(parts):
    from controlstack.training.controlnet import ControlledUNet, assert_locked, build_controlnet
    from controlstack.training.session import make_optimizer
    from controlstack.training.vae import VAEConfig

    sd, _, _ = parts
    model = ControlledUNet(sd.unet, build_controlnet(sd.unet, sd.vae, (8, 16, 32, 32)))
    cfg = VAEConfig(data="unused")
    assert_locked(model, make_optimizer(model.controlnet.parameters(), cfg))
    with pytest.raises(AssertionError, match="optimiser"):  # the optimiser also holds base weights
        assert_locked(model, make_optimizer(list(model.controlnet.parameters())[:3], cfg))
    sd.unet.conv_in.weight.requires_grad_(True)
    try:
        with pytest.raises(AssertionError, match="base-model weight"):
            assert_locked(model, make_optimizer(model.controlnet.parameters(), cfg))
    finally:
        sd.unet.conv_in.weight.requires_grad_(False)


def test_init_from_fine_tunes_a_trained_controlnet(parts, tmp_path):
    """``init_from``: the trainable copy starts as the given ControlNet (weights bit for bit, in
    train mode); one built for another base is refused with the one-line error."""
    from controlstack.errors import ControlstackError
    from controlstack.io.checkpoints import save_controlnet
    from controlstack.models.tiny import tiny_controlnet, tiny_unet
    from controlstack.training.controlnet import build_controlnet

    sd, cn, _ = parts
    save_controlnet(cn, tmp_path / "cn")
    started = build_controlnet(sd.unet, sd.vae, (8, 16, 32, 32), init=str(tmp_path / "cn"))
    assert started.training
    ref = cn.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in started.state_dict().items())
    save_controlnet(tiny_controlnet(tiny_unet(cross_attention_dim=16), seed=1), tmp_path / "other")
    with pytest.raises(ControlstackError, match="does not match the base"):
        build_controlnet(sd.unet, sd.vae, (8, 16, 32, 32), init=str(tmp_path / "other"))
