"""Run-time checks of what is fast on the machine at hand (never assumed).

bf16 is ~1.6-2x faster than fp32 on CPUs with native bf16 (AVX-512 BF16, AMX) and ~100x slower on
AVX2-only CPUs (measured on an AMD EPYC of ours), so the choice is made by a short probe.
"""

from __future__ import annotations

import functools
import time

import torch


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=None)
def bf16_is_fast(device: str = "cpu", size: int = 256, margin: float = 0.8) -> bool:
    """True when a bf16 matmul takes less than ``margin`` times the fp32 one on ``device``."""
    a = torch.randn(size, size, device=device)
    b = a.to(torch.bfloat16)
    return _best_time(lambda: b @ b) < margin * _best_time(lambda: a @ a)
