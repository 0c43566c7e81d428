"""SD3 / Flux single files (``io/transformer_single_file.py``): the original layouts' tables checked
against diffusers' own converters, a base written as a single file and read back gives the same
image, and the file's config is read from its shapes (an SD3.5-style file with an SD3 folder)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.io import transformer_single_file as tsf
from tests.parity import assert_same_image

SIZE = 32
KW = {"steps": 3, "seed": 1, "width": SIZE, "height": SIZE, "progress": False, "output_type": "np", "cfg": 4.0}


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("config", [{}, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}])
def test_the_sd3_table_is_diffusers_converter_inverted(config):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from controlstack.models.tiny_mmdit import tiny_sd3

    state = tiny_sd3(seed=0, with_t5=False, **config).unet.state_dict()
    original = tsf.to_original(state, "sd3")
    assert "joint_blocks.0.x_block.attn.qkv.weight" in original and ("joint_blocks.0.x_block.attn2.qkv.weight" in original) == bool(config)
    _same(convert_sd3_transformer_checkpoint_to_diffusers(dict(original)), state)
    _same(tsf.to_diffusers(original, "sd3"), state)


def test_the_flux_table_is_diffusers_converter_inverted(monkeypatch):
    from diffusers.loaders import single_file_utils

    from controlstack.models.tiny_mmdit import tiny_flux

    state = tiny_flux(seed=0).unet.state_dict()
    original = tsf.to_original(state, "flux")
    assert "single_blocks.0.linear1.weight" in original and "guidance_in.in_layer.weight" in original
    width = state["x_embedder.weight"].shape[0]
    split = torch.split

    def at_width(t, sizes, dim=0):  # diffusers' converter assumes Flux.1's width (3072); the tiny model's is less
        return split(t, [width] * 3 + [t.shape[0] - 3 * width], dim) if sizes == (3072, 3072, 3072, 12288) else split(t, sizes, dim)

    monkeypatch.setattr(single_file_utils.torch, "split", at_width)
    _same(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(original)), state)
    monkeypatch.undo()
    _same(tsf.to_diffusers(original, "flux"), state)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_single_file_round_trip_gives_the_same_image(tmp_path, family):
    from safetensors import safe_open

    from controlstack import Pipeline
    from controlstack.cli.main import main
    from controlstack.io.checkpoints import save_base
    from controlstack.models.tiny_mmdit import tiny_flux, tiny_sd3

    c = tiny_sd3(seed=0, with_t5=False) if family == "sd3" else tiny_flux(seed=0)
    save_base(c, tmp_path / "folder")
    assert main(["convert", str(tmp_path / "folder"), str(tmp_path / "m.safetensors")]) == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.diffusion_model.") for k in keys) and any(k.startswith("first_stage_model.") for k in keys)
    want = Pipeline(c)("a red cube", **KW)
    got = Pipeline.from_pretrained(tmp_path / "m.safetensors", config=tmp_path / "folder")("a red cube", **KW)
    assert_same_image(got, want)
    with pytest.raises(ControlstackError, match="carries no text encoders"):
        Pipeline.from_pretrained(tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back"), "--config",
                 str(tmp_path / "folder")]) == 0
    assert_same_image(Pipeline.from_pretrained(tmp_path / "back")("a red cube", **KW), want)


def test_a_bare_bfl_file_reads_its_config_from_its_shapes(tmp_path):
    """Black Forest Labs' files have bare keys and no metadata: blocks, widths and the guidance
    embedding come from the shapes, the rest from the folder (here a Flux-dev folder, a schnell file)."""
    from safetensors.torch import save_file

    from controlstack import Pipeline
    from controlstack.io.checkpoints import save_base
    from controlstack.models.tiny_mmdit import tiny_flux

    dev, schnell = tiny_flux(seed=0), tiny_flux(seed=3, guidance_embeds=False, num_single_layers=2)
    save_base(dev, tmp_path / "dev")
    save_file(tsf.to_original(schnell.unet.state_dict(), "flux"), str(tmp_path / "schnell.safetensors"))
    pipe = Pipeline.from_pretrained(tmp_path / "schnell.safetensors", config=tmp_path / "dev")
    assert pipe.unet.config.num_single_layers == 2 and not pipe.unet.config.guidance_embeds
    # the file's transformer with the folder's encoders and VAE
    assert_same_image(pipe("a red cube", **KW), Pipeline(dataclasses.replace(dev, unet=schnell.unet))("a red cube", **KW))
    save_file({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)}, str(tmp_path / "sd3.safetensors"))
    with pytest.raises(ControlstackError, match="is a Flux.1 folder"):
        Pipeline.from_pretrained(tmp_path / "sd3.safetensors", config=tmp_path / "dev")
