"""The world's one fixed pinhole camera: ray directions, projection, camera-space frames.

World frame: X right, Y up, ground plane ``y = 0``; the camera sits at ``(0, HEIGHT, 0)`` and looks
along +Z, pitched ``PITCH_DEG`` down so the horizon crosses the upper third of the frame. Pixel
``(row i, col j)`` covers ``[j, j+1) x [i, i+1)`` in continuous image coordinates and its ray goes
through the pixel centre ``(j + 0.5, i + 0.5)`` (the same convention keypoints use).

Camera-space normals follow the OpenGL convention (X right, Y up, Z towards the viewer), so a
surface facing the camera encodes as bluish ``(128, 128, 255)``.

Because the camera never moves, the per-size ray table is computed once and cached: the renderer
only slices it (see :func:`rays`).
"""

from __future__ import annotations

import functools
import math

import numpy as np

HEIGHT = 1.5  # metres above the ground
PITCH_DEG = 12.0  # looking down
VFOV_DEG = 50.0  # vertical (= horizontal: square images) field of view

_P = math.radians(PITCH_DEG)
POSITION = np.array([0.0, HEIGHT, 0.0])
FORWARD = np.array([0.0, -math.sin(_P), math.cos(_P)])
UP = np.array([0.0, math.cos(_P), math.sin(_P)])
RIGHT = np.array([1.0, 0.0, 0.0])
# Rows: world -> camera (right, up, forward) components.
BASIS = np.stack([RIGHT, UP, FORWARD])


def focal(size: int) -> float:
    """Focal length in pixels for a ``size x size`` image."""
    return 0.5 * size / math.tan(math.radians(VFOV_DEG) / 2)


@functools.lru_cache(maxsize=8)
def rays(size: int) -> np.ndarray:
    """Unit ray directions, ``(size, size, 3)`` float64, read-only (cached per size)."""
    f = focal(size)
    c = (np.arange(size) + 0.5 - size / 2) / f
    x = c[None, :, None]  # columns -> right
    y = -c[:, None, None]  # rows go down the image, camera up goes up
    d = FORWARD + x * RIGHT + y * UP
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    d.setflags(write=False)
    return d


@functools.lru_cache(maxsize=8)
def forward_cosine(size: int) -> np.ndarray:
    """``rays(size) . FORWARD``: converts ray distance ``t`` into z-depth (``z = t * cos``)."""
    cos = rays(size) @ FORWARD
    cos.setflags(write=False)
    return cos


def project(points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """World points ``(..., 3)`` -> (pixel coordinates ``(..., 2)`` as (x, y), z-depth ``(...)``)."""
    rel = (points - POSITION) @ BASIS.T
    z = rel[..., 2]
    f = focal(size)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = f * rel[..., 0] / z + size / 2
        v = -f * rel[..., 1] / z + size / 2
    return np.stack([u, v], axis=-1), z


_TO_GL = (BASIS * np.array([[1.0], [1.0], [-1.0]])).T  # world -> (right, up, -forward)


def to_camera(vectors: np.ndarray) -> np.ndarray:
    """World directions -> OpenGL camera space (X right, Y up, Z towards the viewer)."""
    return vectors @ _TO_GL.astype(vectors.dtype)
