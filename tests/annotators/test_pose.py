"""Pose JSON round trip, stick-figure colours at known joints, edits, and a torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from controlstack import annotators
from controlstack.annotators import pose as P
from controlstack.errors import ControlstackError

# a standing person on a 512x768 canvas (pixels), every body joint present
BODY = [[256, 120], [256, 200], [196, 200], [170, 300], [160, 390], [316, 200], [342, 300], [352, 390],
        [216, 400], [210, 530], [205, 660], [296, 400], [302, 530], [307, 660], [240, 105], [272, 105],
        [226, 115], [286, 115]]


def _person(hands=True, face=True):
    body = [v for x, y in BODY for v in (float(x), float(y), 1.0)]
    hand = [v for i in range(21) for v in (150.0 + i, 400.0 + 2 * i, 0.9)] if hands else None
    face_pts = [v for i in range(70) for v in (240.0 + i % 10 * 3, 95.0 + i // 10 * 3, 0.8)] if face else None
    return {"pose_keypoints_2d": body, "hand_left_keypoints_2d": hand,
            "hand_right_keypoints_2d": [0.0] * 63 if hands else None, "face_keypoints_2d": face_pts}


def _doc():
    animal = [v for i in range(17) for v in (60.0 + 5 * i, 600.0 + 3 * i, 1.0)]
    return {"people": [_person(), _person(hands=False, face=False)], "animals": [animal],
            "canvas_width": 512, "canvas_height": 768, "version": "editor-1"}


def test_json_round_trips_exactly(tmp_path):
    doc = _doc()
    doc["people"][1]["pose_keypoints_2d"][3:6] = [0.0, 0.0, 0.0]  # a missing joint
    path = tmp_path / "pose.json"
    path.write_text(json.dumps(doc))
    pose = P.read_openpose_json(path)
    assert len(pose.people) == 2 and pose.people[0].body.shape == (18, 3)
    assert pose.people[1].left_hand is None and pose.animals[0].shape == (17, 3)
    out = tmp_path / "back.json"
    P.write_openpose_json(pose, out)
    assert json.loads(out.read_text()) == doc
    again = P.read_openpose_json(out)
    assert all(np.array_equal(a.body, b.body) for a, b in zip(again.people, pose.people))


def test_render_draws_the_reference_colours_at_known_joints():
    pose = P.parse_openpose({"people": [_person(hands=False, face=False)], "canvas_width": 512,
                             "canvas_height": 768})
    img = P.render(pose)
    assert img.shape == (768, 512, 3) and img.dtype == np.uint8
    for k, (x, y) in enumerate(BODY):  # every joint centre carries its OpenPose colour
        assert tuple(img[y, x]) == P.COLORS[k], P.BODY_18[k]
    # limb middles carry 0.6 x the limb colour: right upper arm (neck..., limb 3 = joints 3-4)
    x, y = (196 + 170) // 2, (200 + 300) // 2
    assert tuple(img[y, x]) == tuple(int(c * 0.6) for c in P.COLORS[2])
    # right thigh (limb 7: joints 9-10) and left shin (limb 12: joints 13-14)
    assert tuple(img[465, 213]) == tuple(int(c * 0.6) for c in P.COLORS[7])
    assert tuple(img[595, 304]) == tuple(int(c * 0.6) for c in P.COLORS[11])
    assert tuple(img[0, 0]) == (0, 0, 0) and tuple(img[400, 256]) == (0, 0, 0)
    assert len(P.LIMBS) == 17 and len(P.COLORS) == 18


def test_render_openpose_takes_plain_arrays_and_any_resolution():
    body = np.array([[x, y, 1.0] for x, y in BODY])
    a = P.render_openpose([body], 512, 768)
    assert np.array_equal(a, P.render(P.PoseData([P.Person(body)], [], 512, 768)))
    pose = P.PoseData([P.Person(body)], [], 512, 768)
    big = P.render(pose, 1024, 1536)
    assert big.shape == (1536, 1024, 3)
    assert tuple(big[240, 512]) == P.COLORS[0]  # the nose moved with the canvas


def test_hands_face_and_animals_are_drawn():
    pose = P.parse_openpose(_doc())
    img = P.render(pose)
    hand = pose.people[0].left_hand
    assert tuple(img[int(hand[20, 1]), int(hand[20, 0])]) == (0, 0, 255)   # hand joints are blue
    face = pose.people[0].face
    bare = P.render_openpose([P.Person(np.zeros((18, 3)), face=face)], 512, 768)
    assert tuple(bare[int(face[35, 1]), int(face[35, 0])]) == (255, 255, 255)
    no_face = P.render(pose, face=False, hands=False)
    assert not np.array_equal(no_face, img)
    a = np.zeros((17, 3))
    a[[0, 1, 2], :] = [[100, 100, 1], [140, 100, 1], [120, 140, 1]]  # eyes and nose only
    animals = P.render_animal([a], 512, 768)
    assert tuple(animals[120, 130]) == P.ANIMAL_COLORS[1]  # right eye - nose: limb 2
    assert tuple(animals[120, 110]) == P.ANIMAL_COLORS[2]  # left eye - nose: limb 3
    mid = ((a[0, :2] + a[1, :2]) / 2).astype(int)  # limb 1 (left eye - right eye) is white
    assert tuple(animals[mid[1], mid[0]]) == P.ANIMAL_COLORS[0]


def test_mirror_swaps_left_and_right():
    pose = P.parse_openpose(_doc())
    m = P.mirror(pose)
    body, mb = pose.people[0].body, m.people[0].body
    # the right wrist of the mirror is the old left wrist, flipped
    assert mb[4, 0] == 511 - body[7, 0] and mb[4, 1] == body[7, 1]
    assert mb[0, 0] == 511 - body[0, 0]  # the nose stays the nose
    assert m.people[0].right_hand is not None and np.array_equal(
        m.people[0].right_hand[:, 1], pose.people[0].left_hand[:, 1])
    assert np.array_equal(m.people[0].face[45, 1], pose.people[0].face[36, 1])
    assert m.animals[0][0, 0] == 511 - pose.animals[0][1, 0]
    assert P.to_openpose(P.mirror(m)) == P.to_openpose(pose)  # mirroring twice is the identity


def test_move_scale_keep_missing_points_missing():
    doc = _doc()
    doc["people"][0]["pose_keypoints_2d"][3:6] = [0.0, 0.0, 0.0]
    pose = P.parse_openpose(doc)
    moved = P.move(pose, 10, -5)
    assert moved.people[0].body[0, 0] == 266 and moved.people[0].body[0, 1] == 115
    assert moved.people[0].body[1].tolist() == [0.0, 0.0, 0.0]
    scaled = P.scale(pose, 2.0, center=(256, 120))
    assert scaled.people[0].body[1].tolist() == [0.0, 0.0, 0.0]
    assert scaled.people[0].body[2, :2].tolist() == [136.0, 280.0]


def test_pose_annotator_renders_json_with_edits(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_doc()))
    out = annotators.get("pose", json=str(path), resolution=None)()
    assert out.size == (512, 768)
    assert np.array_equal(np.asarray(out), P.render(P.parse_openpose(_doc())))
    mirrored = annotators.get("pose", json=str(path), resolution=None, mirror=True)()
    assert np.array_equal(np.asarray(mirrored), P.render(P.mirror(P.parse_openpose(_doc()))))
    at_image = annotators.get("pose", json=str(path), resolution=None)(np.zeros((384, 256, 3), np.uint8))
    assert at_image.size == (256, 384)


def test_bad_pose_json(tmp_path):
    with pytest.raises(ControlstackError, match="pose JSON needs integer 'canvas_width'"):
        P.parse_openpose({"people": []})
    with pytest.raises(ControlstackError, match=r"people\[0\].pose_keypoints_2d has 2 points; expected 18"):
        P.parse_openpose({"people": [{"pose_keypoints_2d": [1, 2, 1, 3, 4, 1]}], "canvas_width": 8,
                          "canvas_height": 8})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ControlstackError, match="is not valid JSON"):
        P.read_openpose_json(bad)


def test_ap10k_coco_annotations():
    ann = [{"keypoints": [v for i in range(17) for v in (10 + i, 20 + i, 2 if i % 2 else 0)]}]
    pose = P.parse_ap10k_coco(ann, 64, 64)
    assert pose.animals[0][:, 2].tolist() == [float(i % 2) for i in range(17)]


def test_pose_module_imports_without_torch():
    src = Path(__file__).resolve().parents[2] / "src"
    code = (
        "import sys, types\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        # skip controlstack/__init__ (the Pipeline, which needs torch): what is tested is the pose
        # module and what it imports itself
        f"pkg = types.ModuleType('controlstack'); pkg.__path__ = [{str(src / 'controlstack')!r}]\n"
        "sys.modules['controlstack'] = pkg\n"
        "from controlstack.annotators.pose import render_openpose, render_animal\n"
        "import numpy as np\n"
        "img = render_openpose([np.zeros((18, 3))], 8, 8)\n"
        "print(img.shape, 'torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(8, 8, 3) False"
