"""Learned annotators: interface, the clear error without weights, the loader path, no controlnet_aux."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from controlstack import annotators
from controlstack.errors import ControlstackError


@pytest.mark.parametrize("name", annotators.LEARNED)
def test_without_weights_one_clear_line(name):
    with pytest.raises(ControlstackError) as err:
        annotators.get(name)(np.zeros((8, 8, 3), np.uint8))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"{name} is a learned annotator and the project's multi-task predictor weights are not "
                   "available yet; pass weights=DIR (a local controlnet_aux Annotators folder) or a loader")


def test_missing_weights_folder(tmp_path):
    with pytest.raises(ControlstackError, match=r"depth: weights folder '.*nope' does not exist"):
        annotators.get("depth", weights=str(tmp_path / "nope"))


def test_weights_folder_without_controlnet_aux_says_what_to_do(tmp_path):
    # controlnet_aux must never be installed in the project environment: this is the path users hit
    assert subprocess.run([sys.executable, "-c", "import controlnet_aux"], check=False,
                          capture_output=True).returncode != 0
    with pytest.raises(ControlstackError, match=r"depth: weights= needs the controlnet_aux package, which is "
                                                r"not importable here .*torchvision and timm"):
        annotators.get("depth", weights=str(tmp_path))(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ControlstackError, match="seg_estimate: controlnet_aux has no default detector"):
        annotators.get("seg_estimate", weights=str(tmp_path))(np.zeros((8, 8, 3), np.uint8))
    assert "controlnet_aux" not in sys.modules


def test_loader_plugs_in_a_network(tmp_path):
    calls = []

    def loader(weights):
        calls.append(weights)
        return lambda rgb: rgb.mean(axis=2).astype(np.uint8)[::2, ::2]  # half-size output is resized back

    a = annotators.get("depth", weights=str(tmp_path), loader=loader, resolution=None)
    img = np.zeros((16, 24, 3), np.uint8)
    img[:, 12:] = 200
    out = np.asarray(a(img))
    assert out.shape == (16, 24, 3) and calls == [str(tmp_path)]
    assert out[8, 2, 0] == 0 and out[8, 20, 0] == 200
    a(img)
    assert len(calls) == 1  # loaded once
