"""Condition encodings pinned on hand-made buffers."""

from __future__ import annotations

import math

import cv2
import numpy as np

from controlstack.world import annotate, captions, palette, render, sample_scene
from controlstack.world.scene import Entity


def test_depth_is_relative_inverse_depth_near_bright_sky_black():
    depth = np.array([[1.0, 2.0], [np.inf, 4.0]])
    np.testing.assert_array_equal(annotate.encode_depth(depth), [[255, 128], [0, 64]])


def test_normal_encoding_opengl_camera_frame():
    n = np.zeros((1, 2, 3), np.float32)
    n[0, 0] = (0, 1, 0)  # the ground; column 1 stays 0 = sky
    enc = annotate.encode_normal(n)
    p = math.radians(12.0)  # camera pitch: the ground tilts towards the viewer
    want = np.round((np.array([0.0, math.cos(p), math.sin(p)]) + 1) * 127.5)
    np.testing.assert_array_equal(enc[0, 0], want)
    np.testing.assert_array_equal(enc[0, 1], [128, 128, 255])


def test_seg_uses_the_palette():
    sem = np.array([[0, 1], [palette.CLASS_ID["person"], palette.CLASS_ID["dog"]]], np.uint8)
    seg = annotate.encode_seg(sem)
    np.testing.assert_array_equal(seg[0, 0], (6, 230, 230))  # ADE20K sky
    np.testing.assert_array_equal(seg[1, 0], (150, 5, 61))  # ADE20K person
    np.testing.assert_array_equal(seg[1, 1], palette.PALETTE[palette.CLASS_ID["dog"]])


def test_boundaries_mark_instance_edges_and_creases_only():
    inst = np.ones((6, 6), np.uint8)
    inst[:, 3:] = 2
    depth = np.full((6, 6), 5.0)
    normal = np.zeros((6, 6, 3))
    normal[..., 1] = 1.0
    e = annotate.boundaries(depth, normal, inst)
    want = np.zeros((6, 6))
    want[:, 2:4] = 1.0
    np.testing.assert_array_equal(e, want)
    # A 90-degree crease inside one instance is a full-strength (0.7) edge, a 10-degree one none.
    inst[:] = 2
    normal[:, 3:] = (1.0, 0.0, 0.0)
    assert annotate.boundaries(depth, normal, inst)[:, 2:4].min() == 0.7
    normal[:, 3:] = (math.sin(0.17), math.cos(0.17), 0.0)
    assert annotate.boundaries(depth, normal, inst).max() == 0.0


def test_pose_drawing_matches_controlnet_style():
    kps = np.zeros((18, 3))
    kps[1] = (200.5, 100.5, 1.0)  # neck
    kps[2] = (300.5, 100.5, 1.0)  # right shoulder
    canvas = annotate.draw_pose(512, [kps], [], ())
    # The neck -> right-shoulder limb is OpenPose colour 0 at 60 %; keypoints in their colours.
    np.testing.assert_array_equal(canvas[100, 250], (153, 0, 0))
    np.testing.assert_array_equal(canvas[100, 200], annotate.OPENPOSE_COLORS[1])
    np.testing.assert_array_equal(canvas[100, 300], annotate.OPENPOSE_COLORS[2])
    assert canvas[90, 250].sum() == 0  # 4 px stick half-width at 512
    assert annotate.draw_pose(512, [np.zeros((18, 3))], [], ()).sum() == 0


def test_canny_is_opencv_canny_of_the_image_and_softedge_is_graded():
    row = render(sample_scene(5), 128)
    gray = cv2.cvtColor(row["image"], cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(row["canny"], cv2.Canny(gray, 100, 200))
    soft = row["softedge"]
    assert soft.max() == 255 and 0 < np.mean((soft > 0) & (soft < 255)) < 0.5
    assert set(np.unique(row["scribble"]).tolist()) == {0, 255}


def test_caption_phrases_and_relations():
    def ent(kind, cls, words, instance):
        return Entity(kind, cls, instance, np.zeros(3), words)

    sphere = ent("object", "sphere", {"color": "red", "texture": "striped", "noun": "sphere"}, 2)
    cube = ent("object", "box", {"texture": "wooden", "noun": "cube"}, 3)
    cone = ent("object", "cone", {"color": "orange", "texture": "plain", "noun": "cone"}, 4)
    person = ent("person", "person", {"color": "blue", "pose": "running"}, 5)
    dog = ent("animal", "dog", {"color": "brown", "pose": "standing"}, 6)
    assert [captions.phrase(e) for e in (sphere, cube, cone, person, dog)] == [
        "a red striped sphere",
        "a wooden cube",
        "an orange cone",
        "a running person in blue",
        "a brown dog",
    ]
    inst = np.zeros((64, 64), np.uint8)
    inst[30:40, 5:20] = 2  # sphere, left, largest
    inst[30:40, 40:52] = 3  # cube, right
    inst[50:55, 30:36] = 6  # dog
    depth = np.full((64, 64), 5.0)
    text = captions.caption([sphere, cube, dog], "grass", inst, depth)
    assert text == "a red striped sphere left of a wooden cube, a brown dog on grass"
    assert captions.caption([sphere], "snow", np.ones((64, 64), np.uint8), depth) == "an empty scene on snow"
