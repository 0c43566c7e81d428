"""Token downsampling (ToDo) for the fast tier: where it applies, what it changes, that it leaves the
model as it was."""

from __future__ import annotations

import torch

from controlstack.models.runner import UNetRunner
from controlstack.models.tiers import _pooled, make_tier
from controlstack.models.token_downsampling import MIN_TOKENS, DownsampledKV, downsampled, grid


def test_grid_finds_the_level_of_a_token_count():
    assert grid(64 * 48, (64, 48)) == (64, 48)
    assert grid(32 * 24, (64, 48)) == (32, 24)
    assert grid(4 * 3, (7, 5)) == (4, 3)  # odd sizes round up, as the U-Net's strided convs do
    assert grid(77, (64, 64)) is None  # text tokens (cross-attention) are never pooled


def test_self_attention_keys_are_pooled_only_where_the_tokens_are_many(tiny_components):
    unet = tiny_components.unet  # attention at its second level: 8 x 8 tokens for a 16 x 16 latent
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(1, 16, 32, generator=g)
    before = [m.processor for n, m in unet.named_modules() if n.endswith("attn1")]
    with torch.no_grad():
        exact = UNetRunner(unet)(x, t, text)
        with downsampled(unet, (16, 16), 2, min_tokens=64) as model:
            assert all(isinstance(m.processor, DownsampledKV) for n, m in model.named_modules() if n.endswith("attn1"))
            pooled = UNetRunner(unet)(x, t, text)
        with downsampled(unet, (16, 16), 2, min_tokens=65):  # 64 tokens: below the threshold, exact
            above = UNetRunner(unet)(x, t, text)
        again = UNetRunner(unet)(x, t, text)
    rel = float((pooled - exact).norm() / exact.norm())
    assert 1e-4 < rel < 0.2  # measured 0.028 on this random model; 3% on the bench U-Net at 64 x 64
    assert torch.equal(above, exact) and torch.equal(again, exact)
    assert [m.processor for n, m in unet.named_modules() if n.endswith("attn1")] == before  # put back


def test_the_fast_tier_pools_from_sd15s_latent_size():
    assert make_tier("fast", "fp32").token_downsampling == 2 and make_tier("compiled").token_downsampling == 1
    assert MIN_TOKENS == 64 * 64
    assert _pooled((2, 4, 64, 64), 2) and not _pooled((2, 4, 32, 32), 2) and not _pooled((2, 4, 64, 64), 1)
