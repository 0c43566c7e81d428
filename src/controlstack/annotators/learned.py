"""Learned annotators (depth, soft edge, normals, segmentation, pose from a photograph), offline.

By default they run the project's own multi-task dense predictor (OmniControlNet's stage 1,
``models/predictor.py``), bundled in ``assets/bundle/predictor`` and trained on the procedural
world: one network, one backbone pass per image, whatever the task. A user's own weights still
override it:

* ``weights=DIR`` -- a predictor folder (``config.json`` of a ``MultiTaskPredictor``, e.g. one
  trained with ``controlstack train predictor``), or a local folder of controlnet_aux / lllyasviel
  "Annotators" checkpoints, used through :mod:`.aux` (controlnet_aux is imported lazily, only then,
  and never downloads);
* ``loader=`` (Python API) -- a callable ``loader(weights) -> predict`` where
  ``predict(rgb uint8 HxWx3) -> HxW / HxWx3 array or PIL image``.

**Photographs**: the bundled predictor saw only the world's 128-px renders, so on a photograph it
answers with the world's priors -- depth and seg a sky / ground split, hed a blurry depth-like map,
scribble_hed a random net, normals mush -- and is reliable on world scenes only. On photos use real
weights or a classical annotator (``annotators.ON_PHOTOS``); ``pose_estimate`` gates its skeletons
on the predictor's confidence, so a photo where it finds no one gets an empty map.

Annotators never import ``controlstack.models`` at module level: the predictor is reached through
``controlstack.assets`` when an annotator first runs.

Conventions: ``depth`` is near = bright (what depth ControlNets expect); ``hed`` a soft edge
probability; ``scribble_hed`` the paper's user scribble made from it (threshold, thin, dilate:
the ``scribble`` annotator's strokes); ``normal_estimate`` RGB = (n + 1) / 2; ``seg_estimate``
the world palette (ADE20K colours where ADE20K has the class); ``pose_estimate`` OpenPose-18
people and AP-10K animals, drawn as the ``pose`` annotator draws them (:meth:`PoseEstimate.estimate`
gives the JSON).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from controlstack import assets
from controlstack.annotators.aux import load_detector
from controlstack.annotators.base import Annotator, param, to_condition
from controlstack.errors import ControlstackError


def is_predictor_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("_class_name") == "MultiTaskPredictor"
    except (OSError, json.JSONDecodeError):
        return False


@dataclass(kw_only=True)
class LearnedAnnotator(Annotator):
    LEARNED = True
    DETECTOR = ""  # controlnet_aux class used with weights=DIR
    TASK = ""      # the multi-task predictor's task

    weights: str | None = param(None, "weights folder: a MultiTaskPredictor folder or a controlnet_aux "
                                      "Annotators folder (real annotator weights: what photographs need); "
                                      "none = the bundled predictor (trained on world scenes); never downloaded")
    detector: str = param("", "controlnet_aux detector class; empty = the default for this task")
    loader: Callable[[Any], Callable] | None = None  # Python API only (not a CLI parameter)

    def check(self) -> None:
        if self.weights is not None and self.loader is None and not Path(self.weights).is_dir():
            raise ControlstackError(f"{self.NAME}: weights folder '{self.weights}' does not exist; pass a "
                                    "local folder of annotator checkpoints")
        self._predict: Callable | None = None

    def predictor_folder(self) -> Path | None:
        """The MultiTaskPredictor this annotator runs (None: a loader or controlnet_aux weights)."""
        if self.loader is not None:
            return None
        if self.weights is not None:
            return Path(self.weights) if is_predictor_folder(self.weights) else None

        folder = assets.predictor_folder()
        if folder is None:
            raise ControlstackError(
                f"{self.NAME} is a learned annotator and this checkout has no bundled predictor "
                "(assets/bundle/predictor); pass weights=DIR (a predictor or controlnet_aux folder) or a loader")
        return folder

    def predictor(self) -> Callable:
        if self._predict is not None:
            return self._predict
        folder = self.predictor_folder()
        if folder is not None:
            model = assets.load_predictor(folder)
            self._predict = lambda rgb: self.from_outputs(assets.run_predictor(model, rgb, (self.TASK,)), rgb)
        elif self.loader is not None:
            self._predict = self.loader(self.weights)
        else:
            if not (self.detector or self.DETECTOR):
                raise ControlstackError(f"{self.NAME}: controlnet_aux has no default detector for this task; "
                                        "pass detector=CLASS, or a predictor folder as weights")
            self._predict = load_detector(self.detector or self.DETECTOR, self.weights, self.NAME)
        return self._predict

    def from_outputs(self, outputs: dict, rgb: np.ndarray) -> np.ndarray:
        """The predictor's activated outputs -> this annotator's condition array."""
        return assets.predictor_condition(self.TASK, outputs[self.TASK])

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
    TASK = "depth"


@dataclass(kw_only=True)
class Hed(LearnedAnnotator):
    NAME = "hed"
    DETECTOR = "HEDdetector"
    TASK = "hed"


@dataclass(kw_only=True)
class ScribbleHed(LearnedAnnotator):
    """OmniControlNet's user scribble: the learned soft edge, thresholded, thinned and dilated."""

    NAME = "scribble_hed"
    DETECTOR = "HEDdetector"
    TASK = "hed"
    threshold: float = param(0.5, "soft-edge level that counts as a boundary", lo=0.01, hi=0.99)
    width: int = param(3, "stroke width (px)", lo=1, hi=32)

    def from_outputs(self, outputs: dict, rgb: np.ndarray) -> np.ndarray:
        from controlstack.annotators.edges import (  # local: heavy, only this path needs it
            strokes_from_soft_edge,
        )

        return strokes_from_soft_edge(outputs["hed"][0], self.threshold, self.width)


@dataclass(kw_only=True)
class NormalEstimate(LearnedAnnotator):
    NAME = "normal_estimate"
    DETECTOR = "NormalBaeDetector"
    TASK = "normal"


@dataclass(kw_only=True)
class SegEstimate(LearnedAnnotator):
    NAME = "seg_estimate"
    DETECTOR = ""  # controlnet_aux has no ADE20K segmenter; pass detector= (e.g. SamDetector) or loader
    TASK = "seg"


#: Default instance-confidence gates of ``pose_estimate`` (the centre heatmap's peak: an instance's
#: detection score, CenterNet-style; ``models.predictor.decode_keypoints``). The decode thresholds
#: were chosen for recall on world scenes; on photographs the bundled predictor (trained on 128-px
#: renders only) finds weak centres on cups, rockets and fur, which the decode alone turns into skeletons. Each value is
#: the first 0.01 step at least 0.01 above the strongest centre on skimage's astronaut, coffee,
#: chelsea and rocket (people 0.386, animals 0.276). Cost on 100 training scenes ([0, 19000 + i]):
#: people PCK@0.1 0.231 -> 0.222, keypoint precision 0.204 -> 0.227, 59 of 60 scenes with people
#: keep a skeleton; animals PCK 0.066 -> 0.043, precision 0.023 -> 0.037, 61 of 72 -- its animal
#: heatmaps are weak everywhere (docs/omni.md), so no value separates them cleanly.
PEOPLE_CONFIDENCE, ANIMAL_CONFIDENCE = 0.40, 0.29


@dataclass(kw_only=True)
class PoseEstimate(LearnedAnnotator):
    NAME = "pose_estimate"
    DETECTOR = "OpenposeDetector"
    TASK = "pose"
    people: bool = param(True, "detect people (OpenPose-18)")
    animals: bool = param(True, "detect animals (AP-10K, 17 points)")
    confidence: float = param(PEOPLE_CONFIDENCE, "draw a person only if the predictor's confidence (its instance-centre "
                                                 "peak) reaches this; 0 = every decoded one (default: measured on the "
                                                 "bundled predictor, docs/annotators.md; a multi-task predictor's "
                                                 "gate: OpenPose weights and a loader= ignore it)", lo=0, hi=1)
    animal_confidence: float = param(ANIMAL_CONFIDENCE, "the same for animals", lo=0, hi=1)

    def estimate(self, image):
        """The photo's skeletons as :class:`~controlstack.annotators.pose.PoseData` (pixels of the
        annotator's output size): ``to_openpose`` / ``write_openpose_json`` make the JSON."""
        from controlstack.annotators.pose import Person, PoseData  # local: heavy, only this path needs it

        folder = self.predictor_folder()
        if folder is None:
            raise ControlstackError(f"{self.NAME}: keypoint JSON needs the multi-task predictor (bundled or weights=DIR)")
        rgb = self.prepare(image)
        h, w = rgb.shape[:2]
        tasks = tuple(t for t, on in (("pose", self.people), ("animal_pose", self.animals)) if on)
        out = assets.run_predictor(assets.load_predictor(folder), rgb, tasks)
        gate = {"pose": self.confidence, "animal_pose": self.animal_confidence}
        found = {t: assets.predictor_keypoints(t, out[t], w, h, gate[t]) for t in tasks}
        return PoseData([Person(body=b) for b in found.get("pose", [])], found.get("animal_pose", []), w, h)

    def predictor(self) -> Callable:
        if self._predict is None and self.predictor_folder() is not None:
            from controlstack.annotators.pose import render  # local: heavy, only this path needs it

            self._predict = lambda rgb: render(self.estimate(rgb), hands=False, face=False)
        return super().predictor()
