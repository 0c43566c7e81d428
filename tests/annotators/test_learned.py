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


# -- pose_estimate's confidence gate, on the bundled predictor ---------------------------------

def _bundled_or_skip():
    from controlstack import assets

    if assets.predictor_folder() is None:
        pytest.skip("this checkout has no bundled predictor")


def _held_out(index: int) -> dict:
    from controlstack.world import HELD_OUT_SEED, WorldConfig, render, sample_scene

    return render(sample_scene([HELD_OUT_SEED, index], WorldConfig(size=128)), 128)


@pytest.mark.parametrize("index", [1, 2])
def test_pose_estimate_keeps_the_skeletons_of_world_scenes_with_people(index):
    import json

    _bundled_or_skip()
    scene = _held_out(index)
    assert json.loads(scene["keypoints"])["people"]  # the scene has people
    a = annotators.get("pose_estimate", resolution=None)
    assert len(a.estimate(scene["image"]).people) >= 1
    assert np.asarray(a(scene["image"])).max() > 0


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


@pytest.mark.parametrize("what", ["coffee", "rocket", "astronaut", "flat", "scene 11", "scene 25", "scene 34"])
def test_pose_estimate_draws_nothing_where_no_figure_is_found(what):
    """skimage photographs (no person it can find: it was trained on renders), a flat image and
    held-out world scenes without people or animals give an all-black pose map."""
    import json

    _bundled_or_skip()
    if what == "flat":
        image = np.full((96, 128, 3), 128, np.uint8)
    elif what.startswith("scene"):
        scene = _held_out(int(what.split()[1]))
        kp = json.loads(scene["keypoints"])
        assert kp.get("people", []) == [] and kp.get("animals", []) == []  # no figure in the scene
        image = scene["image"]
    else:
        image = _photo(what)
    a = annotators.get("pose_estimate")
    found = a.estimate(image)
    assert found.people == [] and found.animals == []
    assert np.asarray(a(image)).max() == 0


def test_the_confidence_gate_is_what_clears_the_photographs():
    """Without the gate (confidence 0) the same photographs get skeletons: the test above tests the gate."""
    _bundled_or_skip()
    from controlstack.annotators.learned import ANIMAL_CONFIDENCE, PEOPLE_CONFIDENCE

    ungated = annotators.get("pose_estimate", confidence=0, animal_confidence=0)
    for name in ("coffee", "rocket"):
        assert len(ungated.estimate(_photo(name)).animals) >= 5
    assert len(ungated.estimate(_photo("astronaut")).people) >= 1
    a = annotators.get("pose_estimate")
    assert (a.confidence, a.animal_confidence) == (PEOPLE_CONFIDENCE, ANIMAL_CONFIDENCE) == (0.40, 0.29)
    with pytest.raises(ControlstackError, match=r"pose_estimate: confidence must be in \[0, 1\], got 1.5"):
        annotators.get("pose_estimate", confidence=1.5)


def test_decode_drops_instances_below_the_confidence_after_grouping():
    """Two people with centre peaks 0.9 and 0.5: a gate of 0.6 drops the weaker one and leaves the
    stronger one's keypoints exactly as without the gate."""
    from controlstack.models.predictor import decode_keypoints

    k, size = 2, 32
    values = np.zeros((k + 3, size, size), np.float32)
    for (r, c), peak in (((8, 8), 0.9), ((24, 24), 0.5)):
        values[k, r, c] = peak                          # the centre
        values[0, r - 2, c], values[1, r + 2, c] = 0.8, 0.7  # two keypoints voting for it
        values[k + 2, r - 2, c] = 2 / size               # offsets: keypoint -> centre
        values[k + 2, r + 2, c] = -2 / size
    every = decode_keypoints(values)
    assert len(every) == 2
    kept = decode_keypoints(values, min_confidence=0.6)
    assert len(kept) == 1 and np.array_equal(kept[0], every[0])
    assert kept[0][0, 2] == pytest.approx(0.8)
    assert decode_keypoints(values, min_confidence=0.95) == []
