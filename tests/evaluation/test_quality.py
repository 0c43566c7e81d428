"""FID, KID and CLIP score against hand-computed values on small feature sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from controlstack.evaluation import quality
from controlstack.evaluation.metrics import frechet_distance


class MeanColours(nn.Module):
    """A fixed feature network: the mean colour of each image quadrant (12 numbers)."""

    num_features = 12

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        return torch.cat([x[..., :h, :w].mean((2, 3)), x[..., :h, w:].mean((2, 3)),
                          x[..., h:, :w].mean((2, 3)), x[..., h:, w:].mean((2, 3))], 1)


def _images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    return [np.clip(rng.integers(0, 200, (16, 16, 3)) + shift, 0, 255).astype(np.uint8) for _ in range(n)]


def _kid_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """MMD² (unbiased) with k(a, b) = (a·b / d + 1)³ (Bińkowski et al. 2018, eq. 2)."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_fid_of_identical_sets_is_zero_and_kid_is_unbiased():
    net = MeanColours()
    a = _images(30, 0)
    same = quality.fid_kid(net, a, a)
    assert same["fid"] == pytest.approx(0, abs=1e-4)
    assert same["kid"] == pytest.approx(_kid_unbiased(*(quality.features(net, a).numpy(),) * 2), abs=1e-6)
    b = _images(30, 1, shift=40)
    res = quality.fid_kid(net, a, b)
    fa, fb = quality.features(net, a).numpy(), quality.features(net, b).numpy()
    assert res["fid"] == pytest.approx(frechet_distance(fb, fa), rel=1e-3)
    # subsets of all 30 images (<= 50): every subset is the whole set, so KID is the full U-statistic
    assert res["kid"] == pytest.approx(_kid_unbiased(fa, fb), rel=1e-4)
    assert res["fid"] > 0.1 and res["kid"] > same["kid"] + 0.01


def test_clip_score_is_100_times_the_clipped_cosine():
    class Scorer:  # fixed embeddings: cos = 0.6, -0.8
        def scores(self, images, texts):
            cos = np.array([0.6, -0.8][: len(texts)])
            return 100 * np.clip(cos, 0, None)

    assert quality.clip_score(Scorer(), [0, 1], ["a", "b"]) == pytest.approx(30.0)


def test_reference_shuffles_captions_so_none_keeps_its_own():
    texts = ["a", "b", "c"]
    assert all(s != t for s, t in zip(quality.shuffled(texts), texts))
    assert sorted(quality.shuffled(texts)) == texts


def test_fid_needs_two_images():
    from controlstack.errors import ControlstackError

    with pytest.raises(ControlstackError, match=">= 2 images"):
        quality.fid_kid(MeanColours(), _images(1, 0), _images(3, 1))
