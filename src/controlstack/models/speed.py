"""Run-time checks of the machine at hand (never assumed): what is fast, how much memory is free.

On GPUs with bf16 tensor cores and CPUs with native bf16 (AVX-512 BF16, AMX) autocast to bf16 is
~1.6-2x faster than fp32; on AVX2-only CPUs (the AMD EPYC this project is developed on) oneDNN
emulates bf16 and a bf16 matmul is ~100x *slower*. So the choice is made by a short probe, used by
both the inference fast mode and the training recipes' ``mixed_precision: auto``.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch


def _best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN builds its kernels on first use
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def bf16_speedup(device: str = "cpu", size: int = 256) -> float:
    """fp32 time / bf16-autocast time for a ``size``^3 matmul (> 1 means bf16 is faster)."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dev)
    b = torch.randn(size, size, generator=g).to(dev)

    def run(dtype):
        def fn():
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                for _ in range(4):
                    (a @ b).sum().item()
        return fn

    return _best_time(run(torch.float32)) / _best_time(run(torch.bfloat16))


def bf16_is_fast(device: str = "cpu", threshold: float = 1.2) -> bool:
    """True when bf16 autocast is at least ``threshold`` times faster than fp32 on ``device``."""
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return False
    return bf16_speedup(device) >= threshold


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; None elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
