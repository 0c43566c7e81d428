"""Key tables (diffusers <-> lllyasviel / LDM) and architecture inference, checked against diffusers'
own converters on tiny models and on full SD-1.5 / SD-2.1 layouts (meta tensors: shapes only)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_controlnet_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from controlstack.io import original as orig
from controlstack.io.checkpoints import controlnet_to_original
from controlstack.io.sd_single_file import SD15_CONFIGS, base_to_original
from controlstack.models.components import SDComponents
from controlstack.models.families import family_of


def _sd15(part, **over):
    return {**json.loads((SD15_CONFIGS / part / "config.json").read_text()), **over}


@pytest.fixture(scope="module")
def meta_sd15_controlnet():
    with torch.device("meta"):
        return ControlNetModel.from_config(_sd15("controlnet"))


def test_tiny_controlnet_names_are_lllyasviels(cn):
    table = orig.unet_table(cn.state_dict(), cn.config.layers_per_block)
    assert len(table) == 178 and len(set(table.values())) == 178
    pinned = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
        "down_blocks.0.resnets.1.norm2.weight": "input_blocks.2.0.out_layers.0.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
        "down_blocks.1.attentions.1.proj_in.weight": "input_blocks.5.1.proj_in.weight",
        "mid_block.resnets.1.time_emb_proj.weight": "middle_block.2.emb_layers.1.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "controlnet_down_blocks.5.bias": "zero_convs.5.0.bias",
        "controlnet_mid_block.weight": "middle_block_out.0.weight",
        "controlnet_cond_embedding.conv_in.weight": "input_hint_block.0.weight",
        "controlnet_cond_embedding.blocks.5.weight": "input_hint_block.12.weight",
        "controlnet_cond_embedding.conv_out.weight": "input_hint_block.14.weight",
    }
    assert {k: table[k] for k in pinned} == pinned


def test_diffusers_converter_reads_our_tiny_controlnet(cn):
    ours = controlnet_to_original(cn)
    back = convert_controlnet_checkpoint(ours, dict(cn.config))
    state = cn.state_dict()
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_sd15_controlnet_table_matches_diffusers_and_shapes_infer_the_config(meta_sd15_controlnet):
    model = meta_sd15_controlnet
    ours = controlnet_to_original(model)
    assert len(ours) == len(model.state_dict()) == 340
    assert "control_model.input_blocks.11.0.out_layers.3.weight" in ours
    back = convert_controlnet_checkpoint(ours, dict(model.config))
    state = model.state_dict()
    assert sorted(back) == sorted(state)
    assert all(back[k].shape == state[k].shape for k in state)
    cfg = orig.infer_controlnet_config({k.removeprefix("control_model."): tuple(v.shape) for k, v in ours.items()})
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg["layers_per_block"] == 2 and cfg["cross_attention_dim"] == 768 and cfg["in_channels"] == 4
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
    assert cfg["conditioning_channels"] == 3
    # what shapes cannot tell: SD-1.x's 8 heads and 32 groups
    assert cfg["attention_head_dim"] == 8 and cfg["norm_num_groups"] == 32 and cfg["use_linear_projection"] is False
    assert family_of(cfg).display(cfg) == "SD-1.x"


def test_sd21_layout_infers_linear_projection_and_64_dim_heads():
    with torch.device("meta"):
        model = ControlNetModel.from_config(_sd15("controlnet", cross_attention_dim=1024, use_linear_projection=True,
                                                  attention_head_dim=[5, 10, 20, 20]))
    shapes = {k.removeprefix("control_model."): tuple(v.shape) for k, v in controlnet_to_original(model).items()}
    cfg = orig.infer_controlnet_config(shapes)
    assert cfg["use_linear_projection"] is True and cfg["attention_head_dim"] == [5, 10, 20, 20]
    assert family_of(cfg).display(cfg) == "SD-2.x"


def test_sd15_unet_and_vae_tables_match_diffusers_converters():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_sd15("unet"))
        vae = AutoencoderKL.from_config(_sd15("vae"))
    text = torch.nn.Module()  # no text encoder needed for this check
    ldm = base_to_original(SDComponents(unet=unet, vae=vae, text_encoder=text, tokenizer=None))
    assert "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight" in ldm
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in ldm      # upsampler after a ResBlock
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm      # ... and after a transformer
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    for model, convert in [(unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)]:
        back = convert(ldm, dict(model.config))
        state = model.state_dict()
        assert sorted(back) == sorted(state)
        assert all(back[k].shape == state[k].shape for k in state)
    shapes = {k.removeprefix(orig.UNET_PREFIX): tuple(v.shape) for k, v in ldm.items() if k.startswith(orig.UNET_PREFIX)}
    cfg = orig.infer_unet_config(shapes)
    assert cfg["up_block_types"] == list(unet.config.up_block_types) and cfg["out_channels"] == 4
    vae_shapes = {k.removeprefix(orig.VAE_PREFIX): tuple(v.shape) for k, v in ldm.items() if k.startswith(orig.VAE_PREFIX)}
    assert orig.infer_vae_config(vae_shapes)["block_out_channels"] == [128, 256, 512, 512]
