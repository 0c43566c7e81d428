"""img2img and inpainting with controls: parity with diffusers' ControlNet img2img / inpaint pipelines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack import Control, Pipeline
from controlstack.errors import ControlstackError
from controlstack.sampling import make_scheduler
from tests.parity import assert_same_image

STEPS, SIZE, CFG, SEED = 6, 64, 7.5, 99


@pytest.fixture(scope="module")
def init_image():
    rng = np.random.default_rng(5)
    a = np.zeros((SIZE, SIZE, 3), np.uint8) + rng.integers(40, 200, 3).astype(np.uint8)
    a[10:40, 20:50] = (220, 30, 40)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def mask_image():
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:40, 24:60] = 255
    return Image.fromarray(m)


def _reference(kind, components, controlnet, control_image, init, scheduler="unipc", **kw):
    import diffusers

    cls = {"img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]
    ref = cls(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
              unet=components.unet, controlnet=controlnet,
              scheduler=make_scheduler(scheduler, components.scheduler_config), safety_checker=None,
              feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    # these two pipelines default the control weight to 0.8 / 0.5; Control's default is 1.0
    n = len(control_image) if isinstance(control_image, list) else None
    kw.setdefault("controlnet_conditioning_scale", 1.0 if n is None else [1.0] * n)
    return ref("a red box", image=init, control_image=control_image, num_inference_steps=STEPS, guidance_scale=CFG,
               height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
               negative_prompt="blurry", **kw).images


def _ours(pipe, controls, init, scheduler="unipc", **kw):
    return pipe("a red box", controls=controls, steps=STEPS, cfg=CFG, seed=SEED, width=SIZE, height=SIZE,
                scheduler=scheduler, negative_prompt="blurry", output_type="np", progress=False, init_image=init, **kw)


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("scheduler", ["unipc", "euler_a"])
def test_img2img_matches_diffusers(pipe, tiny_components, tiny_controlnets, hint_images, init_image, strength,
                                   scheduler):
    cn = tiny_controlnets[0]
    expected = _reference("img2img", tiny_components, cn, hint_images[0], init_image, scheduler, strength=strength)
    got = _ours(pipe, [Control(cn, hint_images[0])], init_image, scheduler, strength=strength)
    assert got.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert_same_image(got, expected)


def test_img2img_two_controls_window_and_guess_mode(pipe, tiny_components, tiny_controlnets, hint_images, init_image):
    from diffusers import MultiControlNetModel

    multi = MultiControlNetModel(tiny_controlnets[:2])
    expected = _reference("img2img", tiny_components, multi, hint_images, init_image, strength=0.75,
                          controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.3],
                          control_guidance_end=[0.8, 1.0])
    got = _ours(pipe, [Control(tiny_controlnets[0], hint_images[0], weight=0.7, end=0.8),
                       Control(tiny_controlnets[1], hint_images[1], weight=1.3, start=0.3)], init_image, strength=0.75)
    assert_same_image(got, expected)
    cn = tiny_controlnets[0]
    expected = _reference("img2img", tiny_components, cn, hint_images[0], init_image, strength=0.6, guess_mode=True)
    got = _ours(pipe, [Control(cn, hint_images[0])], init_image, strength=0.6, mode="guess")
    assert_same_image(got, expected)


def test_strength_zero_returns_the_init_image_through_the_vae(pipe, tiny_controlnets, hint_images, init_image):
    got = _ours(pipe, [Control(tiny_controlnets[0], hint_images[0])], init_image, strength=0.0)
    from diffusers.image_processor import VaeImageProcessor

    x = VaeImageProcessor(vae_scale_factor=8).preprocess(init_image, height=SIZE, width=SIZE)
    g = torch.Generator("cpu").manual_seed(SEED)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.sample(g) * pipe.vae.config.scaling_factor
    assert_same_image(got, pipe.decode(z))


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpaint_with_a_4_channel_unet_matches_diffusers(pipe, tiny_components, tiny_controlnets, hint_images,
                                                         init_image, mask_image, strength):
    cn = tiny_controlnets[0]
    expected = _reference("inpaint", tiny_components, cn, hint_images[0], init_image, mask_image=mask_image,
                          strength=strength)
    got = _ours(pipe, [Control(cn, hint_images[0])], init_image, inpaint_mask=mask_image, strength=strength)
    assert_same_image(got, expected)


def test_inpaint_two_controls_and_guess_mode(pipe, tiny_components, tiny_controlnets, hint_images, init_image,
                                             mask_image):
    from diffusers import MultiControlNetModel

    multi = MultiControlNetModel(tiny_controlnets[:2])
    expected = _reference("inpaint", tiny_components, multi, hint_images, init_image, mask_image=mask_image,
                          strength=1.0, guess_mode=True)
    got = _ours(pipe, [Control(tiny_controlnets[0], hint_images[0]), Control(tiny_controlnets[1], hint_images[1])],
                init_image, inpaint_mask=mask_image, strength=1.0, mode="guess")
    assert_same_image(got, expected)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_with_a_9_channel_unet_matches_diffusers(tiny_components, tiny_controlnets, hint_images, init_image,
                                                         mask_image, strength):
    from controlstack.models.tiny import tiny_unet

    nine = dataclasses.replace(tiny_components, unet=tiny_unet(3, in_channels=9))
    cn = tiny_controlnets[0]  # a 4-channel ControlNet beside the 9-channel U-Net, as SD-inpainting users do
    expected = _reference("inpaint", nine, cn, hint_images[0], init_image, mask_image=mask_image, strength=strength)
    got = _ours(Pipeline(nine, name="tiny-inpaint"), [Control(cn, hint_images[0])], init_image,
                inpaint_mask=mask_image, strength=strength)
    assert_same_image(got, expected)
    with pytest.raises(ControlstackError, match="inpainting U-Net: pass init_image and inpaint_mask"):
        Pipeline(nine, name="x")("p", steps=1, width=SIZE, height=SIZE, progress=False)


def test_img2img_errors(pipe, init_image, mask_image):
    with pytest.raises(ControlstackError, match=r"strength must be a number in \[0, 1\]"):
        _ours(pipe, [], init_image, strength=1.5)
    with pytest.raises(ControlstackError, match="inpaint_mask needs init_image"):
        _ours(pipe, [], None, inpaint_mask=mask_image)


def test_hires_fix_is_img2img_of_the_upscaled_first_pass(pipe, tiny_controlnets, hint_images):
    from controlstack.io.png import format_parameters

    controls = [Control(tiny_controlnets[0], hint_images[0])]
    kw = dict(steps=3, cfg=CFG, seed=SEED, scheduler="unipc", progress=False)
    result = pipe("a red box", controls, width=32, height=32, hires=2, hires_strength=0.5, return_result=True, **kw)
    first = pipe("a red box", controls, width=32, height=32, **kw)[0]
    second = pipe("a red box", controls, width=64, height=64, init_image=first.resize((64, 64), Image.LANCZOS),
                  strength=0.5, **kw)[0]
    assert result.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(second))
    text = format_parameters(result.parameters)
    # sd-webui's Size under the hires fix is the first pass's
    assert "Size: 32x32" in text and "Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Lanczos" in text
    with pytest.raises(ControlstackError, match=r"hires must be an upscale factor in \[1, 8\]"):
        pipe("x", [], width=32, height=32, hires=0.5, **kw)


def test_the_inpaint_control_gets_controlnet_1_1s_hint(pipe, tiny_controlnets, init_image, mask_image):
    c = Control(tiny_controlnets[0], init_image, preprocess="inpaint")
    hint = pipe.prepare_hint(c, SIZE, SIZE, inpaint_mask=mask_image)[0].numpy()
    masked = np.asarray(mask_image) > 127
    assert (hint[:, masked] == -1).all()
    assert np.allclose(hint[:, ~masked], (np.asarray(init_image, np.float32) / 255).transpose(2, 0, 1)[:, ~masked])
    out = _ours(pipe, [c], init_image, inpaint_mask=mask_image, strength=1.0)
    assert np.isfinite(out).all()
    with pytest.raises(ControlstackError, match="the inpaint control needs a mask"):
        pipe("x", [c], steps=1, width=SIZE, height=SIZE, progress=False)
