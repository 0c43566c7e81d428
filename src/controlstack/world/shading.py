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
def _ground_pattern(ground: str, size: int, variant: int) -> np.ndarray:
    """Mixing weights of the ground texture for every pixel of the frame (0 where sky).

    The camera never moves, so the ground point under each pixel is fixed: the texture is computed
    once per (ground, size, variant) and then only gathered. Variants shift the pattern."""
    rd = camera.rays(size).reshape(-1, 3)
    below = rd[:, 1] < 0
    t = -camera.POSITION[1] / rd[below, 1]
    p = camera.POSITION + t[:, None] * rd[below] + np.array([37.3, 0.0, 19.1]) * variant
    _, _, tex, f = palette.GROUND_MATERIALS[ground]
    if tex == "checkered":
        m = (np.floor(f * p[:, [0, 2]]).astype(np.int64).sum(axis=1) & 1).astype(float)
        m = 0.8 * m + 0.2 * value_noise(p * 3.0)
    else:
        m = 0.7 * value_noise(p * f) + 0.3 * value_noise(p * (0.25 * f) + 3.0)
    out = np.zeros(size * size, np.float32)
    out[below] = m
    out.setflags(write=False)
    return out


def ground_albedo(ground: str, size: int, pixels: np.ndarray, variant: int, tint) -> np.ndarray:
    """Ground colour ``(N, 3)`` at flat pixel indices ``pixels`` (which must see the ground)."""
    base, second, _, _ = palette.GROUND_MATERIALS[ground]
    c0 = np.asarray(base, float) / 255 * tint
    c1 = np.asarray(second, float) / 255 * tint
    return _mix(c0, c1, _ground_pattern(ground, size, variant)[pixels])


@functools.lru_cache(maxsize=32)
def _sky_gradient(sky_index: int, size: int) -> np.ndarray:
    zenith, horizon, _, _ = sky_colors(sky_index)
    rd = camera.rays(size).reshape(-1, 3)
    m = np.clip(rd[:, 1] / 0.5, 0.0, 1.0) ** 0.7
    out = _mix(horizon, zenith, m)
    out.setflags(write=False)
    return out


def sky_colors(sky: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    zenith, horizon, sun, ambient = palette.SKIES[sky]
    return np.asarray(zenith) / 255, np.asarray(horizon) / 255, np.asarray(sun) / 255, ambient


def sky(sky_index: int, size: int) -> np.ndarray:
    """Sky gradient for the whole frame ``(size * size, 3)`` (a fresh copy): horizon colour at the
    horizon, zenith colour from 30 degrees up."""
    return _sky_gradient(sky_index, size).copy()


def shade(sky_index: int, alb: np.ndarray, n: np.ndarray, sun: np.ndarray, lit: np.ndarray,
          t: np.ndarray) -> np.ndarray:
    """Lambert + ambient + fog for hit points; ``lit`` is 1 where the sun is visible, else 0."""
    zenith, horizon, sun_rgb, ambient = sky_colors(sky_index)
    cos = np.clip(n @ sun, 0.0, None) * lit
    ambient_rgb = ambient * (0.5 * zenith + 0.5 * horizon) / np.mean(0.5 * zenith + 0.5 * horizon)
    light = ambient_rgb[None, :] + (1.0 - ambient) * cos[:, None] * sun_rgb[None, :]
    col = alb * light
    fog = 1.0 - np.exp(-((t / FOG_DISTANCE) ** 2))
    return _mix(col, horizon, fog) if col.ndim == 2 else col
