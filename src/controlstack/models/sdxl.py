"""SDXL's text conditioning: two text encoders, the pooled embedding and micro-conditioning.

Podell et al. (2023), "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis", Sec. 2.1-2.2, as diffusers' ``StableDiffusionXLControlNetPipeline.encode_prompt`` and
``_get_add_time_ids`` compute it (the parity tests hold us to those):

* cross-attention reads the *penultimate* hidden states of CLIP ViT-L (``text_encoder``) and of
  OpenCLIP ViT-bigG (``text_encoder_2``), concatenated along the feature axis (768 + 1280 = 2048);
* the U-Net's added embedding reads ``text_encoder_2``'s projected pooled output (1280) and six
  numbers -- ``original_size`` (h, w), ``crops_coords_top_left`` (top, left), ``target_size`` (h, w)
  --, each Fourier-embedded (``addition_time_embed_dim`` = 256 each);
* an empty negative prompt is zeros, hidden and pooled alike, when the model says
  ``force_zeros_for_empty_prompt`` (SDXL base's ``model_index.json`` does; so does diffusers' default).

Defaults (diffusers'): original and target size = the output size, crop = (0, 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from controlstack.errors import ControlstackError

Size = tuple[int, int]


@torch.no_grad()
def encode_prompt(prompt: str, tokenizers: Sequence, text_encoders: Sequence,
                  batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden (batch, L, D1 + D2), pooled (batch, P))`` for one prompt, each tokenizer padding
    to its own length (as diffusers pads both the prompt and the negative prompt)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    emb = torch.concat(hidden, dim=-1).to(text_encoders[-1].dtype)
    if pooled is None:
        raise ControlstackError("the SDXL base's second text encoder gives no pooled embedding; it must be a "
                                "CLIPTextModelWithProjection")
    emb = emb.repeat(1, batch, 1).view(batch, emb.shape[1], -1)
    return emb, pooled.repeat(1, batch).view(batch, -1)


def check_size(value, name: str) -> Size:
    """A (height, width) pair of positive integers (crop: non-negative)."""
    try:
        a, b = (int(v) for v in value)
        ok = all(float(v) == int(v) for v in value) and len(tuple(value)) == 2
    except (TypeError, ValueError, OverflowError):
        ok = False
    low = 0 if name == "crops_coords_top_left" else 1
    if not ok or a < low or b < low:
        what = "(top, left) of integers >= 0" if low == 0 else "(height, width) of positive integers"
        raise ControlstackError(f"{name} must be a pair {what}, got {value!r}")
    return a, b


def add_time_ids(unet, projection_dim: int, original_size: Size, crops_coords_top_left: Size,
                 target_size: Size) -> torch.Tensor:
    """The (1, 6) micro-conditioning ids; checks that the U-Net's added embedding takes 6 of them
    (an SDXL *refiner* takes 5: aesthetic score instead of the target size)."""
    ids = [*original_size, *crops_coords_top_left, *target_size]
    passed = unet.config.addition_time_embed_dim * len(ids) + projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if passed != expected:
        refiner = unet.config.addition_time_embed_dim * 5 + projection_dim == expected
        raise ControlstackError(
            "this looks like an SDXL refiner (aesthetic-score conditioning), which is not supported; use an SDXL base"
            if refiner else f"the U-Net's added embedding takes {expected} features, but the pooled text ({projection_dim}) "
            f"and six micro-conditioning ids give {passed}; the text encoder does not belong to this U-Net")
    return torch.tensor([ids], dtype=torch.float32)


def added_conditions(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict:
    """What ``UNet2DConditionModel`` / ``ControlNetModel`` read as ``added_cond_kwargs``."""
    return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype).repeat(pooled.shape[0], 1)}
