"""Training validation samples through the project's own Pipeline (``training/validation.py``): the
images diffusers' pipelines give with one generator per image, so moving off them changed nothing."""

from __future__ import annotations

import numpy as np
import torch

from controlstack.training.validation import sample_controlnet, sample_text_to_image
from tests.parity import assert_same_image

PROMPTS = ["a red box", "a blue ball on grass"]


def _diffusers_kw(seed: int):
    return {"height": 64, "width": 64, "num_inference_steps": 3, "guidance_scale": 7.5, "output_type": "np",
            "generator": [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]}


def _png(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def _scheduler(components):
    from controlstack.sampling import make_scheduler

    return make_scheduler("ddim", components.scheduler_config)


def test_text_to_image_samples_are_diffusers_images(tiny_components):
    from diffusers import StableDiffusionPipeline

    c = tiny_components
    ours = sample_text_to_image(c.vae, c.text_encoder, c.tokenizer, c.unet, c.scheduler_config, PROMPTS, 64, 3, 7.5, 4)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=_scheduler(c), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, **_diffusers_kw(4)).images
    assert_same_image(_png(ours), (theirs * 255).round().astype(np.uint8))


def test_controlnet_samples_are_diffusers_images(tiny_components, tiny_controlnets, hint_images):
    from diffusers import StableDiffusionControlNetPipeline

    c, cn = tiny_components, tiny_controlnets[0]
    hints = list(hint_images)
    ours = sample_controlnet(c.vae, c.text_encoder, c.tokenizer, c.unet, cn, c.scheduler_config, PROMPTS, hints, 64,
                             3, 7.5, 0.8, 4)
    pipe = StableDiffusionControlNetPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                             unet=c.unet, controlnet=cn, scheduler=_scheduler(c), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, image=hints, controlnet_conditioning_scale=0.8, **_diffusers_kw(4)).images
    assert_same_image(_png(ours), (theirs * 255).round().astype(np.uint8))
