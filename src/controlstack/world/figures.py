"""Articulated figures: humanoids (OpenPose COCO-18 skeleton) and quadrupeds (AP-10K skeleton).

A figure is forward kinematics over a few joint angles, dressed in capsules and spheres whose
axes run between the joints, so every keypoint sits *inside* the body (joints) or *on* its surface
(eyes, nose, ears). Keypoint orders are the published ones:

* OpenPose BODY_18 / COCO-18 (Cao et al., "OpenPose", TPAMI 2019; ControlNet's ``annotator/
  openpose``): nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip,
  r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear.
* AP-10K (Yu et al., NeurIPS 2021 Datasets track; mmpose ``configs/_base_/datasets/ap10k.py``):
  l-eye, r-eye, nose, neck, root of tail, l-shoulder, l-elbow, l-front paw, r-shoulder, r-elbow,
  r-front paw, l-hip, l-knee, l-back paw, r-hip, r-knee, r-back paw.

Figures are built in a local frame (X = the figure's left, Y up, Z = the way it faces) and placed
on the ground with a yaw. Each keypoint carries a depth tolerance (the body radius around it) used
to decide visibility against the rendered depth (see ``render.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from controlstack.world.primitives import CAPSULE, SPHERE

OPENPOSE_KEYPOINTS = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
AP10K_KEYPOINTS = (
    "left_eye",
    "right_eye",
    "nose",
    "neck",
    "root_of_tail",
    "left_shoulder",
    "left_elbow",
    "left_front_paw",
    "right_shoulder",
    "right_elbow",
    "right_front_paw",
    "left_hip",
    "left_knee",
    "left_back_paw",
    "right_hip",
    "right_knee",
    "right_back_paw",
)
# AP-10K skeleton (0-based pairs), in mmpose's skeleton_info order.
AP10K_SKELETON = (
    (0, 1),
    (0, 2),
    (1, 2),
    (2, 3),
    (3, 4),
    (3, 5),
    (5, 6),
    (6, 7),
    (3, 8),
    (8, 9),
    (9, 10),
    (4, 11),
    (11, 12),
    (12, 13),
    (4, 14),
    (14, 15),
    (15, 16),
)
PERSON_POSES = ("standing", "walking", "running", "waving", "cheering")
ANIMAL_POSES = ("standing", "walking", "running", "grazing")


@dataclass
class Figure:
    """Primitives and keypoints of one figure, in world coordinates once placed.

    ``parts``: ``(kind, a, b, radius, material_slot)`` with ``b`` None for spheres; material slots
    index ``materials`` (tuples ``(rgb, secondary_rgb, texture)``).
    """

    parts: list = field(default_factory=list)
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    tolerance: np.ndarray = field(default_factory=lambda: np.zeros(0))
    materials: list = field(default_factory=list)

    def cap(self, a, b, r, slot):
        self.parts.append((CAPSULE, np.asarray(a, float), np.asarray(b, float), float(r), slot))

    def ball(self, c, r, slot):
        self.parts.append((SPHERE, np.asarray(c, float), None, float(r), slot))

    def place(self, position: np.ndarray, yaw: float) -> None:
        """Rotate by ``yaw`` about Y, rest the lowest point on the ground, move to ``position``."""
        c, s = math.cos(yaw), math.sin(yaw)
        m = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
        low = min(min(a[1], b[1] if b is not None else a[1]) - r for _, a, b, r, _ in self.parts)
        shift = np.array([position[0], -low, position[2]])

        def tf(p):
            return None if p is None else m @ p + shift

        self.parts = [(k, tf(a), tf(b), r, slot) for k, a, b, r, slot in self.parts]
        self.keypoints = self.keypoints @ m.T + shift

    @property
    def bound(self) -> tuple[np.ndarray, float]:
        pts = np.array([p for _, a, b, _, _ in self.parts for p in (a, b) if p is not None])
        center = (pts.min(0) + pts.max(0)) / 2
        radius = max(
            np.linalg.norm(p - center) + r for _, a, b, r, _ in self.parts for p in (a, b) if p is not None
        )
        return center, float(radius)


def _limb(phi: float, beta: float, side: float) -> np.ndarray:
    """Unit direction of a limb segment: ``phi`` swings it forward from hanging straight down,
    ``beta`` raises it sideways (outwards on ``side``: +1 left, -1 right). Radians."""
    return np.array([side * math.sin(beta), -math.cos(beta) * math.cos(phi), math.cos(beta) * math.sin(phi)])


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _person_angles(rng: np.random.Generator, pose: str) -> dict:
    d = math.radians

    def j():  # per-angle jitter
        return d(rng.uniform(-8, 8))

    a = {}
    for side in ("l", "r"):
        a[f"{side}_arm"] = (d(rng.uniform(-5, 10)), d(rng.uniform(5, 15)))
        a[f"{side}_fore"] = (a[f"{side}_arm"][0] + d(rng.uniform(0, 25)), a[f"{side}_arm"][1])
        a[f"{side}_leg"] = (j() * 0.4, d(3))
        a[f"{side}_shin"] = (a[f"{side}_leg"][0] - d(rng.uniform(0, 6)), d(3))
    lean = d(rng.uniform(-3, 5))
    if pose in ("walking", "running"):
        s = d(rng.uniform(15, 30) if pose == "walking" else rng.uniform(30, 45))
        front = "l" if rng.random() < 0.5 else "r"
        back = "r" if front == "l" else "l"
        a[f"{front}_leg"] = (s + j(), d(3))
        a[f"{back}_leg"] = (-s + j(), d(3))
        knee_f, knee_b = (d(10), d(25)) if pose == "walking" else (d(35), d(80))
        a[f"{front}_shin"] = (a[f"{front}_leg"][0] - knee_f, d(3))
        a[f"{back}_shin"] = (a[f"{back}_leg"][0] - knee_b, d(3))
        elbow = d(15) if pose == "walking" else d(85)
        a[f"{back}_arm"] = (0.8 * s + j(), d(8))
        a[f"{front}_arm"] = (-0.8 * s + j(), d(8))
        for side in ("l", "r"):
            a[f"{side}_fore"] = (a[f"{side}_arm"][0] + elbow, d(8))
        if pose == "running":
            lean = d(rng.uniform(8, 15))
    elif pose == "waving":
        side = "l" if rng.random() < 0.5 else "r"
        a[f"{side}_arm"] = (d(rng.uniform(0, 25)), d(rng.uniform(75, 100)))
        a[f"{side}_fore"] = (d(rng.uniform(0, 20)), d(rng.uniform(145, 175)))
    elif pose == "cheering":
        for side in ("l", "r"):
            a[f"{side}_arm"] = (d(rng.uniform(-10, 15)), d(rng.uniform(135, 165)))
            a[f"{side}_fore"] = (a[f"{side}_arm"][0] + j(), a[f"{side}_arm"][1] + d(rng.uniform(-5, 15)))
    a["lean"] = lean
    a["head_yaw"] = d(rng.uniform(-40, 40))
    return a


def humanoid(rng: np.random.Generator, pose: str, scale: float, materials: dict) -> Figure:
    """An OpenPose-18 humanoid about ``1.75 * scale`` m tall.

    ``materials``: slots ``skin``, ``hair``, ``shirt``, ``trousers``, ``shoes`` -> material tuples;
    ``long_sleeves`` (bool) decides the forearms' slot.
    """
    s = scale
    a = _person_angles(rng, pose)
    fig = Figure(materials=[materials[k] for k in ("skin", "hair", "shirt", "trousers", "shoes")])
    SKIN, HAIR, SHIRT, TROUSERS, SHOES = range(5)
    up = np.array([0.0, 1.0, 0.0])
    pelvis = np.array([0.0, 0.95 * s, 0.0])
    lean = a["lean"]
    spine = np.array([0.0, math.cos(lean), math.sin(lean)])
    neck = pelvis + 0.55 * s * spine
    kp = np.zeros((18, 3))
    tol = np.zeros(18)
    kp[1], tol[1] = neck, 0.12 * s  # inside the top of the torso
    fig.cap(neck, neck + 0.1 * s * spine, 0.05 * s, SKIN)
    head_r = 0.11 * s
    hc = neck + 0.17 * s * spine
    fig.ball(hc, head_r, SKIN)
    fig.ball(hc + np.array([0.0, 0.02, -0.025]) * s, 1.02 * head_r, HAIR)
    yaw = a["head_yaw"]
    fwd_h = np.array([math.sin(yaw), 0.0, math.cos(yaw)])
    left_h = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    kp[0] = hc + head_r * _unit(fwd_h - 0.15 * up)
    kp[15] = hc + head_r * _unit(0.93 * fwd_h + 0.12 * up + 0.35 * left_h)
    kp[14] = hc + head_r * _unit(0.93 * fwd_h + 0.12 * up - 0.35 * left_h)
    kp[17] = hc + head_r * _unit(left_h - 0.1 * fwd_h)
    kp[16] = hc + head_r * _unit(-left_h - 0.1 * fwd_h)
    tol[[0, 14, 15, 16, 17]] = 0.25 * head_r
    hips = {}
    for side, sign, (i_sho, i_elb, i_wri, i_hip, i_kne, i_ank) in (
        ("l", 1.0, (5, 6, 7, 11, 12, 13)),
        ("r", -1.0, (2, 3, 4, 8, 9, 10)),
    ):
        sho = neck + np.array([sign * 0.19 * s, -0.04 * s, 0.0])
        elb = sho + 0.29 * s * _limb(*a[f"{side}_arm"], sign)
        fore = _limb(*a[f"{side}_fore"], sign)
        wri = elb + 0.26 * s * fore
        hip = pelvis + np.array([sign * 0.1 * s, 0.0, 0.0])
        kne = hip + 0.44 * s * _limb(*a[f"{side}_leg"], sign)
        ank = kne + 0.44 * s * _limb(*a[f"{side}_shin"], sign)
        hips[side] = hip
        kp[[i_sho, i_elb, i_wri, i_hip, i_kne, i_ank]] = sho, elb, wri, hip, kne, ank
        # Shoulders and hips sit inside the torso capsules: their depth slack is the torso's.
        tol[[i_sho, i_elb, i_wri, i_hip, i_kne, i_ank]] = (
            0.12 * s,
            0.06 * s,
            0.05 * s,
            0.12 * s,
            0.08 * s,
            0.06 * s,
        )
        fig.cap(sho, elb, 0.048 * s, SHIRT)
        fig.cap(elb, wri, 0.04 * s, SHIRT if materials["long_sleeves"] else SKIN)
        fig.ball(wri + 0.05 * s * fore, 0.042 * s, SKIN)
        fig.cap(hip, kne, 0.075 * s, TROUSERS)
        fig.cap(kne, ank, 0.055 * s, TROUSERS)
        fig.cap(ank, ank + np.array([0.0, -0.02, 0.14]) * s, 0.045 * s, SHOES)
        # Torso side: from above the hip to just inside the shoulder.
        fig.cap(hip + 0.12 * s * spine, sho - np.array([sign * 0.06 * s, 0.05 * s, 0.0]), 0.1 * s, SHIRT)
    fig.cap(hips["l"], hips["r"], 0.09 * s, TROUSERS)
    fig.cap(pelvis + 0.1 * s * spine, neck - 0.06 * s * spine, 0.11 * s, SHIRT)
    fig.keypoints, fig.tolerance = kp, tol
    return fig


# Species proportions (metres): body length, body-axis height, body radius, leg radius, neck
# length, neck elevation (deg), head radius, snout length, snout radius, tail length, tail radius,
# ear length.
SPECIES_SHAPES = {
    "dog": (0.55, 0.42, 0.12, 0.045, 0.22, 50, 0.09, 0.10, 0.045, 0.28, 0.025, 0.06),
    "cat": (0.38, 0.24, 0.08, 0.028, 0.10, 55, 0.065, 0.035, 0.03, 0.32, 0.018, 0.05),
    "horse": (1.05, 1.15, 0.30, 0.07, 0.62, 55, 0.13, 0.30, 0.08, 0.60, 0.05, 0.10),
    "cow": (1.15, 0.95, 0.36, 0.08, 0.35, 25, 0.15, 0.22, 0.10, 0.55, 0.035, 0.08),
}


def quadruped(rng: np.random.Generator, species: str, pose: str, scale: float, coat: tuple) -> Figure:
    """An AP-10K quadruped of ``species`` (see :data:`SPECIES_SHAPES`) in ``pose``."""
    L, H, R, leg_r, neck_len, neck_el, head_r, snout_len, snout_r, tail_len, tail_r, ear_len = (
        v * scale if i != 5 else v for i, v in enumerate(SPECIES_SHAPES[species])
    )
    d = math.radians
    fig = Figure(materials=[coat])
    up = np.array([0.0, 1.0, 0.0])
    hip_mid = np.array([0.0, H, -L / 2])
    sho_mid = np.array([0.0, H, L / 2])
    fig.cap(hip_mid, sho_mid, R, 0)
    kp = np.zeros((17, 3))
    tol = np.zeros(17)
    # Legs: upper segment swings by theta, lower by theta + kappa (elbows fold back, knees forward).
    swing = {"standing": 4, "grazing": 4, "walking": 20, "running": 35}[pose]
    phase = rng.uniform(0, 2 * math.pi)
    leg_len = H - 0.3 * R
    for i, (side, sign, front, j_top, j_mid, j_paw) in enumerate(
        (
            ("l", 1.0, True, 5, 6, 7),
            ("r", -1.0, True, 8, 9, 10),
            ("l", 1.0, False, 11, 12, 13),
            ("r", -1.0, False, 14, 15, 16),
        )
    ):
        # Diagonal pairs move together (a trot): left-front with right-back.
        offset = 0.0 if (front == (side == "l")) else math.pi
        theta = d(swing) * math.sin(phase + offset) + d(rng.uniform(-4, 4))
        kappa = d(rng.uniform(0, 25 if pose == "running" else 12)) * (-1 if front else 1)
        top = (sho_mid if front else hip_mid) + np.array([sign * 0.6 * R, -0.3 * R, 0.0])
        mid = top + 0.5 * leg_len * _limb(theta, 0.0, sign)
        paw = mid + 0.5 * leg_len * _limb(theta + kappa, 0.0, sign)
        fig.cap(top, mid, leg_r * 1.3, 0)
        fig.cap(mid, paw, leg_r, 0)
        kp[[j_top, j_mid, j_paw]] = top, mid, paw
        tol[[j_top, j_mid, j_paw]] = R, leg_r * 1.2, leg_r
    neck_base = sho_mid + np.array([0.0, 0.4 * R, 0.1 * R])
    elev = d(-45 if pose == "grazing" else neck_el + rng.uniform(-10, 10))
    head = neck_base + neck_len * np.array([0.0, math.sin(elev), math.cos(elev)])
    neck_r = max(0.45 * R, 1.1 * leg_r)
    fig.cap(neck_base, head, neck_r, 0)
    fig.ball(head, head_r, 0)
    yaw = d(rng.uniform(-30, 30))
    pitch = d(80 if pose == "grazing" else rng.uniform(10, 40))
    fwd_h = np.array([math.sin(yaw), 0.0, math.cos(yaw)])
    left_h = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    snout_dir = _unit(math.cos(pitch) * fwd_h - math.sin(pitch) * up)
    tip = head + (head_r * 0.6 + snout_len) * snout_dir
    fig.cap(head, tip, snout_r, 0)
    kp[2], tol[2] = tip + snout_r * snout_dir, 0.5 * snout_r
    kp[0] = head + head_r * _unit(0.7 * fwd_h + 0.45 * up + 0.55 * left_h)
    kp[1] = head + head_r * _unit(0.7 * fwd_h + 0.45 * up - 0.55 * left_h)
    tol[[0, 1]] = 0.3 * head_r
    for sign in (1.0, -1.0):
        base = head + head_r * _unit(up + 0.6 * sign * left_h - 0.2 * fwd_h)
        fig.cap(base, base + ear_len * _unit(up + 0.3 * sign * left_h), 0.35 * ear_len, 0)
    kp[3], tol[3] = neck_base, neck_r
    root = hip_mid + np.array([0.0, 0.2 * R, -0.9 * R])
    kp[4], tol[4] = root, R
    tail_angle = d(-70 if species in ("horse", "cow") else rng.uniform(-30, 50))
    fig.cap(root, root + tail_len * np.array([0.0, math.sin(tail_angle), -math.cos(tail_angle)]), tail_r, 0)
    fig.keypoints, fig.tolerance = kp, tol
    return fig
