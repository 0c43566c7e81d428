"""Dense-prediction metrics for OmniControlNet's stage 1 (docs/omni.md, ``benchmarks/omni_tables.py``).

The standard measures of each task's literature, in the simple forms this project can compute
exactly against the world's ground truth:

* depth (MiDaS-style relative depth; Ranftl et al. 2020): the prediction is aligned to the truth
  by least-squares scale and shift per image, then ``AbsRel = mean |d - d*| / d*`` and
  ``δ1 = mean[max(d / d*, d* / d) < 1.25]`` over valid pixels;
* edges (BSDS; Arbeláez et al. 2011): ODS F-score, the best F over one threshold shared by the
  whole set, with a tolerance of ``tol`` pixels (distance-transform matching, no thinning);
* normals: mean angular error in degrees;  segmentation: mean IoU over classes present;
* keypoints: PCK@α (Yang & Ramanan 2013) with the instance's keypoint box as the reference size.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def align_scale_shift(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``s · pred + t`` with (s, t) minimising the squared error to ``gt`` on ``valid`` pixels."""
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    a = np.stack([p, np.ones_like(p)], 1)
    (s, t), *_ = np.linalg.lstsq(a, g, rcond=None)
    return s * pred + t


def depth_errors(pred: np.ndarray, gt: np.ndarray, min_gt: float = 1e-3) -> tuple[float, float]:
    """(AbsRel, δ<1.25) of one image after scale-and-shift alignment; ``gt`` > ``min_gt`` is valid."""
    valid = gt > min_gt
    if valid.sum() < 2:
        return float("nan"), float("nan")
    aligned = np.clip(align_scale_shift(pred, gt, valid), min_gt, None)
    d, t = aligned[valid], gt[valid]
    return float(np.mean(np.abs(d - t) / t)), float(np.mean(np.maximum(d / t, t / d) < 1.25))


def edge_counts(pred: np.ndarray, gt: np.ndarray, tol: float = 2.0, thresholds=THRESHOLDS) -> np.ndarray:
    """Per threshold: (matched predicted, predicted, matched true, true) pixel counts of one image,
    summed over a set by the caller and turned into the ODS F-score by :func:`ods_f`."""
    import cv2  # local: heavy, only this path needs it

    true = gt.astype(bool)
    near_true = cv2.distanceTransform((~true).astype(np.uint8), cv2.DIST_L2, 3) <= tol
    out = np.zeros((len(thresholds), 4))
    for i, th in enumerate(thresholds):
        p = pred >= th
        near_pred = cv2.distanceTransform((~p).astype(np.uint8), cv2.DIST_L2, 3) <= tol
        out[i] = ((p & near_true).sum(), p.sum(), (true & near_pred).sum(), true.sum())
    return out


def ods_f(counts: np.ndarray) -> tuple[float, float]:
    """(ODS F-score, its threshold) from :func:`edge_counts` summed over the set."""
    precision = counts[:, 0] / np.maximum(counts[:, 1], 1)
    recall = counts[:, 2] / np.maximum(counts[:, 3], 1)
    f = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    i = int(np.argmax(f))
    return float(f[i]), float(THRESHOLDS[i])


def angular_error(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean angle (degrees) between unit normals ``(3, H, W)``."""
    cos = np.clip((pred * gt).sum(0) / np.maximum(np.linalg.norm(pred, axis=0) * np.linalg.norm(gt, axis=0), 1e-8),
                  -1, 1)
    return float(np.degrees(np.arccos(cos)).mean())


def confusion(pred: np.ndarray, gt: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` confusion matrix (rows: truth) of two class-id maps."""
    return np.bincount(gt.ravel() * n + pred.ravel(), minlength=n * n).reshape(n, n)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over the classes that occur in the truth of the accumulated confusion matrix."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = conf.sum(1) > 0
    return float(np.mean(inter[present] / np.maximum(union[present], 1)))


def pck_counts(pred: list[np.ndarray], gt: list[np.ndarray], alpha: float = 0.1) -> tuple[int, int]:
    """(correct, total) true keypoints of one image: instances ``(K, 3)`` (x, y, confidence;
    0 = absent), matched greedily by mean distance over the keypoints both have."""
    total = int(sum((g[:, 2] > 0).sum() for g in gt))
    pairs = []
    for i, g in enumerate(gt):
        for j, p in enumerate(pred):
            both = (g[:, 2] > 0) & (p[:, 2] > 0)
            if both.any():
                pairs.append((float(np.linalg.norm(g[both, :2] - p[both, :2], axis=1).mean()), i, j))
    correct, used_g, used_p = 0, set(), set()
    for _, i, j in sorted(pairs):
        if i in used_g or j in used_p:
            continue
        used_g.add(i)
        used_p.add(j)
        g, p = gt[i], pred[j]
        present = g[:, 2] > 0
        box = g[present, :2].max(0) - g[present, :2].min(0)
        limit = alpha * max(float(box.max()), 1.0)
        hit = present & (p[:, 2] > 0) & (np.linalg.norm(g[:, :2] - p[:, :2], axis=1) <= limit)
        correct += int(hit.sum())
    return correct, total
