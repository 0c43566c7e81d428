"""``lines``: straight line segments (the M-LSD control's condition) without a network.

M-LSD (Gu et al. 2022) is what ControlNet's "mlsd" annotator runs; its output is white 1-px line
segments on black. We detect segments with OpenCV's LSD (von Gioi et al. 2012, "LSD: a Line Segment
Detector", sub-pixel and parameter-light), then:

1. drop segments with too little contrast across them (``value_threshold``, the analogue of
   M-LSD's score threshold ``thr_v``) or too short (``min_length``, the analogue of ``thr_d``);
2. merge near-collinear parallel pieces closer than ``merge_distance`` px (LSD returns the two
   sides of a drawn stroke, and pieces of one edge broken by noise) into one segment per line;
3. draw them like ControlNet's annotator: ``cv2.line(..., 255, thickness)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlstack.annotators.base import Annotator, param


def _contrast(g: np.ndarray, segs: np.ndarray, offset: float = 1.0, samples: int = 9) -> np.ndarray:
    """Mean |I(p + offset n) - I(p - offset n)| along each segment (n = unit normal), g in [0,1]."""
    if len(segs) == 0:
        return np.zeros(0, np.float32)
    p1, p2 = segs[:, None, :2], segs[:, None, 2:]
    t = np.linspace(0.1, 0.9, samples, dtype=np.float32)[None, :, None]
    pts = p1 + (p2 - p1) * t  # (N, S, 2)
    d = segs[:, 2:] - segs[:, :2]
    n = np.stack([-d[:, 1], d[:, 0]], 1) / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)
    a = (pts + offset * n[:, None, :]).reshape(-1, 1, 2).astype(np.float32)
    b = (pts - offset * n[:, None, :]).reshape(-1, 1, 2).astype(np.float32)
    va = cv2.remap(g, a[..., 0], a[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    vb = cv2.remap(g, b[..., 0], b[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.abs(va - vb).reshape(len(segs), samples).mean(1)


def merge_segments(segs: np.ndarray, distance: float, angle_deg: float = 4.0) -> np.ndarray:
    """Union near-collinear, parallel, overlapping-or-touching segments; one segment per group.

    Candidate pairs come from one N x N parallelism test (LSD gives at most a few thousand
    segments), exact distance/overlap tests run per candidate pair, groups are connected components of the pair graph (scipy), and a group's line is its longest member's
    direction through the length-weighted mean offset, spanning all members' projections.
    """
    from scipy.sparse import coo_matrix  # local: heavy, only this path needs it
    from scipy.sparse.csgraph import connected_components  # local: heavy, only this path needs it

    n = len(segs)
    if n < 2 or distance <= 0:
        return segs
    p1, p2 = segs[:, :2], segs[:, 2:]
    d = p2 - p1
    length = np.linalg.norm(d, axis=1)
    u = d / np.maximum(length[:, None], 1e-9)
    nrm = np.stack([-u[:, 1], u[:, 0]], 1)
    # candidate pairs: parallel within angle_deg (one N x N product), then exact tests per pair
    i, j = np.nonzero(np.triu(np.abs(u @ u.T) >= np.cos(np.deg2rad(angle_deg)), 1))

    def close(a, b):
        """b's endpoints within `distance` of a's line, and their projections overlap or nearly touch."""
        r1, r2 = p1[b] - p1[a], p2[b] - p1[a]
        perp = np.maximum(np.abs((r1 * nrm[a]).sum(1)), np.abs((r2 * nrm[a]).sum(1)))
        s1, s2 = (r1 * u[a]).sum(1), (r2 * u[a]).sum(1)
        gap = np.maximum(np.minimum(s1, s2) - length[a], -np.maximum(s1, s2))
        return (perp <= distance) & (gap <= distance)

    ok = close(i, j) & close(j, i)
    rows, cols = i[ok], j[ok]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    count, label = connected_components(graph, directed=False)
    sizes = np.bincount(label, minlength=count)
    out = np.empty((count, 4), np.float32)
    single = sizes[label] == 1
    out[label[single]] = segs[single]
    for g in np.nonzero(sizes > 1)[0]:
        idx = np.nonzero(label == g)[0]
        k = idx[np.argmax(length[idx])]
        ug, ng = u[k], nrm[k]
        pts = np.concatenate([p1[idx], p2[idx]])
        w = np.concatenate([length[idx], length[idx]])
        offset = float((pts @ ng * w).sum() / w.sum())
        proj = pts @ ug
        a, b = proj.min(), proj.max()
        out[g, :2] = ug * a + ng * offset
        out[g, 2:] = ug * b + ng * offset
    return out


@dataclass(kw_only=True)
class Lines(Annotator):
    NAME = "lines"
    value_threshold: float = param(0.1, "minimum contrast across a segment, as a fraction of full range",
                                   lo=0.0, hi=1.0)
    min_length: float = param(8.0, "minimum segment length (px, after merging)", lo=0, hi=4096)
    merge_distance: float = param(8.0, "merge parallel pieces closer than this (px): both sides of a stroke "
                                  "become its centre line; 0 = no merging",
                                  lo=0, hi=64)
    thickness: int = param(1, "drawn line width (px)", lo=1, hi=16)

    def segments(self, rgb: np.ndarray) -> np.ndarray:
        """Detected segments as float32 (N, 4): x1, y1, x2, y2 in pixel coordinates."""
        g8 = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        lsd = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD)
        found = lsd.detect(g8)[0]
        if found is None:
            return np.zeros((0, 4), np.float32)
        segs = found.reshape(-1, 4).astype(np.float32)
        if self.value_threshold > 0:
            segs = segs[_contrast(g8.astype(np.float32) / 255.0, segs) >= self.value_threshold]
        segs = merge_segments(segs, self.merge_distance)
        length = np.linalg.norm(segs[:, 2:] - segs[:, :2], axis=1)
        return segs[length >= self.min_length]

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        out = np.zeros(rgb.shape[:2], np.uint8)
        for x1, y1, x2, y2 in self.segments(rgb):
            cv2.line(out, (round(float(x1)), round(float(y1))), (round(float(x2)), round(float(y2))), 255,
                     self.thickness)
        return out
