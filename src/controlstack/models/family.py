"""Base-model families: which Stable Diffusion a U-Net or ControlNet belongs to, told by its config.

* ``sd``   -- Stable Diffusion 1.x / 2.x: one CLIP text encoder, cross-attention over its hidden
  states, a time embedding alone (Rombach et al., CVPR 2022).
* ``sdxl`` -- Stable Diffusion XL (Podell et al., 2023, "SDXL: Improving Latent Diffusion Models for
  High-Resolution Image Synthesis"): two text encoders whose penultimate hidden states are
  concatenated for cross-attention, and an *added* embedding (``addition_embed_type="text_time"``)
  of the second encoder's pooled output and the six micro-conditioning numbers (Sec. 2.2:
  original size, crop top-left, target size), each Fourier-embedded.

A ControlNet is a copy of its base's encoder, so it carries the same marks: an SDXL ControlNet has
the ``text_time`` embedding too. That is what :func:`family_of` reads, for both.
"""

from __future__ import annotations

FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL"}


def family_of(model) -> str:
    """``"sdxl"`` for a U-Net / ControlNet (model or config dict) with SDXL's added text-time
    embedding, else ``"sd"``."""
    config = model if isinstance(model, dict) else getattr(model, "config", {})
    return "sdxl" if dict(config).get("addition_embed_type") == "text_time" else "sd"


def describe(family: str) -> str:
    return FAMILIES[family]
