"""Scene graphs: what is where, drawn from a seed (``sample_scene``).

A scene is a ground plane with a material, a sky, a sun, and a list of *entities* (primitive
objects, people, animals) standing on the ground in front of the fixed camera. Everything that
``render`` needs -- primitives, materials, keypoints -- is decided here, so the renderer is a pure
function of the scene. All randomness comes from one ``numpy.random.Generator`` seeded with the
scene's seed (an int or a sequence of ints, e.g. ``(dataset_seed, index)``).

Instance ids: 0 = sky, 1 = ground, ``2 + i`` = entity ``i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from controlstack.world import palette
from controlstack.world.config import WorldConfig
from controlstack.world.figures import ANIMAL_POSES, PERSON_POSES, humanoid, quadruped
from controlstack.world.primitives import BOX, CONE, CYLINDER, SPHERE, TORUS, Prim

FIRST_ENTITY_ID = 2
NEAR, FAR = 3.0, 9.0
GROUND_VARIANTS = 4  # precomputed ground texture offsets (see shading._ground_pattern)


@dataclass(frozen=True)
class Material:
    """Albedo (linear 0..1 RGB), second colour, texture name, texture frequency (per metre) and,
    for stripes, the local axis they run across."""

    color: tuple[float, float, float]
    secondary: tuple[float, float, float]
    texture: str = "plain"
    frequency: float = 4.0
    axis: int = 1


@dataclass
class Entity:
    """One thing in the scene: ``kind`` is ``object``, ``person`` or ``animal``; ``cls`` its semantic
    class name; ``words`` the caption attributes (colour, texture, pose)."""

    kind: str
    cls: str
    instance: int
    position: np.ndarray
    words: dict = field(default_factory=dict)
    keypoints: np.ndarray | None = None  # (K, 3) world points, figures only
    tolerance: np.ndarray | None = None


@dataclass
class Scene:
    seed: object
    ground: str
    ground_variant: int
    ground_tint: np.ndarray
    sky: int
    sun: np.ndarray  # unit vector towards the sun
    entities: list[Entity]
    prims: list[Prim]
    materials: list[Material]
    config: WorldConfig


def _rgb(c) -> tuple[float, float, float]:
    return tuple(float(v) / 255.0 for v in c)


def _yaw_rot(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def _object_material(rng: np.random.Generator) -> tuple[Material, dict]:
    texture = str(rng.choice(palette.TEXTURES, p=[0.3, 0.175, 0.175, 0.175, 0.175]))
    name = str(rng.choice(palette.COLOR_NAMES))
    if texture == "wooden":
        tone = rng.uniform(0.8, 1.15)
        base = tuple(min(1.0, v * tone) for v in _rgb((170, 115, 60)))
        mat = Material(base, _rgb((105, 65, 30)), "wooden", rng.uniform(6, 12))
        return mat, {"texture": "wooden"}
    others = [c for c in palette.COLOR_NAMES if c != name]
    second = str(rng.choice(others)) if texture in ("striped", "checkered") else name
    sec_rgb = _rgb(palette.COLORS[second])
    if texture == "speckled":
        sec_rgb = tuple(v * 0.55 for v in _rgb(palette.COLORS[name]))
    freq = {"striped": rng.uniform(4, 8), "checkered": rng.uniform(3, 6), "speckled": rng.uniform(6, 12)}.get(
        texture, 4.0
    )
    mat = Material(_rgb(palette.COLORS[name]), sec_rgb, texture, freq, int(rng.integers(0, 3)))
    return mat, {"color": name, "texture": texture}


def _primitive(rng: np.random.Generator, shape: str, x: float, z: float, material: int, group: int) -> Prim:
    yaw = rng.uniform(0, 2 * math.pi)
    if shape == "sphere":
        r = rng.uniform(0.3, 0.7)
        return Prim(SPHERE, (x, r, z), (r,), group, material)
    if shape == "box":
        h = np.full(3, rng.uniform(0.25, 0.55)) if rng.random() < 0.5 else rng.uniform(0.2, 0.6, 3)
        return Prim(BOX, (x, h[1], z), tuple(h), group, material, rot=_yaw_rot(yaw))
    if shape == "cylinder":
        return Prim(
            CYLINDER,
            (x, 0.0, z),
            (rng.uniform(0.2, 0.5), rng.uniform(0.4, 1.4)),
            group,
            material,
            rot=_yaw_rot(yaw),
        )
    if shape == "cone":
        return Prim(
            CONE,
            (x, 0.0, z),
            (rng.uniform(0.25, 0.6), rng.uniform(0.5, 1.4)),
            group,
            material,
            rot=_yaw_rot(yaw),
        )
    big, small = rng.uniform(0.3, 0.55), rng.uniform(0.08, 0.18)
    if rng.random() < 0.5:  # lying flat
        return Prim(TORUS, (x, small, z), (big, small), group, material, rot=_yaw_rot(yaw))
    c, s = math.cos(yaw), math.sin(yaw)
    standing = np.array([[0.0, 1.0, 0.0], [c, 0.0, -s], [s, 0.0, c]])  # ring axis horizontal
    return Prim(TORUS, (x, big + small, z), (big, small), group, material, rot=standing)


def _footprint(prim: Prim) -> float:
    return prim.bound_radius


def _free_spot(rng, taken, radius, near=NEAR, far=FAR):
    for _ in range(30):
        z = rng.uniform(near, far)
        x = rng.uniform(-0.4, 0.4) * z
        if all(math.hypot(x - tx, z - tz) > radius + tr + 0.1 for tx, tz, tr in taken):
            return x, z
    return None


def sample_scene(seed, config: WorldConfig | None = None) -> Scene:
    """Draw a scene from ``seed`` (int or sequence of ints). Same seed and config -> same scene."""
    config = config or WorldConfig()
    rng = np.random.default_rng(seed)
    ground = str(rng.choice(palette.GROUNDS))
    ground_variant = int(rng.integers(GROUND_VARIANTS))
    ground_tint = rng.uniform(0.9, 1.1, 3)
    sky = int(rng.integers(len(palette.SKIES)))
    az, el = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(25, 65))
    sun = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    n_obj = int(rng.integers(config.objects[0], config.objects[1] + 1))
    n_people = int(rng.integers(config.people[0], config.people[1] + 1))
    n_animals = int(rng.integers(config.animals[0], config.animals[1] + 1))
    kinds = ["object"] * n_obj + ["person"] * n_people + ["animal"] * n_animals
    rng.shuffle(kinds)

    entities: list[Entity] = []
    prims: list[Prim] = []
    materials: list[Material] = []
    taken: list[tuple[float, float, float]] = []
    for kind in kinds:
        group = len(entities)
        instance = FIRST_ENTITY_ID + group
        if kind == "object":
            shape = str(rng.choice(palette.SHAPES))
            mat, words = _object_material(rng)
            probe = _primitive(rng, shape, 0.0, 0.0, len(materials), group)
            spot = _free_spot(rng, taken, _footprint(probe))
            if spot is None:
                continue
            probe.origin = probe.origin + np.array([spot[0], 0.0, spot[1]])
            probe.__post_init__()
            if shape == "box":
                words["noun"] = "cube" if max(probe.size) / min(probe.size) < 1.25 else "box"
            else:
                words["noun"] = {"torus": "ring"}.get(shape, shape)
            materials.append(mat)
            prims.append(probe)
            taken.append((spot[0], spot[1], _footprint(probe)))
            entities.append(Entity("object", shape, instance, probe.origin.copy(), words))
            continue
        if kind == "person":
            pose = str(rng.choice(PERSON_POSES))
            shirt = str(rng.choice(palette.COLOR_NAMES))
            pants = str(rng.choice(("blue", "black", "gray", "brown", "white", "green")))
            skin = palette.SKIN_TONES[int(rng.integers(len(palette.SKIN_TONES)))]
            hair = palette.HAIR_COLORS[int(rng.integers(len(palette.HAIR_COLORS)))]
            mats = {
                "skin": (skin, skin, "plain"),
                "hair": (hair, hair, "plain"),
                "shirt": (palette.COLORS[shirt], palette.COLORS[shirt], "plain"),
                "trousers": (palette.COLORS[pants], palette.COLORS[pants], "plain"),
                "shoes": ((40, 35, 30), (40, 35, 30), "plain"),
                "long_sleeves": bool(rng.random() < 0.5),
            }
            fig = humanoid(rng, pose, rng.uniform(0.85, 1.1), mats)
            words, cls, radius, far = {"color": shirt, "pose": pose}, "person", 0.45, 7.5
        else:
            species = str(rng.choice(palette.SPECIES))
            pose = str(rng.choice(ANIMAL_POSES))
            coat_name, base, second, texture = palette.COATS[species][
                int(rng.integers(len(palette.COATS[species])))
            ]
            fig = quadruped(rng, species, pose, rng.uniform(0.9, 1.1), (base, second, texture))
            words, cls = {"color": coat_name, "pose": pose}, species
            radius = fig.bound[1] * 0.8  # footprint ~ the body's half length
            far = 5.0 if species == "cat" else 7.5
        spot = _free_spot(rng, taken, radius, far=far)
        if spot is None:
            continue
        fig.place(np.array([spot[0], 0.0, spot[1]]), rng.uniform(0, 2 * math.pi))
        base_mat = len(materials)
        for rgb, sec, tex in fig.materials:
            materials.append(Material(_rgb(rgb), _rgb(sec), tex, 5.0 if tex == palette.SPOTTED else 12.0, 1))
        for k, a, b, r, slot in fig.parts:
            size = (r,)
            prims.append(Prim(k, a, size, group, base_mat + slot, end=b))
        taken.append((spot[0], spot[1], radius))
        entities.append(
            Entity(
                kind, cls, instance, np.array([spot[0], 0.0, spot[1]]), words, fig.keypoints, fig.tolerance
            )
        )
    return Scene(seed, ground, ground_variant, ground_tint, sky, sun, entities, prims, materials, config)
