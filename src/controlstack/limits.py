"""What a call may ask for, checked before anything runs: the sizes, steps, CFG and batch
(:func:`validate`), and the memory guard -- a lower bound of the bytes a call needs beyond the
loaded weights against the machine's free memory (:func:`check_memory`), so a call that cannot fit
is refused in one line rather than killed by the kernel mid-run. The pipeline, the CLI's preflight
and the server's acceptance checks use the same functions."""

from __future__ import annotations

import numpy as np

from controlstack.errors import ControlstackError

MAX_SIZE = 4096


def memory_needed(unet_width: int, vae_width: int, factor: int, batch: int, width: int, height: int) -> int:
    """A lower bound of the bytes a call needs beyond the loaded weights: the U-Net's first-level
    activations (``unet_width`` channels) for the CFG batch (a dozen live tensors) and the VAE
    decoder's full-resolution ones (``vae_width`` channels: input, output and a normalisation of its
    widest level). Real peaks are higher."""
    unet = 2 * batch * (height // factor) * (width // factor) * unet_width * 4 * 12
    vae = batch * height * width * vae_width * 4 * 3
    return unet + vae


def check_memory(need: int, batch: int, width: int, height: int) -> None:
    """Refuse, in one line, a call that needs more than this machine's free memory (instead of
    being killed by the kernel mid-run)."""
    # local: keeps CLI start-up light (the preflight checks run before torch is needed)
    from controlstack.models.speed import available_memory

    free = available_memory()
    if free is not None and need > free:
        raise ControlstackError(f"batch {batch} at {width}x{height} needs at least {need / 2**30:.1f} GiB, more "
                                f"than the {free / 2**30:.1f} GiB free; lower the batch or the size")


def validate(prompt, steps, cfg, width, height, batch, factor) -> None:
    """The call's own numbers, typed and ranged (the sizes: multiples of the VAE's factor)."""
    if not isinstance(prompt, str):
        raise ControlstackError(f"prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ControlstackError(f"steps must be a positive integer, got {steps}")
    if not np.isfinite(cfg) or cfg < 0:
        raise ControlstackError(f"cfg must be a finite number >= 0, got {cfg}")
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < factor or v > MAX_SIZE or v % factor:
            raise ControlstackError(
                f"{name} must be a multiple of {factor} between {factor} and {MAX_SIZE}, got {v}"
            )
    if not isinstance(batch, int) or batch < 1:
        raise ControlstackError(f"batch must be a positive integer, got {batch}")
