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
                      ("mi", {"mode": "mi"}), ("plain", None)]:
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


def test_the_bundle_declares_its_settings():
    from controlstack import assets
    from controlstack.io.settings import recommended

    for name in ("canny", "depth", "seg", "pose"):
        assert recommended(assets.BUNDLE_DIR / "controlnets" / name) == \
            {"mode": "controlnet", "mode_options": {"layer_weights": "uniform"}}
    assert recommended(assets.BUNDLE_DIR) == {"cfg": 7.0, "steps": 20, "precision": "fp32"}
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
