"""No field of any endpoint is opened as a server path, and no body a client can send is a 500.

Each field that takes an image, a pose JSON, a model, a base or annotator weights is sent a server
path twice -- an existing file (a PNG / pose JSON the test writes, /etc/passwd, a folder) and a
missing one -- and must answer the same 4xx, with nothing of the file in it. Then a hostile-input
table: wrong types for every field sd-webui's txt2img / img2img and /v1 read, deep nesting, huge
numbers, NaN / Infinity, non-UTF-8 bytes, lone surrogates, wrong content types, bodies that are not
objects: all 4xx with a JSON error naming the field."""

from __future__ import annotations

import base64
import copy
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.serve.test_api import BODY, UNIT, b64

INVERT = {"annotator": "invert", "image": UNIT["image"]}
V1 = {"prompt": "x", "steps": 2, "width": 64, "height": 64,
      "controls": [{"model": "canny", "image": UNIT["image"]}]}
POSE = {"canvas_width": 64, "canvas_height": 64,
        "people": [{"pose_keypoints_2d": [v for i in range(18) for v in (10 + 2 * i, 8 + 2 * i, 1.0)]}]}


@pytest.fixture(scope="module")
def client(tiny_pipe_module):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app

    return TestClient(create_app(lambda: tiny_pipe_module))


@pytest.fixture(scope="module")
def tiny_pipe_module(tiny_components, tiny_controlnets):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={"canny": tiny_controlnets[0], "depth": tiny_controlnets[1]},
                    name="tiny")


@pytest.fixture(scope="module")
def server_files(tmp_path_factory):
    """Files that exist on the server: a PNG mask, a pose JSON, a folder; and paths that do not."""
    d = tmp_path_factory.mktemp("server")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(d / "mask.png")
    (d / "pose.json").write_text(json.dumps(POSE))
    (d / "weights").mkdir()
    return {"png": str(d / "mask.png"), "json": str(d / "pose.json"), "dir": str(d / "weights"),
            "passwd": "/etc/passwd", "missing": str(d / "missing.png"), "missing_json": str(d / "nope.json"),
            "missing_dir": str(d / "no_weights")}


def put(body: dict, where: tuple, value) -> dict:
    """A deep copy of ``body`` with the field at ``where`` (keys / indices) set to ``value``."""
    body = copy.deepcopy(body)
    target = body
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    return body


#: (endpoint, body, the field's place) for every field that could name a file
PATH_FIELDS = [
    ("/v1/annotate", {"annotator": "pose", "image": UNIT["image"], "params": {}}, ("params", "json")),
    ("/v1/annotate", {"annotator": "inpaint", "image": UNIT["image"], "params": {}}, ("params", "mask")),
    ("/v1/annotate", {"annotator": "depth", "image": UNIT["image"], "params": {}}, ("params", "weights")),
    ("/v1/annotate", {"annotator": "depth", "image": UNIT["image"], "params": {}}, ("params", "detector")),
    ("/v1/annotate", {"annotator": "depth", "image": UNIT["image"], "params": {}}, ("params", "loader")),
    ("/v1/annotate", INVERT, ("image",)),
    ("/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [UNIT["image"]]},
     ("controlnet_input_images", 0)),
    ("/v1/generate", V1, ("controls", 0, "image")),
    ("/v1/generate", V1, ("controls", 0, "mask")),
    ("/v1/generate", V1, ("controls", 0, "model")),
    ("/v1/generate", V1, ("init_image",)),
    ("/v1/generate", {**V1, "init_image": UNIT["image"]}, ("inpaint_mask",)),
    ("/v1/generate", V1, ("base",)),
    ("/sdapi/v1/txt2img", BODY, ("alwayson_scripts", "ControlNet", "args", 0, "image")),
    ("/sdapi/v1/txt2img", BODY, ("alwayson_scripts", "ControlNet", "args", 0, "mask")),
    ("/sdapi/v1/txt2img", BODY, ("alwayson_scripts", "ControlNet", "args", 0, "model")),
    ("/sdapi/v1/txt2img", {**BODY, "override_settings": {}}, ("override_settings", "sd_model_checkpoint")),
    ("/sdapi/v1/img2img", {**BODY, "init_images": [UNIT["image"]]}, ("init_images", 0)),
    ("/sdapi/v1/img2img", {**BODY, "init_images": [UNIT["image"]]}, ("mask",)),
]


@pytest.mark.parametrize("endpoint, body, where", PATH_FIELDS, ids=lambda v: str(v) if isinstance(v, tuple) else None)
def test_a_path_is_never_opened_and_answers_the_same_whether_the_file_exists(client, server_files, endpoint, body,
                                                                            where):
    answers = []
    for name, path in server_files.items():
        r = client.post(endpoint, json=put(body, where, path))
        assert 400 <= r.status_code < 500, (name, r.text)
        data = r.json()
        assert set(data) == {"error"}, data  # no image, no job id: nothing was made from the file
        assert "root:" not in r.text and "canvas_width" not in r.text and "Traceback" not in r.text
        answers.append((r.status_code, data["error"].replace(path, "<path>")))
    assert len(set(answers)) == 1, answers  # existing file, folder, /etc/passwd and missing: one answer


def test_content_replaces_the_paths_pose_json_and_inpaint_mask(client):
    def image(r):
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).convert("RGB"))

    black = b64(Image.new("RGB", (64, 64)))
    as_object = image(client.post("/v1/annotate", json={"annotator": "pose", "image": black,
                                                        "params": {"json": POSE, "resolution": 64}}))
    as_text = image(client.post("/v1/annotate", json={"annotator": "pose", "image": black,
                                                      "params": {"json": json.dumps(POSE), "resolution": 64}}))
    assert as_object.max() > 0 and np.array_equal(as_object, as_text)  # the skeleton is drawn, either way
    mirrored = image(client.post("/v1/annotate", json={"annotator": "pose", "image": black,
                                                       "params": {"json": POSE, "resolution": 64, "mirror": True}}))
    assert not np.array_equal(mirrored, as_object)  # the edits apply to an inline pose too
    grey = b64(Image.new("RGB", (64, 64), (200, 200, 200)))
    half = np.zeros((64, 64), np.uint8)
    half[:, 32:] = 255
    out = image(client.post("/v1/annotate", json={"annotator": "inpaint", "image": grey, "params": {
        "mask": b64(Image.fromarray(half)), "resolution": 64, "fill": 7}}))
    assert out[10, 10].tolist() == [200, 200, 200] and out[10, 50].tolist() == [7, 7, 7]
    r = client.post("/v1/annotate", json={"annotator": "inpaint", "image": grey, "params": {"resolution": 64}})
    assert r.status_code == 400 and r.json()["error"].startswith("'params.mask' is missing: give a base64 mask")
    r = client.post("/v1/annotate", json={"annotator": "pose", "image": black,
                                          "params": {"json": {**POSE, "people": POSE["people"] * 101}}})
    assert r.status_code == 400 and "more than 100 people" in r.json()["error"]


# ------------------------------------------------------------------------------------ hostile input
def unit_body(key, value):
    return put(BODY, ("alwayson_scripts", "ControlNet", "args", 0, key), value)


def v1_control(key, value):
    return put(V1, ("controls", 0, key), value)


OBJ = {"nested": {"x": 1}}  # the wrong type for every field that is not an object
WEBUI_READ = ["prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "batch_size", "seed",
              "sampler_name", "sampler_index", "denoising_strength", "init_images", "mask"]
UNIT_READ = ["image", "model", "module", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode",
             "processor_res", "threshold_a", "threshold_b", "pixel_perfect", "enabled", "mask"]
V1_READ = ["prompt", "negative_prompt", "steps", "cfg", "seed", "width", "height", "scheduler", "mode", "batch",
           "controls", "init_image", "strength", "inpaint_mask", "hires", "hires_strength", "base"]
V1_CONTROL_READ = ["model", "image", "weight", "start", "end", "mask", "resize_mode", "preprocess", "task"]


def hostile_cases():
    from controlstack.serve.webui import IGNORED_FIELDS, IGNORED_UNIT_FIELDS

    for key in WEBUI_READ + sorted(IGNORED_FIELDS):
        for endpoint in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
            yield endpoint, {**BODY, "init_images": [UNIT["image"]], key: OBJ if key != "comments" else "x"}, key
    for key in ("override_settings", "alwayson_scripts"):
        yield "/sdapi/v1/txt2img", {**BODY, key: "x"}, key
    yield "/sdapi/v1/txt2img", {**BODY, "override_settings": {"sd_model_checkpoint": 5}}, "sd_model_checkpoint"
    yield "/sdapi/v1/txt2img", put(BODY, ("alwayson_scripts", "ControlNet", "args"), "x"), "args"
    yield "/sdapi/v1/txt2img", put(BODY, ("alwayson_scripts", "ControlNet", "args"), ["x"]), "args"
    yield "/sdapi/v1/img2img", {**BODY, "init_images": [5]}, "init_images[0]"
    for key in UNIT_READ + sorted(IGNORED_UNIT_FIELDS):
        yield "/sdapi/v1/txt2img", unit_body(key, OBJ), key
    for key in V1_READ:
        yield "/v1/generate", {**V1, key: OBJ}, key
    yield "/v1/generate", {**V1, "mode_options": "x"}, "mode_options"
    yield "/v1/generate", {**V1, "mode": "mi", "mode_options": {"lambda_max": "x"}}, "mode_options.lambda_max"
    yield "/v1/generate", {**V1, "mode": "mi", "mode_options": {"reduce": OBJ}}, "mode_options.reduce"
    for key in V1_CONTROL_READ:
        yield "/v1/generate", v1_control(key, OBJ), f"controls[0].{key}"
    yield "/v1/generate", v1_control("weight", [[0, "1"]]), "controls[0].weight"
    yield "/v1/generate", v1_control("weight", "12"), "controls[0].weight"
    yield "/v1/generate", {**V1, "controls": [5]}, "controls[0]"
    for key, value in (("annotator", 5), ("params", "x"), ("image", 5)):
        yield "/v1/annotate", {**INVERT, key: value}, key
    yield "/v1/annotate", {**INVERT, "annotator": "canny", "params": {"low_threshold": "x"}}, "low_threshold"
    yield "/v1/annotate", {**INVERT, "annotator": "pose", "params": {"json": [1]}}, "params.json"
    yield "/v1/annotate", {**INVERT, "annotator": "pose", "params": {"json": "{" * 50}}, "params.json"
    detect = {"controlnet_module": "canny", "controlnet_input_images": [UNIT["image"]]}
    for key in ("controlnet_module", "controlnet_input_images", "controlnet_processor_res", "controlnet_threshold_a",
                "controlnet_threshold_b"):
        yield "/controlnet/detect", {**detect, key: OBJ}, key
    for key, value in (("steps", 10**30), ("cfg", 1e308), ("width", -(10**30)), ("seed", 2**64), ("seed", -2)):
        yield "/v1/generate", {**V1, key: value}, key  # huge numbers and out of range
    for key, value in (("steps", 10**30), ("cfg_scale", -1e308), ("batch_size", 1e300), ("seed", 2**64)):
        yield "/sdapi/v1/txt2img", {**BODY, key: value}, key


@pytest.mark.parametrize("endpoint, body, field", list(hostile_cases()),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_field_with_the_wrong_type_is_a_4xx_naming_it(client, endpoint, body, field):
    r = client.post(endpoint, json=body)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.json()["error"], r.text
    assert "Traceback" not in r.text


RAW = [
    (b"[" * 100_000 + b"]" * 100_000, 400, "nests deeper than 32 levels"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, 400, "nests deeper than 32 levels"),
    (b"[" + b"0," * 300_000 + b"0]", 413, "more than 200000 JSON values"),
    (b'{"prompt": "x", "steps": 1e999}', 400, "out of range"),
    (b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}", 400, "more than 40 digits"),
    (b'{"prompt": "x", "cfg": NaN}', 400, "NaN is not JSON"),
    (b'{"prompt": "x", "cfg": Infinity}', 400, "Infinity is not JSON"),
    (b'{"prompt": "x", "cfg": -Infinity}', 400, "-Infinity is not JSON"),
    (b'{"prompt": "caf\xe9"}', 400, "is not UTF-8 text"),
    (b'{"prompt": "\\ud800"}', 400, "lone surrogate"),
    (b'{"prompt": "x"', 400, "is not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'"x"', 400, "must be a JSON object"),
    (b"null", 400, "must be a JSON object"),
]


@pytest.mark.parametrize("endpoint", ["/v1/generate", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/annotate",
                                      "/controlnet/detect"])
def test_hostile_bodies_are_refused_before_parsing(client, endpoint):
    for raw, status, message in RAW:
        r = client.post(endpoint, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status and message in r.json()["error"], (raw[:40], r.text)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = client.post(endpoint, content=json.dumps(V1).encode(), headers={"content-type": ctype})
        assert r.status_code == 415 and "send the body as application/json" in r.json()["error"], r.text


def test_brackets_and_escapes_inside_strings_do_not_count(tmp_path):
    from controlstack.serve.bodies import ClientError, parse_json

    assert parse_json('{"p": "' + "[" * 100_000 + '"}') == {"p": "[" * 100_000}
    assert parse_json('{"p": "a\\"[[[[", "q": [1]}') == {"p": 'a"[[[[', "q": [1]}
    assert parse_json('{"p": "\\ud83d\\ude00"}') == {"p": "\U0001f600"}  # a surrogate pair is text
    with pytest.raises(ClientError, match="nests deeper"):
        parse_json('{"p": "\\\\", "q": ' + "[" * 40 + "]" * 40 + "}")  # an escaped backslash ends no string


def test_a_chunked_body_over_the_cap_is_413(client, monkeypatch):
    import controlstack.serve.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY", 1000)

    def chunks():  # a generator: no Content-Length, so only the reader can stop it
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"].startswith("request body larger than"), r.text
