"""Models carry their recommended settings: used where a call leaves a value unset, never over an
explicit one, recorded in the PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controlstack import Control, Pipeline
from controlstack.errors import ControlstackError


@pytest.fixture()
def folders(tmp_path, tiny_controlnets):
    out = {}
    for name, rec in [("uniform", {"mode": "controlnet", "mode_options": {"layer_weights": "uniform"}}),
                      ("mi", {"mode": "mi"}), ("plain", None), ("window", {"start": 0.25, "end": 0.5})]:
        tiny_controlnets[0].save_pretrained(tmp_path / name)
        if rec:
            (tmp_path / name / "controlstack.json").write_text(json.dumps({"recommended": rec}))
        out[name] = str(tmp_path / name)
    return out


def test_recommendations_fill_what_is_unset(tiny_components, folders, hint_images):
    pipe = Pipeline(tiny_components, recommended={"cfg": 3.0, "steps": 4})
    s = pipe.settings([Control(folders["uniform"], hint_images[0])], None, None, None, None)
    assert s == {"steps": 4, "cfg": 3.0, "mode": "controlnet", "mode_options": {"layer_weights": "uniform"}}
    # explicit values win; the same mode given explicitly keeps the recommended options
    assert pipe.settings([Control(folders["uniform"], hint_images[0])], 9, 5.0, "balanced", None) == \
        {"steps": 9, "cfg": 5.0, "mode": "balanced", "mode_options": None}
    assert pipe.settings([Control(folders["uniform"], hint_images[0])], None, None, "controlnet", None)["mode_options"] \
        == {"layer_weights": "uniform"}
    assert pipe.settings([Control(folders["uniform"], hint_images[0])], None, None, "controlnet",
                         {"layer_weights": "soft"})["mode_options"] == {"layer_weights": "soft"}
    # controls that disagree (or one without a recommendation): the defaults
    mixed = [Control(folders["uniform"], hint_images[0]), Control(folders["mi"], hint_images[0])]
    assert pipe.settings(mixed, None, None, None, None)["mode"] == "balanced"
    assert pipe.settings([Control(folders["plain"], hint_images[0])], None, None, None, None)["mode"] == "balanced"
    assert Pipeline(tiny_components).settings([], None, None, None, None) == \
        {"steps": 20, "cfg": 7.5, "mode": "balanced", "mode_options": None}


def test_the_image_and_its_record_use_the_recommended_values(tiny_components, folders, hint_images):
    pipe = Pipeline(tiny_components, recommended={"cfg": 3.0, "steps": 2})
    kw = dict(width=64, height=64, seed=1, progress=False)
    result = pipe("x", [Control(folders["uniform"], hint_images[0])], return_result=True, output_type="np", **kw)
    explicit = pipe("x", [Control(folders["uniform"], hint_images[0])], steps=2, cfg=3.0, mode="controlnet",
                    mode_options={"layer_weights": "uniform"}, output_type="np", **kw)
    assert np.array_equal(result.images, explicit)
    p = result.parameters
    assert (p["steps"], p["cfg"], p["mode"], p["mode_options"]) == (2, 3.0, "controlnet", {"layer_weights": "uniform"})


def test_bad_recommendations_are_one_line(tmp_path):
    from controlstack.io.settings import recommended

    (tmp_path / "controlstack.json").write_text(json.dumps({"recommended": {"cfg": "high"}}))
    with pytest.raises(ControlstackError, match="recommended cfg must be a number >= 0, got 'high'"):
        recommended(tmp_path)
    (tmp_path / "controlstack.json").write_text(json.dumps({"recommended": {"sampler": "x"}}))
    with pytest.raises(ControlstackError, match="unknown recommended key 'sampler'"):
        recommended(tmp_path)
    (tmp_path / "controlstack.json").write_text(json.dumps({"recommended": {"control_window": [0.8, 0.2]}}))
    with pytest.raises(ControlstackError, match=r"recommended control_window must be \[start, end\]"):
        recommended(tmp_path)


def test_the_bundle_declares_its_settings():
    from controlstack import assets
    from controlstack.io.settings import recommended

    # the late starts docs/windows.md measured (pose keeps the whole run)
    for name, start in (("canny", 0.5), ("depth", 0.25), ("seg", 0.4), ("pose", None)):
        assert recommended(assets.BUNDLE_DIR / "controlnets" / name) == \
            {"mode": "controlnet", "mode_options": {"layer_weights": "uniform"}, **({"start": start} if start else {})}
    # the base declares the mode of its ControlNets: the same its bundled ones declare
    assert recommended(assets.BUNDLE_DIR) == {"cfg": 7.0, "steps": 20, "precision": "fp32", "mode": "controlnet",
                                              "mode_options": {"layer_weights": "uniform"}}
    assert recommended(assets.BUNDLE_DIR / "controlnets" / "mi-canny")["mode"] == "mi"


def test_far_from_native_size_warns(tiny_components, caplog):
    pipe = Pipeline(tiny_components)
    with caplog.at_level("WARNING", logger="controlstack"):
        pipe("x", steps=1, width=256, height=64, progress=False)
    assert "far from the model's native 64x64" in caplog.text


def test_prompt_warnings_for_truncation_and_unknown_words(tiny_components, caplog):
    pipe = Pipeline(tiny_components, vocabulary=["a", "red", "box"])
    with caplog.at_level("WARNING", logger="controlstack"):
        pipe.check_prompt("a red box")
        assert caplog.text == ""
        pipe.check_prompt("a red zebra " + "box " * 20)
    assert "prompt is" in caplog.text and "the text encoder reads 16" in caplog.text
    assert "words the model was not trained on: zebra" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="controlstack"):
        Pipeline(tiny_components).check_prompt("a zebra")  # no declared vocabulary: no word warning
    assert caplog.text == ""


def test_high_order_multistep_with_a_cond_only_mode_and_strong_guidance_is_refused(pipe, tiny_controlnets,
                                                                                   hint_images):
    c = [Control(tiny_controlnets[0], hint_images[0])]
    kw = dict(steps=4, width=64, height=64, progress=False)  # PNDM needs a few steps
    with pytest.raises(ControlstackError, match="scheduler 'pndm' with mode 'controlnet' at CFG 7.5 turns the image "
                                                "to speckle"):
        pipe("x", c, scheduler="pndm", mode="controlnet", cfg=7.5, **kw)
    pipe("x", c, scheduler="lms", mode="controlnet", cfg=4.0, **kw)   # weak guidance: fine
    pipe("x", c, scheduler="pndm", mode="balanced", cfg=7.5, **kw)   # both halves: fine
    pipe("x", [], scheduler="pndm", mode="controlnet", cfg=7.5, **kw)  # no control: nothing to amplify


UNIFORM = {"mode": "controlnet", "mode_options": {"layer_weights": "uniform"}}


def test_a_base_declares_the_mode_of_controlnets_that_declare_none(tiny_components, tiny_controlnets, folders,
                                                                    hint_images):
    pipe = Pipeline(tiny_components, recommended={"mode": "controlnet", "mode_options": {"layer_weights": "uniform"}})
    resolved = {"steps": 20, "cfg": 7.5, **UNIFORM}
    plain = Control(folders["plain"], hint_images[0])
    assert pipe.settings([plain], None, None, None, None) == resolved
    assert pipe.settings([Control(tiny_controlnets[0], hint_images[0])], None, None, None, None) == resolved  # object
    # a declared ControlNet and an undeclared one on this base resolve to the same mode
    assert pipe.settings([Control(folders["uniform"], hint_images[0]), plain], None, None, None, None) == resolved
    # a ControlNet's own declaration wins over the base's: mi + the base's controlnet disagree -> the default
    assert pipe.settings([Control(folders["mi"], hint_images[0])], None, None, None, None)["mode"] == "mi"
    assert pipe.settings([Control(folders["mi"], hint_images[0]), plain], None, None, None, None)["mode"] == "balanced"
    assert pipe.settings([plain], None, None, "balanced", None)["mode"] == "balanced"  # explicit wins
    assert pipe.settings([], None, None, None, None)["mode"] == "balanced"  # no ControlNet: nothing to stand in for
    # the base's options never ride on a ControlNet's own mode
    mi_base = Pipeline(tiny_components, recommended={"mode": "mi", "mode_options": {"reduce": "position"}})
    assert mi_base.settings([Control(folders["uniform"], hint_images[0])], None, None, None, None)["mode_options"] \
        == {"layer_weights": "uniform"}


def test_the_bundled_base_and_its_controlnets_resolve_to_one_mode(folders, hint_images):
    from controlstack import assets

    if assets.is_placeholder():
        pytest.skip("no trained bundle in this checkout")
    pipe = Pipeline.from_pretrained()
    mixed = [Control("canny", hint_images[0]), Control(folders["plain"], hint_images[0])]
    assert pipe.settings(mixed, None, None, None, None) == {"steps": 20, "cfg": 7.0, **UNIFORM}


def test_unset_windows_resolve_to_the_recommendation_else_the_whole_run(tiny_components, folders, hint_images):
    c = Control(folders["window"], hint_images[0])
    assert (c.start, c.end) == (None, None)  # unset until the pipeline resolves it
    pipe = Pipeline(tiny_components)

    def windows(controls):
        return [(w.start, w.end) for w in pipe.with_windows(controls)]

    assert windows([c]) == [(0.25, 0.5)]
    assert (c.start, c.end) == (None, None)  # the caller's object is left as it is
    assert windows([Control(folders["window"], hint_images[0], start=0.0, end=1.0)]) == [(0.0, 1.0)]  # explicit
    assert windows([Control(folders["window"], hint_images[0], end=0.75)]) == [(0.25, 0.75)]  # key by key
    assert windows([Control(folders["plain"], hint_images[0])]) == [(0.0, 1.0)]
    # the base's window stands in for ControlNets that declare none, as its mode does
    base = Pipeline(tiny_components, recommended={"start": 0.1, "end": 0.9})
    assert [(w.start, w.end) for w in base.with_windows([Control(folders["plain"], hint_images[0]), c])] == \
        [(0.1, 0.9), (0.25, 0.5)]
    with pytest.raises(ControlstackError, match="window start=0.6, end=0.5 .* set both start and end"):
        pipe.with_windows([Control(folders["window"], hint_images[0], start=0.6)])
    # a few-step student's control_window wins over every ControlNet's own; an explicit one over it
    student = Pipeline(tiny_components, recommended={"control_window": [0.0, 1.0], "start": 0.1})
    assert [(w.start, w.end) for w in student.with_windows([c, Control(folders["plain"], hint_images[0])])] == \
        [(0.0, 1.0), (0.0, 1.0)]
    assert [(w.start, w.end) for w in student.with_windows([Control(folders["window"], hint_images[0], start=0.5)])] \
        == [(0.5, 1.0)]


def test_the_resolved_window_runs_and_is_recorded(tiny_components, folders, hint_images):
    pipe = Pipeline(tiny_components)
    kw = {"steps": 4, "width": 64, "height": 64, "seed": 1, "progress": False, "mode": "balanced"}
    result = pipe("x", [Control(folders["window"], hint_images[0])], return_result=True, output_type="np", **kw)
    explicit = pipe("x", [Control(folders["window"], hint_images[0], start=0.25, end=0.5)], output_type="np", **kw)
    whole = pipe("x", [Control(folders["window"], hint_images[0], start=0.0, end=1.0)], output_type="np", **kw)
    assert np.array_equal(result.images, explicit) and not np.array_equal(result.images, whole)
    assert (result.parameters["controls"][0]["start"], result.parameters["controls"][0]["end"]) == (0.25, 0.5)


def test_bad_recommended_windows_are_one_line(tmp_path):
    from controlstack.io.settings import recommended

    for rec, message in [({"start": 1.5}, "recommended start must be a number in \\[0, 1\\], got 1.5"),
                         ({"end": "late"}, "recommended end must be a number in \\[0, 1\\], got 'late'"),
                         ({"start": 0.8, "end": 0.2}, "recommended start 0.8 is after end 0.2")]:
        (tmp_path / "controlstack.json").write_text(json.dumps({"recommended": rec}))
        with pytest.raises(ControlstackError, match=message):
            recommended(tmp_path)
    (tmp_path / "controlstack.json").write_text(json.dumps({"recommended": {"start": 0, "end": 0.5}}))
    assert recommended(tmp_path) == {"start": 0, "end": 0.5}


def test_a_small_undeclared_controlnet_in_balanced_warns_once(tiny_components, tiny_controlnets, folders,
                                                              hint_images, caplog):
    kw = {"steps": 1, "width": 64, "height": 64, "progress": False}
    plain = Control(folders["plain"], hint_images[0])
    with caplog.at_level("WARNING", logger="controlstack"):
        pipe = Pipeline(tiny_components)
        pipe("x", [Control(folders["uniform"], hint_images[0])], **kw)  # declared: no warning
        pipe("x", [plain], mode="balanced", **kw)                        # given: no warning
        Pipeline(tiny_components, recommended=UNIFORM)("x", [plain], **kw)  # the base declares it: none
        pipe("x", [], **kw)                                              # no control: nothing to follow
        assert "declares no recommended mode" not in caplog.text
        pipe("x", [plain], **kw)
        pipe("x", [Control(tiny_controlnets[0], hint_images[0])], **kw)
    assert caplog.text.count("declares no recommended mode") == 1  # once per pipeline
    assert "--mode controlnet --layer-weights uniform" in caplog.text and "plain" in caplog.text


def test_a_big_undeclared_controlnet_does_not_warn(tiny_components, folders, hint_images, caplog, monkeypatch):
    import controlstack.recommendations as rec

    monkeypatch.setattr(rec, "SMALL_CONTROLNET", 1000)  # the tiny ControlNet counts as big now
    with caplog.at_level("WARNING", logger="controlstack"):
        Pipeline(tiny_components)("x", [Control(folders["plain"], hint_images[0])], steps=1, width=64, height=64,
                                  progress=False)
    assert "declares no recommended mode" not in caplog.text


def test_a_base_folders_own_controlnets_are_read_from_it(tiny_components, tmp_path, hint_images):
    """``--model base/`` in the bundle's layout brings ``base/controlnets/NAME``: a name resolves
    there (as the loader resolves it), for its recommendation and its condition, not to the
    bundled ControlNet of the same name."""
    from controlstack import annotators
    from controlstack.io.settings import model_folder

    base = tmp_path / "base"
    for name, condition in (("foo", "canny"), ("canny", "depth")):
        (base / "controlnets" / name).mkdir(parents=True)
        (base / "controlnets" / name / "controlstack.json").write_text(json.dumps(
            {"recommended": {"mode": "prompt", "end": 0.5}, "training": {"condition": condition}}))
    assert model_folder("foo", base) == base / "controlnets" / "foo" and model_folder("foo") is None
    pipe = Pipeline(tiny_components, name="tiny")
    pipe.source = base
    assert pipe.control_recommendations([Control("canny", hint_images[0])]) == [{"mode": "prompt", "end": 0.5}]
    assert pipe.settings([Control("foo", hint_images[0])], None, None, None, None)["mode"] == "prompt"
    assert annotators.for_control("foo", base=base) == "canny"
    assert annotators.for_control("canny", base=base) == "depth" and annotators.for_control("canny") == "canny"
