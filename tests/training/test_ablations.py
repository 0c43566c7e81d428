"""The ControlNet paper's ablations as recipe options: ControlNet-lite, standard-initialised convs, data scale."""

from __future__ import annotations

import pytest
import torch

from controlstack.errors import ControlstackError
from tests.training.conftest import tiny_controlnet_config


def test_lite_trains_saves_loads_and_samples(world_dir, tiny_base_dir, tmp_path):
    from controlstack import Control, Pipeline
    from controlstack.io.checkpoints import load_controlnet
    from controlstack.models.lite import LiteControlNetModel
    from controlstack.training.controlnet import train

    out = train(tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "lite", architecture="lite", max_rows=4))
    model = load_controlnet(out)
    assert isinstance(model, LiteControlNetModel)
    assert model.controlnet_mid_block.weight.abs().max() > 0  # trained away from zero
    pipe = Pipeline.from_pretrained(tiny_base_dir)
    hint = torch.rand(3, 32, 32)
    from PIL import Image

    img = Image.fromarray((hint.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    with_lite = pipe("a red cube", [Control(str(out), img)], steps=2, width=32, height=32, output_type="np")
    plain = pipe("a red cube", [], steps=2, width=32, height=32, output_type="np")
    assert with_lite.shape == plain.shape and abs(with_lite - plain).max() > 0


def test_a_fresh_controlnet_leaves_the_base_exact_unless_its_convs_are_standard(tiny_base_dir):
    """Zero convolutions: at step 0 the output equals the base's bit for bit (the paper's Sec. 3.1)."""
    from controlstack.models.runner import ControlNetRunner, UNetRunner
    from controlstack.training.controlnet import build_controlnet, load_base

    base = load_base(tiny_base_dir)
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    text = torch.randn(1, 8, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = base.unet(x, t, text).sample
        for arch, zero, same in [("copy", True, True), ("lite", True, True), ("copy", False, False)]:
            torch.manual_seed(0)
            cn = build_controlnet(base.unet, base.vae, (8,) * len(base.vae.config.block_out_channels),
                                  architecture=arch, zero_init=zero)
            runner, unet = ControlNetRunner(cn), UNetRunner(base.unet)
            h, mid, ctx = unet.encode(x, t, text)
            res = runner(x, t, text, runner.embed_hint(torch.rand(1, 3, 32, 32)))
            out = unet.decode(h, mid, ctx, res)
            assert torch.equal(out, plain) == same, (arch, zero)


def test_ablation_options_are_validated(world_dir, tiny_base_dir, tmp_path):
    with pytest.raises(ControlstackError, match="config key 'architecture' is 'tiny'"):
        tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path, architecture="tiny")
    with pytest.raises(ControlstackError, match="leave them at copy / true"):
        tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path, zero_init=False, init_from=str(tmp_path))
    with pytest.raises(ControlstackError, match="max_rows"):
        tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path, max_rows=-1)
