"""Learned annotators (depth, normals, segmentation, pose from a photograph): interface only, for now.

Their default weights will be the project's own multi-task dense predictor (OmniControlNet's
stage 1: one network for depth, HED, scribble and animal pose); until it ships, each needs either

* ``weights=DIR`` -- a local folder of controlnet_aux / lllyasviel "Annotators" checkpoints, used
  through :mod:`.aux` (controlnet_aux is imported lazily, only then, and never downloads), or
* ``loader=`` (Python API) -- a callable ``loader(weights) -> predict`` where
  ``predict(rgb uint8 HxWx3) -> HxW / HxWx3 array or PIL image``: how the project's predictor (or a
  user's own network) plugs in. Annotators never import ``controlstack.models``.

Without either: one line saying what to pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from controlstack.annotators.base import Annotator, param, to_condition
from controlstack.errors import ControlstackError


@dataclass(kw_only=True)
class LearnedAnnotator(Annotator):
    LEARNED = True
    DETECTOR = ""  # controlnet_aux class used with weights=DIR

    weights: str | None = param(None, "local weights folder (controlnet_aux Annotators layout); "
                                      "never downloaded")
    detector: str = param("", "controlnet_aux detector class; empty = the default for this task")
    loader: Callable[[Any], Callable] | None = None  # Python API only (not a CLI parameter)

    def check(self) -> None:
        if self.weights is not None and self.loader is None and not Path(self.weights).is_dir():
            raise ControlstackError(f"{self.NAME}: weights folder '{self.weights}' does not exist; pass a "
                                    "local folder of annotator checkpoints")
        self._predict: Callable | None = None

    def predictor(self) -> Callable:
        if self._predict is not None:
            return self._predict
        if self.loader is not None:
            self._predict = self.loader(self.weights)
        elif self.weights is not None:
            from controlstack.annotators.aux import load_detector

            self._predict = load_detector(self.detector or self.DETECTOR, self.weights, self.NAME)
        else:
            raise ControlstackError(
                f"{self.NAME} is a learned annotator and the project's multi-task predictor weights are not "
                f"available yet; pass weights=DIR (a local controlnet_aux Annotators folder) or a loader")
        return self._predict

    def __call__(self, image) -> Image.Image:
        predict = self.predictor()  # fail on missing weights before touching the image
        rgb = self.prepare(image)
        out = predict(rgb)
        if isinstance(out, Image.Image):
            out = np.asarray(out.convert("RGB"))
        out = np.asarray(out)
        if out.shape[:2] != rgb.shape[:2]:
            out = np.asarray(to_condition(out).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.BICUBIC))
        return to_condition(out)


@dataclass(kw_only=True)
class Depth(LearnedAnnotator):
    NAME = "depth"
    DETECTOR = "MidasDetector"


@dataclass(kw_only=True)
class NormalEstimate(LearnedAnnotator):
    NAME = "normal_estimate"
    DETECTOR = "NormalBaeDetector"


@dataclass(kw_only=True)
class SegEstimate(LearnedAnnotator):
    NAME = "seg_estimate"
    DETECTOR = ""  # controlnet_aux has no ADE20K segmenter; pass detector= (e.g. SamDetector) or loader


@dataclass(kw_only=True)
class PoseEstimate(LearnedAnnotator):
    NAME = "pose_estimate"
    DETECTOR = "OpenposeDetector"
