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
