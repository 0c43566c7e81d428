"""T2I-Adapter (Mou et al., AAAI 2024, "T2I-Adapter: Learning Adapters to Dig out More Controllable
Ability for Text-to-Image Diffusion Models"; diffusers' ``T2IAdapter``, full and light, SD-1.x and
SDXL): a small network maps the condition image to one feature map per U-Net encoder level, and
the U-Net adds them *inside* its encoder -- after the last layer of each cross-attention down block,
after the whole block for the others (diffusers' ``down_intrablock_additional_residuals``). Unlike
a ControlNet it reads neither the latents nor the time: its features are computed once per run,
weighted per step, and cost nothing per step but the additions.
"""

from __future__ import annotations

import torch


def is_adapter(model) -> bool:
    """Whether a control model is a T2I-Adapter (diffusers' ``T2IAdapter``)."""
    from diffusers import T2IAdapter  # local: heavy, only this path needs it

    return isinstance(model, T2IAdapter)


@torch.no_grad()
def adapter_features(adapter, hint: torch.Tensor) -> list[torch.Tensor]:
    """The adapter's feature maps for a (B, C, H, W) hint in [0, 1] (a 1-channel adapter, e.g.
    sketch, reads the hint's first channel)."""
    if adapter.config.in_channels == 1 and hint.shape[1] == 3:
        hint = hint[:, :1]
    return list(adapter(hint.to(adapter.dtype)))
