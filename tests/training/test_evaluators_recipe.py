"""The evaluation networks' recipes (features, clip): 2 steps, labels from the export, loadable output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack.training import recipe


def test_scene_labels_read_the_exports_columns():
    from controlstack.training.evaluators import FeatureNetTrainConfig, scene_labels
    from controlstack.world.palette import CLASS_ID, PALETTE

    cfg = FeatureNetTrainConfig(data="unused").model_config()
    seg = np.zeros((20, 20, 3), np.uint8)
    seg[:] = PALETTE[CLASS_ID["sky"]]
    seg[10:] = PALETTE[CLASS_ID["ground"]]
    seg[12:16, 2:7] = PALETTE[CLASS_ID["dog"]]   # 20 px of 400
    inst = np.zeros((20, 20), np.uint8)
    inst[10:] = 1
    inst[12:16, 2:7] = 2                          # visible (>= 4 px)
    inst[0, 0] = 3                                # one pixel: not visible
    image = np.zeros((20, 20, 3), np.uint8)
    image[:10] = (100, 150, 200)                  # the sky's colour, where instances == 0
    image[0, 0] = (0, 0, 0)                       # entity 3's pixel is not sky
    labels = scene_labels("a brown dog on grass", seg, inst, image, cfg)
    said = {w for w, v in zip(cfg.words, labels["words"]) if v}
    assert said == {"brown", "dog", "grass"}
    assert labels["classes"][CLASS_ID["dog"]] == pytest.approx(np.sqrt(20 / 400))
    assert labels["classes"][CLASS_ID["sky"]] == pytest.approx(np.sqrt(200 / 400))
    assert int(labels["count"]) == 1
    np.testing.assert_allclose(labels["sky"], np.array([100, 150, 200]) / 255, rtol=1e-6)


def test_features_two_steps(world_dir, tmp_path):
    from controlstack.evaluation.networks import load_feature_net

    config_cls, train = recipe("features")
    cfg = config_cls(data=world_dir, output_dir=str(tmp_path / "f"), resolution=32, batch_size=4, max_steps=2,
                     widths=(8, 16), num_features=8, checkpoint_every=2, log_every=1)
    model = load_feature_net(train(cfg))
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)  # another size: clean-resized to 32
    f = model(images)
    assert f.shape == (3, 8) and torch.equal(f, model(images))


def test_clip_two_steps_loads_as_a_clip_folder(world_dir, tmp_path):
    from controlstack.evaluation.networks import ClipScorer

    config_cls, train = recipe("clip")
    cfg = config_cls(data=world_dir, output_dir=str(tmp_path / "c"), resolution=32, patch_size=16, width=32,
                     layers=1, heads=2, projection_dim=8, batch_size=4, max_steps=2, checkpoint_every=2, log_every=1)
    scorer = ClipScorer.load(train(cfg))
    images = [np.full((40, 50, 3), v, np.uint8) for v in (0, 128)]
    s = scorer.scores(images, ["a red sphere", "a dog"])
    assert s.shape == (2,) and ((s >= 0) & (s <= 100)).all()
    r = scorer.retrieval(images, ["a red sphere", "a dog"])
    assert set(r) == {"image_to_text", "text_to_image"}
