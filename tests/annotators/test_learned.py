"""Learned annotators: interface, the clear error without weights, the loader path, no controlnet_aux."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from controlstack import annotators
from controlstack.errors import ControlstackError


@pytest.mark.parametrize("name", annotators.LEARNED)
def test_without_weights_or_a_bundled_predictor_one_clear_line(name, monkeypatch):
    from controlstack import assets

    monkeypatch.setattr(assets, "predictor_folder", lambda bundle=None: None)  # a checkout without it
    with pytest.raises(ControlstackError) as err:
        annotators.get(name)(np.zeros((8, 8, 3), np.uint8))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"{name} is a learned annotator and this checkout has no bundled predictor "
                   "(assets/bundle/predictor); pass weights=DIR (a predictor or controlnet_aux folder) or a loader")


@pytest.fixture(scope="module")
def predictor_dir(tmp_path_factory):
    """A tiny seeded MultiTaskPredictor folder (what ``weights=`` takes, like the bundled one)."""
    import torch

    from controlstack.models.predictor import MultiTaskPredictor, PredictorConfig, save_predictor

    torch.manual_seed(0)
    model = MultiTaskPredictor(PredictorConfig(image_size=32, embed_dim=8, num_heads=[1, 1, 2, 2], fpn_width=8,
                                               head_width=8, stem_width=4))
    return str(save_predictor(model, tmp_path_factory.mktemp("pred") / "p"))


@pytest.mark.parametrize("name", annotators.LEARNED)
def test_a_predictor_folder_as_weights_gives_every_condition(name, predictor_dir):
    from controlstack.world.palette import PALETTE

    img = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    out = np.asarray(annotators.get(name, weights=predictor_dir, resolution=None)(img))
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    if name in ("depth", "hed", "scribble_hed"):
        assert (out[..., 0] == out[..., 1]).all()  # grey
    if name == "scribble_hed":
        assert set(np.unique(out)) <= {0, 255}
    if name == "seg_estimate":
        assert {tuple(c) for c in out.reshape(-1, 3)} <= {tuple(c) for c in PALETTE}


def test_pose_estimate_gives_the_skeletons_as_openpose_json(predictor_dir, tmp_path):
    from controlstack.annotators import pose as P

    a = annotators.get("pose_estimate", weights=predictor_dir, resolution=None)
    found = a.estimate(np.zeros((32, 48, 3), np.uint8))
    data = P.to_openpose(found)
    assert data["canvas_width"] == 48 and data["canvas_height"] == 32
    back = P.parse_openpose(data)
    assert len(back.people) == len(found.people) and len(back.animals) == len(found.animals)


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


def test_condition_annotators_refuse_a_photograph_naming_the_one_that_fits(coffee_small):
    with pytest.raises(ControlstackError, match="pose: the image looks like a photograph.*use pose_estimate"):
        annotators.get("pose", resolution=None)(coffee_small)
    with pytest.raises(ControlstackError, match="normal: expects a depth map.*use normal_estimate"):
        annotators.get("normal", resolution=None)(coffee_small)
    grey = coffee_small.convert("L")
    assert annotators.get("normal", resolution=None)(grey).size == grey.size  # a grey (depth) image is fine
