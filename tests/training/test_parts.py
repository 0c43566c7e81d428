"""Library parts of the recipes: tokenizer, data, edge fidelity, precision probe, schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError


def test_tokenizer_whole_words_and_clip_format(tmp_path):
    from transformers import CLIPTokenizer

    from controlstack.training.tokenizer import build_tokenizer

    tok = build_tokenizer("dataset", 12, ["A red striped sphere, left of a cube."])
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    ids = loaded("a red striped sphere left of a cube").input_ids
    assert ids == tok("a red striped sphere left of a cube").input_ids
    assert len(ids) == 2 + 8  # one token per word
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    assert len(loaded("zebra").input_ids) == 2 + 5  # unknown words fall back to bytes
    assert loaded.model_max_length == 12


def test_world_words_are_single_tokens_whatever_their_merges_share():
    """BPE merges the lowest-ranked pair first, so a word's merges can be pre-empted by another
    word's: spelt letter by letter, "and" (a+n) cut "sand" into s|and, and 8 of the world's 51
    words (person, striped, ...) came out in pieces -- 15% of captions then ran past 32 tokens."""
    from controlstack.training.tokenizer import build_tokenizer
    from controlstack.world.captions import VOCABULARY

    tok = build_tokenizer("world", 32)
    assert [w for w in VOCABULARY if len(tok(w).input_ids) != 3] == []
    caption = "a gray striped cone right of a gray cube, a white horse behind a running person in purple on sand"
    assert len(tok(caption).input_ids) == 2 + 21  # one token per word and comma
    assert tok("sand and an").input_ids == tok("sand").input_ids[:-1] + tok("and an").input_ids[1:]


def test_optimizer_is_fused_on_the_cpu():
    from controlstack.training.session import make_optimizer
    from controlstack.training.vae import VAEConfig

    frozen, trained = torch.nn.Linear(3, 3).requires_grad_(False), torch.nn.Linear(3, 2)
    opt = make_optimizer([*frozen.parameters(), *trained.parameters()], VAEConfig(data="unused", learning_rate=0.1))
    assert opt.defaults["fused"] is True
    assert [p for g in opt.param_groups for p in g["params"]] == list(trained.parameters())
    trained.weight.grad, trained.bias.grad = torch.ones(2, 3), torch.ones(2)
    before = trained.weight.detach().clone()
    opt.step()  # Adam's first step moves every weight by lr (x (1 - lr * weight decay) first)
    expected = before * (1 - 0.1 * opt.defaults["weight_decay"]) - 0.1
    assert torch.allclose(trained.weight, expected, atol=1e-6)


def test_unknown_vocabulary_source():
    from controlstack.training.tokenizer import build_tokenizer

    with pytest.raises(ControlstackError, match="unknown vocabulary 'wiki'"):
        build_tokenizer("wiki", 8)


def test_condition_fidelity_of_an_image_with_itself():
    from PIL import Image

    from controlstack.training.validation import condition_fidelity

    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    pil = Image.fromarray(img)
    assert condition_fidelity("depth", [pil], [pil]) == 1.0
    assert condition_fidelity("depth", [pil], [Image.new("RGB", (32, 32))]) == 0.0


def test_mixed_precision_resolution():
    from controlstack.training.precision import resolve_mixed_precision

    assert resolve_mixed_precision("no") == "no"
    assert resolve_mixed_precision("bf16") == "bf16"
    assert resolve_mixed_precision("auto") in ("no", "bf16")


def test_sd_schedule_and_caption_dropout():
    from controlstack.training.diffusion import drop_captions, sd_noise_scheduler

    s = sd_noise_scheduler()
    # SD-1.x: scaled_linear betas -> alphas_cumprod[-1] = 0.0047 (the value in SD's configs)
    assert float(s.alphas_cumprod[-1]) == pytest.approx(0.00466, abs=1e-5)
    caps = drop_captions(["x"] * 10000, 0.1, torch.Generator().manual_seed(0))
    assert caps.count("") == pytest.approx(1000, abs=100)


def test_v_prediction_target_is_sqrt_abar_eps_minus_sqrt_one_minus_abar_z0():
    from controlstack.training.diffusion import noisy_batch, sd_noise_scheduler

    class Cache:  # a fixed latent for every row
        def sample(self, rows, generator, device):
            return torch.full((len(rows), 4, 2, 2), 0.5)

    class Tok:  # token ids do not matter here
        model_max_length = 3

        def __call__(self, caps, **kw):
            return type("Ids", (), {"input_ids": torch.zeros(len(caps), 3, dtype=torch.long)})()

    tok = Tok()
    batch = {"row": torch.arange(3), "text": ["a", "b", "c"]}
    out = {p: noisy_batch(None, sd_noise_scheduler(p), tok, batch, 0.0, torch.Generator().manual_seed(0), "cpu",
                          Cache()) for p in ("epsilon", "v_prediction")}
    (noisy, eps, t, _), (noisy_v, v, t_v, _) = out["epsilon"], out["v_prediction"]
    assert torch.equal(noisy, noisy_v) and torch.equal(t, t_v)  # same draws, only the target differs
    abar = sd_noise_scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * 0.5, atol=1e-6)
    assert not torch.allclose(v, eps)


def test_batches_resume_mid_epoch_gives_the_same_stream():
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from controlstack.training.data import batches

    acc = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=5))

    def stream(start, n):
        loader = acc.prepare(torch.utils.data.DataLoader(list(range(10)), batch_size=3, shuffle=True, drop_last=True))
        it = batches(acc, loader, start)
        return [next(it).tolist() for _ in range(n)]

    full = stream(0, 8)
    assert stream(4, 4) == full[4:]            # 3 batches per epoch: resume in epoch 1
    assert full[:3] != full[3:6]               # epochs are reshuffled
    assert sorted(sum(full[:3], [])) == sorted(set(sum(full[:3], [])))  # no repeats within an epoch


def test_dataset_errors(tmp_path, world_dir):
    from controlstack.training.data import load_image_dataset

    with pytest.raises(ControlstackError, match="not found"):
        load_image_dataset(str(tmp_path / "nope"), {"image": "image"})
    ds = load_image_dataset(world_dir, {"image": "image", "canny": "hint"})
    assert ds.column_names == ["image", "hint"]


def test_vae_random_crops_are_seeded_slices():
    from controlstack.training.vae import VAEConfig, random_crops

    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    a = random_crops(x, 8, torch.Generator().manual_seed(4))
    b = random_crops(x, 8, torch.Generator().manual_seed(4))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    for crop, image in zip(a, x):  # each crop is a contiguous window of its own image
        y0, x0 = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 16)
        assert torch.equal(crop, image[:, y0:y0 + 8, x0:x0 + 8])
    assert random_crops(x, 0, torch.Generator()) is x
    with pytest.raises(ControlstackError, match="crop_size"):
        VAEConfig(data="d", resolution=64, crop_size=12)


def test_vae_object_weight_is_a_weighted_mean_over_object_pixels():
    from diffusers import AutoencoderKL

    from controlstack.training.vae import VAEConfig, VAELoss

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=2)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    objects = torch.zeros(2, 1, 8, 8)
    objects[:, :, 2:5, 3:6] = 1.0

    def loss(weight):
        cfg = VAEConfig(data="d", resolution=8, kl_weight=0.0, object_column="instances", object_weight=weight)
        return VAELoss(vae, cfg)(x, torch.Generator().manual_seed(1), objects)[0].item()

    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(1))
        err = (vae.decode(z).sample - x).abs()
    w = 1 + 4 * objects
    assert loss(0.0) == pytest.approx(err.mean().item(), rel=1e-5)
    assert loss(4.0) == pytest.approx(((err * w).mean() / w.mean()).item(), rel=1e-5)
    assert loss(4.0) != pytest.approx(loss(0.0), rel=1e-3)
    with pytest.raises(ControlstackError, match="object_column"):
        VAEConfig(data="d", resolution=8, object_weight=1.0)


def test_object_map_and_weighted_mean():
    from controlstack.training.data import object_map, weighted_mean

    ids = torch.zeros(1, 3, 16, 16)
    ids[:, :, :8, :8] = 1 / 255   # ground: not an object
    ids[:, :, 8:, 8:12] = 2 / 255  # the first entity id
    objects = object_map(ids, min_id=2)
    assert objects.shape == (1, 1, 16, 16) and objects.sum() == 32
    err = torch.ones(1, 4, 2, 2)
    err[..., 1, 1] = 3.0  # the latent pixel holding the object (half of its 8x8 image pixels)
    assert weighted_mean(err, objects, 0.0) == pytest.approx(1.5)
    assert weighted_mean(err, None, 4.0) == pytest.approx(1.5)
    # area-pooled: w = 1 + 4 * 0.5 = 3 at (1, 1), 1 elsewhere -> (3 * 3 + 3 * 1) / (3 + 3)
    assert weighted_mean(err, objects, 4.0) == pytest.approx(2.0)


def test_object_weight_config_checks():
    from controlstack.training.base import BaseConfig
    from controlstack.training.controlnet import ControlNetConfig

    with pytest.raises(ControlstackError, match="'object_weight' needs 'object_column'"):
        BaseConfig(data="d", vae="v", object_weight=1.0)
    with pytest.raises(ControlstackError, match="object_min_id"):
        ControlNetConfig(data="d", base="b", object_column="instances", object_min_id=0)
    with pytest.raises(ControlstackError, match="both name 'instances'"):
        ControlNetConfig(data="d", base="b", condition="instances", object_column="instances")
