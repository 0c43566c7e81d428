"""Each recipe runs 2 steps on CPU with a finite loss and exports loadable weights."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from controlstack.errors import ControlstackError
from tests.training.conftest import tiny_controlnet_config


def _metric(out: Path, name: str) -> list[float]:
    with (Path(out) / "metrics.csv").open() as f:
        return [float(r["value"]) for r in csv.DictReader(f) if r["metric"] == name]


def test_vae_two_steps(world_dir, tmp_path):
    from diffusers import AutoencoderKL

    from controlstack.training.vae import VAEConfig, train

    cfg = VAEConfig(data=world_dir, output_dir=str(tmp_path / "vae"), resolution=32, batch_size=4, max_steps=2,
                    downsampling=4, block_out_channels=(8, 8, 8), norm_num_groups=8, checkpoint_every=1,
                    validate_every=2, log_every=1, num_validation_images=2, scaling_batches=2,
                    gradient_loss_weight=0.5, object_column="instances", object_weight=4.0)
    model = train(cfg)
    losses = _metric(tmp_path / "vae", "loss")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    vae = AutoencoderKL.from_pretrained(model)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 4
    # the measured latent scale is stored in the exported config (SD's 0.18215 was found this way)
    assert vae.config.scaling_factor == pytest.approx(_metric(tmp_path / "vae", "scaling_factor")[0], rel=1e-5)
    assert vae.config.scaling_factor != 0.18215
    assert (tmp_path / "vae" / "samples" / "step-0000002.png").is_file()
    assert [p.name for p in sorted((tmp_path / "vae" / "checkpoints").iterdir())] == ["step-0000001", "step-0000002"]


def test_vae_decoder_finetune_keeps_the_encoder(world_dir, tiny_vae_dir, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from controlstack.training.vae import VAEConfig, train

    cfg = VAEConfig(data=world_dir, output_dir=str(tmp_path / "dec"), resolution=32, batch_size=4, max_steps=2,
                    init_from=tiny_vae_dir, train_encoder=False, latent_noise=0.3, learning_rate=1e-2,
                    checkpoint_every=2, validate_every=2, num_validation_images=0)
    out = AutoencoderKL.from_pretrained(train(cfg))
    before = load_file(f"{tiny_vae_dir}/diffusion_pytorch_model.safetensors")
    after = out.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith("decoder.") and k.endswith("weight")]
    assert frozen and all(torch.equal(before[k].float(), after[k].float()) for k in frozen)
    assert sum(not torch.equal(before[k].float(), after[k].float()) for k in trained) > len(trained) // 2
    assert out.config.scaling_factor == AutoencoderKL.from_pretrained(tiny_vae_dir).config.scaling_factor
    with pytest.raises(ControlstackError, match="init_from"):
        VAEConfig(data=world_dir, train_encoder=False)


def test_base_two_steps_exports_a_stable_diffusion_folder(world_dir, tiny_vae_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from controlstack.training.base import BaseConfig, train

    cfg = BaseConfig(data=world_dir, vae=tiny_vae_dir, output_dir=str(tmp_path / "base"), vocabulary="dataset",
                     max_length=8, resolution=32, batch_size=4, max_steps=2, block_out_channels=(16, 32),
                     attention_levels=1, norm_num_groups=8, text_hidden_size=16, text_layers=1, text_heads=2,
                     checkpoint_every=2, validate_every=2, log_every=1, num_validation_images=1,
                     num_inference_steps=2)
    model = train(cfg)
    assert all(math.isfinite(v) for v in _metric(tmp_path / "base", "loss"))
    index = json.loads((Path(model) / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    s = pipe.scheduler.config
    assert (s.beta_start, s.beta_end, s.beta_schedule, s.num_train_timesteps, s.prediction_type) == (
        0.00085, 0.012, "scaled_linear", 1000, "epsilon")
    # cross-attention only at the lowest level: the high-resolution level has no attention
    assert list(pipe.unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    tok = CLIPTokenizer.from_pretrained(Path(model) / "tokenizer")
    ids = tok("a red sphere").input_ids
    assert len(ids) == 5  # start, three whole-word tokens, end
    image = pipe("a red sphere", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_controlnet_two_steps_trains_only_the_controlnet(world_dir, tiny_base_dir, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    from controlstack.training.controlnet import train

    cfg = tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "cn", condition="depth", use_ema=True)
    model = train(cfg)
    assert all(math.isfinite(v) for v in _metric(tmp_path / "cn", "loss"))
    fidelity = _metric(tmp_path / "cn", "fidelity")
    assert len(fidelity) == 1 and 0.0 <= fidelity[0] <= 1.0
    assert (tmp_path / "cn" / "fidelity.png").is_file()
    cn = ControlNetModel.from_pretrained(model)
    assert list(cn.config.conditioning_embedding_out_channels) == [8, 8, 8, 8]
    # the locked U-Net inside the checkpoint is bit-identical to the base; the zero convs moved
    state = load_file(tmp_path / "cn" / "checkpoints" / "step-0000002" / "model.safetensors")
    base = UNet2DConditionModel.from_pretrained(tiny_base_dir, subfolder="unet").state_dict()
    assert all(torch.equal(state[f"unet.{k}"], v) for k, v in base.items())
    assert cn.controlnet_mid_block.weight.abs().max() > 0


def test_object_weight_changes_the_controlnet_and_base_losses(world_dir, tiny_vae_dir, tiny_base_dir, tmp_path):
    """The recipes pass the instance map to the loss: the same first batch gives another loss."""
    from controlstack.training.base import BaseConfig
    from controlstack.training.base import train as train_base
    from controlstack.training.controlnet import train as train_controlnet

    def first_loss(name, weight):
        out = tmp_path / f"{name}-{weight}"
        objects = {"object_column": "instances", "object_weight": weight} if weight else {}
        if name == "cn":
            train_controlnet(tiny_controlnet_config(world_dir, tiny_base_dir, out, max_steps=1,
                                                    num_validation_images=0, **objects))
        else:
            train_base(BaseConfig(data=world_dir, vae=tiny_vae_dir, output_dir=str(out), vocabulary="dataset",
                                  max_length=8, resolution=32, batch_size=4, max_steps=1, block_out_channels=(16, 32),
                                  attention_levels=1, norm_num_groups=8, text_hidden_size=16, text_layers=1,
                                  text_heads=2, num_validation_images=0, log_every=1, **objects))
        return _metric(out, "loss")[0]

    for name in ("cn", "base"):
        plain, weighted = first_loss(name, 0.0), first_loss(name, 8.0)
        assert math.isfinite(weighted) and weighted != pytest.approx(plain, rel=1e-4)


def test_output_folder_is_not_overwritten_without_resume(world_dir, tiny_base_dir, tmp_path):
    from controlstack.training.controlnet import train

    cfg = tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "cn", max_steps=1, num_validation_images=0)
    train(cfg)
    with pytest.raises(ControlstackError, match="--resume"):
        train(cfg)
    train(cfg, resume=True)  # already at max_steps: re-exports the same weights


def test_hint_encoder_must_match_the_vae(world_dir, tiny_base_dir, tmp_path):
    from controlstack.training.controlnet import train

    cfg = tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "cn", hint_channels=(8, 8, 8))
    with pytest.raises(ControlstackError, match="hint_channels.*downsamples 8x"):
        train(cfg)
    assert not (tmp_path / "cn").exists()  # a user error leaves no output behind


def test_missing_condition_column_names_the_columns(world_dir, tiny_base_dir, tmp_path):
    from controlstack.training.controlnet import train

    cfg = tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "cn", condition="hed")
    with pytest.raises(ControlstackError, match="no column.*hed.*canny"):
        train(cfg)
