"""The web UI: it builds and mounts beside the API, and the functions its widgets call work (no browser)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from controlstack.errors import ControlstackError


@pytest.fixture(scope="module")
def tiny_pipe(tiny_components, tiny_controlnets):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={"canny": tiny_controlnets[0]}, name="tiny")


def test_ui_mounts_at_root_beside_the_api(tiny_pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app

    client = TestClient(create_app(lambda: tiny_pipe, ui=True))
    assert client.get("/").status_code == 200 and "gradio" in client.get("/").text.lower()
    assert client.get("/controlnet/version").json() == {"version": 2}  # the API still answers under the mount


def test_preview_and_generate_with_a_drawn_mask(tiny_pipe):
    from controlstack.serve.ui import generate, preview

    photo = np.zeros((64, 64, 3), np.uint8)
    photo[20:44, 20:44] = 200
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[:, :32, 3] = 255  # the left half drawn
    value = {"background": photo, "layers": [layer], "composite": photo}
    edges = preview(value, "canny", 64)
    assert edges.size == (64, 64) and np.asarray(edges).max() == 255
    steps = []
    images, text = generate(tiny_pipe, threading.Lock(), "a red box", "", "Euler a", 2, 5, 3, 64, 64, 1,
                            "ControlNet is more important", [(True, value, "canny", "canny", 0.8, 0.0, 1.0)],
                            progress=lambda frac, desc: steps.append(frac))
    assert len(images) == 1 and "Sampler: Euler a" in text and "Module: canny" in text and steps[-1] == 1.0
    with pytest.raises(ControlstackError, match="Unit 0 is enabled but has no image"):
        generate(tiny_pipe, threading.Lock(), "x", "", "UniPC", 1, 5, 0, 64, 64, 1, "Balanced",
                 [(True, None, "none", "canny", 1.0, 0.0, 1.0)])
    with pytest.raises(ControlstackError, match="upload an image"):
        preview(None, "canny")
    assert preview(Image.fromarray(photo), "none").size == (64, 64)


def test_choosing_a_model_sets_its_recommended_window(tiny_components, tmp_path):
    import json

    from controlstack import Pipeline
    from controlstack.serve.ui import recommended_window

    base = tmp_path / "base"
    (base / "controlnets" / "late").mkdir(parents=True)
    (base / "controlnets" / "late" / "controlstack.json").write_text(json.dumps({"recommended": {"start": 0.4}}))
    (base / "controlstack.json").write_text(json.dumps({"recommended": {"end": 0.9}}))
    pipe = Pipeline.from_source(tiny_components, {}, "tiny", base)
    assert recommended_window(pipe, "late") == (0.4, 0.9)  # the ControlNet's start, the base's end
    assert recommended_window(pipe, None) == (0.0, 0.9)
    # a pipeline over in-memory components: its "canny" is its own, not the bundled one (start 0.5)
    assert recommended_window(Pipeline(tiny_components, name="tiny"), "canny") == (0.0, 1.0)
