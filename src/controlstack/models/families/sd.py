"""Stable Diffusion 1.x / 2.x (Rombach et al., CVPR 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): one CLIP text encoder whose last hidden states the U-Net cross-attends
to, and a time embedding alone (no added conditions). The text embedding is diffusers'
``encode_prompt``: padded to the tokenizer's length, no clip skip (``Prompting.encode_prompt``)."""

from __future__ import annotations

from controlstack.errors import ControlstackError
from controlstack.models.families.base import Family

WIDTHS = {768: "SD-1.x", 1024: "SD-2.x"}  # by cross-attention (text) width


class SD(Family):
    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    bundled_controlnets = True  # the bundled ControlNets are SD-1.x-layout

    def detect(self, config: dict) -> bool:
        return True  # the fallback: every other family detects itself first

    def detect_state(self, keys) -> bool:
        return True

    def display(self, config: dict) -> str:
        width = config.get("cross_attention_dim")
        return WIDTHS.get(width, f"custom (cross-attention dim {width})")

    def check_components(self, components) -> None:
        pass  # one text encoder and its tokenizer: what every SDComponents holds

    def encode_text(self, pipe, prompt: str, batch: int):
        return pipe.encode_prompt(prompt, batch), None

    def text_conditions(self, pipe, prompt, negative_prompt, batch, do_cfg, size, micro):
        given = {k: v for k, v in micro.items() if v is not None}
        if given:
            raise ControlstackError(f"{', '.join(given)}: SDXL micro-conditioning, but this base is {self.label}")
        cond = pipe.encode_prompt(prompt, batch)
        return cond, (pipe.encode_prompt(negative_prompt or "", batch) if do_cfg else None), None

    def text_encoders(self, pipe):
        return [("text_encoder", pipe.text_encoder)]

    def lora_loader(self):
        from diffusers.loaders import StableDiffusionLoraLoaderMixin  # local: heavy, only this path needs it

        return StableDiffusionLoraLoaderMixin

    def __repr__(self) -> str:
        return "<family sd>"


FAMILY = SD()
