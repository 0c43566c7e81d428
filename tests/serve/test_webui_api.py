"""sd-webui's API field by field (docs/webui-api.md): batch count, the hires fix, seeds and subseeds,
the scheduler field, img2img's inpainting fields, the answer's ``parameters`` echo and ``info``, the
endpoints beside txt2img / img2img (skip, interrupt, options, cmd-flags, memory, schedulers,
upscalers, png-info), ``/controlnet/detect``'s spellings, the JSON 404 -- on the embedded server and,
where the code is shared, on a broker front (over a stand-in Cluster: no Redis)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.serve.test_api import BODY, UNIT, b64


@pytest.fixture(scope="module")
def tiny_pipe(tiny_components, tiny_controlnets):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={"canny": tiny_controlnets[0], "depth": tiny_controlnets[1]},
                    name="tiny")


@pytest.fixture(scope="module")
def client(tiny_pipe, tmp_path_factory):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app

    return TestClient(create_app(lambda: tiny_pipe, data=tmp_path_factory.mktemp("jobs")))


def parse(pipe, body, img2img=False):
    from controlstack.serve.spec import Limits
    from controlstack.serve.webui import parse_generation

    return parse_generation(body, lambda name: pipe, Limits(), img2img)


def png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def pixels(data: str) -> np.ndarray:
    return np.asarray(png(data).convert("RGB")).astype(int)


PLAIN = {k: v for k, v in BODY.items() if k != "alwayson_scripts"}  # no unit: faster, same fields
NOISE = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
SQUARE = np.pad(np.full((24, 24), 255, np.uint8), 20)  # the mask: a 24 px square in the middle


# ---------------------------------------------------------------------------------------- txt2img fields
def test_n_iter_returns_n_iter_times_batch_size_images_with_their_seeds_and_subseeds(client):
    r = client.post("/sdapi/v1/txt2img", json={**PLAIN, "n_iter": 2, "batch_size": 2, "subseed": 100})
    assert r.status_code == 200, r.text
    images, info = r.json()["images"], json.loads(r.json()["info"])
    assert len(images) == 4 and len(info["infotexts"]) == 4
    # iteration j runs seed + j * batch_size; image k of a batch is that seed at batch position k
    assert info["all_seeds"] == [7, 7, 9, 9] and info["seed"] == 7
    assert info["all_subseeds"] == [100, 101, 102, 103] and info["subseed"] == 100
    assert info["all_prompts"] == ["a red box"] * 4 and info["batch_size"] == 2
    # the second iteration is the image a request with seed 9 makes
    again = client.post("/sdapi/v1/txt2img", json={**PLAIN, "seed": 9, "batch_size": 2}).json()["images"]
    assert np.array_equal(pixels(images[2]), pixels(again[0])) and np.array_equal(pixels(images[3]), pixels(again[1]))
    # subseed -1 is drawn, as sd-webui draws it: consecutive from a random start
    info = json.loads(client.post("/sdapi/v1/txt2img", json={**PLAIN, "batch_size": 2}).json()["info"])
    first = info["all_subseeds"][0]
    assert info["all_subseeds"] == [first, first + 1] and info["subseed"] == first and first >= 0


@pytest.mark.parametrize("change, message", [
    ({"n_iter": 0}, "'n_iter' must be an integer in [1, 16], got 0"),
    ({"n_iter": 2.5}, "'n_iter' must be an integer"),
    ({"subseed_strength": 0.3}, "'subseed_strength' > 0 asks for variation seeds"),
    ({"subseed_strength": 2}, "'subseed_strength' must be a number in [0, 1]"),
    ({"subseed": "x"}, "'subseed' must be an integer"),
    ({"scheduler": "Uniform"}, "'scheduler' 'Uniform' is not available for DPM++ 2M"),
    ({"sampler_name": "Euler", "scheduler": "Karras"}, "'scheduler' 'Karras' is not available for Euler"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, ("'hr_upscaler' 'R-ESRGAN 4x+' is unknown; choose one of "
                                                           "Lanczos, Nearest, None, Latent, Latent (antialiased)")),
    ({"enable_hr": True, "hr_scale": 0.5}, "'hr_scale' must be a number in [1, 8], got 0.5"),
    ({"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": -1}, "'hr_second_pass_steps' must be an integer"),
    ({"enable_hr": True, "hr_resize_x": 128, "hr_resize_y": 64}, "another aspect ratio than 64x64"),
    ({"enable_hr": True, "hr_resize_x": 32}, "is an upscale of 0.5; it must be in [1, 8]"),
    ({"enable_hr": True, "denoising_strength": 1.5}, "'denoising_strength' must be a number in [0, 1]"),
    ({"enable_hr": "yes"}, "'enable_hr' must be true or false"),
    ({"hr_scale": "2"}, "'hr_scale' must be a number"),  # typed even with the hires fix off
])
def test_txt2img_fields_are_checked_as_one_line_400s(client, change, message):
    r = client.post("/sdapi/v1/txt2img", json={**PLAIN, **change})
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert "\n" not in r.json()["error"] and "Traceback" not in r.text


def test_defaults_and_spellings_are_sd_webuis(tiny_pipe, client):
    spec = parse(tiny_pipe, {"prompt": "x", "width": 64, "height": 64})
    assert (spec.steps, spec.scheduler, spec.cfg, spec.n_iter, spec.hires) == (50, "euler", 7.0, 1, None)
    assert parse(tiny_pipe, {**PLAIN, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}).scheduler == "dpmpp_2m_karras"
    assert parse(tiny_pipe, {**PLAIN, "scheduler": "automatic"}).scheduler == "dpmpp_2m"
    assert parse(tiny_pipe, {**PLAIN, "subseed_strength": 0}).seed == 7  # 0: accepted
    r = client.post("/sdapi/v1/txt2img", json={**PLAIN, "sampler_name": "UniPC"})
    assert json.loads(r.json()["info"])["sampler_name"] == "UniPC"  # sd-webui's label, not ours ("unipc")
    r = client.post("/sdapi/v1/txt2img", json={**PLAIN, "sampler_index": "DPM++ 2M", "sampler_name": None,
                                                "scheduler": "Karras"})
    assert json.loads(r.json()["info"])["sampler_name"] == "DPM++ 2M Karras"


def test_the_hires_fix_from_sd_webuis_fields(tiny_pipe, client):
    hr = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent (nearest)", "hr_second_pass_steps": 3,
          "denoising_strength": 0.6}
    spec = parse(tiny_pipe, {**PLAIN, **hr})
    assert (spec.hires, spec.hires_strength, spec.hires_steps, spec.hires_upscaler) == (2, 0.6, 3, "latent_nearest")
    spec = parse(tiny_pipe, {**PLAIN, "enable_hr": True})  # sd-webui's defaults: x2, "Latent", the same steps
    assert (spec.hires, spec.hires_strength, spec.hires_steps, spec.hires_upscaler) == (2.0, 0.75, None, "latent")
    assert parse(tiny_pipe, {**PLAIN, "enable_hr": True, "hr_resize_x": 96}).hires == 1.5
    assert parse(tiny_pipe, {**PLAIN, "enable_hr": True, "hr_resize_x": 128, "hr_resize_y": 128}).hires == 2
    assert parse(tiny_pipe, {**PLAIN, **hr, "enable_hr": False}).hires is None  # off: the fields are not used
    r = client.post("/sdapi/v1/txt2img", json={**PLAIN, **hr, "hr_upscaler": "Lanczos"})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert png(r.json()["images"][0]).size == (128, 128)
    assert (info["width"], info["height"]) == (64, 64)  # sd-webui's info: the asked (first pass) size
    assert info["extra_generation_params"] == {"Hires upscale": 2, "Hires upscaler": "Lanczos", "Hires steps": 3}
    text = info["infotexts"][0]
    assert "Hires upscale: 2" in text and "Hires upscaler: Lanczos" in text and "Hires steps: 3" in text


def test_parameters_echo_the_request_as_sd_webui_does(client):
    r = client.post("/sdapi/v1/txt2img", json={**PLAIN, "not_a_field": 1, "styles": ["a"], "eta": 1})
    p = r.json()["parameters"]
    from controlstack.serve.webui import IMG2IMG_DEFAULTS, TXT2IMG_DEFAULTS

    assert set(p) == set(TXT2IMG_DEFAULTS)  # every field of sd-webui's request model, nothing else
    assert (p["prompt"], p["steps"], p["seed"], p["sampler_name"], p["styles"]) == ("a red box", 2, 7, "DPM++ 2M",
                                                                                    ["a"])
    assert p["cfg_scale"] == 5.0 and isinstance(p["cfg_scale"], float) and p["eta"] == 1.0  # float fields: floats
    assert (p["n_iter"], p["enable_hr"], p["hr_scale"], p["sampler_index"], p["send_images"]) == (1, False, 2.0,
                                                                                               "Euler", True)
    assert p["alwayson_scripts"] == {} and p["subseed"] == -1  # as sent: -1, the drawn one is in info
    init, mask = b64(Image.fromarray(NOISE)), b64(Image.fromarray(SQUARE))
    body = {**PLAIN, "init_images": [init], "mask": mask, "denoising_strength": 0.5}
    p = client.post("/sdapi/v1/img2img", json=body).json()["parameters"]
    assert set(p) == set(IMG2IMG_DEFAULTS) and p["init_images"] is None and p["mask"] is None
    assert (p["denoising_strength"], p["mask_blur_x"], p["inpaint_full_res"], p["inpainting_fill"]) == (0.5, 4, True, 0)
    p = client.post("/sdapi/v1/img2img", json={**body, "include_init_images": True}).json()["parameters"]
    assert p["init_images"] == [init] and p["mask"] == mask


MOVED_TXT2IMG = ["n_iter", "subseed", "subseed_strength", "scheduler", "enable_hr", "hr_scale", "hr_upscaler",
                 "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "send_images"]
MOVED_IMG2IMG = ["n_iter", "subseed", "scheduler", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill",
                 "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert", "resize_mode",
                 "include_init_images", "send_images"]


@pytest.mark.parametrize("endpoint, key", [("txt2img", k) for k in MOVED_TXT2IMG] +
                         [("img2img", k) for k in MOVED_IMG2IMG])
def test_the_fields_now_read_refuse_a_wrong_type_naming_it(client, endpoint, key):
    # they left IGNORED_FIELDS (tests/serve/test_security.py types those): each is typed where it is read
    body = {**PLAIN, "init_images": [UNIT["image"]], "mask": UNIT["image"], "enable_hr": True, key: {"nested": 1}}
    r = client.post(f"/sdapi/v1/{endpoint}", json=body)
    assert r.status_code == 400 and f"'{key}'" in r.json()["error"], r.text


def test_send_images_false_answers_without_images(client):
    r = client.post("/sdapi/v1/txt2img", json={**PLAIN, "send_images": False})
    assert r.status_code == 200 and r.json()["images"] == []
    assert json.loads(r.json()["info"])["infotexts"][0].startswith("a red box")
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 4}


# ---------------------------------------------------------------------------------------- img2img inpainting
def test_inpainting_fields_map_to_inpaint_options_with_sd_webuis_api_defaults(tiny_pipe):
    from controlstack.inpaint import InpaintOptions

    body = {**PLAIN, "init_images": [b64(Image.fromarray(NOISE))], "mask": b64(Image.fromarray(SQUARE))}
    assert parse(tiny_pipe, body, True).inpaint == InpaintOptions(mask_blur=4, invert=False, full_res=True, padding=0,
                                                                  fill="fill")
    spec = parse(tiny_pipe, {**body, "inpainting_fill": 2, "inpaint_full_res": 0, "inpaint_full_res_padding": 32,
                             "mask_blur": 8, "mask_blur_x": 1, "mask_blur_y": 2, "inpainting_mask_invert": 1}, True)
    assert spec.inpaint == InpaintOptions(mask_blur=8, invert=True, full_res=False, padding=32, fill="latent_noise")
    assert parse(tiny_pipe, {**body, "mask_blur_x": 3, "mask_blur_y": 3, "inpainting_fill": 3}, True).inpaint == \
        InpaintOptions(mask_blur=3, full_res=True, padding=0, fill="latent_nothing")
    assert parse(tiny_pipe, {**body, "mask": None}, True).inpaint is None  # no mask: plain img2img
    assert parse(tiny_pipe, {**body, "inpainting_fill": 1}, True).inpaint.fill == "original"


@pytest.mark.parametrize("change, message", [
    ({"mask_blur_x": 2, "mask_blur_y": 5}, "'mask_blur_x' 2 and 'mask_blur_y' 5 differ"),
    ({"mask_blur": 65}, "'mask_blur' must be an integer in [0, 64]"),
    ({"inpainting_fill": 4}, "'inpainting_fill' must be an integer in [0, 3]"),
    ({"inpaint_full_res": 2}, "'inpaint_full_res' must be true / false or 0 / 1"),
    ({"inpainting_mask_invert": "yes"}, "'inpainting_mask_invert' must be true / false or 0 / 1"),
    ({"inpaint_full_res_padding": -1}, "'inpaint_full_res_padding' must be an integer in [0, 256]"),
    ({"mask": "%%%"}, "'mask': not valid base64"),
])
def test_inpainting_fields_are_checked(client, change, message):
    body = {**PLAIN, "init_images": [b64(Image.fromarray(NOISE))], "mask": b64(Image.fromarray(SQUARE)), **change}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_pixels_outside_the_mask_are_the_init_images(client):
    init = b64(Image.fromarray(NOISE))
    body = {**PLAIN, "init_images": [init], "mask": b64(Image.fromarray(SQUARE)), "denoising_strength": 0.9}
    outside = SQUARE == 0
    # no blur, the whole picture: every pixel outside the square is the init image's, inside it is repainted
    out = pixels(client.post("/sdapi/v1/img2img", json={**body, "mask_blur": 0, "inpaint_full_res": False}
                             ).json()["images"][0])
    assert np.array_equal(out[outside], NOISE[outside].astype(int))
    assert np.abs(out[~outside] - NOISE[~outside]).mean() > 20
    # sd-webui's API defaults (blur 4, only masked): pixels beyond the blur's reach are the init image's
    out = pixels(client.post("/sdapi/v1/img2img", json=body).json()["images"][0])
    far = np.ones((64, 64), bool)
    far[20 - 11:44 + 11, 20 - 11:44 + 11] = False  # the blur's kernel: 2 * int(2.5 * 4 + 0.5) + 1 = 21 px
    assert np.array_equal(out[far], NOISE[far].astype(int)) and np.abs(out[~outside] - NOISE[~outside]).mean() > 20
    # inverted: the square is kept, the rest repainted
    out = pixels(client.post("/sdapi/v1/img2img", json={**body, "mask_blur": 0, "inpaint_full_res": False,
                                                         "inpainting_mask_invert": 1}).json()["images"][0])
    assert np.array_equal(out[~outside], NOISE[~outside].astype(int))


def test_resize_mode_fits_the_init_image_and_mask_as_sd_webui(tiny_pipe):
    from controlstack.io.images import resize_image

    wide = Image.fromarray(np.concatenate([NOISE, NOISE[:, ::-1]], axis=1))  # 128 x 64
    mask = Image.fromarray(np.concatenate([SQUARE, SQUARE], axis=1))
    body = {**PLAIN, "init_images": [b64(wide)]}
    for mode, name in [(0, "just_resize"), (1, "crop_and_resize"), (2, "resize_and_fill"), (3, "just_resize")]:
        spec = parse(tiny_pipe, {**body, "resize_mode": mode}, True)
        assert spec.init_image.size == (64, 64), mode
        assert np.array_equal(np.asarray(spec.init_image), np.asarray(resize_image(wide, 64, 64, name))), mode
    crop = parse(tiny_pipe, {**body, "resize_mode": 1}, True).init_image  # the middle 64 x 64
    assert np.abs(np.asarray(crop).astype(int) - np.concatenate([NOISE[:, 32:], NOISE[:, ::-1][:, :32]], 1)).mean() < 1
    # whole picture: the mask is fitted alike; only masked: both keep their size (the output is the init's)
    spec = parse(tiny_pipe, {**body, "mask": b64(mask), "inpaint_full_res": False, "resize_mode": 1}, True)
    assert spec.inpaint_mask.size == (64, 64)
    assert np.array_equal(np.asarray(spec.inpaint_mask), np.asarray(resize_image(mask, 64, 64, "crop_and_resize")))
    spec = parse(tiny_pipe, {**body, "mask": b64(mask), "resize_mode": 1}, True)
    assert spec.init_image.size == spec.inpaint_mask.size == (128, 64)


def test_an_img2img_unit_without_an_image_conditions_on_the_init_image(tiny_pipe, client):
    init = Image.fromarray(NOISE)
    unit = {**UNIT, "image": ""}  # webuiapi's spelling of "no image"
    spec = parse(tiny_pipe, {**BODY, "init_images": [b64(init)], "resize_mode": 1,
                             "alwayson_scripts": {"ControlNet": {"args": [unit]}}}, True)
    assert np.array_equal(np.asarray(spec.controls[0].image), NOISE) and spec.controls[0].resize_mode == "crop_and_resize"
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 400 and r.json()["error"] == ("'ControlNet unit 0.image' is missing (a base64 condition "
                                                          "or photo)")


# ---------------------------------------------------------------------------------------- the other endpoints
def test_the_lists_and_reports_clients_read(client):
    assert [s["name"] for s in client.get("/sdapi/v1/schedulers").json()] == ["automatic", "karras"]
    assert client.get("/sdapi/v1/schedulers").json()[1]["label"] == "Karras"
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()] == ["Lanczos", "Nearest", "None"]
    assert [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"]
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["nowebui"] is True and flags["api_auth"] is None
    assert all(v is None for k, v in flags.items() if k.endswith("_dir"))  # no server path is shown
    memory = client.get("/sdapi/v1/memory").json()
    ram = memory["ram"]
    assert ram["used"] > 0 and ram["free"] + ram["used"] == ram["total"]
    import torch

    assert memory["cuda"] == {"error": "unavailable"} if not torch.cuda.is_available() else "system" in memory["cuda"]
    models = client.get("/sdapi/v1/sd-models").json()
    assert models == [{"title": "default", "model_name": "default", "hash": None, "sha256": None, "filename": "default",
                       "config": None}]


def test_png_info_reads_the_infotext_back(client):
    image = client.post("/sdapi/v1/txt2img", json={**PLAIN, "negative_prompt": "blurry, dark"}).json()["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image})
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["info"].startswith("a red box\nNegative prompt: blurry, dark\nSteps: 2, Sampler: DPM++ 2M")
    p = info["parameters"]
    assert (p["Prompt"], p["Negative prompt"], p["Steps"], p["Seed"], p["Size-1"], p["Size-2"]) == (
        "a red box", "blurry, dark", "2", "7", "64", "64") and "Size" not in p and info["items"] == {}
    plain = client.post("/sdapi/v1/png-info", json={"image": b64(Image.fromarray(NOISE))}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}
    for body, message in [({"image": "%%%"}, "'image': not valid base64"), ([1], "the request body must be a JSON object")]:
        r = client.post("/sdapi/v1/png-info", json=body)
        assert r.status_code == 400 and message in r.json()["error"]


def test_options_switch_the_default_base_and_ignore_other_settings(tiny_pipe, tiny_components, tmp_path):
    from fastapi.testclient import TestClient

    from controlstack import Pipeline
    from controlstack.serve.app import create_app

    other = Pipeline(tiny_components, controlnets={"canny": tiny_pipe.controlnets["canny"]}, name="other")
    client = TestClient(create_app({"default": lambda: tiny_pipe, "other": lambda: other}, data=tmp_path))
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other", "CLIP_stop_at_last_layers": 2,
                                               "samples_save": False})
    assert (r.status_code, r.json()) == (200, None)  # sd-webui answers null
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other"
    text = json.loads(client.post("/sdapi/v1/txt2img", json=PLAIN).json()["info"])["infotexts"][0]
    assert "Model: other" in text  # a request naming no base runs on the new default
    r = client.post("/sdapi/v1/txt2img", json={**PLAIN, "override_settings": {"sd_model_checkpoint": "default"}})
    assert "Model: tiny" in json.loads(r.json()["info"])["infotexts"][0]  # a request's own choice still wins
    for body, message in [({"sd_model_checkpoint": "../x"}, ("'sd_model_checkpoint' '../x' is not registered; "
                                                             "choose one of default, other")),
                          ({"sd_model_checkpoint": 5}, "'sd_model_checkpoint' must be a string"),
                          (["x"], "the request body must be a JSON object")]:
        r = client.post("/sdapi/v1/options", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other"


@pytest.mark.parametrize("ui", [False, True])
def test_an_unknown_endpoint_is_a_json_404_naming_the_endpoints(tiny_pipe, tmp_path, ui):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app

    client = TestClient(create_app(lambda: tiny_pipe, data=tmp_path, ui=ui))
    for path in ("/sdapi/v1/nope", "/controlnet/nope", "/v1/nope/deeper", "/sdapi/v2/txt2img"):
        r = client.post(path, json={})
        assert r.status_code == 404, (path, r.text)
        body = r.json()
        assert body["error"] == f"no endpoint '{path}'; the endpoints are listed in 'endpoints'"
        assert {"POST /sdapi/v1/txt2img", "POST /sdapi/v1/skip", "GET /sdapi/v1/memory", "POST /controlnet/detect",
                "GET /v1/jobs/{job_id}"} <= set(body["endpoints"])
    r = client.get("/sdapi/v1/txt2img")
    assert (r.status_code, r.json()) == (405, {"error": "GET is not allowed on /sdapi/v1/txt2img; use POST"})
    r = client.get("/sdapi/v1/samplers/", follow_redirects=False)  # a trailing slash: redirected, as FastAPI does
    assert r.status_code == 307 and r.headers["location"].endswith("/sdapi/v1/samplers")
    assert client.get("/v1/jobs/job-9").json()["error"].startswith("no job 'job-9'")  # the route's own 404
    if ui:  # the web UI still answers at "/" and its own paths
        assert client.get("/").status_code == 200 and "gradio" in client.get("/").text.lower()
    else:
        assert client.get("/elsewhere").status_code == 404 and "endpoints" in client.get("/elsewhere").json()


# ---------------------------------------------------------------------------------------- interrupt / skip
def _running(client, steps: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = client.get("/sdapi/v1/progress").json()["state"]
        if state["sampling_steps"] == steps and state["sampling_step"] >= 1:
            return
        time.sleep(0.01)
    raise AssertionError("the job did not start")


def _in_thread(client, body) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(r=client.post("/sdapi/v1/txt2img", json=body)))
    thread.start()
    return thread, out


def test_interrupt_answers_the_waiting_txt2img_with_the_images_so_far(client):
    assert client.post("/sdapi/v1/interrupt").json() == {}  # nothing running: nothing to stop
    thread, out = _in_thread(client, {**PLAIN, "steps": 150, "n_iter": 2})
    _running(client, 150)
    assert client.post("/sdapi/v1/interrupt").json() == {}
    thread.join(timeout=120)
    r = out["r"]
    assert r.status_code == 200, r.text
    # the first iteration stopped early with its partial image; the second never ran
    assert len(r.json()["images"]) == 1 and json.loads(r.json()["info"])["all_seeds"] == [7]


def test_skip_ends_the_current_iteration_and_the_next_runs(client):
    assert client.post("/sdapi/v1/skip").json() is None  # sd-webui answers null
    thread, out = _in_thread(client, {**PLAIN, "steps": 150, "n_iter": 2})
    _running(client, 150)
    client.post("/sdapi/v1/skip")
    thread.join(timeout=180)
    r = out["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 2, r.text
    full = client.post("/sdapi/v1/txt2img", json={**PLAIN, "steps": 150}).json()["images"][0]
    second = client.post("/sdapi/v1/txt2img", json={**PLAIN, "steps": 150, "seed": 8}).json()["images"][0]
    assert not np.array_equal(pixels(r.json()["images"][0]), pixels(full))  # skipped: a partly denoised image
    assert np.array_equal(pixels(r.json()["images"][1]), pixels(second))  # the next iteration ran in full


# ---------------------------------------------------------------------------------------- /controlnet/detect
def test_detect_takes_both_spellings_and_the_preprocessor_sliders(client):
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[16:48, 16:48] = 20  # a faint square: edges for low thresholds only
    image = b64(Image.fromarray(photo))
    base = {"controlnet_module": "canny", "controlnet_processor_res": 64}
    low = {"controlnet_threshold_a": 10, "controlnet_threshold_b": 20}
    ours = client.post("/controlnet/detect", json={**base, **low, "controlnet_input_images": [image]}).json()
    webuiapi = client.post("/controlnet/detect", json={**base, **low,
                                                       "controlnet_images": ["data:image/png;base64," + image]})
    assert webuiapi.status_code == 200 and webuiapi.json() == ours and ours["info"] == "Success"
    assert pixels(ours["images"][0]).max() == 255  # thresholds under the edge's strength: the square's edges
    default = client.post("/controlnet/detect", json={**base, "controlnet_images": [image]}).json()
    assert pixels(default["images"][0]).max() == 0  # canny's 100 / 200: the faint edge is not strong enough
    unset = client.post("/controlnet/detect", json={**base, "controlnet_images": [image], "controlnet_threshold_a": -100,
                                                    "controlnet_threshold_b": -1, "controlnet_processor_res": -100})
    assert unset.status_code == 200 and pixels(unset.json()["images"][0]).shape[:2] == (512, 512)  # the defaults
    assert pixels(unset.json()["images"][0]).max() == 0
    masked = client.post("/controlnet/detect", json={"controlnet_module": "inpaint", "controlnet_images": [image],
                                                     "controlnet_masks": [b64(Image.fromarray(SQUARE))],
                                                     "controlnet_processor_res": 64})
    assert masked.status_code == 200, masked.text
    for body, message in [
        ({**base, "controlnet_images": []}, "'controlnet_images' must be a list of 1-8 base64 images"),
        ({**base, "controlnet_images": [image], "controlnet_threshold_a": 300},
         "'controlnet_threshold_a' must be a number in [1, 255]"),
        ({**base, "controlnet_images": [image], "controlnet_threshold_a": "x"}, "'controlnet_threshold_a' must be a"),
        ({"controlnet_module": "inpaint", "controlnet_images": [image]}, "'controlnet_masks[0]' is missing"),
        ({"controlnet_module": "invert", "controlnet_images": [image], "controlnet_threshold_a": []},
         "'controlnet_threshold_a' must be a number"),
        ([image], "the request body must be a JSON object"),
    ]:
        r = client.post("/controlnet/detect", json=body)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)


def test_unit_sliders_set_the_same_annotator_parameters(tiny_pipe):
    def params(module, a, b):
        unit = {**UNIT, "module": module, "threshold_a": a, "threshold_b": b, "processor_res": 64}
        return parse(tiny_pipe, {**BODY, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}).controls[0] \
            .annotator_params

    assert params("canny", 50, 150.0) == {"low_threshold": 50, "high_threshold": 150, "resolution": 64}
    assert params("canny", -1, None) == {"low_threshold": 100, "high_threshold": 200, "resolution": 64}
    assert params("lines", 0.5, 3) == {"value_threshold": 0.5, "resolution": 64}
    assert params("binary", 127, -1) == {"threshold": 127, "resolution": 64}
    assert params("tile", 2, 64) == {"down_sampling_rate": 2, "resolution": 64}
    assert params("invert", 64, 64) == {"resolution": 64}  # webuiapi's 64 / 64 on a module without sliders


# ---------------------------------------------------------------------------------------- a broker front
class StandInCluster:
    """What a front calls on its Cluster, without Redis: two bases held, jobs recorded, never run."""

    job_seconds = 20

    def __init__(self):
        from controlstack.serve.distributed import Cluster

        self.held = {"default": {"canny"}, "other": {"canny"}}
        self.calls, self.specs, self.waiting = [], [], set()
        self.base_of = Cluster.base_of.__get__(self)  # the real rules, over bases() below
        self.ui_base = Cluster.ui_base.__get__(self)

    def bases(self):
        return {k: set(v) for k, v in self.held.items()}

    def interrupt(self):
        self.calls.append("interrupt")
        return []

    def skip(self):
        self.calls.append("skip")
        return []

    def submit(self, spec, priority=0):
        self.specs.append(spec)
        return f"job-{len(self.specs)}"

    def wait(self, job_id, report=None):
        return {"id": job_id, "status": "failed", "error": "no worker in this test"}

    def queued(self):
        return 0


def test_a_front_has_the_same_endpoints_and_its_own_default_base():
    from fastapi.testclient import TestClient

    from controlstack.serve.front import create_front_app

    cluster = StandInCluster()
    app = create_front_app(cluster)
    front = TestClient(app)
    assert app.state.control.ui_base()[0] == "default"  # the web UI's backend: Cluster.ui_base until set
    assert front.post("/sdapi/v1/skip").json() is None and front.post("/sdapi/v1/interrupt").json() == {}
    assert cluster.calls == ["skip", "interrupt"]
    assert [m["title"] for m in front.get("/sdapi/v1/sd-models").json()] == ["default", "other"]
    assert front.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "default"
    assert front.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other", "x": 1}).json() is None
    assert front.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other"
    assert app.state.control.ui_base()[0] == "other"  # the web UI follows it, as on the single server
    r = front.post("/sdapi/v1/options", json={"sd_model_checkpoint": "gone"})
    assert (r.status_code, r.json()["error"]) == (400, ("'sd_model_checkpoint' 'gone' is not held by a running worker;"
                                                       " choose one of default, other"))
    r = front.post("/sdapi/v1/txt2img", json=PLAIN)
    assert (r.status_code, r.json()) == (400, {"error": "no worker in this test"})
    assert cluster.specs[-1].base == "other"  # no base named: the front's default
    front.post("/v1/generate", json={"prompt": "x", "width": 64, "height": 64})
    assert cluster.specs[-1].base == "other"
    front.post("/sdapi/v1/txt2img", json={**PLAIN, "override_settings": {"sd_model_checkpoint": "default"}})
    assert cluster.specs[-1].base == "default"
    for path in ("/sdapi/v1/schedulers", "/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes", "/sdapi/v1/samplers",
                 "/sdapi/v1/scripts", "/controlnet/version"):
        assert front.get(path).status_code == 200, path
    r = front.post("/sdapi/v1/nope")
    assert r.status_code == 404 and "POST /sdapi/v1/png-info" in r.json()["endpoints"]


def test_the_compatibility_page_lists_every_field_and_endpoint(client):
    from pathlib import Path

    from controlstack.serve.webui import IGNORED_UNIT_FIELDS, IMG2IMG_DEFAULTS, TXT2IMG_DEFAULTS

    page = (Path(__file__).parents[2] / "docs" / "webui-api.md").read_text()
    assert [k for k in {**TXT2IMG_DEFAULTS, **IMG2IMG_DEFAULTS} if f"`{k}`" not in page] == []
    assert [k for k in IGNORED_UNIT_FIELDS if f"`{k}`" not in page] == []
    routes = client.post("/sdapi/v1/nope").json()["endpoints"]
    webui = [r for r in routes if " /sdapi/" in r or " /controlnet/" in r]
    assert [r for r in webui if f"`{r}`" not in page] == []  # "GET /sdapi/v1/options" etc., each in its row


def test_loras_are_listed_and_a_prompts_lora_tag_applies_to_that_job(tmp_path):
    from fastapi.testclient import TestClient

    from controlstack import Pipeline
    from controlstack.models.tiny import tiny_sd
    from controlstack.serve.app import create_app
    from tests.core.test_lora import save_peft

    fresh = lambda: tiny_sd(seed=0, max_length=16)
    folder = tmp_path / "loras"
    folder.mkdir()
    save_peft(folder, fresh, 1, "ink")
    pipe = Pipeline(fresh(), name="tiny")
    pipe.lora_dir = folder
    client = TestClient(create_app(lambda: pipe, data=tmp_path / "data", lora_dir=folder))
    assert client.get("/sdapi/v1/loras").json() == [{"name": "ink", "alias": "ink", "path": "ink.safetensors",
                                                     "metadata": {}}]
    body = {"prompt": "a cube <lora:ink:0.7>", "steps": 2, "width": 64, "height": 64, "seed": 3}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["prompt"] == "a cube <lora:ink:0.7>" and 'Lora hashes: "ink: ' in info["infotexts"][0]
    plain = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cube"}).json()["images"][0]
    assert plain != r.json()["images"][0] and pipe.loras == {}  # the LoRA applied to that job only
    r = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cube <lora:nope:1>"})
    assert r.status_code == 400 and "<lora:nope> is not a LoRA file" in r.json()["error"]


def test_an_ip_adapter_unit_is_an_image_prompt(tmp_path, tiny_controlnets, hint_images):
    from fastapi.testclient import TestClient

    from controlstack import Control, Pipeline
    from controlstack.ip_adapter import ImagePrompt
    from controlstack.models.tiny import tiny_sd
    from controlstack.serve.app import create_app
    from tests.core.test_ip_adapter import image_encoder, ip_adapter_file

    pipe = Pipeline(tiny_sd(seed=0, max_length=16), controlnets={"canny": tiny_controlnets[0]}, name="tiny")
    pipe.load_ip_adapter(ip_adapter_file(tmp_path, pipe.unet, 1, "ip-adapter_sd15"), image_encoder=image_encoder())
    client = TestClient(create_app(lambda: pipe, data=tmp_path / "data"))
    assert "ip-adapter_sd15" in client.get("/controlnet/model_list").json()["model_list"]
    ip_unit = {"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15 [1a2b3c4d]", "weight": 0.7,
               "image": b64(Image.fromarray(np.asarray(hint_images[0])))}
    cn_unit = {"module": "none", "model": "canny", "image": b64(Image.fromarray(np.asarray(hint_images[1])))}
    body = {"prompt": "a cube", "steps": 2, "width": 64, "height": 64, "seed": 3, "cfg_scale": 7, "sampler_name": "UniPC",
            "alwayson_scripts": {"ControlNet": {"args": [ip_unit, cn_unit]}}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
    want = pipe("a cube", [Control("canny", hint_images[1])], steps=2, cfg=7, seed=3, width=64, height=64,
                scheduler="unipc", progress=False, image_prompts=[ImagePrompt(hint_images[0], 0.7)])[0]
    assert np.array_equal(got, np.asarray(want))
    r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ControlNet": {"args": [
        {**ip_unit, "model": "nope"}]}}})
    assert r.status_code == 400 and "not a registered model" in r.json()["error"]


def test_v1_takes_image_prompts_by_adapter_name(tmp_path, hint_images):
    from fastapi.testclient import TestClient

    from controlstack import Pipeline
    from controlstack.models.tiny import tiny_sd
    from controlstack.serve.app import create_app
    from tests.core.test_ip_adapter import image_encoder, ip_adapter_file
    from tests.serve.test_api import _wait

    pipe = Pipeline(tiny_sd(seed=0, max_length=16), name="tiny")
    pipe.load_ip_adapter(ip_adapter_file(tmp_path, pipe.unet, 1, "style"), image_encoder=image_encoder())
    client = TestClient(create_app(lambda: pipe, data=tmp_path / "data"))
    body = {"prompt": "a cube", "steps": 2, "width": 64, "height": 64, "seed": 1,
            "image_prompts": [{"model": "style", "image": b64(Image.fromarray(np.asarray(hint_images[0]))), "scale": 0.5}]}
    job = client.post("/v1/generate", json=body).json()["id"]
    assert _wait(client, job)["status"] == "done"
    r = client.post("/v1/generate", json={**body, "image_prompts": [{**body["image_prompts"][0], "model": "nope"}]})
    assert r.status_code == 400 and "no IP-Adapter named nope" in r.json()["error"]
