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


@pytest.fixture(scope="module")
def xl():
    from controlstack.models.tiny import tiny_sdxl

    return tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def xl_cn(xl):
    from controlstack.models.tiny import tiny_controlnet

    return tiny_controlnet(xl.unet, seed=5)


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
    assert back.family == "sdxl" and type(back.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _same(getattr(back, part), getattr(xl, part)), part
    assert back.tokenizer_2("a cat").input_ids == xl.tokenizer_2("a cat").input_ids
    assert Pipeline.from_pretrained(xl_dir).family == "sdxl"
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


def test_sdxl_single_file_bases_are_named_not_crashed(xl, tmp_path):
    with pytest.raises(ControlstackError, match="SDXL base as a single file is not supported yet"):
        save_base(xl, tmp_path / "xl.safetensors")
    path = tmp_path / "sd_xl_base.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3),
               "conditioner.embedders.1.model.text_projection": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ControlstackError, match="SDXL single-file checkpoint"):
        load_base(path)


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
    np.testing.assert_array_equal(got, np.asarray(expected))


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
