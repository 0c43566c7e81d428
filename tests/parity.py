"""The tolerance every "same image as the reference" assertion uses.

oneDNN picks its convolution and matmul kernels per CPU (AVX2 on an AMD EPYC, AMX on a recent
Xeon) and per shape, so two float32 computations of the same image through different code paths
(ours and diffusers', eager and compiled, batch 1 and batch 2) agree to rounding, not to the bit,
on every machine the suite runs on. Measured worst cases on both: 1.1e-5 in [0, 1] images (the
compiled tier), one 8-bit level on 1 of 12288 values of a PNG. Bit-identity is asserted only where
one code path is run twice (a cache, a resume, a fallback that is the same math)."""

from __future__ import annotations

import numpy as np

#: float images in [0, 1]: well under one 8-bit level (1 / 255 = 3.9e-3)
FLOAT_ATOL = 1e-4
#: 8-bit images: at most one level apart, on at most this fraction of the values
UINT8_FRACTION = 1e-3


def assert_same_image(got, expected, atol: float = FLOAT_ATOL) -> None:
    """``got`` equals ``expected`` up to float rounding (float arrays) or one 8-bit level on a
    handful of values (uint8 arrays, e.g. PNGs) -- the module docstring says why."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if got.dtype == np.uint8 or expected.dtype == np.uint8:
        diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
        assert diff.max() <= 1, f"8-bit images differ by up to {diff.max()} levels"
        assert (diff > 0).mean() <= UINT8_FRACTION, f"{(diff > 0).mean():.2%} of the values differ by one level"
    else:
        diff = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
        assert diff < atol, f"images differ by up to {diff:.3g} (tolerance {atol:g})"
