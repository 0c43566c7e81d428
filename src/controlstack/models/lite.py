"""ControlNet-lite: the ControlNet paper's architecture ablation (Zhang et al. 2023, Sec. 4.2, Fig. 8c).

The paper replaces the trainable copy of the encoder with "lightweight layers" -- plain
convolutions -- and finds that control then fails unless the prompt says what the condition shows:
the deep copy, not the zero convolutions alone, is what learns to read the condition. Here each
skip the U-Net encoder produces gets ONE 3x3 convolution (stride 2 where the U-Net downsamples),
the middle one more; the hint encoder, the input convolution and the zero convolutions are the
ControlNet's own. No timestep, no text: those enter a ControlNet only through the copied blocks.

The model returns the same ``(down_residuals, mid_residual)`` as a ControlNet
(:meth:`residuals`, dispatched to by ``ControlNetRunner``), so it trains through the same recipe
(``architecture: lite``) and samples through the same loop; it is saved as a diffusers model
(``config.json`` + safetensors, ``_class_name`` LiteControlNetModel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from controlstack.residuals import Residuals


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LiteControlNetModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 4, block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
                 layers_per_block: int = 2, cross_attention_dim: int = 768,
                 conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                 conditioning_channels: int = 3, controlnet_conditioning_channel_order: str = "rgb",
                 global_pool_conditions: bool = False):
        super().__init__()
        c0 = block_out_channels[0]
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            c0, conditioning_channels=conditioning_channels, block_out_channels=tuple(conditioning_embedding_out_channels))
        layers, skips, prev = [], [c0], c0
        for i, c in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                layers.append(nn.Conv2d(prev, c, 3, padding=1))
                prev = c
                skips.append(c)
            if i < len(block_out_channels) - 1:  # the U-Net's downsampler: one skip more, half the size
                layers.append(nn.Conv2d(prev, prev, 3, stride=2, padding=1))
                skips.append(prev)
        self.layers = nn.ModuleList(layers)
        self.mid = nn.Conv2d(prev, prev, 3, padding=1)
        self.controlnet_down_blocks = nn.ModuleList([_zero(nn.Conv2d(c, c, 1)) for c in skips])
        self.controlnet_mid_block = _zero(nn.Conv2d(prev, prev, 1))

    @classmethod
    def from_unet(cls, unet, conditioning_embedding_out_channels=(16, 32, 96, 256)) -> LiteControlNetModel:
        u = unet.config
        return cls(in_channels=u.in_channels, block_out_channels=tuple(u.block_out_channels),
                   layers_per_block=u.layers_per_block, cross_attention_dim=u.cross_attention_dim,
                   conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))

    def residuals(self, sample: torch.Tensor, hint_features: torch.Tensor) -> Residuals:
        """Noisy latents + the embedded hint -> one zero-convolved residual per skip and the middle's."""
        h = self.conv_in(sample)
        h = h + hint_features.expand(h.shape[0], -1, -1, -1)
        feats = [h]
        for layer in self.layers:
            h = F.silu(layer(h))
            feats.append(h)
        mid = self.controlnet_mid_block(F.silu(self.mid(h)))
        return Residuals([zero(f) for f, zero in zip(feats, self.controlnet_down_blocks)], mid)
