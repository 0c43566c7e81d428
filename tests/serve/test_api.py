"""The HTTP API with FastAPI's test client: sd-webui's txt2img / img2img with ControlNet units, the
lists clients read, and every error as JSON (bad base64, oversized images, path-like model names,
bad JSON, out-of-range values, a full queue, a missing token)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def tiny_pipe(tiny_components, tiny_controlnets):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={"canny": tiny_controlnets[0], "depth": tiny_controlnets[1]},
                    name="tiny")


@pytest.fixture()
def client(tiny_pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app

    return TestClient(create_app(lambda: tiny_pipe))


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


EDGES = np.zeros((64, 64, 3), np.uint8)
EDGES[16:48, 32] = 255
UNIT = {"image": b64(Image.fromarray(EDGES)), "model": "control_v11p_sd15_canny [d14c016b]", "module": "none",
        "weight": 0.8, "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "ControlNet is more important",
        "resize_mode": "Just Resize"}
BODY = {"prompt": "a red box", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler_name": "DPM++ 2M",
        "cfg_scale": 5, "alwayson_scripts": {"ControlNet": {"args": [UNIT]}}}


def test_txt2img_with_a_controlnet_unit_as_sd_webui_answers(client, tiny_pipe):
    from controlstack import Control

    r = client.post("/sdapi/v1/txt2img", json=BODY)
    assert r.status_code == 200, r.text
    data = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert image.size == (64, 64) and "Sampler: DPM++ 2M" in image.info["parameters"]
    info = json.loads(data["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7] and "ControlNet is more important" in info["infotexts"][0]
    # the same image as the Python API with the same values
    direct = tiny_pipe("a red box", [Control("canny", Image.fromarray(EDGES), weight=0.8)], steps=2, width=64,
                       height=64, seed=7, scheduler="dpmpp_2m", cfg=5, mode="controlnet", progress=False)[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct))


def test_img2img_with_init_image_and_mask(client):
    init = b64(Image.fromarray(np.full((64, 64, 3), 120, np.uint8)))
    mask = b64(Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)))
    r = client.post("/sdapi/v1/img2img", json={**BODY, "init_images": [init], "denoising_strength": 0.6,
                                                "mask": mask})
    assert r.status_code == 200, r.text
    assert "Denoising strength: 0.6" in json.loads(r.json()["info"])["infotexts"][0]


def test_the_lists_clients_read(client):
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/model_list").json() == {"model_list": ["canny", "depth"]}
    assert "canny" in client.get("/controlnet/module_list").json()["module_list"]
    assert {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in client.get("/sdapi/v1/samplers").json()
    assert [c["name"] for c in client.get("/v1/models").json()["controlnets"]] == ["canny", "depth"]
    assert client.get("/openapi.json").json()["paths"]["/sdapi/v1/txt2img"]
    assert "low_threshold" in [p["name"] for p in client.get("/v1/annotators").json()["canny"]]


@pytest.mark.parametrize("change, message", [
    ({"alwayson_scripts": {"ControlNet": {"args": [{**UNIT, "image": "%%%not-base64"}]}}}, "not valid base64"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{**UNIT, "image": base64.b64encode(b"hello").decode()}]}}},
     "not an image PIL can read"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{**UNIT, "model": "../../etc/passwd"}]}}},
     "is not a registered model"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{**UNIT, "model": "/tmp/canny"}]}}}, "is not a registered model"),
    ({"steps": -1}, "'steps' must be an integer in [1, 150], got -1"),
    ({"steps": "many"}, "'steps' must be an integer"),
    ({"width": 100000}, "'width' must be an integer in [8, 1024]"),
    ({"sampler_name": "Heun++"}, "'sampler_name' 'Heun++' is unknown"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{**UNIT, "control_mode": 7}]}}}, "control_mode"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{**UNIT, "guidance_start": 0.9, "guidance_end": 0.1}]}}},
     "is after guidance_end"),
])
def test_client_errors_are_json_400_naming_the_problem(client, change, message):
    r = client.post("/sdapi/v1/txt2img", json={**BODY, **change})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert "Traceback" not in r.text and "/work" not in r.text


def test_bad_json_huge_images_and_a_missing_init_image(client):
    r = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "the request body is not valid JSON"
    bomb = b64(Image.new("1", (20000, 20000)))  # a few kB of PNG that decodes to 400 M pixels
    r = client.post("/v1/annotate", json={"annotator": "invert", "image": bomb})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    big = b64(Image.new("RGB", (5000, 10)))
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": {"ControlNet": {"args": [{**UNIT,
                                                                                                     "image": big}]}}})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    r = client.post("/sdapi/v1/img2img", json=BODY)
    assert r.status_code == 400 and "needs 'init_images'" in r.json()["error"]


def test_a_token_is_required_when_set_and_a_full_queue_answers_429(tiny_pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import Worker, create_app

    client = TestClient(create_app(lambda: tiny_pipe, token="s3cret"))
    assert client.get("/controlnet/version").status_code == 401
    assert client.get("/controlnet/version", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/controlnet/version", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    busy = TestClient(create_app(lambda: tiny_pipe, queue_size=0))
    original = Worker.generate
    try:
        Worker.generate = lambda self, job: (_ for _ in ()).throw(__import__(
            "controlstack.serve.app", fromlist=["Busy"]).Busy())
        r = busy.post("/sdapi/v1/txt2img", json=BODY)
    finally:
        Worker.generate = original
    assert r.status_code == 429 and r.headers["retry-after"] == "5"


def test_serve_refuses_a_public_address_without_a_token(capsys):
    from controlstack.cli.main import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "set --token" in capsys.readouterr().err


def _wait(client, job_id, statuses=("done", "failed", "cancelled"), timeout=120):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        record = client.get(f"/v1/jobs/{job_id}").json()
        if record["status"] in statuses:
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {record}")


def test_v1_generate_job_with_progress_and_the_same_image_as_the_python_api(client, tiny_pipe):
    from controlstack import Control

    body = {"prompt": "a red box", "steps": 3, "width": 64, "height": 64, "seed": 5, "scheduler": "unipc",
            "controls": [{"model": "canny", "image": UNIT["image"], "weight": [[0.0, 1.0], [1.0, 0.2]], "end": 0.8}]}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 202, r.text
    record = _wait(client, r.json()["id"])
    assert record["status"] == "done" and record["progress"] == [3, 3]
    image = Image.open(io.BytesIO(base64.b64decode(record["images"][0])))
    direct = tiny_pipe("a red box", [Control("canny", Image.fromarray(EDGES), weight=[(0.0, 1.0), (1.0, 0.2)],
                                             end=0.8)], steps=3, width=64, height=64, seed=5, progress=False)[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct))
    assert client.get("/v1/jobs/nope").status_code == 404


def test_v1_cancel_stops_a_job_and_bad_bodies_are_400(client):
    r = client.post("/v1/generate", json={"prompt": "x", "steps": 50, "width": 64, "height": 64})
    job_id = r.json()["id"]
    _wait(client, job_id, ("running", "done"))
    client.delete(f"/v1/jobs/{job_id}")
    assert _wait(client, job_id)["status"] == "cancelled"
    for body, message in [({"prompt": "x", "steps": 0}, "'steps' must be an integer in [1, 150]"),
                          ({"prompt": "x", "colour": 1}, "unknown field(s) colour"),
                          ({"prompt": "x", "controls": [{"model": "../x", "image": UNIT["image"]}]},
                           "is not a registered model")]:
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.text


def test_detect_and_annotate(client):
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [UNIT["image"]],
                                                "controlnet_processor_res": 64})
    assert r.status_code == 200 and r.json()["info"] == "Success"
    r = client.post("/v1/annotate", json={"annotator": "invert", "image": UNIT["image"], "params": {"resolution": 64}})
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).convert("RGB"))
    assert out[0, 0, 0] == 255 and out[20, 32, 0] == 0
    r = client.post("/v1/annotate", json={"annotator": "depth", "image": UNIT["image"], "params": {"weights": "/etc"}})
    assert r.status_code == 400 and "cannot be set over HTTP" in r.json()["error"]
    r = client.post("/controlnet/detect", json={"controlnet_module": "rm -rf", "controlnet_input_images": []})
    assert r.status_code == 400 and "unknown" in r.json()["error"]


def test_progress_events_and_the_sdapi_extras(client):
    r = client.post("/v1/generate", json={"prompt": "x", "steps": 3, "width": 64, "height": 64})
    job_id = r.json()["id"]
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["status"] == "done" and events[-1]["progress"] == [3, 3]
    assert [e["progress"][0] for e in events] == sorted(e["progress"][0] for e in events)  # steps only go up
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0.0  # nothing running now
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


def test_a_job_over_the_time_limit_stops_with_a_message(tiny_pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app
    from controlstack.serve.webui import Limits

    client = TestClient(create_app(lambda: tiny_pipe, limits=Limits(job_seconds=0.0)))
    r = client.post("/sdapi/v1/txt2img", json=BODY)
    assert r.status_code == 400 and "ran longer than the server's 0 s limit" in r.json()["error"]
    job_id = client.post("/v1/generate", json={"prompt": "x", "steps": 3, "width": 64, "height": 64}).json()["id"]
    record = _wait(client, job_id)
    assert record["status"] == "failed" and "ran longer" in record["error"]


def test_several_bases_by_name_with_a_memory_budget(tiny_pipe, tiny_components):
    from fastapi.testclient import TestClient

    from controlstack import Pipeline
    from controlstack.serve.app import create_app, model_bytes

    loads = []

    def other():
        loads.append("other")
        return Pipeline(tiny_components, controlnets={"canny": tiny_pipe.controlnets["canny"]}, name="other")

    budget = model_bytes(tiny_pipe) * 1.5 / 2**30  # room for one base only
    client = TestClient(create_app({"default": lambda: tiny_pipe, "other": other}, memory_gib=budget))
    assert [m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()] == ["default", "other"]
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {"sd_model_checkpoint": "other"}})
    assert r.status_code == 200 and "Model: other" in json.loads(r.json()["info"])["infotexts"][0]
    client.post("/sdapi/v1/txt2img", json=BODY)  # the default again: "other" is unloaded (over budget)
    client.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {"sd_model_checkpoint": "other"}})
    assert loads == ["other", "other"]
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {"sd_model_checkpoint": "../x"}})
    assert r.status_code == 400 and "is not registered; choose one of default, other" in r.json()["error"]
