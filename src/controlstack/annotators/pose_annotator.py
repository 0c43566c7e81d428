"""``pose``: OpenPose / AP-10K JSON -> the coloured stick-figure condition, with simple edits.

Without ``json`` the input image is taken to be an already-rendered pose map and is only validated
and resized (so ``--preprocess`` on a pose control is harmless). With ``json`` the skeletons in the
file are edited (mirror, then scale about the canvas centre, then move) and rendered at the input
image's size (after ``resolution``), or at the JSON canvas size when no image is given. Detecting a
pose *from a photograph* is the learned ``pose_estimate``. Rendering: :mod:`.pose`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from controlstack.annotators import pose as P
from controlstack.annotators.base import Annotator, param, to_condition
from controlstack.errors import ControlstackError
from controlstack.io.images import validate_image


@dataclass(kw_only=True)
class Pose(Annotator):
    NAME = "pose"
    json: str | None = param(None, "OpenPose / sd-webui editor JSON to render; none = image is a pose map")
    hands: bool = param(True, "draw hands (openpose_full); false = body only")
    face: bool = param(True, "draw face landmarks")
    mirror: bool = param(False, "flip horizontally, swapping left and right joints")
    scale: float = param(1.0, "scale skeletons about the canvas centre", lo=0.05, hi=20)
    move_x: float = param(0.0, "move skeletons right by this fraction of the canvas width", lo=-2, hi=2)
    move_y: float = param(0.0, "move skeletons down by this fraction of the canvas height", lo=-2, hi=2)
    #: a pose given as data instead of a file named by ``json`` (the server's content-only input); not a parameter
    pose_data: P.PoseData | None = None

    def edited(self) -> P.PoseData:
        """The pose (``pose_data``, else the JSON file's) after this annotator's edits, on its own canvas."""
        pose = self.pose_data if self.pose_data is not None else P.read_openpose_json(self.json)
        if self.mirror:
            pose = P.mirror(pose)
        if self.scale != 1.0:
            pose = P.scale(pose, self.scale)
        if self.move_x or self.move_y:
            pose = P.move(pose, self.move_x * pose.width, self.move_y * pose.height)
        return pose

    def __call__(self, image=None) -> Image.Image:
        if self.json is None and self.pose_data is None:
            if image is None:
                raise_missing()
            rgb = self.prepare(image)
            if looks_like_photo(rgb):
                raise ControlstackError("pose: the image looks like a photograph, not a pose map (stick figures on "
                                        "black); use pose_estimate to detect skeletons in a photo, or pass json=")
            return to_condition(rgb)
        pose = self.edited()
        size = validate_image(image).size if image is not None else (pose.width, pose.height)
        w, h = self.target_size(size)
        return to_condition(P.render(pose, w, h, hands=self.hands, face=self.face))

    def detect(self, rgb: np.ndarray) -> np.ndarray:  # a pose map passes through
        return rgb


def raise_missing() -> None:
    raise ControlstackError("pose: nothing to render; pass json=POSE.json, or an already-rendered pose image")


def looks_like_photo(rgb: np.ndarray, black: int = 16, share: float = 0.5) -> bool:
    """A rendered pose map is mostly black background; a photograph is not."""
    return float((rgb.max(-1) <= black).mean()) < share
