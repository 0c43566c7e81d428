"""The guidance embedding of a consistency-distilled student (Luo et al., 2023, "Latent Consistency
Models: Synthesizing High-Resolution Images with Few-Step Inference", Sec. 4.2): a U-Net with
``time_cond_proj_dim`` reads the guidance scale ``w`` as a second time-like condition, so one
forward pass gives the guided prediction and there is no CFG batch. Used by the pipeline when
sampling such a U-Net and by the distillation recipe (``training/lcm.py``) when training it."""

from __future__ import annotations

import math

import torch


def guidance_scale_embedding(w: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of ``w`` (shape ``(B,)``) at ``1000 w``, sines then cosines: diffusers'
    ``get_guidance_scale_embedding``, which the students of its LCM scripts are trained with. The
    pipelines feed ``w = cfg - 1`` (their guidance ``cond + w (cond - uncond)``)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = (w.to(dtype) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb
