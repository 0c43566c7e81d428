"""Condition fidelity per control type: re-extract the condition from the generated image and
compare it with the input (ControlNet paper Sec. 4.3 and Table 2's protocol; docs/method.md §4).

The re-extraction is the project's own: canny for edges, the bundled multi-task predictor
(OmniControlNet stage 1, ``models/predictor.py``) for depth, soft edges, normals, segmentation and
pose -- the same networks the annotators run. Each type gets its literature's measure:

=============  ==========================================================================
canny          edge F1 with a 2 px tolerance (BSDS-style matching), canny(100, 200) of the image
softedge/hed   edge F1 (2 px) of the predicted soft edge > 0.5 against the input > 50%
scribble       edge F1 (2 px) of the predicted scribble (``scribble_hed``) against the input
depth          RMSE and AbsRel of the predicted relative depth (near = bright, aligned to the
               input by least-squares scale and shift, MiDaS' protocol) on the input's non-sky
               pixels, both in the input's [0, 1] units
seg            mIoU over the classes present in the input, accumulated over the set
pose           PCK@0.1 of the decoded people against the input's keypoints (OpenPose JSON)
normal         mean angle (degrees) between predicted and input normals
=============  ==========================================================================

Every generated image also gets its total variation (``mi.total_variation``: texture), next to
the real renders' for reference. :class:`FidelityMeter` accumulates a set and returns one number
per metric (means; seg and pose pooled over the set, as their benchmarks do).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from controlstack import assets
from controlstack.errors import require
from controlstack.evaluation import omni as M
from controlstack.evaluation.omni import align_scale_shift

#: control type -> the metrics it reports (lower is better for the ``_rmse`` / ``_absrel`` / ``_angle`` ones)
METRICS = {"canny": ("edge_f1",), "softedge": ("edge_f1",), "hed": ("edge_f1",), "scribble": ("edge_f1",),
           "depth": ("depth_rmse", "depth_absrel"), "seg": ("seg_miou",), "pose": ("pose_pck",),
           "normal": ("normal_angle",)}
#: ControlNet++'s controllability protocol (Li et al., ECCV 2024, Sec. 4.1 and Table 1; used by UniControl
#: and Uni-ControlNet too): canny F1 pixel by pixel, soft-edge SSIM, depth RMSE on 0-255 maps, seg mIoU
#: (pose: PCK, the project's, as the protocol has none)
PROTOCOL_METRICS = {"canny": ("f1",), "softedge": ("ssim",), "hed": ("ssim",), "scribble": ("ssim",),
                    "depth": ("rmse_255",), "seg": ("seg_miou",), "pose": ("pose_pck",), "normal": ("normal_angle",)}
PROTOCOLS = ("project", "controlnet++")
LOWER_IS_BETTER = ("depth_rmse", "depth_absrel", "normal_angle", "fid", "kid", "rmse_255")
PREDICTOR_TASK = {"softedge": "hed", "hed": "hed", "scribble": "hed", "depth": "depth", "seg": "seg",
                  "pose": "pose", "normal": "normal"}


def supported(control: str) -> bool:
    return control in METRICS


def _gray(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a if a.ndim == 2 else a[..., :3].mean(-1)


def depth_rmse_absrel(pred: np.ndarray, target: np.ndarray, min_target: float = 1e-3) -> tuple[float, float]:
    """(RMSE, AbsRel) of ``pred`` aligned by scale and shift to ``target`` on ``target > min_target``."""
    valid = target > min_target
    if valid.sum() < 2:
        return float("nan"), float("nan")
    aligned = align_scale_shift(pred, target, valid)
    d, t = aligned[valid], target[valid]
    return float(np.sqrt(np.mean((d - t) ** 2))), float(np.mean(np.abs(np.clip(d, min_target, None) - t) / t))


def pixel_f1(reference: np.ndarray, predicted: np.ndarray) -> float:
    """F1 of two boolean maps pixel by pixel (no distance tolerance: ControlNet++'s canny measure)."""
    tp = float(np.logical_and(reference, predicted).sum())
    fp, fn = float(np.logical_and(~reference, predicted).sum()), float(np.logical_and(reference, ~predicted).sum())
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two maps in [0, 1] (skimage's, 7x7 Gaussian-free windows, data range 1)."""
    from skimage.metrics import structural_similarity  # local: heavy, only this path needs it

    return float(structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=1.0))


def rmse_255(pred: np.ndarray, target: np.ndarray) -> float:
    """RMSE of a predicted relative depth, min-max scaled to [0, 255] per image, against the input depth
    map's 0-255 values (ControlNet++'s depth measure)."""
    lo, hi = float(pred.min()), float(pred.max())
    scaled = (pred - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(pred, dtype=np.float64)
    return float(np.sqrt(np.mean((scaled - target.astype(np.float64)) ** 2)))


class FidelityMeter:
    """Accumulates one control type's fidelity over a set of (generated, input) pairs, by the project's
    measures (``protocol="project"``, the table above) or ControlNet++'s (:data:`PROTOCOL_METRICS`)."""

    def __init__(self, control: str, predictor=None, protocol: str = "project"):
        require(supported(control), f"no fidelity measure for control type '{control}'; "
                                    f"measured types: {', '.join(METRICS)}")
        require(protocol in PROTOCOLS, f"unknown protocol '{protocol}'; choose one of {', '.join(PROTOCOLS)}")
        self.control, self._predictor, self.protocol = control, predictor, protocol
        table = PROTOCOL_METRICS if protocol == "controlnet++" else METRICS
        self.values: dict[str, list[float]] = {m: [] for m in table[control]}
        self.tv: list[float] = []
        self.conf = None
        self.pck = [0, 0]

    @property
    def predictor(self):
        if self._predictor is None:
            folder = assets.predictor_folder()
            require(folder is not None, "this checkout has no bundled predictor; depth / seg / pose / normal / "
                                        "soft-edge fidelity need it")
            self._predictor = assets.load_predictor(folder)
        return self._predictor

    def add(self, generated: np.ndarray, condition: np.ndarray, keypoints: list[np.ndarray] | None = None) -> dict:
        """One pair: ``generated`` uint8 (H, W, 3); ``condition`` the input condition image at the
        same size; ``keypoints`` the input's instances (K, 3) for pose. Returns its own numbers."""
        from controlstack.evaluation.metrics import edge_f1, edges  # local: heavy, only this path needs it
        from controlstack.evaluation.mi import total_variation  # local: heavy, only this path needs it

        generated, condition = np.asarray(generated), np.asarray(condition)
        require(generated.shape[:2] == condition.shape[:2],
                f"generated image {generated.shape[:2]} and condition {condition.shape[:2]} differ in size")
        self.tv.append(total_variation(generated))
        c, out = self.control, {}
        strict = self.protocol == "controlnet++"
        if c == "canny":
            found = edges(Image.fromarray(generated))
            out["f1" if strict else "edge_f1"] = (pixel_f1 if strict else edge_f1)(_gray(condition) > 127, found)
            return self._keep(out)

        task = PREDICTOR_TASK[c]
        pred = assets.run_predictor(self.predictor, generated, [task])[task]
        h, w = generated.shape[:2]
        if strict and c in ("softedge", "hed", "scribble"):
            out["ssim"] = ssim(pred[0].clip(0, 1), _gray(condition) / 255.0)
        elif strict and c == "depth":
            out["rmse_255"] = rmse_255(pred[0].astype(np.float64), _gray(condition))
        elif c in ("softedge", "hed"):
            out["edge_f1"] = edge_f1(_gray(condition) > 127, pred[0] > 0.5)
        elif c == "scribble":
            from controlstack.annotators.edges import (  # local: heavy, only this path needs it
                strokes_from_soft_edge,
            )

            out["edge_f1"] = edge_f1(_gray(condition) > 127, strokes_from_soft_edge(pred[0], 0.5, 3) > 127)
        elif c == "depth":
            out["depth_rmse"], out["depth_absrel"] = depth_rmse_absrel(pred[0].astype(np.float64),
                                                                       _gray(condition).astype(np.float64) / 255)
        elif c == "normal":
            out["normal_angle"] = M.angular_error(pred, condition[..., :3].astype(np.float64).transpose(2, 0, 1) / 127.5 - 1)
        elif c == "seg":
            from controlstack.models.predictor import N_CLASSES  # local: heavy, only this path needs it
            from controlstack.training.predictor import (  # local: heavy, only this path needs it
                seg_to_classes,
            )

            conf = M.confusion(pred.argmax(0), seg_to_classes(condition[..., :3]), N_CLASSES)
            self.conf = conf if self.conf is None else self.conf + conf
            out["seg_miou"] = M.mean_iou(conf)
        elif c == "pose":
            require(keypoints is not None, "pose fidelity needs the input's keypoints (OpenPose JSON)")
            found = assets.predictor_keypoints("pose", pred, w, h)
            hit, total = M.pck_counts(found, keypoints)
            self.pck[0] += hit
            self.pck[1] += total
            out["pose_pck"] = hit / total if total else float("nan")
        return self._keep(out)

    def _keep(self, out: dict) -> dict:
        for k, v in out.items():
            self.values[k].append(v)
        return out

    def result(self) -> dict[str, float]:
        """One number per metric over everything added, and the mean total variation ``tv``."""
        res = {k: float(np.nanmean(v)) if v and not np.all(np.isnan(v)) else float("nan")
               for k, v in self.values.items()}
        if self.control == "seg" and self.conf is not None:
            res["seg_miou"] = M.mean_iou(self.conf)
        if self.control == "pose" and self.pck[1]:
            res["pose_pck"] = self.pck[0] / self.pck[1]
        res["tv"] = float(np.mean(self.tv)) if self.tv else float("nan")
        return res
