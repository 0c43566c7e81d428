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
def bf16_speedup(device: str = "cpu") -> float:
    """fp32 time / bf16 time (> 1: bf16 is faster) of a model-shaped workload: a 3x3 convolution
    (64 channels, 32x32, batch 2) and a 512^3 matmul, operands already in each dtype -- as frozen
    compiled graphs and bf16 weights hold them. Timing one 256^3 matmul under autocast (plus a
    ``.item()`` per call) measures the per-call casts and the sync instead: it reports 1.03x on an
    AMX Xeon where the U-Net + ControlNet step runs 1.35x faster in bf16."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    a, b = torch.randn(512, 512, generator=g), torch.randn(512, 512, generator=g)

    def run(dtype):
        xs, ws, as_, bs = (t.to(dev, dtype) for t in (x, w, a, b))

        def fn():
            for _ in range(2):
                torch.nn.functional.conv2d(xs, ws, padding=1)
                as_ @ bs
            if dev.type == "cuda":
                torch.cuda.synchronize()
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
