"""Token downsampling for self-attention: the ``fast`` tier's attention approximation.

Smith et al. (2024), "ToDo: Token Downsampling for Efficient Generation of High-Resolution
Images": in a U-Net's self-attention at its finest level, the queries stay at full resolution but
the keys and values come from the feature map downsampled ``factor`` x ``factor`` -- neighbouring
latent pixels carry nearly the same key, so attending to their average costs little, and the
``N x N`` score matrix becomes ``N x N / factor^2``. It is ToMe for SD's (Bolya & Hoffman, 2023)
saving without its per-step matching (a gather/scatter that costs about what it saves at the token
counts of small models). Applied only where attention dominates: self-attention over at least
``min_tokens`` tokens (the bench model's 64 x 64 latents, SD-1.5's 512 px; docs/speed.md).

Used inside the compiled graphs (:mod:`controlstack.models.tiers`) through :func:`downsampled`,
which swaps the processors of the affected ``attn1`` modules while a graph is traced and puts the
originals back, so the model itself -- and the parity tier that shares it -- never changes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

#: self-attention with fewer tokens is left exact: below 64 x 64 the saving does not pay for the error
MIN_TOKENS = 4096


def grid(tokens: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The (height, width) of a U-Net level with ``tokens`` tokens, for a latent of ``size``."""
    h, w = size
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return None


class DownsampledKV:
    """Wraps an attention processor: self-attention over ``>= min_tokens`` tokens gets its keys and
    values from the ``factor``-average-pooled token map; everything else goes to ``base`` as is."""

    def __init__(self, base, size: tuple[int, int], factor: int = 2, min_tokens: int = MIN_TOKENS):
        self.base, self.size, self.factor, self.min_tokens = base, size, factor, min_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3:
            b, n, c = hidden_states.shape
            hw = grid(n, self.size) if n >= self.min_tokens else None
            if hw is not None:
                fmap = hidden_states.transpose(1, 2).reshape(b, c, *hw)
                pooled = F.avg_pool2d(fmap, self.factor, ceil_mode=True)
                encoder_hidden_states = pooled.flatten(2).transpose(1, 2)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)


@contextlib.contextmanager
def downsampled(model: torch.nn.Module, size: tuple[int, int], factor: int = 2, min_tokens: int = MIN_TOKENS):
    """Within the block, ``model``'s self-attention (every ``attn1``) downsamples its keys and
    values (``factor`` <= 1: unchanged). ``size`` is the latent's (height, width)."""
    swapped = []
    if factor > 1:
        for name, module in model.named_modules():
            if name.endswith("attn1") and hasattr(module, "processor"):
                swapped.append((module, module.processor))
                module.processor = DownsampledKV(module.processor, tuple(size), factor, min_tokens)
    try:
        yield model
    finally:
        for module, processor in swapped:
            module.processor = processor
