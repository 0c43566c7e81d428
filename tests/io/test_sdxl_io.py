"""SDXL bases and ControlNets on disk: diffusers folders, the single-file forms of ControlNets,
family detection by ``inspect``, wrong-family errors, and the CLI giving diffusers' PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from controlstack import Control, Pipeline
from controlstack.cli.main import main
from controlstack.errors import ControlstackError
from controlstack.io.checkpoints import (
    controlnet_to_original,
    inspect_checkpoint,
    load_base,
    load_controlnet,
    save_base,
    save_controlnet,
)
from tests.parity import assert_same_image


@pytest.fixture(scope="module")
def xl_cn(xl_controlnets):
    return xl_controlnets[0]


@pytest.fixture(scope="module")
def xl_dir(xl, tmp_path_factory):
    return save_base(xl, tmp_path_factory.mktemp("xl") / "base")


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sdxl_folder_round_trip(xl, xl_dir):
    import json

    index = json.loads((xl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    back = load_base(xl_dir)
    assert back.family.name == "sdxl" and type(back.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same(getattr(back, part), getattr(xl, part)), part
    assert back.tokenizer_2("a cat").input_ids == xl.tokenizer_2("a cat").input_ids
    assert Pipeline.from_pretrained(xl_dir).family.name == "sdxl"
    assert inspect_checkpoint(xl_dir)["arch"]["family"] == "SDXL"


@pytest.mark.parametrize("form", ["folder", "original", "diffusers-keyed"])
def test_sdxl_controlnet_forms_round_trip(xl_cn, tmp_path, form):
    if form == "folder":
        path = save_controlnet(xl_cn, tmp_path / "cn")
    elif form == "original":
        path = save_controlnet(xl_cn, tmp_path / "cn.safetensors")
    else:  # a diffusers-named single file, as people share them (no config inside)
        path = tmp_path / "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in xl_cn.state_dict().items()}, str(path))
    back = load_controlnet(path)
    assert _same(back, xl_cn) and back.config.addition_embed_type == "text_time"
    assert inspect_checkpoint(path)["arch"]["family"] == "SDXL"


def test_an_sdxl_original_file_without_config_gets_sdxls_defaults(xl_cn, tmp_path):
    # sd-webui / ComfyUI files hold tensors only: what shapes cannot tell comes from SDXL's own config
    path = tmp_path / "controlnet-xl.safetensors"
    save_file(controlnet_to_original(xl_cn), str(path))
    back = load_controlnet(path)
    assert back.config.addition_embed_type == "text_time" and back.config.addition_time_embed_dim == 256
    assert list(back.config.transformer_layers_per_block) == [1, 2] and back.config.use_linear_projection
    assert _same(back, xl_cn)  # every tensor read back exactly


def test_controlnets_of_the_other_family_are_one_line_errors(xl, xl_cn, tiny_components, tiny_controlnets, hint_images):
    with pytest.raises(ControlstackError, match="for Stable Diffusion 1.x/2.x but the base model is Stable Diffusion XL"):
        Pipeline(xl)("a", [Control(tiny_controlnets[0], hint_images[0])], steps=1, progress=False)
    with pytest.raises(ControlstackError, match="for Stable Diffusion XL but the base model is Stable Diffusion 1.x/2.x"):
        Pipeline(tiny_components)("a", [Control(xl_cn, hint_images[0])], steps=1, progress=False)


def test_sdxl_single_file_round_trip(xl, xl_dir, tmp_path):
    from safetensors.torch import load_file

    path = save_base(xl, tmp_path / "sd_xl_tiny.safetensors")
    raw = load_file(path)
    # Stability's layout: LDM U-Net / VAE, CLIP-L under embedders.0, OpenCLIP bigG under embedders.1
    assert torch.equal(raw["model.diffusion_model.label_emb.0.0.weight"], xl.unet.add_embedding.linear_1.weight)
    assert torch.equal(raw["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
                       xl.text_encoder.state_dict()["final_layer_norm.weight"])
    te2 = xl.text_encoder_2.state_dict()
    assert torch.equal(raw["conditioner.embedders.1.model.text_projection"], te2["text_projection.weight"].T)
    fused = raw["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused[32:64], te2["text_model.encoder.layers.1.self_attn.k_proj.weight"])  # q, k, v stacked
    back = load_base(path, config=xl_dir)  # configs embedded; the folder gives the tokenizers
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same(getattr(back, part), getattr(xl, part)), part
    assert back.family.name == "sdxl" and inspect_checkpoint(path)["arch"]["family"] == "SDXL"
    with pytest.raises(ControlstackError, match="carries no tokenizer"):
        load_base(path)  # a tiny vocabulary: no cached CLIP tokenizer fits it


def test_sdxl_single_file_without_config_reads_the_tensors(xl, tmp_path):
    # sd-webui's files carry no config: SDXL 1.0's, with what the shapes tell from the shapes
    from safetensors.torch import load_file

    from controlstack.io.sd_single_file import load_unet
    from controlstack.io.sdxl_single_file import infer_open_clip_config

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(save_base(xl, tmp_path / "xl.safetensors")), str(bare))
    unet = load_unet(bare)
    assert _same(unet, xl.unet) and unet.config.addition_embed_type == "text_time"
    assert list(unet.config.transformer_layers_per_block) == [1, 2] and unet.config.cross_attention_dim == 64
    shapes = {k.removeprefix("conditioner.embedders.1.model."): tuple(v.shape) for k, v in load_file(bare).items()
              if k.startswith("conditioner.embedders.1.model.")}
    assert infer_open_clip_config(shapes) == {"vocab_size": 514, "hidden_size": 32, "projection_dim": 32,
                                              "max_position_embeddings": 16, "num_hidden_layers": 2,
                                              "intermediate_size": 64, "num_attention_heads": 1}


def test_cli_generate_on_sdxl_writes_diffusers_image(xl, xl_cn, xl_dir, tmp_path, hint_images):
    from diffusers import StableDiffusionXLControlNetPipeline
    from PIL import Image

    from controlstack.sampling import make_scheduler

    cn_dir = save_controlnet(xl_cn, tmp_path / "cn")
    hint = tmp_path / "hint.png"
    hint_images[0].save(hint)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(xl_dir), "--control", f"{cn_dir}:{hint}", "--prompt", "a red box",
                 "--steps", "4", "--cfg", "6", "--seed", "3", "--width", "64", "--height", "64",
                 "--original-size", "128", "96", "--out", str(out), "--no-progress"]) == 0
    got = np.asarray(Image.open(out / "00000-3.png"))
    ref = StableDiffusionXLControlNetPipeline(
        vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2, tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2, unet=xl.unet, controlnet=xl_cn, scheduler=make_scheduler("unipc"),
        add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    expected = ref("a red box", image=hint_images[0], num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                   original_size=(128, 96), generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert_same_image(got, np.asarray(expected))


def test_served_bases_offer_the_controlnets_of_their_family(xl, xl_cn, xl_dir, tiny_controlnets, tmp_path):
    from controlstack.cli.serve import controlnet_families, with_controlnets

    paths = [str(save_controlnet(xl_cn, tmp_path / "canny-xl")), str(save_controlnet(tiny_controlnets[0], tmp_path / "canny15"))]
    found = controlnet_families(paths)
    assert {k: v[1] for k, v in found.items()} == {"canny-xl": "sdxl", "canny15": "sd"}
    pipe = Pipeline.from_pretrained(xl_dir)
    assert pipe.controlnets == {}  # the bundled ControlNets are SD-1.x: not offered to an SDXL base
    assert sorted(with_controlnets(pipe, found).controlnets) == ["canny-xl"]
    assert _same(pipe.controlnet("canny-xl"), xl_cn)
    with pytest.raises(ControlstackError, match="is a base, not a ControlNet"):
        controlnet_families([str(xl_dir)])
