"""Validation at acceptance: a /v1 job is checked whole when it is submitted (into a JobSpec), so an
invalid one is a 400 naming the field and never takes a queue slot; the spec is plain data that
round-trips through JSON; sd-webui bodies go through the same checks."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from tests.serve.test_api import BODY, UNIT, b64

V1 = {"prompt": "x", "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def pipe(tiny_components, tiny_controlnets):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={"canny": tiny_controlnets[0], "depth": tiny_controlnets[1]},
                    name="tiny")


def wait_for(client, job_id, statuses, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = client.get(f"/v1/jobs/{job_id}").json()
        if record["status"] in statuses:
            return record
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {statuses}: {record}")


def test_invalid_jobs_are_refused_when_submitted_and_take_no_queue_slot(pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app

    app = create_app(lambda: pipe, queue_size=1)
    client = TestClient(app)
    with app.state.worker.run_lock:  # the worker takes the first job, then waits here: the queue holds one more
        first = client.post("/v1/generate", json=V1).json()["id"]
        wait_for(client, first, ("running",))
        for change, message in [({"cfg": "x"}, "'cfg' must be a number in [0, 30], got 'x'"),
                                ({"seed": "x"}, "'seed' must be an integer in [-1, 9223372036854775807], got 'x'"),
                                ({"scheduler": "heun"}, "'scheduler' 'heun' is unknown; choose one of ddim"),
                                ({"negative_prompt": 3}, "'negative_prompt' must be a string, got 3")] * 3:
            r = client.post("/v1/generate", json={**V1, **change})
            assert r.status_code == 400 and r.json()["error"].startswith(message), r.text
        second = client.post("/v1/generate", json=V1)
        assert second.status_code == 202, second.text  # the 12 invalid ones left the one free slot free
        full = client.post("/v1/generate", json=V1)
        assert full.status_code == 429 and full.headers["retry-after"] == "5"
    assert wait_for(client, second.json()["id"], ("done", "failed"))["status"] == "done"
    assert client.get(f"/v1/jobs/{first}").json()["status"] == "done"


V1_CONTROL = {"model": "canny", "image": UNIT["image"]}


@pytest.mark.parametrize("change, message", [
    ({"width": 60}, "'width' must be a multiple of 8 in [8, 1024] for this base, got 60"),
    ({"height": 4}, "'height' must be an integer in [8, 1024], got 4"),
    ({"hires": 20}, "'hires' must be a number in [1, 8], got 20"),
    ({"width": 1024, "hires": 2.5}, "'hires' 2.5 makes 2560x160, over this server's 2048 px"),
    ({"strength": 0.5}, "'strength' applies to img2img: give 'init_image' too"),
    ({"hires_strength": 0.5}, "'hires_strength' applies to the hires fix: give 'hires' too"),
    ({"inpaint_mask": UNIT["image"]}, "'inpaint_mask' needs 'init_image' (the image to repaint)"),
    ({"mode": "sumx"}, "'mode' 'sumx' is unknown; choose one of balanced"),
    ({"mode_options": {"layer_weights": "uniform"}},
     "'mode_options.layer_weights' is not an option of mode 'balanced' (its options: none)"),
    ({"mode": "controlnet", "mode_options": {"layer_weights": "flat"}}, "'mode_options': layer_weights must be one of"),
    ({"mode": "controlnet", "scheduler": "pndm", "cfg": 7, "controls": [V1_CONTROL]},
     "'scheduler' pndm with mode 'controlnet' above CFG 4 turns the image to speckle"),
    ({"controls": [{**V1_CONTROL, "task": "depth"}]}, "'controls[0]': control model 'canny' has no task tokens"),
    ({"controls": [{**V1_CONTROL, "preprocess": "inpaint"}]},
     "'controls[0]': the inpaint preprocessor needs a mask: give 'inpaint_mask'"),
    ({"controls": [{**V1_CONTROL, "preprocess": "sharpen"}]}, "'controls[0].preprocess' 'sharpen' is unknown"),
    ({"controls": [{**V1_CONTROL, "start": 0.8, "end": 0.2}]}, "'controls[0]': control window start=0.8, end=0.2"),
    ({"controls": [{**V1_CONTROL, "weight": [[0.5, 1], [0.2, 1]]}]},
     "'controls[0].weight': schedule progress values must be ascending"),
    ({"controls": [{**V1_CONTROL, "weight": [[0, 1]] * 65}]}, "'controls[0].weight' must be a number or 1-64 keyframes"),
    ({"controls": [V1_CONTROL] * 5}, "'controls' must be a list of at most 4 objects"),
    ({"prompt": "x" * 10_001}, "'prompt' is longer than 10000 characters"),
    ({"base": "other"}, "'base': base model 'other' is not registered; choose one of default"),
])
def test_v1_fields_are_checked_against_the_base_when_submitted(pipe, change, message):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app

    r = TestClient(create_app(lambda: pipe)).post("/v1/generate", json={**V1, **change})
    assert r.status_code == 400 and r.json()["error"].startswith(message), r.text


def test_a_job_spec_is_plain_data_that_round_trips(pipe):
    import json

    from controlstack.serve.spec import Limits, spec_from_v1

    mask = b64(Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)))
    body = {**V1, "seed": -1, "mode": "controlnet", "mode_options": {"layer_weights": "uniform"},
            "init_image": UNIT["image"], "inpaint_mask": mask, "strength": 0.6,
            "controls": [{**V1_CONTROL, "weight": [[0, 1], [1, 0.5]], "end": 0.8, "resize_mode": "crop_and_resize"}]}
    spec = spec_from_v1(body, lambda name: pipe, Limits())
    assert 0 <= spec.seed < 2**32  # -1 is drawn once, at acceptance, and recorded
    again = spec_from_v1(json.loads(json.dumps(spec.to_dict())), lambda name: pipe, Limits())
    assert again.seed == spec.seed and again.mode_options == {"layer_weights": "uniform"}
    assert again.controls[0].weight == ((0.0, 1.0), (1.0, 0.5)) and again.controls[0].end == 0.8
    assert np.array_equal(np.asarray(again.inpaint_mask), np.asarray(spec.inpaint_mask))
    prompt, controls, kw = spec.call_args()
    assert prompt == "x" and controls[0].resize_mode == "crop_and_resize" and kw["strength"] == 0.6
    assert controls[0].mask is None and kw["inpaint_mask"].size == (64, 64)


def test_sd_webui_bodies_get_the_same_checks_and_sd_webui_defaults(pipe):
    from controlstack.serve.bodies import ClientError
    from controlstack.serve.spec import Limits
    from controlstack.serve.webui import parse_generation

    def parse(body, img2img=False):
        return parse_generation(body, lambda name: pipe, Limits(), img2img)

    unit = {**UNIT, "module": "canny", "processor_res": -1, "threshold_a": -1, "threshold_b": -1}
    spec = parse({**BODY, "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "x"},
                  "alwayson_scripts": {"ControlNet": {"args": [{"enabled": False, "image": 5}, unit]}}})
    # -1 is sd-webui-controlnet's "the preprocessor's default"; a disabled unit is not read at all
    assert spec.controls[0].annotator_params == {"low_threshold": 100, "high_threshold": 200}
    assert spec.mode == "controlnet" and spec.cfg == 5.0 and spec.scheduler == "dpmpp_2m" and spec.seed == 7
    for body, message in [
        ({**BODY, "width": 60}, "'width' must be a multiple of 8"),
        ({**BODY, "cfg_scale": 7, "sampler_name": "PLMS"}, "'sampler_name' pndm with mode 'controlnet' above CFG 4"),
        ({**BODY, "alwayson_scripts": {"ControlNet": {"args": [{"enabled": False}, {**UNIT, "weight": "x"}]}}},
         "'ControlNet unit 1.weight' must be a number"),  # the unit's index among those sent
        ({**BODY, "alwayson_scripts": {"ControlNet": {"args": [{**UNIT, "module": "depth_leres"}]}}},
         "'ControlNet unit 0.module' 'depth_leres' is unknown; see /controlnet/module_list"),
        ({**BODY, "override_settings": {"sd_model_checkpoint": ["x"]}},
         "'override_settings.sd_model_checkpoint' must be a string"),
        ({**BODY, "enable_hr": "yes"}, "'enable_hr' must be true or false, got 'yes'"),
    ]:
        with pytest.raises(ClientError) as exc:
            parse(body)
        assert str(exc.value).startswith(message), str(exc.value)
    from controlstack.serve.spec import check_spec
    from controlstack.serve.webui import NAMES

    spec = parse({**BODY, "init_images": [UNIT["image"]], "mask": UNIT["image"]}, img2img=True)
    assert spec.inpaint_mask.size == (64, 64) and spec.strength == 0.75
    spec.init_image = None
    with pytest.raises(ClientError, match=r"^'mask' needs 'init_images\[0\]'"):
        check_spec(spec, pipe, Limits(), NAMES)  # sd-webui's names in check_spec's messages
