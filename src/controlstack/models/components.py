"""The parts of a base model, as loaded (a diffusers folder, a single file) or built (tiny test
models): the U-Net, the VAE, the text encoder(s) and tokenizer(s), the noise schedule's config, and
the base's family (``models/families/``), told by its U-Net."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from controlstack.models.families import family_of


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion base model: SD-1.x / 2.x have one text encoder, SDXL two
    (``text_encoder_2`` gives the pooled embedding its U-Net adds to the time embedding), SD3 three
    (CLIP-L, CLIP-G, T5); ``unet`` is the denoising network, an SD3 base's MMDiT transformer too."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict | None = None  # the model's own noise schedule (None = SD-1.x's)
    text_encoder_2: torch.nn.Module | None = None  # SDXL: CLIPTextModelWithProjection (OpenCLIP bigG)
    tokenizer_2: object | None = None
    force_zeros_for_empty_prompt: bool = True  # SDXL: an empty negative prompt is zeros (diffusers' default)
    text_encoder_3: torch.nn.Module | None = None  # SD3: T5 (optional: its states are zeros without it)
    tokenizer_3: object | None = None

    @property
    def family(self):
        """The base's family (``models/families/``), told by its U-Net."""
        return family_of(self.unet)
