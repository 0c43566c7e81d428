"""OmniControlNet's multi-task dense predictor: shapes, task routing, keypoint decoding, storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.models.predictor import (
    TASKS,
    MultiTaskPredictor,
    PredictorConfig,
    activate,
    decode_keypoints,
    keypoint_targets,
    load_predictor,
    predict,
    save_predictor,
)

TINY = dict(image_size=32, embed_dim=8, num_heads=[1, 1, 2, 2], fpn_width=8, head_width=8, stem_width=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultiTaskPredictor(PredictorConfig(**TINY)).eval()
    with torch.no_grad():  # distinct task embeddings, as after training
        m.task_embedding.weight.copy_(torch.rand(m.task_embedding.weight.shape) * 2)
    return m


def test_shapes_and_one_pass_for_all_tasks_equals_one_task_at_a_time(model):
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        together = model(x)
        for task, channels in TASKS.items():
            assert together[task].shape == (2, channels, 32, 64)
            assert torch.allclose(model(x, [task])[task], together[task], atol=1e-6)
        half = model(x, ["seg"], size=(16, 32))["seg"]
    assert half.shape == (2, TASKS["seg"], 16, 32)


def test_the_task_embedding_routes_the_one_head(model):
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x, ["depth", "hed"])
        assert not torch.allclose(out["depth"], out["hed"])  # same head, same channel 0: only the embedding differs
        model.task_embedding.weight[1] = model.task_embedding.weight[0]  # hed gets depth's embedding
        again = model(x, ["depth", "hed"])
    assert torch.equal(again["depth"], again["hed"])
    with pytest.raises(ControlstackError, match="has no task 'edges'; it has depth, hed"):
        model(x, ["edges"])


def test_heatmaps_to_keypoints_to_json_round_trip():
    from controlstack.annotators.pose import Person, PoseData, parse_openpose, to_openpose

    a = np.zeros((18, 3))
    a[:, 0] = np.linspace(8, 20, 18) + 0.5
    a[:, 1] = np.linspace(6, 40, 18) + 0.5
    a[:, 2] = 1
    a[5] = 0  # absent joint
    b = a.copy()
    b[:, 0] += 24
    b[5] = 0
    target = torch.from_numpy(keypoint_targets([a, b], 18, 48))
    k = 18
    logits = torch.logit(target[: k + 1].clamp(1e-4, 1 - 1e-4))
    values = activate("pose", torch.cat([logits, target[k + 1:k + 3]])[None])[0].numpy()
    found = sorted(decode_keypoints(values), key=lambda p: p[0, 0])
    assert len(found) == 2
    for want, got in zip((a, b), found):
        present = want[:, 2] > 0
        assert np.array_equal(got[:, 2] > 0, present)
        assert np.abs(got[present, :2] - want[present, :2]).max() <= 0.5
    pose = PoseData([Person(body=p) for p in found], [], 48, 48)
    back = parse_openpose(to_openpose(pose))
    assert all(np.allclose(p.body, q) for p, q in zip(back.people, found))


def test_save_load_round_trip_and_bad_folders(model, tmp_path):
    save_predictor(model, tmp_path / "p")
    again = load_predictor(tmp_path / "p")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x)["normal"], model(x)["normal"])
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    out = predict(again, rgb, ["depth", "pose"])
    assert out["depth"].shape == (1, 40, 56) and 0 <= out["depth"].min() and out["depth"].max() <= 1
    assert out["pose"].shape[0] == 21
    with pytest.raises(ControlstackError, match="is not a predictor folder"):
        load_predictor(tmp_path)
    with pytest.raises(ControlstackError, match="tasks .* unknown"):
        PredictorConfig(tasks=["depth", "edges"])
