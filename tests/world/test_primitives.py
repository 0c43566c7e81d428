"""Ray-primitive intersections against hand-computed distances, and the batched capsule form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controlstack.world import primitives as P


def _ray(origin, direction):
    d = np.asarray(direction, float)
    return np.asarray(origin, float), (d / np.linalg.norm(d))[None, :]


@pytest.mark.parametrize(
    "prim, origin, direction, expected",
    [
        (P.Prim(P.SPHERE, (0, 1, 5), (0.5,), 0, 0), (0, 1, 0), (0, 0, 1), 4.5),
        (P.Prim(P.BOX, (0, 0.5, 5), (0.5, 0.5, 0.25), 0, 0), (0, 0.5, 0), (0, 0, 1), 4.75),
        (P.Prim(P.CYLINDER, (0, 0, 5), (0.3, 1.0), 0, 0), (0, 0.5, 0), (0, 0, 1), 4.7),
        (P.Prim(P.CYLINDER, (0, 0, 5), (0.3, 1.0), 0, 0), (0, 3, 5), (0, -1, 0), 2.0),  # top cap
        # Cone r=0.5, h=1 at height 0.5: radius 0.25.
        (P.Prim(P.CONE, (0, 0, 5), (0.5, 1.0), 0, 0), (0, 0.5, 0), (0, 0, 1), 4.75),
        # Lying torus R=0.5, r=0.1: a horizontal ray through its centre plane hits at z - 0.6.
        (P.Prim(P.TORUS, (0, 0.1, 5), (0.5, 0.1), 0, 0), (0, 0.1, 0), (0, 0, 1), 4.4),
        # ... and a vertical ray through the hole misses.
        (P.Prim(P.TORUS, (0, 0.1, 5), (0.5, 0.1), 0, 0), (0, 3, 5), (0, -1, 0), math.inf),
        (P.Prim(P.CAPSULE, (-1, 1, 5), (0.2,), 0, 0, end=np.array([1, 1, 5])), (0, 1, 0), (0, 0, 1), 4.8),
        (P.Prim(P.CAPSULE, (-1, 1, 5), (0.2,), 0, 0, end=np.array([1, 1, 5])), (-3, 1, 5), (1, 0, 0), 1.8),
    ],
)
def test_hit_distance(prim, origin, direction, expected):
    ro, rd = _ray(origin, direction)
    t = P.intersect(prim, ro, rd)[0]
    if math.isinf(expected):
        assert math.isinf(t)
    else:
        assert t == pytest.approx(expected, abs=1e-4 if prim.kind == P.TORUS else 1e-9)


def test_rotated_box_and_normals_are_unit_and_outward():
    yaw = math.radians(30)
    c, s = math.cos(yaw), math.sin(yaw)
    rot = np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    box = P.Prim(P.BOX, (0, 0.5, 5), (0.5, 0.5, 0.5), 0, 0, rot=rot)
    rng = np.random.default_rng(0)
    rd = rng.normal(size=(400, 3)) * [0.05, 0.05, 0] + [0, 0, 1]
    rd /= np.linalg.norm(rd, axis=1, keepdims=True)
    ro = np.array([0.0, 0.5, 0.0])
    t = P.intersect(box, ro, rd)
    hit = np.isfinite(t)
    assert hit.sum() > 300
    p = ro + t[hit, None] * rd[hit]
    n = P.normal(box, p)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-12)
    assert (np.einsum("ij,ij->i", n, rd[hit]) < 0).all()  # facing the ray
    # Hit points lie on the box surface: max |local| / half-extent == 1.
    q = box.to_local(p)
    np.testing.assert_allclose(np.abs(q).max(axis=1), 0.5, atol=1e-9)


def test_capsule_pairs_match_single_capsule():
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (50, 3)) + [0, 1, 5]
    b = a + rng.uniform(-0.5, 0.5, (50, 3))
    b[::7] = a[::7]  # some spheres
    r = rng.uniform(0.05, 0.3, 50)
    ro = np.array([0.0, 1.5, 0.0])
    rd = (a + b) / 2 + rng.normal(size=(50, 3)) * 0.2 - ro  # aimed near each capsule
    rd /= np.linalg.norm(rd, axis=1, keepdims=True)
    got = P.capsule_pairs(ro, rd, a, b, r)
    want = np.array([P._capsule(ro, rd[i : i + 1], a[i], b[i], r[i])[0] for i in range(50)])
    assert 10 <= np.isfinite(got).sum() < 50
    np.testing.assert_allclose(got, want, rtol=1e-9)
