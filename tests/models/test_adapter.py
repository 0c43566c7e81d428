"""T2I-Adapters (``models/adapter.py``, ``control.AdapterBranch``): diffusers' own pipeline's image,
alone, two at once, beside a ControlNet, with a window; a mismatched adapter is a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError
from tests.parity import assert_same_image

KW = {"steps": 3, "seed": 1, "width": 64, "height": 64, "progress": False, "output_type": "np", "cfg": 7.5}


def adapter_base(seed: int = 0):
    """A tiny SD base whose first down block has cross-attention, as SD's (the adapter's first
    features join it before its downsampler)."""
    import dataclasses

    from diffusers import UNet2DConditionModel

    from controlstack.models.tiny import tiny_sd

    c = tiny_sd(seed=seed, max_length=16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32)
    return dataclasses.replace(c, unet=unet)


def tiny_adapter(seed: int, kind: str = "full_adapter"):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=8, adapter_type=kind)
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(3.0)  # large enough that the adapter changes the image visibly
    return adapter.eval()


def reference(components, adapter, image, scale):
    from diffusers import StableDiffusionAdapterPipeline

    from controlstack.sampling import make_scheduler

    c = components
    pipe = StableDiffusionAdapterPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                          adapter=adapter, scheduler=make_scheduler("unipc", None), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cube", image=image, num_inference_steps=3, height=64, width=64, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(1), output_type="np",
                adapter_conditioning_scale=scale).images


@pytest.mark.parametrize("kind", ["full_adapter", "light_adapter"])
def test_an_adapter_gives_diffusers_image(hint_images, kind):
    from controlstack import Control, Pipeline

    c, adapter = adapter_base(), tiny_adapter(1, kind)
    pipe = Pipeline(c)
    ours = pipe("a cube", [Control(adapter, hint_images[0], weight=0.8)], **KW)
    assert_same_image(ours, reference(c, adapter, hint_images[0], 0.8))
    assert np.abs(ours - pipe("a cube", **KW)).max() > 1e-2


def test_outside_its_window_an_adapter_adds_nothing(hint_images):
    # SDXL's adapter pipeline calls the window's end adapter_conditioning_factor: active while i < int(N * f)
    from controlstack import Control, Pipeline

    c, adapter = adapter_base(), tiny_adapter(1)
    pipe = Pipeline(c)
    never = pipe("a cube", [Control(adapter, hint_images[0], start=0.0, end=0.3)], **KW)  # 3 steps: none ends <= 0.3
    assert np.array_equal(never, pipe("a cube", **KW))
    first_two = pipe("a cube", [Control(adapter, hint_images[0], start=0.0, end=0.67)], **KW)
    assert np.abs(first_two - never).max() > 1e-3 and np.abs(first_two - pipe("a cube", [Control(adapter,
                                                                                  hint_images[0])], **KW)).max() > 0


def test_two_adapters_are_diffusers_multiadapter(hint_images):
    from diffusers import MultiAdapter

    from controlstack import Control, Pipeline

    c, a, b = adapter_base(), tiny_adapter(1), tiny_adapter(2)
    ours = Pipeline(c)("a cube", [Control(a, hint_images[0], weight=0.6), Control(b, hint_images[1], weight=0.3)],
                       **KW)
    theirs = reference(c, MultiAdapter([a, b]), [hint_images[0], hint_images[1]], [0.6, 0.3])
    assert_same_image(ours, theirs)


def test_an_adapter_beside_a_controlnet_and_a_mismatch(hint_images):
    from controlstack import Control, Pipeline
    from controlstack.models.tiny import tiny_controlnet

    c = adapter_base()
    cn = tiny_controlnet(c.unet, seed=4)
    pipe = Pipeline(c)
    both = pipe("a cube", [Control(tiny_adapter(1), hint_images[0]), Control(cn, hint_images[1])], **KW)
    alone = pipe("a cube", [Control(cn, hint_images[1])], **KW)
    assert np.abs(both - alone).max() > 1e-2
    from diffusers import T2IAdapter

    wide = T2IAdapter(in_channels=3, channels=[64, 128], num_res_blocks=1, downscale_factor=8)
    with pytest.raises(ControlstackError, match=r"T2I-Adapter feature channels \[64, 128\] do not fit"):
        pipe("a cube", [Control(wide, hint_images[0])], **KW)


def test_an_adapter_folder_is_a_control_model_by_path(tmp_path, hint_images):
    from controlstack import Control, Pipeline

    c, adapter = adapter_base(), tiny_adapter(1)
    adapter.save_pretrained(tmp_path / "sketch")  # config.json (T2IAdapter) + safetensors
    pipe = Pipeline(c)
    by_path = pipe("a cube", [Control(str(tmp_path / "sketch"), hint_images[0])], **KW)
    assert_same_image(by_path, pipe("a cube", [Control(adapter, hint_images[0])], **KW))


def test_an_sdxl_adapter_gives_diffusers_image(hint_images):
    """A ``full_adapter_xl`` on the SDXL layout (first down block without cross-attention: its
    features join after the block's downsampler) gives ``StableDiffusionXLAdapterPipeline``'s image."""
    from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

    from controlstack import Control, Pipeline
    from controlstack.models.tiny import tiny_sdxl
    from controlstack.sampling import make_scheduler

    xl = tiny_sdxl(seed=0)
    assert xl.unet.config.down_block_types[0] == "DownBlock2D"
    torch.manual_seed(2)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=16,
                         adapter_type="full_adapter_xl")
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(3.0)
    adapter.eval()
    ref = StableDiffusionXLAdapterPipeline(
        vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2, tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2, unet=xl.unet, adapter=adapter, scheduler=make_scheduler("unipc", None))
    ref.set_progress_bar_config(disable=True)
    expected = ref("a cube", image=hint_images[0], num_inference_steps=3, height=64, width=64, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(1), output_type="np", adapter_conditioning_scale=0.8,
                   adapter_conditioning_factor=2 / 3).images
    pipe = Pipeline(xl)
    ours = pipe("a cube", [Control(adapter, hint_images[0], weight=0.8, end=2 / 3)], **KW)
    assert_same_image(ours, expected)
    assert np.abs(ours - pipe("a cube", **KW)).max() > 1e-2
