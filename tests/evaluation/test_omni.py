"""Dense-prediction metrics of docs/omni.md on hand-made inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from controlstack.evaluation import omni as M


def test_depth_is_scale_and_shift_invariant_and_sky_is_ignored():
    gt = np.tile(np.linspace(0.2, 1.0, 16), (16, 1))
    gt[:4] = 0  # sky
    absrel, d1 = M.depth_errors(3 * gt - 0.7, gt)
    assert absrel == pytest.approx(0, abs=1e-9) and d1 == 1.0
    noisy = gt.copy()
    noisy[4:, :8] *= 1.5  # half the valid pixels 50% too far off
    absrel, d1 = M.depth_errors(noisy, gt)
    assert 0.05 < absrel < 0.5 and 0.3 < d1 < 0.9


def test_ods_counts_a_one_pixel_shift_as_right_and_a_far_edge_as_wrong():
    gt = np.zeros((32, 32), bool)
    gt[16, 4:28] = True
    near = np.zeros((32, 32))
    near[17, 4:28] = 0.9
    f, th = M.ods_f(M.edge_counts(near, gt))
    assert f == pytest.approx(1.0) and th <= 0.9
    far = np.zeros((32, 32))
    far[24, 4:28] = 0.9
    assert M.ods_f(M.edge_counts(far, gt))[0] == 0.0
    half = near.copy()
    half[17, 16:28] = 0.0  # half the edge found, nothing wrong: P 1, R 13/24 (one more within 2 px of the end)
    assert M.ods_f(M.edge_counts(half, gt))[0] == pytest.approx(2 * (13 / 24) / (1 + 13 / 24))


def test_angular_error_and_miou():
    n = np.zeros((3, 4, 4))
    n[2] = 1
    m = np.zeros((3, 4, 4))
    m[0] = 1
    assert M.angular_error(n, n) == pytest.approx(0, abs=1e-6) and M.angular_error(m, n) == pytest.approx(90)
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    conf = M.confusion(pred, gt, 3)
    assert M.mean_iou(conf) == pytest.approx((1 / 2 + 2 / 3) / 2)  # class 2 absent: not averaged


def test_pck_matches_instances_and_counts_misses():
    a = np.array([[10, 10, 1], [10, 30, 1], [20, 30, 0.5], [0, 0, 0]], float)  # box side 20 -> 2 px limit
    b = a + [[50, 0, 0]]
    b[3] = 0
    pred = [b + [[1.5, 0, 0]], a + [[0, 3, 0]]]  # b within the limit; a's points 3 px off
    pred[1][0, 1] -= 3  # ... except its first point
    assert M.pck_counts(pred, [a, b]) == (1 + 3, 6)
    assert M.pck_counts([], [a]) == (0, 3)
