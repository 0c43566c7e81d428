"""Shared pieces of the diffusion recipes (base model and ControlNet): schedule, latents, dropout.

DDPM (Ho et al. 2020) forward process ``z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) ε`` with Stable
Diffusion's schedule (scaled_linear betas 0.00085 -> 0.012, 1000 steps), so every diffusers
scheduler samples the trained models without conversion. The network predicts ε (SD-1.x) or
v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z_0 (Salimans & Ho 2022, "v-prediction", SD-2.x): at high noise an
ε-model's error is amplified by 1/sqrt(ᾱ_t) (~15x at t = 999) when the sampler forms z_0, which a
small model cannot afford; a v-model predicts the image there directly. Latents are
``vae.encode(x).latent_dist.sample() * scaling_factor`` (LDM, Sec. 3-4; ``models/vae.py``). Caption dropout replaces
prompts by the empty string (classifier-free guidance, Ho & Salimans 2022; the ControlNet paper
drops 50% of prompts so the model must read the condition itself).
"""

from __future__ import annotations

import torch

from controlstack.models.vae import encode
from controlstack.sampling.schedulers import SD_SCHEDULER_CONFIG
from controlstack.training.latents import batch_latents

#: the noise schedule recipes train with: SD-1.x's, the one ``sampling/schedulers.py`` samples with
SD_SCHEDULE = {k: SD_SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                                   "clip_sample")}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def sd_noise_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler  # local: heavy, only this path needs it

    return DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)


def sd_sampling_scheduler(prediction_type: str = "epsilon"):
    """What SD-1.5's ``scheduler/`` folder holds: PNDM (PLMS) with the training betas."""
    from diffusers import PNDMScheduler  # local: heavy, only this path needs it

    scheduler = PNDMScheduler(
        **{k: v for k, v in SD_SCHEDULE.items() if k != "clip_sample"}, prediction_type=prediction_type,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    # SD-1.5's file carries clip_sample: false too, for the schedulers built from it (DDIM
    # would otherwise clamp the predicted latents to [-1, 1])
    scheduler.register_to_config(clip_sample=False)
    return scheduler


def encode_latents(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents: one posterior sample (``models/vae.py``, the encoder
    inference uses too)."""
    return encode(vae, images, generator)


def add_noise(scheduler, latents: torch.Tensor, generator: torch.Generator):
    """(noisy latents, ε, t) with t ~ U{0..T-1} and ε ~ N(0, I), drawn on the CPU generator."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    t = t.to(latents.device)
    return scheduler.add_noise(latents, noise, t), noise, t


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability ``p``."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def tokenize(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)


def noisy_batch(vae, noise_scheduler, tokenizer, batch: dict, caption_dropout: float,
                generator: torch.Generator, device, cache=None):
    """One batch of the denoising objective: VAE latents noised at random timesteps, the regression
    target (ε or v, as the scheduler's ``prediction_type`` says) and the captions (with dropout to
    the empty prompt) as token ids. Returns (noisy, target, t, ids).
    With a :class:`~controlstack.training.latents.LatentCache` the posterior comes from the cache
    (rows ``batch["row"]``) instead of the encoder; the draws from ``generator`` are the same."""
    latents = batch_latents(vae, batch, generator, device, cache)
    noisy, noise, t = add_noise(noise_scheduler, latents, generator)
    ids = tokenize(tokenizer, drop_captions(batch["text"], caption_dropout, generator), device)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, noise_scheduler.get_velocity(latents, noise, t), t, ids
    return noisy, noise, t, ids
