"""Stable Diffusion XL (Podell et al., 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis"): two text encoders whose penultimate hidden states are
concatenated for cross-attention, and an *added* embedding (``addition_embed_type="text_time"``)
of the second encoder's pooled output and the six micro-conditioning numbers (Sec. 2.2: original
size, crop top-left, target size), each Fourier-embedded. The tensor work is ``models/sdxl.py``."""

from __future__ import annotations

import torch

from controlstack.errors import ControlstackError
from controlstack.models import sdxl
from controlstack.models.families.base import Family


class SDXL(Family):
    name = "sdxl"
    label = "Stable Diffusion XL"
    bundled_controlnets = False  # the bundled ControlNets are SD-1.x-layout: none would run

    def detect(self, config: dict) -> bool:
        return config.get("addition_embed_type") == "text_time"

    def detect_state(self, keys) -> bool:
        # the original layout's text encoders live under "conditioner.embedders." (SD's: "cond_stage_model.")
        return any(k.startswith("conditioner.embedders.") for k in keys)

    def display(self, config: dict) -> str:
        return "SDXL"

    def check_components(self, components) -> None:
        if components.text_encoder_2 is None or components.tokenizer_2 is None:
            raise ControlstackError("an SDXL U-Net needs both text encoders and tokenizers (text_encoder_2, "
                                    "tokenizer_2)")

    @torch.no_grad()
    def encode_text(self, pipe, prompt: str, batch: int):
        return sdxl.encode_prompt(prompt, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                  batch)

    def text_conditions(self, pipe, prompt, negative_prompt, batch, do_cfg, size, micro):
        given = {k: v for k, v in micro.items() if v is not None}
        cond, pooled = self.encode_text(pipe, prompt, batch)
        uncond = neg_pooled = None
        if do_cfg and not negative_prompt and pipe.force_zeros_for_empty_prompt:
            uncond, neg_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        elif do_cfg:
            uncond, neg_pooled = self.encode_text(pipe, negative_prompt or "", batch)
        ids = sdxl.add_time_ids(
            pipe.unet, pooled.shape[-1],
            sdxl.check_size(given.get("original_size", size), "original_size"),
            sdxl.check_size(given.get("crops_coords_top_left", (0, 0)), "crops_coords_top_left"),
            sdxl.check_size(given.get("target_size", size), "target_size"))
        added = (sdxl.added_conditions(neg_pooled, ids) if do_cfg else None, sdxl.added_conditions(pooled, ids))
        return cond, uncond, added

    def text_encoders(self, pipe):
        return [("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)]

    def lora_loader(self):
        from diffusers.loaders import (  # local: heavy, only this path needs it
            StableDiffusionXLLoraLoaderMixin,
        )

        return StableDiffusionXLLoraLoaderMixin

    def __repr__(self) -> str:
        return "<family sdxl>"


FAMILY = SDXL()
