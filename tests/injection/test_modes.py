"""Control modes: which CFG half gets the control and each layer's weight."""

from __future__ import annotations

import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.injection import make_injection
from controlstack.residuals import Residuals


def _branch(value: float):
    # a 16x16-latent model's shape: skips at 16, 16, 8, 8, 4, 4 and the middle at 4
    h = [torch.full((1, 4, s, s), value) for s in (16, 16, 8, 8, 4, 4)]
    return h, torch.full((1, 4, 4, 4), value)


@pytest.mark.parametrize("kind, expected", [
    ("resolution", [0.25, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0]),
    ("soft", [0.825 ** (6 - i) for i in range(7)]),
    ("uniform", [1.0] * 7),
])
def test_controlnet_mode_layer_weights(kind, expected):
    strategy = make_injection("controlnet", layer_weights=kind)
    assert strategy.cond_only is True
    h, mid = _branch(2.0)
    out = strategy(h, mid, [Residuals(h, mid)])
    got = [float(t.flatten()[0]) / 2.0 for t in [*out.downs, out.mid]]
    assert got == pytest.approx(expected)


def test_balanced_is_a_plain_sum_on_both_halves():
    strategy = make_injection("balanced")
    assert strategy.cond_only is False
    h, mid = _branch(1.0)
    out = strategy(h, mid, [Residuals(h, mid), Residuals(h, mid)])
    assert [float(t.flatten()[0]) for t in [*out.downs, out.mid]] == [2.0] * 7


def test_unknown_layer_weights_is_refused():
    # a user's error (API or --layer-weights), so the CLI prints it as one line
    with pytest.raises(ControlstackError, match="uniform"):
        make_injection("controlnet", layer_weights="linear")
