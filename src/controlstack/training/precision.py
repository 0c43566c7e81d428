"""Choose the mixed-precision mode at run time: never assume bf16 is fast.

On GPUs with bf16 tensor cores autocast to bf16 is a large win; on CPUs without AVX512-BF16 /
AMX (e.g. AVX2-only AMD EPYC, where this project is developed) oneDNN emulates bf16 and a bf16
matmul is ~100x *slower* than fp32. ``mixed_precision: auto`` therefore times one small matmul
both ways at start-up and keeps bf16 only where it actually wins.
"""

from __future__ import annotations

import time

import torch


def _time(fn, repeats: int = 3) -> float:
    fn()  # warm-up: oneDNN builds its kernels on first use
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bf16_speedup(device: torch.device | str = "cpu", size: int = 256) -> float:
    """fp32 time / bf16-autocast time for a ``size``^3 matmul (> 1 means bf16 is faster)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)

    def run(dtype):
        def fn():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for _ in range(4):
                    (a @ b).sum().item()
        return fn

    return _time(run(torch.float32)) / _time(run(torch.bfloat16))


def resolve_mixed_precision(requested: str, device: torch.device | str = "cpu", threshold: float = 1.2) -> str:
    """``"no"`` / ``"bf16"`` as given; ``"auto"`` -> ``"bf16"`` only if measured >= ``threshold``x faster."""
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "no"
    return "bf16" if bf16_speedup(device) >= threshold else "no"
