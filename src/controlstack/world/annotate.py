"""Condition images from the G-buffer, in the encodings ControlNet's annotators produce.

* depth: MiDaS-style relative inverse depth (ControlNet's ``annotator/midas``): ``1/z``
  normalised per image by its maximum, so near is bright and the sky is 0; 8-bit grey.
* normal: camera-space unit normals (OpenGL axes: X right, Y up, Z to the viewer) mapped
  ``(n + 1) / 2 * 255`` to RGB; sky = facing the camera ``(128, 128, 255)``.
* seg: semantic ids coloured with ``palette.PALETTE`` (ADE20K colours where ADE20K has the class).
* softedge: HED-like soft boundaries (Xie & Tu, "Holistically-nested edge detection", ICCV
  2015 -- ControlNet's softedge/HED condition), here *exact*: instance boundaries (1.0), depth
  jumps inside an entity and normal creases (graded by size), Gaussian-blurred, 8-bit grey.
* canny: ``cv2.Canny`` of the rendered image with ControlNet's default thresholds (100, 200).
* scribble: boundaries warped by a smooth random displacement field and dilated, white on
  black, like ControlNet's synthesised scribbles (HED boundaries + random morphology).
* pose: OpenPose's stick figures as drawn by ControlNet 1.1 (``annotator/openpose/util.py``
  ``draw_bodypose``: limb ellipses at 60 % colour, then keypoint discs, on black), widths scaled
  from the 512-pixel originals; AP-10K animals drawn the same way with the same colour cycle.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from controlstack.world import camera, palette

CANNY_LOW, CANNY_HIGH = 100, 200

# OpenPose COCO-18 limbs (0-based, ControlNet's limbSeq without the two ear-shoulder links) and
# the 18 colours (RGB) drawn for limbs and keypoints.
OPENPOSE_LIMBS = (
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)
OPENPOSE_COLORS = (
    (255, 0, 0),
    (255, 85, 0),
    (255, 170, 0),
    (255, 255, 0),
    (170, 255, 0),
    (85, 255, 0),
    (0, 255, 0),
    (0, 255, 85),
    (0, 255, 170),
    (0, 255, 255),
    (0, 170, 255),
    (0, 85, 255),
    (0, 0, 255),
    (85, 0, 255),
    (170, 0, 255),
    (255, 0, 255),
    (255, 0, 170),
    (255, 0, 85),
)


def encode_depth(depth: np.ndarray) -> np.ndarray:
    """z-depth (inf = sky) -> uint8 relative inverse depth, near = 255, sky = 0."""
    with np.errstate(divide="ignore"):
        disp = np.where(np.isfinite(depth), 1.0 / depth, 0.0)
    top = disp.max()
    return np.round(disp * (255.0 / top)).astype(np.uint8) if top > 0 else np.zeros(depth.shape, np.uint8)


def camera_normals(normal_world: np.ndarray, sky: np.ndarray | None = None) -> np.ndarray:
    """World-frame normals (0 = sky) -> OpenGL camera frame, sky facing the camera.
    ``sky``: the sky mask if known (else: pixels whose normal is 0)."""
    cam = camera.to_camera(normal_world)
    cam[~normal_world.any(axis=-1) if sky is None else sky] = (0.0, 0.0, 1.0)
    return cam


def encode_normal(normal_world: np.ndarray, sky: np.ndarray | None = None) -> np.ndarray:
    """``(n + 1) / 2 * 255``, rounded and saturated (one OpenCV call)."""
    cam = camera_normals(normal_world, sky).astype(np.float32, copy=False)
    return cv2.convertScaleAbs(cam, alpha=127.5, beta=127.5)


def encode_seg(semantic: np.ndarray) -> np.ndarray:
    return palette.PALETTE[semantic]


def _neighbour_max(h: np.ndarray, v: np.ndarray, shape) -> np.ndarray:
    """Spread per-pair edge strengths (horizontal ``(H, W-1)``, vertical ``(H-1, W)``) onto both
    pixels of each pair."""
    out = np.zeros(shape, np.float32)
    np.maximum(out[:, 1:], h, out=out[:, 1:])
    np.maximum(out[:, :-1], h, out=out[:, :-1])
    np.maximum(out[1:, :], v, out=out[1:, :])
    np.maximum(out[:-1, :], v, out=out[:-1, :])
    return out


def boundaries(depth: np.ndarray, normal: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """Exact boundary strength in ``[0, 1]`` before blurring: instance edges 1.0, occlusions
    within an entity graded by relative depth jump, creases graded by normal angle."""
    logz = np.log(np.minimum(depth, 1e3).astype(np.float32))
    strengths = []
    for a, b in (
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
    ):
        ia, ib = instance[a], instance[b]
        inst = (ia != ib).astype(np.float32)
        same_entity = (ia == ib) & (ia >= 2)
        dz = np.abs(logz[a] - logz[b])
        dep = np.clip((dz - 0.04) / 0.15, 0.0, 1.0) * same_entity
        cos = np.einsum("ijk,ijk->ij", normal[a], normal[b])
        crease = np.clip((1.0 - cos - 0.06) / 0.44, 0.0, 1.0) * ((ia == ib) & (ia >= 1))
        strengths.append(np.maximum(inst, np.maximum(0.8 * dep, 0.7 * crease)))
    return _neighbour_max(strengths[0], strengths[1], depth.shape)


def softedge(edges: np.ndarray) -> np.ndarray:
    """Blurred boundaries -> uint8; a line's centre stays near 255, its flanks fade."""
    size = edges.shape[0]
    sigma = 0.8 * max(size / 128.0, 0.6)
    soft = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    return np.round(np.clip(soft * 1.5, 0.0, 1.0) * 255).astype(np.uint8)


def canny(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.Canny(gray, CANNY_LOW, CANNY_HIGH)


def scribble(edges: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Strong boundaries, jittered by a smooth random warp and thickened: a user's scribble."""
    size = edges.shape[0]
    strokes = (edges > 0.5).astype(np.uint8) * 255
    amp = size / 64.0
    field = rng.standard_normal((2, 5, 5)).astype(np.float32) * amp
    grid = np.arange(size, dtype=np.float32)
    dx = cv2.resize(field[0], (size, size), interpolation=cv2.INTER_CUBIC)
    dy = cv2.resize(field[1], (size, size), interpolation=cv2.INTER_CUBIC)
    warped = cv2.remap(
        strokes,
        grid[None, :] + dx,
        grid[:, None] + dy,
        cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    k = 2 * max(1, size // 128) + 1
    return cv2.dilate(warped, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))


def _draw_skeleton(canvas: np.ndarray, kps: np.ndarray, limbs, stick: int, radius: int) -> None:
    """``kps``: ``(K, 3)`` pixel x, y and confidence (0 = absent)."""
    for (i, j), color in zip(limbs, OPENPOSE_COLORS * 2):
        if kps[i, 2] <= 0 or kps[j, 2] <= 0:
            continue
        (x0, y0), (x1, y1) = kps[i, :2], kps[j, :2]
        length = math.hypot(x1 - x0, y1 - y0)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        poly = cv2.ellipse2Poly(
            (int((x0 + x1) / 2), int((y0 + y1) / 2)), (int(length / 2), stick), int(angle), 0, 360, 1
        )
        cv2.fillConvexPoly(canvas, poly, [int(c * 0.6) for c in color])
    for k, color in zip(range(len(kps)), OPENPOSE_COLORS * 2):
        if kps[k, 2] > 0:
            cv2.circle(canvas, (int(kps[k, 0]), int(kps[k, 1])), radius, color, thickness=-1)


def draw_pose(size: int, people: list[np.ndarray], animals: list[np.ndarray], animal_limbs) -> np.ndarray:
    """Stick figures on black: ``people`` ``(18, 3)`` OpenPose arrays, ``animals`` ``(17, 3)``."""
    canvas = np.zeros((size, size, 3), np.uint8)
    stick = max(1, round(4 * size / 512))
    radius = max(1, round(4 * size / 512))
    for kps in people:
        _draw_skeleton(canvas, kps, OPENPOSE_LIMBS, stick, radius)
    for kps in animals:
        _draw_skeleton(canvas, kps, animal_limbs, stick, radius)
    return canvas
