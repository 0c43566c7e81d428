"""Flux.1 bases (``models/families/flux.py``) and their ControlNets (``mmdit.py``) in the one loop:
diffusers' ``FluxPipeline`` / ``FluxControlNetPipeline`` images on tiny seeded models built as
diffusers' fast tests build them -- guidance-distilled and not, one ControlNet with a window, two
(``FluxMultiControlNetModel``), a ControlNet-Union with its modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError
from tests.parity import assert_same_image

SIZE = 32
KW = {"steps": 3, "seed": 1, "width": SIZE, "height": SIZE, "progress": False, "output_type": "np", "cfg": 3.5}


@pytest.fixture(scope="module")
def flux():
    from controlstack.models.tiny_mmdit import tiny_flux

    return tiny_flux(seed=0)


@pytest.fixture(scope="module")
def hints():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]


def reference(c, controlnet=None, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline, FluxPipeline

    parts = dict(transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                 text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                 scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    pipe = FluxPipeline(**parts) if controlnet is None else FluxControlNetPipeline(**parts, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cube", num_inference_steps=3, guidance_scale=3.5, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(1), output_type="np", **kw).images


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_text_to_image_is_diffusers_image(guidance_embeds):
    from controlstack import Pipeline
    from controlstack.models.families import family_of
    from controlstack.models.tiny_mmdit import tiny_flux

    c = tiny_flux(seed=0, guidance_embeds=guidance_embeds)
    assert family_of(c.unet).name == "flux"
    assert_same_image(Pipeline(c)("a red cube", **KW), reference(c))


def test_a_controlnet_is_diffusers_controlnet_image(flux, hints):
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux_controlnet

    cn = tiny_flux_controlnet(flux.unet, seed=5)
    pipe = Pipeline(flux)
    ours = pipe("a red cube", [Control(cn, hints[0], weight=0.7, end=2 / 3)], **KW)
    theirs = reference(flux, cn, control_image=Image.fromarray(hints[0]), controlnet_conditioning_scale=0.7,
                       control_guidance_end=2 / 3)
    assert_same_image(ours, theirs)
    assert np.abs(ours - pipe("a red cube", **KW)).max() > 1e-3


def test_two_controlnets_and_a_union_are_diffusers_images(flux, hints):
    """``FluxMultiControlNetModel`` of a plain ControlNet and a ControlNet-Union (mode: depth = 2)."""
    from diffusers import FluxMultiControlNetModel
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux_controlnet

    a, union = tiny_flux_controlnet(flux.unet, seed=5), tiny_flux_controlnet(flux.unet, seed=6, num_mode=10)
    ours = Pipeline(flux)("a red cube", [Control(a, hints[0], weight=0.6),
                                         Control(union, hints[1], weight=0.9, task="depth")], **KW)
    theirs = reference(flux, FluxMultiControlNetModel([a, union]), control_image=[Image.fromarray(h) for h in hints],
                       controlnet_conditioning_scale=[0.6, 0.9], control_mode=[None, 2])
    assert_same_image(ours, theirs)
    with pytest.raises(ControlstackError, match="needs task= one of canny, tile, depth"):
        Pipeline(flux)("a", [Control(union, hints[1])], **KW)


def test_a_negative_prompt_is_refused(flux):
    from controlstack import Pipeline

    with pytest.raises(ControlstackError, match="takes no negative prompt"):
        Pipeline(flux)("a", negative_prompt="blurry", **KW)


def test_folders_load_and_the_cli_generates_diffusers_image(tmp_path, flux, hints):
    """A Flux pipeline folder and a Flux ControlNet folder (as diffusers saves them) load by path:
    ``controlstack generate --model DIR --control CN_DIR:IMAGE`` gives ``FluxControlNetPipeline``'s image."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from PIL import Image

    from controlstack import Pipeline
    from controlstack.cli.main import main
    from controlstack.models.tiny_mmdit import tiny_flux_controlnet

    c, cn = flux, tiny_flux_controlnet(flux.unet, seed=5)
    FluxPipeline(transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                 text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                 scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config)).save_pretrained(tmp_path / "b")
    cn.save_pretrained(tmp_path / "cn")
    Image.fromarray(hints[0]).save(tmp_path / "hint.png")
    theirs = reference(flux, cn, control_image=Image.fromarray(hints[0]), controlnet_conditioning_scale=0.7)
    assert Pipeline.from_pretrained(tmp_path / "b").family.name == "flux"
    from controlstack.io.checkpoints import inspect_checkpoint

    base, control = inspect_checkpoint(tmp_path / "b"), inspect_checkpoint(tmp_path / "cn")
    assert (base["kind"], base["arch"]["family"], control["kind"]) == ("base", "Flux.1-dev", "controlnet")
    assert main(["generate", "--model", str(tmp_path / "b"), "--prompt", "a red cube", "--control",
                 f"{tmp_path / 'cn'}:{tmp_path / 'hint.png'}:0.7", "--steps", "3", "--cfg", "3.5", "--seed", "1",
                 "--width", str(SIZE), "--height", str(SIZE), "--no-progress", "--out", str(tmp_path / "out")]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert_same_image(np.asarray(Image.open(png))[None], (theirs * 255).round().astype(np.uint8))


def test_img2img_with_a_controlnet_is_diffusers_controlnet_img2img(flux, hints):
    """``FluxControlNetImg2ImgPipeline``: the control's latents, then the init image's, then the noise
    drawn from the generator in that order; the flow path on packed tokens; strength 0.5 of 3 steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetImg2ImgPipeline
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux_controlnet

    c, cn = flux, tiny_flux_controlnet(flux.unet, seed=5)
    ref = FluxControlNetImg2ImgPipeline(
        transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, controlnet=cn,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red cube", image=Image.fromarray(hints[1]), control_image=Image.fromarray(hints[0]), strength=0.5,
                 num_inference_steps=3, guidance_scale=3.5, controlnet_conditioning_scale=0.8, height=SIZE,
                 width=SIZE, generator=torch.Generator().manual_seed(1), output_type="np").images
    ours = Pipeline(c)("a red cube", [Control(cn, hints[0], weight=0.8)], init_image=Image.fromarray(hints[1]),
                       strength=0.5, **KW)
    assert_same_image(ours, theirs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_region_mask_keeps_the_residuals_to_its_tokens(family, flux, hints):
    """A control's mask on the token grid (row-major patches): with the top half white, every block
    residual the transformer receives is zero on the bottom half's tokens and not on the top's; an
    all-black mask gives the image of the control at weight 0, bit for bit."""
    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux_controlnet, tiny_sd3, tiny_sd3_controlnet

    base = flux if family == "flux" else tiny_sd3(seed=0)
    cn = tiny_flux_controlnet(base.unet, seed=5) if family == "flux" else tiny_sd3_controlnet(base.unet, seed=5)
    key = "controlnet_block_samples" if family == "flux" else "block_controlnet_hidden_states"
    rows = SIZE // 2 if family == "flux" else SIZE  # Flux: 2x2 patches; the tiny SD3: patch size 1
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[: SIZE // 2] = 1.0
    pipe, seen, forward = Pipeline(base), [], type(base.unet).forward

    def hook(self, *a, **k):
        seen.extend(r.clone() for r in k[key])
        return forward(self, *a, **k)

    type(base.unet).forward = hook
    try:
        pipe("a red cube", [Control(cn, hints[0], mask=mask)], **KW)
    finally:
        type(base.unet).forward = forward
    for r in seen:
        grid = r.reshape(r.shape[0], rows, -1, r.shape[-1])
        assert grid[:, rows // 2:].abs().max() == 0 and grid[:, : rows // 2].abs().max() > 0
    off = pipe("a red cube", [Control(cn, hints[0], weight=0.0)], **KW)  # (Flux draws its control latents first)
    assert np.array_equal(pipe("a red cube", [Control(cn, hints[0], mask=np.zeros((SIZE, SIZE)))], **KW), off)


def test_a_flux_control_base_reads_its_condition(hints):
    """A Flux Control base (Canny-dev / Depth-dev: it reads twice the channels it writes) takes
    ``Control("base", image)``: the condition's latents concatenated to the latents' channels, as
    ``FluxControlPipeline``; a weight or window on it, or the condition on a plain base, is one line."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlPipeline
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux

    c = tiny_flux(seed=2, in_channels=32, out_channels=16)
    ref = FluxControlPipeline(transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                              text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                              scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red cube", control_image=Image.fromarray(hints[0]), num_inference_steps=3, guidance_scale=3.5,
                 height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(1), output_type="np").images
    pipe = Pipeline(c)
    assert_same_image(pipe("a red cube", [Control("base", hints[0])], **KW), theirs)
    with pytest.raises(ControlstackError, match="at weight 1"):
        pipe("a", [Control("base", hints[0], weight=0.5)], **KW)
    with pytest.raises(ControlstackError, match="is for a Flux Control base"):
        Pipeline(tiny_flux(seed=0))("a", [Control("base", hints[0])], **KW)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_with_a_controlnet_is_diffusers_controlnet_inpaint(flux, hints, strength):
    """``FluxControlNetInpaintPipeline``: the known region blended back at each step on packed tokens
    (the mask packed per channel), the generator drawn in diffusers' order."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetInpaintPipeline
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux_controlnet

    c, cn = flux, tiny_flux_controlnet(flux.unet, seed=5)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:20, 10:30] = 255
    ref = FluxControlNetInpaintPipeline(
        transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, controlnet=cn,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red cube", image=Image.fromarray(hints[1]), mask_image=Image.fromarray(mask),
                 control_image=Image.fromarray(hints[0]), strength=strength, num_inference_steps=3,
                 guidance_scale=3.5, controlnet_conditioning_scale=0.8, height=SIZE, width=SIZE,
                 generator=torch.Generator().manual_seed(1), output_type="np").images
    ours = Pipeline(c)("a red cube", [Control(cn, hints[0], weight=0.8)], init_image=Image.fromarray(hints[1]),
                       inpaint_mask=mask, strength=strength, **KW)
    assert_same_image(ours, theirs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_hires_fix_runs_on_transformer_bases(family):
    """sd-webui's hires fix (generate, upscale, img2img at twice the size) through the flow img2img path,
    with a pixel and a latent upscaler (Flux's latents are unpacked between the passes)."""
    from controlstack import Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux, tiny_sd3

    pipe = Pipeline((tiny_flux if family == "flux" else tiny_sd3)(seed=0))
    first = pipe("a red cube", **{**KW, "steps": 2})
    for upscaler in ("lanczos", "latent"):
        out = pipe("a red cube", hires=2, hires_upscaler=upscaler, hires_strength=0.5, **{**KW, "steps": 2})
        assert out.shape == (1, 2 * SIZE, 2 * SIZE, 3)
        assert np.abs(out[:, ::2, ::2] - first).mean() > 1e-3  # the second pass changed the image


def test_a_flux_fill_transformer_is_refused_in_one_line():
    from controlstack import Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux

    with pytest.raises(ControlstackError, match="Flux Fill"):
        Pipeline(tiny_flux(seed=0, in_channels=16 * 6, out_channels=16))  # Fill-dev's 384 = 64 x 6 at tiny scale
