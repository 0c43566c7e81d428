"""Surface appearance: procedural textures, sky, and Lambert shading with a sun and fog.

Textures are solid (3-D) functions of the surface point in the primitive's local frame, so they
stick to the object as it rotates: stripes (a square wave across one axis), checker (parity of the
integer lattice cell), speckle (value noise, Perlin's smoothstep-interpolated lattice noise from
"An image synthesizer", SIGGRAPH 1985), wood (rings around the local Y axis perturbed by noise, the
classic solid-texture example of the same paper) and spots (thresholded noise).

Lighting is Lambert's cosine law with one directional sun, an ambient term tinted by the sky and
a binary shadow factor from the renderer's shadow rays, then exponential-squared distance fog
towards the horizon colour (it also hides the ground texture's aliasing near the horizon).
"""

from __future__ import annotations

import functools

import numpy as np

from controlstack.world import camera, palette
from controlstack.world.scene import Material

_N = 16
# A fixed lattice: the noise pattern is part of the world's definition, not of a scene's seed.
_LATTICE = np.random.default_rng(20240501).random(_N**3)
FOG_DISTANCE = 50.0  # metres


def value_noise(p: np.ndarray) -> np.ndarray:
    """Smooth 3-D value noise in ``[0, 1]`` at points ``(N, 3)`` (period 16 per axis)."""
    fl = np.floor(p)
    f = p - fl
    i = fl.astype(np.int64) & (_N - 1)
    u = f * f * (3.0 - 2.0 * f)
    i1 = (i + 1) & (_N - 1)
    x0, y0, z0 = i[:, 0] * _N * _N, i[:, 1] * _N, i[:, 2]
    x1, y1, z1 = i1[:, 0] * _N * _N, i1[:, 1] * _N, i1[:, 2]
    g = _LATTICE
    ux, uy, uz = u[:, 0], u[:, 1], u[:, 2]
    c00 = g[x0 + y0 + z0] * (1 - ux) + g[x1 + y0 + z0] * ux
    c10 = g[x0 + y1 + z0] * (1 - ux) + g[x1 + y1 + z0] * ux
    c01 = g[x0 + y0 + z1] * (1 - ux) + g[x1 + y0 + z1] * ux
    c11 = g[x0 + y1 + z1] * (1 - ux) + g[x1 + y1 + z1] * ux
    return (c00 * (1 - uy) + c10 * uy) * (1 - uz) + (c01 * (1 - uy) + c11 * uy) * uz


def _mix(a, b, m: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    return a + (b - a) * m[:, None]


def albedo(material: Material, q: np.ndarray) -> np.ndarray:
    """Surface colour ``(N, 3)`` in ``[0, 1]`` at local points ``q`` ``(N, 3)``."""
    tex, f = material.texture, material.frequency
    c0, c1 = material.color, material.secondary
    if tex == "plain":
        return np.broadcast_to(np.asarray(c0), q.shape)
    if tex == "striped":
        m = (np.sin(2 * np.pi * f * q[:, material.axis]) > 0).astype(float)
    elif tex == "checkered":
        m = (np.floor(f * q).astype(np.int64).sum(axis=1) & 1).astype(float)
    elif tex == "speckled":
        n = 0.65 * value_noise(q * f) + 0.35 * value_noise(q * (2.3 * f) + 7.0)
        m = np.clip((n - 0.3) / 0.4, 0.0, 1.0)
    elif tex == "wooden":
        r = np.hypot(q[:, 0], q[:, 2]) * f + 1.5 * value_noise(q * 2.0)
        m = (r - np.floor(r)) ** 3
    elif tex == palette.SPOTTED:
        m = (value_noise(q * f) > 0.6).astype(float)
    else:  # pragma: no cover - a bug
        raise ValueError(f"unknown texture {tex!r}")
    return _mix(c0, c1, m)


@functools.lru_cache(maxsize=64)
def _ground_albedo(ground: str, size: int, variant: int) -> np.ndarray:
    """Untinted ground colour of every pixel of the frame, float32 ``(size * size, 3)``, 0 for sky.

    The camera never moves, so the ground point under each pixel is fixed: the texture is computed
    once per (ground, size, variant) and reused. Variants shift the pattern."""
    rd = camera.rays(size).reshape(-1, 3)
    below = rd[:, 1] < 0
    t = -camera.POSITION[1] / rd[below, 1]
    p = camera.POSITION + t[:, None] * rd[below] + np.array([37.3, 0.0, 19.1]) * variant
    base, second, tex, f = palette.GROUND_MATERIALS[ground]
    if tex == "checkered":
        m = (np.floor(f * p[:, [0, 2]]).astype(np.int64).sum(axis=1) & 1).astype(float)
        m = 0.8 * m + 0.2 * value_noise(p * 3.0)
    else:
        m = 0.7 * value_noise(p * f) + 0.3 * value_noise(p * (0.25 * f) + 3.0)
    out = np.zeros((size * size, 3), np.float32)
    out[below] = _mix(np.asarray(base) / 255, np.asarray(second) / 255, m)
    out.setflags(write=False)
    return out


def ground_albedo(ground: str, size: int, variant: int, tint) -> np.ndarray:
    """Ground colour for the whole frame (a fresh float32 ``(size * size, 3)`` array)."""
    return _ground_albedo(ground, size, variant) * np.asarray(tint, np.float32)


@functools.lru_cache(maxsize=32)
def _sky_gradient(sky_index: int, size: int) -> np.ndarray:
    """Horizon colour at and below the horizon, blending to the zenith colour 30 degrees up."""
    zenith, horizon, _, _ = sky_colors(sky_index)
    rd = camera.rays(size).reshape(-1, 3)
    m = np.clip(rd[:, 1] / 0.5, 0.0, 1.0) ** 0.7
    out = _mix(horizon, zenith, m).astype(np.float32)
    out.setflags(write=False)
    return out


def sky_colors(sky: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    zenith, horizon, sun, ambient = palette.SKIES[sky]
    return np.asarray(zenith) / 255, np.asarray(horizon) / 255, np.asarray(sun) / 255, ambient


def fog(t: np.ndarray) -> np.ndarray:
    """Exponential-squared fog weight, float32 (1 for ``t = inf``)."""
    return (1.0 - np.exp(-((t / FOG_DISTANCE) ** 2))).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _ground_fog(size: int) -> np.ndarray:
    """Fog of the bare frame: ground distances never change, sky is 1."""
    rd = camera.rays(size).reshape(-1, 3)
    with np.errstate(divide="ignore"):
        t = np.where(rd[:, 1] < 0, -camera.POSITION[1] / rd[:, 1], np.inf)
    out = fog(t)
    out.setflags(write=False)
    return out


def shade(
    sky_index: int,
    size: int,
    alb: np.ndarray,
    n: np.ndarray,
    sun: np.ndarray,
    lit: np.ndarray,
    t: np.ndarray,
    obj: np.ndarray,
) -> np.ndarray:
    """Whole-frame colour ``(size * size, 3)`` float32 in ``[0, 1]``: Lambert + sky-tinted
    ambient, then fog towards the sky gradient (which is the horizon colour below the horizon).
    Sky pixels (``t = inf``) are pure fog, i.e. the sky gradient itself. ``obj``: the pixels
    whose distance differs from the bare frame's (entities)."""
    zenith, horizon, sun_rgb, ambient = sky_colors(sky_index)
    mean = 0.5 * zenith + 0.5 * horizon
    ambient_rgb = (ambient * mean / mean.mean()).astype(np.float32)
    sun_k = ((1.0 - ambient) * sun_rgb).astype(np.float32)
    cos = (n @ sun.astype(np.float32)).clip(0.0, None) * lit
    col = alb * (ambient_rgb + cos[:, None] * sun_k)
    w = _ground_fog(size).copy()
    w[obj] = fog(t[obj])
    bg = _sky_gradient(sky_index, size)
    col += (bg - col) * w[:, None]
    return col.clip(0.0, 1.0, out=col)
