"""SD base models: diffusers folders and SD-1.x single files (read with diffusers' converters)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from controlstack.errors import ControlstackError
from controlstack.io.checkpoints import load_base
from controlstack.io.sd_single_file import load_unet

PARTS = ("unet", "vae", "text_encoder")


def test_single_file_has_ldm_names(ckpt_dir, tiny_components):
    raw = load_file(ckpt_dir / "base.safetensors")
    assert len(raw) == 520
    unet, vae = tiny_components.unet, tiny_components.vae
    assert torch.equal(raw["model.diffusion_model.input_blocks.0.0.weight"], unet.conv_in.weight)
    assert torch.equal(raw["model.diffusion_model.out.2.weight"], unet.conv_out.weight)
    q = raw["first_stage_model.encoder.mid.attn_1.q.weight"]  # LDM: 1x1 conv, diffusers: Linear
    assert q.shape == (16, 16, 1, 1) and torch.equal(q[:, :, 0, 0], vae.encoder.mid_block.attentions[0].to_q.weight)
    assert torch.equal(raw["first_stage_model.decoder.up.0.block.1.conv2.weight"],
                       vae.decoder.up_blocks[3].resnets[1].conv2.weight)  # decoder blocks numbered in reverse
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in raw


def test_single_file_round_trip_through_diffusers_converters(same_tensors, ckpt_dir, tiny_components):
    base = load_base(ckpt_dir / "base.safetensors", config=ckpt_dir / "base")
    for part in PARTS:
        same_tensors(getattr(base, part), getattr(tiny_components, part))
    assert base.tokenizer("a cat").input_ids == tiny_components.tokenizer("a cat").input_ids
    assert base.scheduler_config["beta_schedule"] == "scaled_linear"


def test_folder_round_trip(same_tensors, ckpt_dir, tiny_components):
    base = load_base(ckpt_dir / "base")
    for part in PARTS:
        same_tensors(getattr(base, part), getattr(tiny_components, part))
    assert json.loads((ckpt_dir / "base" / "model_index.json").read_text())["unet"] == ["diffusers",
                                                                                          "UNet2DConditionModel"]


def test_single_file_without_tokenizer_fails_clearly(ckpt_dir):
    with pytest.raises(ControlstackError, match="carries no tokenizer; pass --config DIR"):
        load_base(ckpt_dir / "base.safetensors")


def test_unet_from_single_file_without_config(same_tensors, ckpt_dir, tiny_components, tmp_path):
    same_tensors(load_unet(ckpt_dir / "base.safetensors"), tiny_components.unet)  # embedded config
    save_file(load_file(ckpt_dir / "base.safetensors"), tmp_path / "nometa.safetensors")
    unet = load_unet(tmp_path / "nometa.safetensors")  # SD-1.5 config + what the tensors tell
    same_tensors(unet, tiny_components.unet)
    assert list(unet.config.block_out_channels) == [32, 64] and unet.config.cross_attention_dim == 32
    assert list(unet.config.up_block_types) == ["CrossAttnUpBlock2D", "UpBlock2D"]


@pytest.mark.parametrize("case,match", [
    ("controlnet", "ControlNet checkpoint, not a Stable Diffusion base"),
    ("model_folder", "single-model folder"),
    ("empty_folder", "no model_index.json"),
    ("pickle", "allow-pickle"),
])
def test_bad_base_inputs(ckpt_dir, tmp_path, case, match):
    path = {"controlnet": ckpt_dir / "cn.safetensors", "model_folder": ckpt_dir / "cn",
            "empty_folder": tmp_path, "pickle": tmp_path / "sd.ckpt"}[case]
    if case == "pickle":
        torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ControlstackError, match=match):
        load_base(path)
