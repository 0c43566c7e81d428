"""Pose data: OpenPose JSON (body-18 + hands + face) and AP-10K animals; stick-figure rendering; edits.

numpy + OpenCV only (no torch), so the world generator can import it in a dataloader worker.

Keypoints are float arrays of shape (N, 3): x, y in pixels of the pose's canvas, and a confidence;
confidence 0 means "missing" (OpenPose writes missing points as 0, 0, 0).

* People: ``Person.body`` (18, 3) in OpenPose's COCO-18 order (:data:`BODY_18`), optional
  ``left_hand`` / ``right_hand`` (21, 3) and ``face`` (70, 3: 68 iBUG landmarks + 2 pupils).
* Animals: (17, 3) in AP-10K order (:data:`AP10K`; Yu et al. 2021).

File format: the JSON sd-webui-controlnet's pose editor exports (``encode_poses_as_dict``)::

    {"people": [{"pose_keypoints_2d": [x, y, c, ...], "hand_left_keypoints_2d": [...] | null,
                 "hand_right_keypoints_2d": ..., "face_keypoints_2d": ...}],
     "animals": [[x, y, c, ...], ...], "canvas_width": W, "canvas_height": H}

Unknown keys are kept, so reading then writing gives back the same JSON.

Rendering reproduces controlnet_aux / sd-webui-controlnet's ``draw_bodypose`` / ``draw_handpose`` /
``draw_facepose`` / ``draw_animalpose`` (``open_pose/util.py``): 17 limbs as filled ellipses of half
width 4 in 0.6 x the limb colour, 18 joint circles of radius 4 in full colour, hand bones 2 px wide in
HSV-rainbow colours with blue joints (radius 4), face landmarks as white dots (radius 3), animal
limbs as 5 px lines. Sizes are in pixels, as there; pass ``stick_width`` etc. to scale them.
"""

from __future__ import annotations

import colorsys
import copy
import json
import math
import os
from dataclasses import dataclass, field

import cv2
import numpy as np

from controlstack.errors import ControlstackError

BODY_18 = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
           "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
           "right_eye", "left_eye", "right_ear", "left_ear")
# OpenPose limbs, 1-based as in the reference code
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
         (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
HAND_COLORS = tuple(tuple(c * 255.0 for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
                    for i in range(len(HAND_EDGES)))

AP10K = ("left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow",
         "left_front_paw", "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee",
         "left_back_paw", "right_hip", "right_knee", "right_back_paw")
ANIMAL_LIMBS = ((1, 2), (2, 3), (1, 3), (3, 4), (4, 9), (9, 10), (10, 11), (4, 6), (6, 7), (7, 8), (4, 5),
                (5, 15), (15, 16), (16, 17), (5, 12), (12, 13), (13, 14))
ANIMAL_COLORS = ((255, 255, 255), (100, 255, 100), (150, 255, 255), (100, 50, 255), (50, 150, 200),
                 (0, 255, 255), (0, 150, 0), (0, 0, 255), (0, 0, 150), (255, 50, 255), (255, 0, 255),
                 (255, 0, 0), (150, 0, 0), (255, 255, 100), (0, 150, 0), (255, 255, 0), (150, 150, 150))

# Mirror permutations: index i takes the point that was at SWAP[i] (left <-> right).
BODY_SWAP = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)
AP10K_SWAP = (1, 0, 2, 3, 4, 8, 9, 10, 5, 6, 7, 14, 15, 16, 11, 12, 13)
_FACE_PAIRS = ([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)]
               + [(31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
                  (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67), (68, 69)])
FACE_SWAP = list(range(70))
for _a, _b in _FACE_PAIRS:
    FACE_SWAP[_a], FACE_SWAP[_b] = _b, _a
FACE_SWAP = tuple(FACE_SWAP)

_PART_KEYS = {"body": "pose_keypoints_2d", "left_hand": "hand_left_keypoints_2d",
              "right_hand": "hand_right_keypoints_2d", "face": "face_keypoints_2d"}
_PART_SIZES = {"body": 18, "left_hand": 21, "right_hand": 21, "face": 70}


@dataclass
class Person:
    body: np.ndarray
    left_hand: np.ndarray | None = None
    right_hand: np.ndarray | None = None
    face: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # other keys of the person's JSON object, kept as-is

    def parts(self):
        return {k: getattr(self, k) for k in _PART_KEYS}


@dataclass
class PoseData:
    people: list[Person]
    animals: list[np.ndarray]
    width: int
    height: int
    extra: dict = field(default_factory=dict)  # other top-level keys, kept as-is


# ---------------------------------------------------------------------------------------- JSON
def _points(values, n: int | None, where: str) -> np.ndarray | None:
    if values is None:
        return None
    if not isinstance(values, list) or len(values) % 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ControlstackError(f"pose JSON: {where} must be a flat list of x, y, confidence numbers")
    a = np.asarray(values, dtype=np.float64).reshape(-1, 3)
    if n is not None and len(a) not in (0, n):
        raise ControlstackError(f"pose JSON: {where} has {len(a)} points; expected {n}")
    if not np.isfinite(a).all():
        raise ControlstackError(f"pose JSON: {where} contains NaN or infinite values")
    return a


def parse_openpose(data: dict) -> PoseData:
    """A parsed OpenPose / sd-webui editor JSON object -> :class:`PoseData` (validated)."""
    if not isinstance(data, dict):
        raise ControlstackError("pose JSON must be an object with 'people' and canvas_width/canvas_height")
    try:
        width, height = int(data["canvas_width"]), int(data["canvas_height"])
    except (KeyError, TypeError, ValueError):
        raise ControlstackError("pose JSON needs integer 'canvas_width' and 'canvas_height'")
    if not (0 < width <= 16384 and 0 < height <= 16384):
        raise ControlstackError(f"pose JSON canvas {width}x{height} is invalid; use 1-16384 px per side")
    people = []
    for i, p in enumerate(data.get("people", [])):
        if not isinstance(p, dict):
            raise ControlstackError(f"pose JSON: people[{i}] must be an object")
        parts = {k: _points(p.get(key), _PART_SIZES[k], f"people[{i}].{key}") for k, key in _PART_KEYS.items()}
        if parts["body"] is None:
            parts["body"] = np.zeros((0, 3))
        extra = {k: v for k, v in p.items() if k not in _PART_KEYS.values()}
        people.append(Person(**parts, extra=extra))
    animals = [_points(a, 17, f"animals[{i}]") for i, a in enumerate(data.get("animals", []) or [])]
    extra = {k: v for k, v in data.items() if k not in ("people", "animals", "canvas_width", "canvas_height")}
    if "animals" in data and not data["animals"]:
        extra["animals"] = data["animals"]  # keep an explicit empty/null list as it was
    return PoseData(people, animals, width, height, extra)


def to_openpose(pose: PoseData) -> dict:
    """:class:`PoseData` -> JSON-ready dict in the editor's format."""
    def flat(a):
        return None if a is None else [float(v) for v in np.asarray(a, np.float64).reshape(-1)]

    people = []
    for p in pose.people:
        d = dict(p.extra)
        for k, key in _PART_KEYS.items():
            d[key] = flat(getattr(p, k))
        people.append(d)
    out = {"people": people}
    out.update({k: v for k, v in pose.extra.items() if k != "animals"})
    if pose.animals:
        out["animals"] = [flat(a) for a in pose.animals]
    elif "animals" in pose.extra:
        out["animals"] = pose.extra["animals"]
    out["canvas_width"] = int(pose.width)
    out["canvas_height"] = int(pose.height)
    return out


def read_openpose_json(path: str | os.PathLike) -> PoseData:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ControlstackError(f"pose JSON '{path}' does not exist; check the path")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlstackError(f"'{path}' is not valid JSON ({exc}); export the pose again")
    return parse_openpose(data)


def write_openpose_json(pose: PoseData, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_openpose(pose), fh)


def parse_ap10k_coco(annotations: list[dict], width: int, height: int) -> PoseData:
    """AP-10K's own COCO-style annotations (``keypoints``: x, y, visibility 0/1/2) -> animals.

    COCO visibility 0 = not labelled becomes confidence 0; 1 and 2 (labelled) become 1.
    """
    animals = []
    for i, ann in enumerate(annotations):
        a = _points(ann.get("keypoints") if isinstance(ann, dict) else None, 17, f"annotations[{i}].keypoints")
        if a is None:
            raise ControlstackError(f"AP-10K annotations[{i}] has no 'keypoints'")
        a = a.copy()
        a[:, 2] = (a[:, 2] > 0).astype(np.float64)
        animals.append(a)
    return PoseData([], animals, int(width), int(height))


# ---------------------------------------------------------------------------------------- edits
def _map_points(pose: PoseData, fn) -> PoseData:
    """Apply fn(points (N,3) -> (N,3)) to every present point set; missing points stay (0, 0, 0)."""
    out = copy.deepcopy(pose)

    def go(a):
        if a is None or len(a) == 0:
            return a
        b = fn(np.asarray(a, np.float64).copy())
        b[a[:, 2] <= 0, :2] = a[a[:, 2] <= 0, :2]
        return b

    for p in out.people:
        for k in _PART_KEYS:
            setattr(p, k, go(getattr(p, k)))
    out.animals = [go(a) for a in out.animals]
    return out


def move(pose: PoseData, dx: float, dy: float) -> PoseData:
    """Translate every skeleton by (dx, dy) pixels."""
    def fn(a):
        a[:, 0] += dx
        a[:, 1] += dy
        return a
    return _map_points(pose, fn)


def scale(pose: PoseData, factor: float, center: tuple[float, float] | None = None) -> PoseData:
    """Scale every skeleton about ``center`` (default: the canvas centre)."""
    if not (factor > 0 and math.isfinite(factor)):
        raise ControlstackError(f"pose scale must be a positive number, got {factor}")
    cx, cy = center if center is not None else ((pose.width - 1) / 2.0, (pose.height - 1) / 2.0)

    def fn(a):
        a[:, 0] = cx + (a[:, 0] - cx) * factor
        a[:, 1] = cy + (a[:, 1] - cy) * factor
        return a
    return _map_points(pose, fn)


def mirror(pose: PoseData) -> PoseData:
    """Flip horizontally (x -> W - 1 - x) and swap left/right joints, hands and face landmarks."""
    w = pose.width

    def fn(a):
        a[:, 0] = (w - 1) - a[:, 0]
        return a
    out = _map_points(pose, fn)
    for p in out.people:
        if len(p.body) == 18:
            p.body = p.body[list(BODY_SWAP)]
        if p.face is not None and len(p.face) == 70:
            p.face = p.face[list(FACE_SWAP)]
        p.left_hand, p.right_hand = p.right_hand, p.left_hand
    out.animals = [a[list(AP10K_SWAP)] if len(a) == 17 else a for a in out.animals]
    return out


def resize(pose: PoseData, width: int, height: int) -> PoseData:
    """The same pose on a ``width`` x ``height`` canvas (coordinates scaled per axis)."""
    sx, sy = width / pose.width, height / pose.height

    def fn(a):
        a[:, 0] *= sx
        a[:, 1] *= sy
        return a
    out = _map_points(pose, fn)
    out.width, out.height = int(width), int(height)
    return out


# ---------------------------------------------------------------------------------------- render
def _canvas(width: int, height: int, canvas: np.ndarray | None) -> np.ndarray:
    if canvas is not None:
        return canvas
    return np.zeros((int(height), int(width), 3), np.uint8)


def _draw_body(canvas: np.ndarray, body: np.ndarray, stick_width: int, joint_radius: int) -> None:
    present = body[:, 2] > 0
    for (i, j), color in zip(LIMBS, COLORS):
        a, b = i - 1, j - 1
        if not (present[a] and present[b]):
            continue
        # the reference's (X, Y) are (rows, cols): keep its exact arithmetic for identical pixels
        ys = np.array([body[a, 0], body[b, 0]])
        xs = np.array([body[a, 1], body[b, 1]])
        m_x, m_y = np.mean(xs), np.mean(ys)
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(xs[0] - xs[1], ys[0] - ys[1]))
        poly = cv2.ellipse2Poly((int(m_y), int(m_x)), (int(length / 2), stick_width), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, [int(float(c) * 0.6) for c in color])
    for k, color in zip(range(len(body)), COLORS):
        if present[k]:
            cv2.circle(canvas, (int(body[k, 0]), int(body[k, 1])), joint_radius, color, thickness=-1)


def _draw_hand(canvas: np.ndarray, hand: np.ndarray, width: int, radius: int) -> None:
    present = hand[:, 2] > 0
    for (i, j), color in zip(HAND_EDGES, HAND_COLORS):
        if present[i] and present[j]:
            cv2.line(canvas, (int(hand[i, 0]), int(hand[i, 1])), (int(hand[j, 0]), int(hand[j, 1])), color,
                     thickness=width)
    for k in np.nonzero(present)[0]:
        cv2.circle(canvas, (int(hand[k, 0]), int(hand[k, 1])), radius, (0, 0, 255), thickness=-1)


def _draw_face(canvas: np.ndarray, face: np.ndarray, radius: int) -> None:
    for k in np.nonzero(face[:, 2] > 0)[0]:
        cv2.circle(canvas, (int(face[k, 0]), int(face[k, 1])), radius, (255, 255, 255), thickness=-1)


def render_openpose(people, width: int, height: int, *, hands: bool = True, face: bool = True,
                    stick_width: int = 4, joint_radius: int = 4, canvas: np.ndarray | None = None) -> np.ndarray:
    """Stick figures on black: ``people`` is a list of (18, 3) body arrays or :class:`Person` objects,
    in pixels of the ``width`` x ``height`` canvas. Returns uint8 (height, width, 3) RGB."""
    out = _canvas(width, height, canvas)
    for p in people:
        person = p if isinstance(p, Person) else Person(np.asarray(p, np.float64))
        if len(person.body):
            _draw_body(out, np.asarray(person.body, np.float64), stick_width, joint_radius)
        if hands:
            for hand in (person.left_hand, person.right_hand):
                if hand is not None and len(hand):
                    _draw_hand(out, np.asarray(hand, np.float64), max(1, stick_width // 2), joint_radius)
        if face and person.face is not None and len(person.face):
            _draw_face(out, np.asarray(person.face, np.float64), max(1, joint_radius - 1))
    return out


def render_animal(animals, width: int, height: int, *, line_width: int = 5,
                  canvas: np.ndarray | None = None) -> np.ndarray:
    """AP-10K skeletons (list of (17, 3) arrays, pixels) as coloured lines on black, uint8 RGB."""
    out = _canvas(width, height, canvas)
    for a in animals:
        a = np.asarray(a, np.float64)
        present = a[:, 2] > 0
        for (i, j), color in zip(ANIMAL_LIMBS, ANIMAL_COLORS):
            if present[i - 1] and present[j - 1]:
                cv2.line(out, (int(a[i - 1, 0]), int(a[i - 1, 1])), (int(a[j - 1, 0]), int(a[j - 1, 1])),
                         color, line_width)
    return out


def render(pose: PoseData, width: int | None = None, height: int | None = None, **kwargs) -> np.ndarray:
    """Render people then animals, rescaled to ``width`` x ``height`` (default: the pose's canvas)."""
    width, height = width or pose.width, height or pose.height
    if (width, height) != (pose.width, pose.height):
        pose = resize(pose, width, height)
    animal_kw = {k: kwargs.pop(k) for k in ("line_width",) if k in kwargs}
    out = render_openpose(pose.people, width, height, **kwargs)
    return render_animal(pose.animals, width, height, canvas=out, **animal_kw)
