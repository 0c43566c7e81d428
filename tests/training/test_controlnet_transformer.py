"""The ControlNet recipe on transformer bases (``training/controlnet_transformer.py``): 2 steps of the
flow-matching loss on the tiny world for a tiny SD3 and a tiny Flux base; the ControlNet trained (its
zero outputs moved), its folder loads as a control of the base and changes the image; the U-Net-only
options are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError
from tests.training.conftest import tiny_controlnet_config


def save_base(tmp_path, family: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from controlstack.models.tiny_mmdit import tiny_flux, tiny_sd3

    c = (tiny_sd3 if family == "sd3" else tiny_flux)(seed=0)
    parts = dict(transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                 text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                 scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    if family == "sd3":
        StableDiffusion3Pipeline(**parts, text_encoder_3=c.text_encoder_3, tokenizer_3=c.tokenizer_3).save_pretrained(
            tmp_path / "base")
    else:
        FluxPipeline(**parts).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_two_steps_train_a_transformer_controlnet(world_dir, tmp_path, family):
    from controlstack import Control, Pipeline
    from controlstack.io.checkpoints import load_controlnet
    from controlstack.training import recipe

    base = save_base(tmp_path, family)
    _, train = recipe("controlnet")
    cfg = tiny_controlnet_config(world_dir, base, tmp_path / "out", learning_rate=1e-2, controlnet_layers=1,
                                 num_inference_steps=2, guidance_scale=3.0)
    out = train(cfg)
    cn = load_controlnet(out)
    assert type(cn).__name__ == ("SD3ControlNetModel" if family == "sd3" else "FluxControlNetModel")
    outputs = cn.controlnet_blocks[0].weight
    assert outputs.abs().max() > 0  # the zero-initialised output layer trained
    assert (tmp_path / "out" / "samples" / "step-0000002.png").is_file()
    pipe = Pipeline.from_pretrained(base)
    hint = np.zeros((32, 32, 3), np.uint8)
    hint[8:24, 16] = 255
    kw = {"steps": 2, "seed": 0, "width": 32, "height": 32, "output_type": "np", "progress": False, "cfg": 3.0}
    controlled = pipe("a red cube", [Control(str(out), hint)], **kw)
    assert controlled.shape == (1, 32, 32, 3) and np.isfinite(controlled).all()
    assert np.abs(controlled - pipe("a red cube", **kw)).max() > 1e-4


def test_u_net_only_options_are_one_line_errors(world_dir, tmp_path):
    from controlstack.training import recipe

    base = save_base(tmp_path, "sd3")
    _, train = recipe("controlnet")
    with pytest.raises(ControlstackError, match="Minimal Impact's options act on a U-Net"):
        train(tiny_controlnet_config(world_dir, base, tmp_path / "o", injection="mi"))
    with pytest.raises(ControlstackError, match="fresh zero-initialised copy"):
        train(tiny_controlnet_config(world_dir, base, tmp_path / "o", architecture="lite"))


def test_the_flow_batch_is_the_straight_path():
    from controlstack.training.controlnet_transformer import flow_batch

    x0 = torch.randn(4, 2, 3, 3)
    noisy, target, t = flow_batch(x0, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t2 = torch.sigmoid(torch.randn(4, generator=g))
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, t2) and ((t > 0) & (t < 1)).all()
    torch.testing.assert_close(noisy, (1 - t2.view(-1, 1, 1, 1)) * x0 + t2.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(target, noise - x0)
