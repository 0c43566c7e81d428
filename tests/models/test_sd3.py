"""SD3 / SD3.5 bases (``models/families/sd3.py``) and their ControlNets (``mmdit.py``) in the one loop:
diffusers' ``StableDiffusion3Pipeline`` / ``StableDiffusion3ControlNetPipeline`` images on tiny seeded
models built as diffusers' fast tests build them (with and without T5; one and two ControlNets;
SD3.5's ControlNet without text and with the transformer's position embedding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError
from tests.parity import assert_same_image

SIZE = 32
KW = {"steps": 3, "seed": 1, "width": SIZE, "height": SIZE, "progress": False, "output_type": "np", "cfg": 5.0}


@pytest.fixture(scope="module")
def sd3():
    from controlstack.models.tiny_mmdit import tiny_sd3

    return tiny_sd3(seed=0)


@pytest.fixture(scope="module")
def hints():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(2)]


def reference(c, controlnet=None, **kw):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3ControlNetPipeline,
        StableDiffusion3Pipeline,
    )

    parts = dict(transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                 text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, text_encoder_3=c.text_encoder_3,
                 tokenizer_3=c.tokenizer_3, scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    pipe = (StableDiffusion3Pipeline(**parts) if controlnet is None else
            StableDiffusion3ControlNetPipeline(**parts, controlnet=controlnet))
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red cube", num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(1), output_type="np", **kw).images


def test_the_family_is_told_by_the_transformer(sd3):
    from controlstack import Pipeline
    from controlstack.models.families import family_of

    assert family_of(sd3.unet).name == "sd3" and Pipeline(sd3).native_size == SIZE
    assert family_of(dict(sd3.unet.config)).display(dict(sd3.unet.config)) == "SD3 (4 joint blocks)"


@pytest.mark.parametrize("with_t5", [True, False])
def test_text_to_image_is_diffusers_image(with_t5):
    from controlstack import Pipeline
    from controlstack.models.tiny_mmdit import tiny_sd3

    c = tiny_sd3(seed=0, with_t5=with_t5)
    assert_same_image(Pipeline(c)("a red cube", **KW), reference(c))


def test_a_controlnet_is_diffusers_controlnet_image(sd3, hints):
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_sd3_controlnet

    cn = tiny_sd3_controlnet(sd3.unet, seed=5)
    pipe = Pipeline(sd3)
    ours = pipe("a red cube", [Control(cn, hints[0], weight=0.7, start=0.0, end=2 / 3)], **KW)
    theirs = reference(sd3, cn, control_image=Image.fromarray(hints[0]), controlnet_conditioning_scale=0.7,
                       control_guidance_end=2 / 3)
    assert_same_image(ours, theirs)
    assert np.abs(ours - pipe("a red cube", **KW)).max() > 1e-3  # the control changed the image


def test_two_controlnets_are_diffusers_multicontrolnet(sd3, hints):
    from diffusers import SD3MultiControlNetModel
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_sd3_controlnet

    a, b = tiny_sd3_controlnet(sd3.unet, seed=5), tiny_sd3_controlnet(sd3.unet, seed=6, num_layers=1)
    ours = Pipeline(sd3)("a red cube", [Control(a, hints[0], weight=0.6), Control(b, hints[1], weight=0.9)], **KW)
    theirs = reference(sd3, SD3MultiControlNetModel([a, b]),
                       control_image=[Image.fromarray(h) for h in hints], controlnet_conditioning_scale=[0.6, 0.9])
    assert_same_image(ours, theirs)


def test_an_sd35_controlnet_reads_no_text_and_shares_the_position_embedding(hints):
    """SD3.5's own ControlNets: no joint attention width (no text), no position embedding of their own
    (the transformer's, set by the pipeline), and qk-norm in the transformer."""
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_sd3, tiny_sd3_controlnet

    c = tiny_sd3(seed=1, qk_norm="rms_norm")
    cn = tiny_sd3_controlnet(c.unet, seed=7, joint_attention_dim=None, use_pos_embed=False)
    ours = Pipeline(c)("a red cube", [Control(cn, hints[0], weight=0.8)], **KW)
    theirs = reference(c, cn, control_image=Image.fromarray(hints[0]), controlnet_conditioning_scale=0.8)
    assert_same_image(ours, theirs)


def test_modes_weight_the_block_residuals_and_cond_half_modes_leave_the_uncond_half(sd3, hints):
    """What the transformer receives per block at the first step (the same input in every mode):
    prompt = balanced's residuals
    times ``0.825 ** (N - 1 - i)``; controlnet (uniform) = balanced's on the conditional half and zeros
    on the unconditional one; the noise-prediction samplers are one-line errors (Minimal Impact:
    tests/models/test_transformer_mi.py)."""
    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_sd3_controlnet

    pipe = Pipeline(sd3)
    control = [Control(tiny_sd3_controlnet(sd3.unet, seed=5, num_layers=3), hints[0])]
    seen: dict[str, list] = {}
    forward = type(sd3.unet).forward

    def capture(mode, **options):
        seen[mode] = []

        def hook(self, *a, **k):
            seen[mode].append([r.clone() for r in k["block_controlnet_hidden_states"]])
            return forward(self, *a, **k)

        type(sd3.unet).forward = hook
        try:
            pipe("a red cube", control, mode=mode, mode_options=options or None, **KW)
        finally:
            type(sd3.unet).forward = forward

    capture("balanced")
    capture("prompt")
    capture("controlnet", layer_weights="uniform")
    base, prompt, cond = seen["balanced"][0], seen["prompt"][0], seen["controlnet"][0]
    assert len(base) == 3 and all(len(seen[m]) == 3 for m in seen)
    for i, (b, p, c) in enumerate(zip(base, prompt, cond)):
        torch.testing.assert_close(p, b * 0.825 ** (2 - i))
        assert torch.equal(c[:1], torch.zeros_like(c[:1])) and b[:1].abs().max() > 0
        torch.testing.assert_close(c[1:], b[1:])
    with pytest.raises(ControlstackError, match="this flow-matching base samples with euler"):
        pipe("a", scheduler="unipc", **KW)


def test_folders_load_and_the_cli_generates_diffusers_image(tmp_path, sd3, hints):
    """An SD3 pipeline folder and an SD3 ControlNet folder (as diffusers saves them) load by path:
    ``Pipeline.from_pretrained`` and ``controlstack generate --model DIR --control CN_DIR:IMAGE`` give
    ``StableDiffusion3ControlNetPipeline``'s image (the CLI's default sampler on SD3: euler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.cli.main import main
    from controlstack.models.tiny_mmdit import tiny_sd3_controlnet

    c, cn = sd3, tiny_sd3_controlnet(sd3.unet, seed=5)
    StableDiffusion3Pipeline(transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                             text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                             text_encoder_3=c.text_encoder_3, tokenizer_3=c.tokenizer_3,
                             scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config)
                             ).save_pretrained(tmp_path / "base")
    cn.save_pretrained(tmp_path / "cn")
    Image.fromarray(hints[0]).save(tmp_path / "hint.png")
    theirs = reference(sd3, cn, control_image=Image.fromarray(hints[0]), controlnet_conditioning_scale=0.7)

    pipe = Pipeline.from_pretrained(tmp_path / "base")
    assert pipe.family.name == "sd3" and pipe.text_encoder_3 is not None
    assert_same_image(pipe("a red cube", [Control(str(tmp_path / "cn"), hints[0], weight=0.7)], **KW), theirs)
    assert main(["generate", "--model", str(tmp_path / "base"), "--prompt", "a red cube", "--control",
                 f"{tmp_path / 'cn'}:{tmp_path / 'hint.png'}:0.7", "--steps", "3", "--cfg", "5", "--seed", "1",
                 "--width", str(SIZE), "--height", str(SIZE), "--no-progress", "--out", str(tmp_path / "out")]) == 0
    (png,) = (tmp_path / "out").glob("*.png")
    assert_same_image(np.asarray(Image.open(png))[None], (theirs * 255).round().astype(np.uint8))
    assert "Sampler: Euler" in Image.open(png).info["parameters"]
    from controlstack.io.checkpoints import inspect_checkpoint

    base, control = inspect_checkpoint(tmp_path / "base"), inspect_checkpoint(tmp_path / "cn")
    assert (base["kind"], base["arch"]["family_name"], base["arch"]["family"]) == ("base", "sd3", "SD3 (4 joint blocks)")
    assert (control["kind"], control["arch"]["family_name"]) == ("controlnet", "sd3")


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_is_diffusers_sd3_img2img(sd3, hints, strength):
    """SDEdit on the flow path, ``(1 - σ) z_0 + σ ε`` from the init image's latents (shift and scale),
    with the flow pipelines' step rounding (strength 0.5 of 3 steps runs 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline
    from PIL import Image

    from controlstack import Pipeline

    c = sd3
    ref = StableDiffusion3Img2ImgPipeline(
        transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, text_encoder_3=c.text_encoder_3,
        tokenizer_3=c.tokenizer_3, scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    ref.set_progress_bar_config(disable=True)
    init = Image.fromarray(hints[1])
    theirs = ref("a red cube", image=init, strength=strength, num_inference_steps=3, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(1), output_type="np").images
    ours = Pipeline(c)("a red cube", init_image=init, strength=strength, **KW)
    assert_same_image(ours, theirs)


def test_an_inpainting_controlnet_is_diffusers_controlnet_inpainting(sd3, hints):
    """An SD3 inpainting ControlNet (one extra channel: the mask) reads the call's ``inpaint_mask``:
    ``StableDiffusion3ControlNetInpaintingPipeline``'s image (a txt2img run around the ControlNet)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetInpaintingPipeline
    from PIL import Image

    from controlstack import Control, Pipeline
    from controlstack.models.tiny_mmdit import tiny_sd3_controlnet

    c = sd3
    cn = tiny_sd3_controlnet(c.unet, seed=8, extra_conditioning_channels=1)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 8:24] = 255
    ref = StableDiffusion3ControlNetInpaintingPipeline(
        transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, text_encoder_3=c.text_encoder_3,
        tokenizer_3=c.tokenizer_3, controlnet=cn,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red cube", control_image=Image.fromarray(hints[0]), control_mask=Image.fromarray(mask),
                 controlnet_conditioning_scale=0.9, num_inference_steps=3, guidance_scale=5.0, height=SIZE,
                 width=SIZE, generator=torch.Generator().manual_seed(1), output_type="np").images
    pipe = Pipeline(c)
    ours = pipe("a red cube", [Control(cn, hints[0], weight=0.9)], inpaint_mask=mask, **KW)
    assert_same_image(ours, theirs)
    with pytest.raises(ControlstackError, match="this is an inpainting ControlNet: pass inpaint_mask"):
        pipe("a red cube", [Control(cn, hints[0])], **KW)


@pytest.mark.parametrize("key, label", [("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                                         "Stable Diffusion 3"),
                                        ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "Flux.1")])
def test_a_transformer_single_file_without_its_encoders_folder_is_a_one_line_error(tmp_path, key, label):
    from safetensors.torch import save_file

    from controlstack import Pipeline

    save_file({key: torch.zeros(2, 2)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ControlstackError, match=f"is a {label} single file: it carries no text encoders"):
        Pipeline.from_pretrained(tmp_path / "m.safetensors")


def test_convert_keeps_a_transformer_base_a_diffusers_folder(tmp_path, sd3):
    """``save_base`` / ``convert --to diffusers`` write the SD3 pipeline's own layout (the same images
    after the round trip; single files: tests/io/test_transformer_single_file.py)."""
    from controlstack import Pipeline
    from controlstack.cli.main import main
    from controlstack.io.checkpoints import save_base

    save_base(sd3, tmp_path / "a")
    assert (tmp_path / "a" / "transformer" / "config.json").is_file() and (tmp_path / "a" / "text_encoder_3").is_dir()
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--to", "diffusers"]) == 0
    assert_same_image(Pipeline.from_pretrained(tmp_path / "b")("a red cube", **KW), Pipeline(sd3)("a red cube", **KW))


def test_the_memory_guard_reads_the_image_size_and_the_networks_width(sd3):
    """``Pipeline.memory_needed``: the network's width per latent pixel (a U-Net's first level, a
    transformer's heads x head width / patch area) with the call's image size, never one for the other."""
    from controlstack import Pipeline
    from controlstack.limits import memory_needed
    from controlstack.models.tiny import tiny_sd

    sd = Pipeline(tiny_sd(seed=0))
    assert sd.memory_needed(2, 96, 64) == memory_needed(sd.unet.config.block_out_channels[0],
                                                        sd.vae.config.block_out_channels[0], 8, 2, 96, 64)
    pipe, c = Pipeline(sd3), sd3.unet.config
    assert pipe.memory_needed(1, 64, 32) == memory_needed(c.num_attention_heads * c.attention_head_dim,
                                                          sd3.vae.config.block_out_channels[0], 1, 1, 64, 32)
