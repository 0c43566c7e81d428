"""Condition-fidelity metrics."""

from __future__ import annotations

import numpy as np
import pytest

from controlstack.evaluation.metrics import edge_f1


def test_edge_f1_tolerance():
    a = np.zeros((32, 32), bool)
    a[8:24, 10] = True
    assert edge_f1(a, a) == 1.0
    assert edge_f1(a, np.roll(a, 2, axis=1)) == 1.0    # 2 px away: within tolerance
    assert edge_f1(a, np.roll(a, 3, axis=1)) == 0.0    # 3 px away: no match
    half = a.copy()
    half[16:24, 10] = False        # rows 8-15 kept: P = 1, R = 10/16 (rows 16, 17 within 2 px)
    assert edge_f1(a, half) == pytest.approx(2 * 0.625 / 1.625)
    assert edge_f1(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert edge_f1(a, np.zeros_like(a)) == 0.0


def test_frechet_distance_pinned_values():
    from controlstack.evaluation.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # a pure shift adds exactly ||shift||^2; a scale s of unit Gaussians adds ~D (1 - s)^2
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, abs=1e-6)
    b = rng.normal(size=(20000, 3))
    assert frechet_distance(b, 3 * rng.normal(size=(20000, 3))) == pytest.approx(12.0, rel=0.05)


def test_colour_feature_ignores_shadow_and_brightness():
    from controlstack.evaluation.metrics import colour_feature, nearest_name

    img = np.zeros((4, 4, 3), np.uint8)
    img[:2] = (200, 30, 30)  # the lit half of a red object
    img[2:] = (20, 20, 20)   # its shadowed half: ignored
    mask = np.ones((4, 4), bool)
    f = colour_feature(img, mask)
    assert f == pytest.approx([300 * 200 / 260, 300 * 30 / 260, 300 * 30 / 260, 0.5 * 260 / 3])
    assert colour_feature(img, np.zeros((4, 4), bool)) is None
    # a dimmer red keeps its chromaticity: still nearer red than brown, which the RGB median confuses
    dim = np.full((2, 2, 3), (100, 15, 15), np.uint8)
    protos = {n: colour_feature(np.full((2, 2, 3), c, np.uint8), np.ones((2, 2), bool))
              for n, c in {"red": (200, 30, 30), "brown": (120, 75, 35), "black": (25, 25, 25)}.items()}
    assert nearest_name(colour_feature(dim, np.ones((2, 2), bool)), protos) == "red"
