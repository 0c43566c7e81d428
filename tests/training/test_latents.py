"""The latent cache draws the same latents as encoding every step, and is never stale."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.training.conftest import tiny_controlnet_config


def _vae_and_rows(world_dir, tiny_vae_dir):
    from controlstack.training.base import load_vae
    from controlstack.training.data import load_image_dataset

    return load_vae(tiny_vae_dir), load_image_dataset(world_dir, {"image": "image"})


def test_cached_sample_equals_encoding_the_batch(world_dir, tiny_vae_dir):
    from controlstack.training.data import RowTransform
    from controlstack.training.diffusion import encode_latents
    from controlstack.training.latents import LatentCache

    vae, ds = _vae_and_rows(world_dir, tiny_vae_dir)
    cache = LatentCache.build(vae, ds, 32, batch_size=3)  # batches that do not divide 8 rows
    assert cache.mean.shape == (8, 4, 4, 4) and (cache.std > 0).all()
    rows = torch.tensor([5, 0, 7])
    images = torch.stack(RowTransform(32, targets=("image",))(ds[[5, 0, 7]])["image"])
    direct = encode_latents(vae, images, torch.Generator().manual_seed(11))
    cached = cache.sample(rows, torch.Generator().manual_seed(11), "cpu")
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5)
    assert direct.abs().max() > 0.05  # a real sample, not zeros


def test_cache_file_is_reused_and_rebuilt_when_stale(world_dir, tiny_vae_dir, tmp_path, monkeypatch):
    from controlstack.training.latents import LatentCache

    vae, ds = _vae_and_rows(world_dir, tiny_vae_dir)
    path = tmp_path / "latents.safetensors"
    first = LatentCache.load_or_build(path, vae, ds, 32)
    assert path.is_file() and not list(tmp_path.glob(".*partial"))

    def no_build(*a, **k):
        raise AssertionError("a matching cache must be read, not rebuilt")

    monkeypatch.setattr(LatentCache, "build", no_build)
    again = LatentCache.load_or_build(path, vae, ds, 32)
    assert torch.equal(again.mean, first.mean) and again.scaling_factor == first.scaling_factor
    # a recipe that keeps other columns (a ControlNet's hint) reads the same rows: same cache
    from controlstack.training.data import load_image_dataset

    with_hint = load_image_dataset(world_dir, {"image": "image", "text": "text", "canny": "hint"})
    assert torch.equal(LatentCache.load_or_build(path, vae, with_hint, 32).mean, first.mean)
    with pytest.raises(AssertionError, match="must be read"):  # another resolution: stale
        LatentCache.load_or_build(path, vae, ds, 64)
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.01)  # another VAE: stale
    with pytest.raises(AssertionError, match="must be read"):
        LatentCache.load_or_build(path, vae, ds, 32)


def _losses(out) -> list[float]:
    with (out / "metrics.csv").open() as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["metric"] == "loss"]


def test_controlnet_recipe_with_cache_takes_the_same_steps(world_dir, tiny_base_dir, tmp_path):
    from controlstack.training.controlnet import train

    kw = dict(max_steps=3, num_validation_images=0)
    train(tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "plain", **kw))
    train(tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "cached",
                                 latent_cache=str(tmp_path / "latents.safetensors"), **kw))
    plain, cached = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert len(plain) == 3 and plain[0] > 0
    assert cached == pytest.approx(plain, rel=1e-4)
