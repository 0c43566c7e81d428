"""Condition fidelity per control type: perfect re-extractions score perfectly, and pooling is right."""

from __future__ import annotations

import numpy as np
import pytest

from controlstack import assets
from controlstack.errors import ControlstackError
from controlstack.evaluation.fidelity import FidelityMeter, depth_rmse_absrel


def _scene(size=32):
    img = np.zeros((size, size, 3), np.uint8)
    img[8:24, 8:24] = 255
    return img


def test_canny_of_the_image_itself_has_f1_one():
    import cv2

    img = _scene()
    cond = np.repeat(cv2.Canny(img[..., 0], 100, 200)[..., None], 3, -1)
    m = FidelityMeter("canny")
    assert m.add(img, cond)["edge_f1"] == 1.0
    assert m.add(img, np.zeros_like(cond))["edge_f1"] == 0.0
    res = m.result()
    assert res["edge_f1"] == 0.5 and res["tv"] > 0


def test_depth_is_scale_and_shift_invariant_on_non_sky_pixels():
    t = np.tile(np.linspace(0.1, 1, 10), (10, 1))
    t[:3] = 0  # sky: excluded
    rmse, absrel = depth_rmse_absrel(2 * t + 0.3, t)
    assert rmse == pytest.approx(0, abs=1e-9) and absrel == pytest.approx(0, abs=1e-9)
    rmse, _ = depth_rmse_absrel(t + 0.2 * (np.arange(10) % 2), t)
    assert rmse > 0.05


def test_seg_pools_the_confusion_and_pose_pools_keypoints(monkeypatch):
    from controlstack.models.predictor import N_CLASSES
    from controlstack.world.palette import PALETTE

    truth = np.zeros((16, 16), np.int64)
    truth[:8] = 3
    cond = PALETTE[truth].astype(np.uint8)
    wrong = np.zeros_like(truth)  # predicts class 0 everywhere
    outputs = iter([np.eye(N_CLASSES)[truth].transpose(2, 0, 1), np.eye(N_CLASSES)[wrong].transpose(2, 0, 1)])
    monkeypatch.setattr(assets, "run_predictor", lambda model, rgb, tasks: {"seg": next(outputs)})
    m = FidelityMeter("seg", predictor=object())
    assert m.add(np.zeros((16, 16, 3), np.uint8), cond)["seg_miou"] == 1.0
    m.add(np.zeros((16, 16, 3), np.uint8), cond)
    # pooled over both images: class 0 IoU 256 / 384, class 3 IoU 128 / 256 (not the mean of per-image mIoUs)
    assert m.result()["seg_miou"] == pytest.approx((256 / 384 + 128 / 256) / 2)

    person = np.zeros((18, 3))
    person[:4] = [[5, 5, 1], [10, 5, 1], [5, 12, 1], [10, 12, 1]]
    found = iter([[person], []])
    monkeypatch.setattr(assets, "run_predictor", lambda model, rgb, tasks: {"pose": np.zeros((21, 8, 8))})
    monkeypatch.setattr(assets, "predictor_keypoints", lambda task, values, w, h: next(found))
    p = FidelityMeter("pose", predictor=object())
    assert p.add(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8), [person])["pose_pck"] == 1.0
    p.add(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8), [person])  # nothing found
    assert p.result()["pose_pck"] == 0.5


def test_unknown_types_and_size_mismatch_are_one_line_errors():
    with pytest.raises(ControlstackError, match="no fidelity measure for control type 'mlsd'"):
        FidelityMeter("mlsd")
    with pytest.raises(ControlstackError, match="differ in size"):
        FidelityMeter("canny").add(np.zeros((8, 8, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))


def test_the_controlnet_plus_plus_measures_by_hand():
    """ControlNet++'s protocol: canny F1 pixel by pixel, SSIM of soft edges, depth RMSE on 0-255 maps."""
    from controlstack.evaluation.fidelity import pixel_f1, rmse_255, ssim

    ref = np.zeros((4, 4), bool)
    ref[1, :] = True                                   # 4 edge pixels
    pred = np.zeros((4, 4), bool)
    pred[1, :2] = True                                 # 2 hits
    pred[2, 0] = True                                  # 1 false positive, 2 misses
    assert pixel_f1(ref, pred) == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert pixel_f1(ref, np.zeros_like(ref)) == 0.0 and pixel_f1(np.zeros_like(ref), np.zeros_like(ref)) == 1.0
    x = np.random.default_rng(0).random((16, 16))
    assert ssim(x, x) == pytest.approx(1.0) and ssim(x, 1 - x) < 0
    depth = np.linspace(0, 1, 16).reshape(4, 4)
    assert rmse_255(depth * 3 + 2, depth * 255) == pytest.approx(0.0, abs=1e-9)  # min-max scaled first
    assert rmse_255(depth, np.full((4, 4), 255.0)) == pytest.approx(np.sqrt(np.mean((depth * 255 - 255) ** 2)))


def test_a_meter_by_the_protocol_and_the_preset():
    from controlstack.errors import ControlstackError
    from controlstack.evaluation.evaluate import EvaluateConfig
    from controlstack.evaluation.fidelity import FidelityMeter

    cond = np.zeros((32, 32, 3), np.uint8)
    cond[8:24, 16] = 255
    gen = np.zeros((32, 32, 3), np.uint8)
    gen[8:24, 17] = 255                                # one pixel over: canny finds its sides at 16 and 18
    project, strict = FidelityMeter("canny"), FidelityMeter("canny", protocol="controlnet++")
    assert project.add(gen, cond)["edge_f1"] == 1.0    # every edge within 2 px
    assert strict.add(gen, cond)["f1"] == pytest.approx(0.64)  # pixel by pixel: 16 hits, 18 beside
    assert set(strict.result()) == {"f1", "tv"}
    cfg = EvaluateConfig(preset="controlnet++", steps=3, cfg=(2.0,))
    assert (cfg.steps, cfg.cfg, cfg.scheduler, cfg.images_per_condition, cfg.protocol, cfg.modes) == \
        (20, (7.5,), "unipc", 4, "controlnet++", ("balanced",))  # the protocol's settings win
    with pytest.raises(ControlstackError, match="unknown preset 'cn'"):
        EvaluateConfig(preset="cn")
    with pytest.raises(ControlstackError, match="unknown protocol"):
        FidelityMeter("canny", protocol="x")
