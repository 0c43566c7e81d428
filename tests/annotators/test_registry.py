"""Registry contract, parameter validation and command-line parsing."""

from __future__ import annotations

import pytest

from controlstack import annotators
from controlstack.errors import ControlstackError

CONTRACT = ["canny", "lines", "softedge", "scribble", "lineart", "shuffle", "tile", "inpaint", "normal",
            "seg", "pose", "binary", "invert", "depth", "hed", "scribble_hed", "normal_estimate", "seg_estimate",
            "pose_estimate"]


def test_registry_names_are_the_contract():
    assert annotators.available() == CONTRACT
    for name in CONTRACT:
        cls = annotators.annotator_class(name)
        assert cls.NAME == name
        assert cls.LEARNED == (name in annotators.LEARNED)


def test_unknown_name_lists_known_names():
    with pytest.raises(ControlstackError, match=r"unknown annotator 'cany'; choose one of canny, lines"):
        annotators.get("cany")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ControlstackError, match=r"canny has no parameter 'low'; valid parameters: resolution, "
                                                r"low_threshold, high_threshold, l2_gradient"):
        annotators.get("canny", low=3)


@pytest.mark.parametrize("name, params, message", [
    ("canny", {"low_threshold": 250, "high_threshold": 200},
     r"canny: low_threshold \(250\) is above high_threshold \(200\); choose low <= high, both in \[1, 255\]"),
    ("canny", {"low_threshold": 0}, r"canny: low_threshold must be in \[1, 255\], got 0"),
    ("canny", {"low_threshold": 1.5}, r"canny: low_threshold must be an integer in \[1, 255\], got 1.5"),
    ("canny", {"l2_gradient": "yes"}, r"canny: l2_gradient must be true or false"),
    ("scribble", {"width": 0}, r"scribble: width must be in \[1, 32\], got 0"),
    ("softedge", {"sigmas": ()}, r"softedge: sigmas must be a non-empty list"),
    ("lineart", {"method": "hed"}, r"lineart: method must be one of standard, xdog, got 'hed'"),
    ("tile", {"resolution": 0}, r"tile: resolution must be in \[1, 4096\], got 0"),
    ("shuffle", {"f": float("nan")}, r"shuffle: f must be an integer"),
])
def test_bad_values_name_the_parameter_and_range(name, params, message):
    with pytest.raises(ControlstackError, match=message):
        annotators.get(name, **params)


def test_parse_converts_by_type_and_rejects_garbage():
    cls = annotators.annotator_class("softedge")
    assert cls.parse({"sigmas": "1,2.5", "safe": "true", "gain": "3", "resolution": "none"}) == {
        "sigmas": (1.0, 2.5), "safe": True, "gain": 3.0, "resolution": None}
    with pytest.raises(ControlstackError, match=r"softedge: gain must be a number in \[0.1, 50\], got 'x'"):
        cls.parse({"gain": "x"})
    with pytest.raises(ControlstackError, match=r"softedge: safe must be true or false, got 'maybe'"):
        cls.parse({"safe": "maybe"})


def test_pixel_perfect_uses_the_core_rule(astronaut):
    from controlstack.io.images import pixel_perfect_resolution

    a = annotators.get("canny").pixel_perfect(astronaut.size, 768, 512, "crop_and_resize")
    assert a.resolution == pixel_perfect_resolution(astronaut.size, 768, 512, "crop_and_resize") == 768
    assert a(astronaut).size == (768, 768)
    b = annotators.get("canny").pixel_perfect(astronaut.size, 768, 512, "resize_and_fill")
    assert b.resolution == 512


def test_resolution_scales_short_side_and_rejects_runaway_aspect():
    import numpy as np

    out = annotators.get("invert", resolution=64)(np.zeros((100, 300, 3), np.uint8))
    assert out.size == (192, 64)
    with pytest.raises(ControlstackError, match=r"invert: resolution 512 makes this 4000x2 image"):
        annotators.get("invert")(np.zeros((2, 4000), np.uint8))


@pytest.mark.parametrize("name, condition", [
    ("mi-canny", "canny"), ("control_v11p_sd15_openpose.safetensors", "pose"), ("control_v11f1p_sd15_depth", "depth"),
    ("models/control_sd15_mlsd.safetensors", "lines"), ("runs/seg-finetune/model", "seg"), ("omni", None),
    ("my_controlnet", None)])
def test_a_controlnets_name_tells_its_condition(name, condition):
    assert annotators.condition_in_name(name) == condition


def test_preprocess_follows_the_condition_a_controlnet_takes(tmp_path):
    import json

    # the bundled MI models by their training record, an Omni task by its annotator
    assert annotators.for_control("mi-canny") == "canny" and annotators.for_control("mi-seg") == "seg"
    assert annotators.for_control("omni", "depth") == "depth" and annotators.for_control("omni", "pose") == "pose_estimate"
    # a recipe's output folder (named "model") by the condition its controlstack.json records
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "controlstack.json").write_text(json.dumps({"training": {"condition": "scribble"}}))
    assert annotators.for_control(str(folder)) == "scribble"
    (folder / "controlstack.json").write_text("{}")
    with pytest.raises(ControlstackError, match=r"cannot tell which annotator control model '.*model' needs.*"
                                                r"--module I:canny"):
        annotators.for_control(str(folder))
