"""SDXL through the one loop: family detection, both text encoders and the pooled embedding against
diffusers' ``encode_prompt``, micro-conditioning ids, and parity with diffusers' four SDXL ControlNet
pipelines (text-to-image, img2img, inpaint; the union one in test_union.py) on tiny seeded models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack import Control, Pipeline
from controlstack.errors import ControlstackError
from controlstack.sampling import make_scheduler
from tests.parity import assert_same_image

STEPS, SIZE, CFG, SEED = 6, 64, 7.5, 1234


@pytest.fixture(scope="module")
def init_image():
    g = np.random.default_rng(3)
    return Image.fromarray((g.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def mask_image():
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:48, 8:40] = 255
    return Image.fromarray(m)


def reference(cls_name, xl, controlnet, **kw):
    import diffusers

    ref = getattr(diffusers, cls_name)(
        vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2, tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2, unet=xl.unet, controlnet=controlnet, scheduler=make_scheduler(kw.pop("scheduler", "unipc")),
        add_watermarker=False,
    )
    ref.set_progress_bar_config(disable=True)
    return ref("a red box", num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **kw).images


def ours(pipe, controls, **kw):
    return pipe("a red box", controls, steps=STEPS, cfg=CFG, seed=SEED, width=SIZE, height=SIZE,
                output_type="np", progress=False, **kw)


def test_family_is_told_by_the_unet(xl, tiny_components, xl_pipe, pipe):
    from controlstack.models.families import family_of, get

    assert family_of(xl.unet) is xl.family is xl_pipe.family is get("sdxl")
    assert family_of(tiny_components.unet) is pipe.family is get("sd")
    assert family_of(dict(xl.unet.config)).name == "sdxl" and xl_pipe.family.label == "Stable Diffusion XL"
    assert xl_pipe.native_size == 64  # tiny: sample_size 8 x the VAE's 8 (SDXL's own: 128 x 8 = 1024)


def test_an_sdxl_unet_without_its_second_encoder_is_refused(xl):
    import dataclasses

    with pytest.raises(ControlstackError, match="needs both text encoders"):
        Pipeline(dataclasses.replace(xl, text_encoder_2=None))


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_both_text_encoders_and_the_pooled_embedding_match_diffusers(xl, xl_pipe, xl_controlnets, negative):
    from diffusers import StableDiffusionXLControlNetPipeline

    ref = StableDiffusionXLControlNetPipeline(
        vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2, tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2, unet=xl.unet, controlnet=xl_controlnets[0], scheduler=make_scheduler("unipc"),
        add_watermarker=False)
    emb, neg, pooled, neg_pooled = ref.encode_prompt("a red box", device=torch.device("cpu"), num_images_per_prompt=2,
                                                         do_classifier_free_guidance=True, negative_prompt=negative)
    cond, uncond, added = xl_pipe.text_conditions("a red box", negative or "", 2, True, (SIZE, SIZE), {})
    assert cond.shape == (2, 16, 64) and added[1]["text_embeds"].shape == (2, 32)
    assert torch.equal(cond, emb) and torch.equal(uncond, neg)
    assert torch.equal(added[1]["text_embeds"], pooled) and torch.equal(added[0]["text_embeds"], neg_pooled)
    assert (uncond.abs().sum() == 0) == (negative is None)  # force_zeros_for_empty_prompt


def test_micro_conditioning_ids(xl, xl_pipe, pipe):
    _, _, added = xl_pipe.text_conditions("a", "", 1, True, (64, 48), {"crops_coords_top_left": (2, 4)})
    assert added[1]["time_ids"].tolist() == [[64, 48, 2, 4, 64, 48]]  # defaults: the output size (h, w)
    _, _, added = xl_pipe.text_conditions("a", "", 1, False, (64, 64), {"original_size": (1024, 768),
                                                                        "target_size": (512, 512)})
    assert added[0] is None and added[1]["time_ids"].tolist() == [[1024, 768, 0, 0, 512, 512]]
    with pytest.raises(ControlstackError, match=r"original_size must be a pair \(height, width\)"):
        xl_pipe.text_conditions("a", "", 1, True, (64, 64), {"original_size": (0, 64)})
    with pytest.raises(ControlstackError, match="crops_coords_top_left must be a pair"):
        xl_pipe.text_conditions("a", "", 1, True, (64, 64), {"crops_coords_top_left": (1, 2, 3)})
    with pytest.raises(ControlstackError, match="SDXL micro-conditioning, but this base is Stable Diffusion 1"):
        pipe("a", steps=1, original_size=(64, 64), progress=False)


def test_a_refiner_unet_is_named(xl):
    from controlstack.models import sdxl

    with pytest.raises(ControlstackError, match="SDXL refiner"):
        sdxl.add_time_ids(xl.unet, 32 + xl.unet.config.addition_time_embed_dim, (64, 64), (0, 0), (64, 64))
    with pytest.raises(ControlstackError, match="does not belong to this U-Net"):
        sdxl.add_time_ids(xl.unet, 31, (64, 64), (0, 0), (64, 64))


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_one_control_matches_diffusers(xl, xl_pipe, xl_controlnets, hint_images, scheduler):
    cn = xl_controlnets[0]
    expected = reference("StableDiffusionXLControlNetPipeline", xl, cn, image=hint_images[0], scheduler=scheduler)
    got = ours(xl_pipe, [Control(cn, hint_images[0])], scheduler=scheduler)
    assert got.shape == (1, SIZE, SIZE, 3)
    assert_same_image(got, expected)
    assert np.abs(got - ours(xl_pipe, [], scheduler=scheduler)).max() > 1e-2  # the control acts


def test_two_controls_window_and_micro_conditioning_match_diffusers(xl, xl_pipe, xl_controlnets, hint_images):
    from diffusers import MultiControlNetModel

    micro = {"original_size": (128, 96), "crops_coords_top_left": (4, 8), "target_size": (64, 80)}
    expected = reference("StableDiffusionXLControlNetPipeline", xl, MultiControlNetModel(xl_controlnets),
                         image=hint_images, controlnet_conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.2],
                         control_guidance_end=[0.5, 1.0], negative_prompt="blurry", **micro)
    controls = [Control(xl_controlnets[0], hint_images[0], weight=0.8, end=0.5),
                Control(xl_controlnets[1], hint_images[1], weight=1.2, start=0.2)]
    got = ours(xl_pipe, controls, negative_prompt="blurry", **micro)
    assert_same_image(got, expected)
    assert np.abs(got - ours(xl_pipe, controls, negative_prompt="blurry")).max() > 1e-3  # the ids act


def test_guess_mode_matches_diffusers(xl, xl_pipe, xl_controlnets, hint_images):
    cn = xl_controlnets[0]
    expected = reference("StableDiffusionXLControlNetPipeline", xl, cn, image=hint_images[0], guess_mode=True)
    assert_same_image(ours(xl_pipe, [Control(cn, hint_images[0])], mode="guess"), expected)


def test_img2img_matches_diffusers(xl, xl_pipe, xl_controlnets, hint_images, init_image):
    cn = xl_controlnets[0]
    # the SDXL img2img pipeline's default conditioning scale is 0.8; ours is the Control's weight
    expected = reference("StableDiffusionXLControlNetImg2ImgPipeline", xl, cn, image=init_image,
                         control_image=hint_images[0], strength=0.6, controlnet_conditioning_scale=0.8)
    got = ours(xl_pipe, [Control(cn, hint_images[0], weight=0.8)], init_image=init_image, strength=0.6)
    assert_same_image(got, expected)


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpaint_matches_diffusers(xl, xl_pipe, xl_controlnets, hint_images, init_image, mask_image, strength):
    cn = xl_controlnets[1]
    expected = reference("StableDiffusionXLControlNetInpaintPipeline", xl, cn, image=init_image, mask_image=mask_image,
                         control_image=hint_images[1], strength=strength)
    got = ours(xl_pipe, [Control(cn, hint_images[1])], init_image=init_image, inpaint_mask=mask_image, strength=strength)
    assert_same_image(got, expected)


def test_modes_masks_schedules_and_mi_run_on_sdxl_shapes(xl_pipe, xl_controlnets, hint_images):
    # SDXL's tiny layout has 7 skip features (not SD-1.x's 13 at full size): the modes' layer weights
    # and MI's balancing come from the residuals' shapes, so every mode runs and changes the image
    cn = xl_controlnets[0]
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, : SIZE // 2] = 1
    base = ours(xl_pipe, [Control(cn, hint_images[0])])
    for mode in ("controlnet", "guess", "mi"):
        out = ours(xl_pipe, [Control(cn, hint_images[0])], mode=mode)
        assert np.isfinite(out).all() and np.abs(out - base).max() > 1e-3, mode
    masked = ours(xl_pipe, [Control(cn, hint_images[0], mask=mask, weight=[(0.0, 1.0), (1.0, 0.2)])])
    assert np.abs(masked - base).max() > 1e-3


def test_png_parameters_carry_the_micro_conditioning(xl_pipe, xl_controlnets, hint_images, tmp_path):
    from controlstack.io.png import atomic_save, read_parameters

    result = xl_pipe("a red box", [Control(xl_controlnets[0], hint_images[0])], steps=2, seed=1, width=SIZE,
                     height=SIZE, progress=False, original_size=(96, 80), return_result=True)
    assert "Original size: 80x96" in result.images[0].info["parameters"]  # width x height, as "Size:"
    assert "Target size" not in result.images[0].info["parameters"]  # only what was set
    saved = read_parameters(atomic_save(result.images[0], tmp_path / "a.png", result.parameters))
    assert saved["controlstack"]["original_size"] == [96, 80] and "target_size" not in saved["controlstack"]


def test_hires_fix_on_sdxl_recomputes_the_size_ids(xl_pipe, xl_controlnets, hint_images):
    # the second pass is img2img at twice the size; unset micro-conditioning follows the new size
    result = xl_pipe("a red box", [Control(xl_controlnets[0], hint_images[0])], steps=2, seed=1, width=32, height=32,
                     hires=2, progress=False, return_result=True, output_type="np")
    assert result.images.shape == (1, 64, 64, 3) and result.parameters["hires"]["first_pass"] == [32, 32]
    _, _, added = xl_pipe.text_conditions("a", "", 1, False, (64, 64), {})
    assert added[1]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]]


def test_a_batch_of_two_matches_diffusers(xl, xl_pipe, xl_controlnets, hint_images):
    # the added conditions are batched like the text: [uncond x B; cond x B]
    cn = xl_controlnets[0]
    expected = reference("StableDiffusionXLControlNetPipeline", xl, cn, image=hint_images[0], num_images_per_prompt=2,
                         negative_prompt="blurry")
    got = ours(xl_pipe, [Control(cn, hint_images[0])], batch=2, negative_prompt="blurry")
    assert got.shape == (2, SIZE, SIZE, 3)
    assert_same_image(got, expected)


def test_odd_negative_prompts_and_sizes_are_handled(xl, xl_pipe):
    import dataclasses

    no_zeros = Pipeline(dataclasses.replace(xl, force_zeros_for_empty_prompt=False))
    _, uncond, _ = no_zeros.text_conditions("a", None, 1, True, (64, 64), {})
    assert uncond.abs().sum() > 0  # the empty prompt encoded, as diffusers does without force_zeros
    with pytest.raises(ControlstackError, match="original_size must be a pair"):
        xl_pipe.text_conditions("a", "", 1, True, (64, 64), {"original_size": (float("inf"), 64)})
