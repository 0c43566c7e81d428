"""Analytic primitives: vectorised ray intersection, surface normals and local coordinates.

Every function takes many rays at once (``ro``: ``(3,)`` or ``(N, 3)``, ``rd``: ``(N, 3)`` unit
directions) and returns the nearest hit distance ``t`` per ray (``inf`` where it misses). The
closed forms are the standard ones collected by Inigo Quilez ("Intersectors",
iquilezles.org/articles/intersectors): sphere (quadratic), box (slab method), capped cylinder and
cone (quadratic + cap planes), capsule (cylinder body + end spheres). The torus is quartic; it is
sphere-traced on its signed distance function ("Distance functions", same author) from the entry
of its bounding sphere, which is exact to ``1e-4`` and cheap because only the few rays that hit
the bounding sphere are traced.

Shapes other than spheres and capsules live in a local frame: ``local = rot @ (p - origin)``.
Cylinders and cones stand on their base at local ``y = 0``; the torus ring lies in local XZ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPHERE, BOX, CYLINDER, CONE, TORUS, CAPSULE = range(6)
KIND_NAMES = ("sphere", "box", "cylinder", "cone", "torus", "capsule")
EPS = 1e-6
TORUS_STEPS = 48


@dataclass(eq=False)
class Prim:
    """One primitive surface.

    ``size`` is per kind: sphere ``(r,)``, box half extents ``(hx, hy, hz)``, cylinder and cone
    ``(r, h)``, torus ``(R, r)``, capsule ``(r,)`` (then ``origin`` and ``end`` are the segment).
    ``group`` is the index of the scene entity it belongs to; ``material`` indexes the scene's
    material table.
    """

    kind: int
    origin: np.ndarray
    size: tuple[float, ...]
    group: int
    material: int
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    end: np.ndarray | None = None
    # Bounding sphere (for screen-space culling and shadow culling).
    bound_center: np.ndarray = field(init=False)
    bound_radius: float = field(init=False)

    def __post_init__(self) -> None:
        self.origin = np.asarray(self.origin, float)
        s = self.size
        up = self.rot[1]  # the local Y axis, in world coordinates
        if self.kind == SPHERE:
            c, r = self.origin, s[0]
        elif self.kind == BOX:
            c, r = self.origin, float(np.linalg.norm(s))
        elif self.kind in (CYLINDER, CONE):
            c, r = self.origin + up * s[1] / 2, float(np.hypot(s[0], s[1] / 2))
        elif self.kind == TORUS:
            c, r = self.origin, s[0] + s[1]
        elif self.kind == CAPSULE:
            self.end = np.asarray(self.end, float)
            c = (self.origin + self.end) / 2
            r = float(np.linalg.norm(self.end - self.origin)) / 2 + s[0]
        else:  # pragma: no cover - a bug
            raise ValueError(f"unknown primitive kind {self.kind}")
        self.bound_center, self.bound_radius = np.asarray(c, float), float(r)

    def to_local(self, p: np.ndarray) -> np.ndarray:
        return (p - self.origin) @ self.rot.T


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", a, b)


def _sphere(ro, rd, c, r):
    oc = ro - c
    b = _dot(oc, rd) if oc.ndim > 1 else rd @ oc
    cc = _dot(oc, oc) - r * r
    disc = b * b - cc
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
    return np.where((disc > 0) & (t > EPS), t, np.inf)


def _box(ro, rd, h):
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / rd
        t1 = (-np.asarray(h) - ro) * inv
        t2 = (np.asarray(h) - ro) * inv
        tn = np.minimum(t1, t2).max(axis=-1)
        tf = np.maximum(t1, t2).min(axis=-1)
    return np.where((tn <= tf) & (tn > EPS), tn, np.inf)


def _cylinder(ro, rd, r, h):
    ox, oy, oz = ro[..., 0], ro[..., 1], ro[..., 2]
    dx, dy, dz = rd[:, 0], rd[:, 1], rd[:, 2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(disc)) / a
        y = oy + ts * dy
        side = np.where((disc > 0) & (y >= 0) & (y <= h) & (ts > EPS), ts, np.inf)
        best = side
        for plane in (h, 0.0):
            tc = (plane - oy) / dy
            xc, zc = ox + tc * dx, oz + tc * dz
            cap = np.where((xc * xc + zc * zc <= r * r) & (tc > EPS), tc, np.inf)
            best = np.minimum(best, cap)
    return best


def _cone(ro, rd, r, h):
    k2 = (r / h) ** 2
    ox, oy, oz = ro[..., 0], ro[..., 1], ro[..., 2]
    dx, dy, dz = rd[:, 0], rd[:, 1], rd[:, 2]
    q = h - oy
    a = dx * dx + dz * dz - k2 * dy * dy
    b = ox * dx + oz * dz + k2 * q * dy
    c = ox * ox + oz * oz - k2 * q * q
    disc = b * b - a * c
    best = np.full(rd.shape[0], np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.sqrt(disc)
        for t in ((-b - sq) / a, (-b + sq) / a):
            y = oy + t * dy
            ok = (disc > 0) & (y >= 0) & (y <= h) & (t > EPS)
            best = np.minimum(best, np.where(ok, t, np.inf))
        tc = -oy / dy  # the base disc at y = 0
        xc, zc = ox + tc * dx, oz + tc * dz
        best = np.minimum(best, np.where((xc * xc + zc * zc <= r * r) & (tc > EPS), tc, np.inf))
    return best


def _torus_sdf(p, R, r):
    q = np.hypot(p[:, 0], p[:, 2]) - R
    return np.hypot(q, p[:, 1]) - r


def _torus(ro, rd, R, r, steps=TORUS_STEPS):
    # Sphere-trace only the rays that cross the torus' bounding cylinder (radius R + r, height
    # 2 r), from where they enter it (or from their origin, for shadow rays starting inside).
    ox, oy, oz = ro[..., 0], ro[..., 1], ro[..., 2]
    dx, dy, dz = rd[:, 0], rd[:, 1], rd[:, 2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    disc = b * b - a * (ox * ox + oz * oz - (R + r) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        sq = np.sqrt(disc)
        t0, t1 = (-b - sq) / a, (-b + sq) / a
        y0, y1 = (-r - oy) / dy, (r - oy) / dy
    enter = np.maximum(np.maximum(t0, np.minimum(y0, y1)), 0.0)
    leave = np.minimum(t1, np.maximum(y0, y1))
    live = np.flatnonzero((disc > 0) & (leave > enter) & (leave > EPS))
    out = np.full(rd.shape[0], np.inf)
    if live.size == 0:
        return out
    o = ro[live] if ro.ndim > 1 else ro
    d = rd[live]
    t = enter[live]
    tmax = leave[live] + 1e-4
    # March in rounds, dropping rays that converged or left the bounding cylinder after each.
    for _ in range(steps // 4):
        for _ in range(3):
            t += _torus_sdf(o + t[:, None] * d, R, r)
        dist = _torus_sdf(o + t[:, None] * d, R, r)
        t += dist
        hit = (np.abs(dist) < 1e-5) & (t < tmax) & (t > EPS)
        out[live[hit]] = t[hit]
        going = ~hit & (t < tmax)
        if not going.any():
            break
        live, t, tmax, d = live[going], t[going], tmax[going], d[going]
        if o.ndim > 1:
            o = o[going]
    return out


def _capsule(ro, rd, a, b, r):
    ba = b - a
    oa = ro - a
    baba = ba @ ba
    bard = rd @ ba
    baoa = oa @ ba if oa.ndim > 1 else float(oa @ ba)
    rdoa = _dot(rd, oa) if oa.ndim > 1 else rd @ oa
    oaoa = _dot(oa, oa)
    A = baba - bard * bard
    B = baba * rdoa - baoa * bard
    C = baba * oaoa - baoa * baoa - r * r * baba
    h = B * B - A * C
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (-B - np.sqrt(h)) / A
        y = baoa + t * bard
        body = np.where((h > 0) & (y > 0) & (y < baba) & (t > EPS), t, np.inf)
    caps = np.minimum(_sphere(ro, rd, a, r), _sphere(ro, rd, b, r))
    return np.where(np.isfinite(body), body, caps)


def intersect(prim: Prim, ro: np.ndarray, rd: np.ndarray, shadow: bool = False) -> np.ndarray:
    """Nearest hit distance along each ray (``inf`` for a miss). ``shadow``: only whether a hit
    exists matters and the result only darkens the image, so the torus marches half as far."""
    k = prim.kind
    if k == SPHERE:
        return _sphere(ro, rd, prim.origin, prim.size[0])
    if k == CAPSULE:
        return _capsule(ro, rd, prim.origin, prim.end, prim.size[0])
    lo, ld = prim.to_local(ro), rd @ prim.rot.T
    if k == BOX:
        return _box(lo, ld, prim.size)
    if k == CYLINDER:
        return _cylinder(lo, ld, *prim.size)
    if k == CONE:
        return _cone(lo, ld, *prim.size)
    return _torus(lo, ld, *prim.size, steps=TORUS_STEPS // 2 if shadow else TORUS_STEPS)


def normal(prim: Prim, p: np.ndarray) -> np.ndarray:
    """Outward unit normals (world frame) at surface points ``p`` ``(N, 3)``."""
    k = prim.kind
    if k == SPHERE:
        n = p - prim.origin
    elif k == CAPSULE:
        ba = prim.end - prim.origin
        pa = p - prim.origin
        s = np.clip(pa @ ba / (ba @ ba), 0.0, 1.0)
        n = pa - s[:, None] * ba
    else:
        q = prim.to_local(p)
        if k == BOX:
            rel = np.abs(q) / np.asarray(prim.size)
            axis = rel.argmax(axis=1)
            nl = np.zeros_like(q)
            rows = np.arange(len(q))
            nl[rows, axis] = np.sign(q[rows, axis])
        elif k == CYLINDER:
            r, h = prim.size
            nl = np.stack([q[:, 0], np.zeros(len(q)), q[:, 2]], axis=1) / r
            # Points on a cap (not on the rim) get the cap's axis normal.
            radial = np.hypot(q[:, 0], q[:, 2])
            top, bottom = np.abs(q[:, 1] - h), np.abs(q[:, 1])
            side_gap = np.abs(radial - r)
            cap = np.minimum(top, bottom) < side_gap
            nl[cap] = 0.0
            nl[cap, 1] = np.where(top[cap] < bottom[cap], 1.0, -1.0)
        elif k == CONE:
            r, h = prim.size
            radial = np.maximum(np.hypot(q[:, 0], q[:, 2]), 1e-9)
            nl = np.stack([q[:, 0] / radial * h, np.full(len(q), r), q[:, 2] / radial * h], axis=1)
            base = np.abs(q[:, 1]) < 1e-6 * max(h, 1.0) + 1e-7
            nl[base] = (0.0, -1.0, 0.0)
        else:  # torus
            R = prim.size[0]
            radial = np.maximum(np.hypot(q[:, 0], q[:, 2]), 1e-9)
            ring = np.stack([q[:, 0] / radial * R, np.zeros(len(q)), q[:, 2] / radial * R], axis=1)
            nl = q - ring
        n = nl @ prim.rot  # local -> world (rot is orthonormal)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def capsule_pairs(ro: np.ndarray, rd: np.ndarray, a: np.ndarray, b: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Hit distances ``(M,)`` for ``M`` (ray, capsule) pairs: every argument has one row per pair
    (``ro`` may be a single ``(3,)`` origin). A sphere is a capsule with ``a == b``. Same closed
    form as :func:`_capsule`; the renderer builds the pairs from screen-space culling so a figure's
    parts are traced in one vectorised call."""
    ba = b - a
    oa = ro - a
    baba = np.einsum("ni,ni->n", ba, ba)
    bard = np.einsum("ni,ni->n", rd, ba)
    baoa = np.einsum("ni,ni->n", oa, ba)
    rdoa = np.einsum("ni,ni->n", rd, oa)
    oaoa = np.einsum("ni,ni->n", oa, oa)
    r2 = r * r
    A = baba - bard * bard
    B = baba * rdoa - baoa * bard
    C = baba * oaoa - baoa * baoa - r2 * baba
    h = B * B - A * C
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (-B - np.sqrt(h)) / A
        y = baoa + t * bard
        body = np.where((h > 0) & (y > 0) & (y < baba) & (t > EPS), t, np.inf)
        disc_a = rdoa * rdoa - (oaoa - r2)
        ta = -rdoa - np.sqrt(disc_a)
        ob = ro - b
        rdob = np.einsum("ni,ni->n", rd, ob)
        disc_b = rdob * rdob - (np.einsum("ni,ni->n", ob, ob) - r2)
        tb = -rdob - np.sqrt(disc_b)
    caps = np.minimum(
        np.where((disc_a > 0) & (ta > EPS), ta, np.inf), np.where((disc_b > 0) & (tb > EPS), tb, np.inf)
    )
    return np.where(np.isfinite(body), body, caps)


def capsule_normals(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unit normals at points ``p`` on capsules given per point (``a``, ``b``: ``(N, 3)``)."""
    ba = b - a
    pa = p - a
    baba = np.einsum("ni,ni->n", ba, ba)
    s = np.clip(np.einsum("ni,ni->n", pa, ba) / np.maximum(baba, 1e-12), 0.0, 1.0)
    n = pa - s[:, None] * ba
    return n / np.linalg.norm(n, axis=1, keepdims=True)
