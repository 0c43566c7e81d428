"""Sun shadows on the ground, rasterised instead of ray traced.

The ground plane is where most shadow rays start, and a convex occluder's shadow on a plane is the
convex hull of its points projected along the sun direction (a parallel projection maps convex
sets to convex sets, and so does the camera's perspective for points in front of it). So each
occluder is split into convex pieces -- a figure's capsules, a box, a cylinder, a cone, a sphere,
a torus as a ring of capsules -- whose silhouette points are slid down the sun direction onto
``y = 0``, projected to the screen and filled with ``cv2.fillConvexPoly`` (sub-pixel, 4 fraction
bits) at 4x resolution, then area-averaged and thresholded at one half (so a pixel is shadowed
when its centre region mostly is). Round outlines use equal-area 16-gons. Shadows only shade the image (no ground-truth
column depends on them); ``tests/world`` checks that this agrees with exact shadow rays on more
than 99 % of ground pixels. Entity surfaces still get exact shadow rays (``raytrace._shadows``).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from controlstack.world import camera
from controlstack.world.primitives import BOX, CAPSULE, CONE, CYLINDER, SPHERE, TORUS

N_ROUND = 16
_ANG = 2 * np.pi * np.arange(N_ROUND) / N_ROUND
_COS, _SIN = np.cos(_ANG), np.sin(_ANG)
# Equal-area 16-gon: neither inside nor outside the circle on average.
_OUT = math.sqrt((2 * math.pi / N_ROUND) / math.sin(2 * math.pi / N_ROUND))
NEAR_Z = 1.0  # world z below which ground points are clipped (the camera sits at z = 0)
SHIFT = 4
SUPERSAMPLE = 4  # fillConvexPoly paints every pixel an edge touches: fill finer, keep majority


def _sun_frame(sun: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e1 = np.cross(sun, [0.0, 0.0, 1.0] if abs(sun[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(sun, e1)


def _capsule_points(a: np.ndarray, b: np.ndarray, r: np.ndarray, sun: np.ndarray) -> np.ndarray:
    """``(K, 2 N_ROUND, 3)``: for each capsule, the two end circles orthogonal to the sun (their
    hull's shadow is the capsule's shadow)."""
    e1, e2 = _sun_frame(sun)
    ring = (_COS[:, None] * e1 + _SIN[:, None] * e2) * _OUT  # (N, 3)
    rr = r[:, None, None] * ring
    return np.concatenate([a[:, None, :] + rr, b[:, None, :] + rr], axis=1)


def _local_circle(radius: float, y: float) -> np.ndarray:
    return np.stack([radius * _OUT * _COS, np.full(N_ROUND, y), radius * _OUT * _SIN], axis=1)


def pieces(prims, sun: np.ndarray) -> list[np.ndarray]:
    """Convex pieces of all primitives, each as world points whose hull is the piece."""
    caps = [p for p in prims if p.kind in (CAPSULE, SPHERE)]
    out: list[np.ndarray] = []
    if caps:
        a = np.array([p.origin for p in caps])
        b = np.array([p.end if p.end is not None else p.origin for p in caps])
        out.extend(_capsule_points(a, b, np.array([p.size[0] for p in caps]), sun))
    for p in prims:
        if p.kind == BOX:
            local = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * p.size
        elif p.kind == CYLINDER:
            local = np.concatenate([_local_circle(p.size[0], 0.0), _local_circle(p.size[0], p.size[1])])
        elif p.kind == CONE:
            local = np.concatenate([_local_circle(p.size[0], 0.0), [[0.0, p.size[1], 0.0]]])
        elif p.kind == TORUS:
            big, small = p.size
            ring = (
                np.stack([big * _OUT * _COS, np.zeros(N_ROUND), big * _OUT * _SIN], axis=1) @ p.rot + p.origin
            )
            out.extend(_capsule_points(ring, np.roll(ring, -1, axis=0), np.full(N_ROUND, small), sun))
            continue
        else:
            continue
        out.append(local @ p.rot + p.origin)
    return out


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Clip a convex polygon on the ground (ordered ``(n, 2)`` xz points) to ``z >= NEAR_Z``
    (Sutherland-Hodgman against one edge)."""
    out = []
    n = len(poly)
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        p_in, q_in = p[1] >= NEAR_Z, q[1] >= NEAR_Z
        if p_in:
            out.append(p)
        if p_in != q_in:
            out.append(p + (NEAR_Z - p[1]) / (q[1] - p[1]) * (q - p))
    return np.array(out).reshape(-1, 2)


def ground_shadow(prims, sun: np.ndarray, size: int) -> np.ndarray:
    """Flat boolean ``(size * size,)`` mask of pixels whose ground point is in shadow (pixels that
    do not show the ground may be set too; callers mask them)."""
    fine = size * SUPERSAMPLE
    mask = np.zeros((fine, fine), np.uint8)
    parts = pieces(prims, sun)
    if not parts:
        return np.zeros(size * size, bool)
    counts = [len(p) for p in parts]
    pts = np.concatenate(parts)
    ground = pts - (pts[:, 1] / sun[1])[:, None] * sun  # slide along -sun down to y = 0
    uv, _ = camera.project(ground, size)

    def to_fixed(uv):  # OpenCV puts pixel centres on integers, ours are at +0.5
        return np.round((uv * SUPERSAMPLE - 0.5) * (1 << SHIFT)).astype(np.int32)

    fixed = to_fixed(uv)
    start = 0
    for n in counts:
        sl = slice(start, start + n)
        start += n
        if ground[sl, 2].min() >= NEAR_Z:
            hull = cv2.convexHull(fixed[sl])
        else:  # part of the shadow falls behind the camera: clip on the ground first
            xz = ground[sl][:, [0, 2]].astype(np.float32)
            poly = _clip_near(cv2.convexHull(xz).reshape(-1, 2).astype(float))
            if len(poly) < 3:
                continue
            g3 = np.stack([poly[:, 0], np.zeros(len(poly)), poly[:, 1]], axis=1)
            hull = to_fixed(camera.project(g3, size)[0])
        cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_8, shift=SHIFT)
    return (cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA) > 127).ravel()
