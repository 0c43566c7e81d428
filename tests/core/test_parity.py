"""Acceptance 1-2: bit-level parity with diffusers' pipelines on the same tiny weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack import Control
from controlstack.sampling import make_scheduler
from tests.parity import assert_same_image

STEPS, SIZE, CFG, SEED = 6, 64, 7.5, 1234


def reference(components, controlnet, image, scheduler="unipc", **kw):
    from diffusers import StableDiffusionControlNetPipeline

    ref = StableDiffusionControlNetPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, controlnet=controlnet, scheduler=make_scheduler(scheduler, components.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    out = ref("a red box", image=image, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
              width=SIZE, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
              negative_prompt="blurry", **kw)
    return out.images


def ours(pipe, controls, scheduler="unipc", **kw):
    return pipe("a red box", controls=controls, steps=STEPS, cfg=CFG, seed=SEED, width=SIZE, height=SIZE,
                scheduler=scheduler, negative_prompt="blurry", output_type="np", progress=False, **kw)


@pytest.mark.parametrize("scheduler", ["unipc", "ddim", "euler", "euler_a", "dpmpp_2m", "lcm", "tcd"])
def test_one_control(pipe, tiny_components, tiny_controlnets, hint_images, scheduler):
    cn = tiny_controlnets[0]
    expected = reference(tiny_components, cn, hint_images[0], scheduler)
    got = ours(pipe, [Control(cn, hint_images[0])], scheduler)
    assert got.shape == expected.shape == (1, SIZE, SIZE, 3)
    assert_same_image(got, expected)
    # and the control did something: not the uncontrolled image
    assert np.abs(got - ours(pipe, [], scheduler)).max() > 1e-2


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_v_prediction_base_samples_as_diffusers(tiny_components, tiny_controlnets, hint_images, scheduler):
    # a base whose scheduler config says v_prediction (SD-2.x, the bundled base) is sampled with it
    import dataclasses

    from controlstack import Pipeline
    from controlstack.sampling.schedulers import SD_SCHEDULER_CONFIG

    v = dataclasses.replace(tiny_components, scheduler_config={**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    cn = tiny_controlnets[0]
    got = ours(Pipeline(v, name="tiny-v"), [Control(cn, hint_images[0])], scheduler)
    assert_same_image(got, reference(v, cn, hint_images[0], scheduler))
    assert np.abs(got - ours(Pipeline(tiny_components, name="tiny"), [Control(cn, hint_images[0])], scheduler)).max() > 1e-2


def test_two_controls_weighted(pipe, tiny_components, tiny_controlnets, hint_images):
    from diffusers import MultiControlNetModel

    multi = MultiControlNetModel(tiny_controlnets[:2])
    expected = reference(tiny_components, multi, hint_images, controlnet_conditioning_scale=[0.7, 1.3])
    got = ours(pipe, [Control(tiny_controlnets[0], hint_images[0], weight=0.7),
                      Control(tiny_controlnets[1], hint_images[1], weight=1.3)])
    assert_same_image(got, expected)


def test_guess_mode(pipe, tiny_components, tiny_controlnets, hint_images):
    cn = tiny_controlnets[0]
    expected = reference(tiny_components, cn, hint_images[0], guess_mode=True)
    got = ours(pipe, [Control(cn, hint_images[0])], mode="guess")
    assert_same_image(got, expected)


def test_window(pipe, tiny_components, tiny_controlnets, hint_images):
    cn = tiny_controlnets[0]
    expected = reference(tiny_components, cn, hint_images[0], control_guidance_start=0.2,
                         control_guidance_end=0.6)
    got = ours(pipe, [Control(cn, hint_images[0], start=0.2, end=0.6)])
    assert_same_image(got, expected)


def test_batch_of_images(pipe, tiny_components, tiny_controlnets, hint_images):
    cn = tiny_controlnets[0]
    expected = reference(tiny_components, cn, hint_images[0], num_images_per_prompt=2)
    got = ours(pipe, [Control(cn, hint_images[0])], batch=2)
    assert got.shape[0] == 2
    assert_same_image(got, expected)


def test_no_control_equals_plain_sd(pipe, tiny_components):
    from diffusers import StableDiffusionPipeline

    c = tiny_components
    ref = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                  scheduler=make_scheduler("unipc"), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    expected = ref("a red box", num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE,
                   generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
                   negative_prompt="blurry").images
    got = ours(pipe, [], mode="sum")
    assert_same_image(got, expected)


def test_fresh_controlnet_is_identity(tiny_components):
    """Acceptance 2: zero convolutions -> a fresh ControlNet leaves the base unchanged bit for bit."""
    from diffusers import ControlNetModel

    from controlstack.models.runner import ControlNetRunner, UNetRunner

    unet = tiny_components.unet
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32)).eval()
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    runner, cnr = UNetRunner(unet), ControlNetRunner(cn)
    with torch.no_grad():
        res = cnr(x, torch.tensor(321), emb, cnr.embed_hint(hint))
        assert all(torch.count_nonzero(d) == 0 for d in res.downs + [res.mid])
        out = runner(x, torch.tensor(321), emb, res)
        base = unet(x, torch.tensor(321), emb).sample
    assert torch.equal(out, base)


def test_runner_matches_diffusers_forward(tiny_components, tiny_controlnets):
    """The split forward is the diffusers forward: equal with and without residuals."""
    from controlstack.models.runner import ControlNetRunner, UNetRunner

    unet, cn = tiny_components.unet, tiny_controlnets[0]
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor(500)
    with torch.no_grad():
        downs, mid = cn(x, t, emb, hint, return_dict=False)
        ref = unet(x, t, emb, down_block_additional_residuals=downs, mid_block_additional_residual=mid).sample
        cnr = ControlNetRunner(cn)
        res = cnr(x, t, emb, cnr.embed_hint(hint))
        assert all(torch.equal(a, b) for a, b in zip(res.downs, downs)) and torch.equal(res.mid, mid)
        assert torch.equal(UNetRunner(unet)(x, t, emb, res), ref)


def test_a_guidance_embedded_student_reads_w_as_diffusers(tiny_components, tiny_controlnets, hint_images):
    """An LCM student (a U-Net with ``time_cond_proj_dim``) gets ``w = cfg - 1`` embedded, no CFG batch:
    diffusers' ControlNet pipeline with the LCM sampler on the same weights."""
    import dataclasses

    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline,
    )

    from controlstack import Pipeline
    from controlstack.models.lcm import guidance_scale_embedding
    from controlstack.models.tiny import tiny_unet

    w = torch.tensor([0.5, 3.0])
    want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    torch.testing.assert_close(guidance_scale_embedding(w, 32), want, rtol=0, atol=1e-6)

    student = tiny_unet(0, time_cond_proj_dim=32)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 0.5)
    c = dataclasses.replace(tiny_components, unet=student)
    cn = tiny_controlnets[0]
    expected = reference(c, cn, hint_images[0], "lcm")
    got = ours(Pipeline(c, name="student"), [Control(cn, hint_images[0])], "lcm")
    assert_same_image(got, expected)
    other_w = Pipeline(c, name="student")("a red box", [Control(cn, hint_images[0])], steps=STEPS, cfg=2.0, seed=SEED,
                                          width=SIZE, height=SIZE, scheduler="lcm", output_type="np", progress=False)
    assert np.abs(got - other_w).max() > 1e-3  # the embedded w changes the image
