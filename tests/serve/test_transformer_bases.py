"""A server whose base is a transformer (a tiny SD3 model with an SD3 ControlNet): sd-webui's txt2img
with a ControlNet unit and ``/v1/generate`` give the Python API's image (the family's sampler when the
request names none: euler; sd-webui's default "Euler" is the flow one), a noise-prediction sampler is a 400."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def sd3_pipe():
    from controlstack import Pipeline
    from controlstack.models.tiny_mmdit import tiny_sd3, tiny_sd3_controlnet

    base = tiny_sd3(seed=0)
    return Pipeline(base, controlnets={"canny": tiny_sd3_controlnet(base.unet, seed=5)}, name="sd3-tiny")


@pytest.fixture()
def client(sd3_pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app

    return TestClient(create_app(lambda: sd3_pipe))


EDGES = np.zeros((32, 32, 3), np.uint8)
EDGES[8:24, 16] = 255


def b64(a) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_sd_webui_and_v1_jobs_on_an_sd3_base(client, sd3_pipe):
    from controlstack import Control

    direct = sd3_pipe("a red box", [Control("canny", EDGES, weight=0.8)], steps=2, cfg=4.0, width=32, height=32,
                      seed=7, progress=False)[0]
    unit = {"image": b64(EDGES), "model": "canny", "module": "none", "weight": 0.8, "resize_mode": "Just Resize"}
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red box", "steps": 2, "cfg_scale": 4, "width": 32,
                                               "height": 32, "seed": 7,
                                               "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(direct))
    assert json.loads(r.json()["info"])["sampler_name"] == "Euler"  # sd-webui's default: the flow Euler here

    r = client.post("/v1/generate", json={"prompt": "a red box", "steps": 2, "cfg": 4, "width": 32, "height": 32,
                                          "seed": 7, "controls": [{"model": "canny", "image": b64(EDGES),
                                                                   "weight": 0.8}]})
    assert r.status_code == 202, r.text
    for _ in range(400):
        record = client.get(f"/v1/jobs/{r.json()['id']}").json()
        if record["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert record["status"] == "done", record
    image = Image.open(io.BytesIO(base64.b64decode(record["images"][0]))).convert("RGB")
    assert np.array_equal(np.asarray(image), np.asarray(direct))

    r = client.post("/v1/generate", json={"prompt": "a", "steps": 2, "width": 32, "height": 32, "scheduler": "unipc"})
    assert r.status_code == 400 and "samples with euler" in r.json()["error"]
