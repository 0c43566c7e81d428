"""Choose the mixed-precision mode at run time: never assume bf16 is fast.

``mixed_precision: auto`` keeps bf16 only where the probe in ``models/speed.py`` shows it wins
(on AVX2-only CPUs a bf16 matmul is ~100x slower than fp32).
"""

from __future__ import annotations

import torch

from controlstack.models.speed import bf16_is_fast, bf16_speedup

__all__ = ["bf16_speedup", "resolve_mixed_precision"]


def resolve_mixed_precision(requested: str, device: torch.device | str = "cpu", threshold: float = 1.2) -> str:
    """``"no"`` / ``"bf16"`` as given; ``"auto"`` -> ``"bf16"`` only if measured >= ``threshold``x faster."""
    if requested != "auto":
        return requested
    return "bf16" if bf16_is_fast(str(torch.device(device)), threshold) else "no"
