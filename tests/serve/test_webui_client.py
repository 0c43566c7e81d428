"""The server driven as sd-webui API clients drive sd-webui: the request bodies they build and the way
they read the answers, written out here from their sources (no client is a dependency):

- ``webuiapi`` (mix1009/sdwebuiapi): ``WebUIApi.txt2img`` / ``img2img`` send every field with the
  library's defaults (``sampler_index``, ``scheduler: "automatic"``, ``eta: 1.0``, data-URL images),
  ``ControlNetUnit.to_dict()`` units (``image: ""`` when none, thresholds 64 / 64, ``hr_option``),
  ``controlnet_detect`` sends ``controlnet_images``; ``_to_api_result`` decodes ``images``,
  ``json.loads`` the ``info``; ``util_set_model`` / ``util_get_current_model`` / ``util_wait_for_ready``
  go through ``/sdapi/v1/options``, ``sd-models`` and ``progress``;
- sd-webui-controlnet's own API tests (tests/web_api/template.py): ``txt2img_payload`` /
  ``img2img_payload`` with its ``default_unit`` (pixel perfect, -1 thresholds), run with its CI
  overrides (3 steps, 64 x 64); its generation tests' unit overrides (an unknown key, -100 values,
  no unit, two units, ``n_iter``, ``batch_size``).

This server returns the generated images only (sd-webui-controlnet appends each unit's detected map;
docs/webui-api.md), so the counts below are ``n_iter * batch_size``."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from tests.serve.test_api import EDGES


@pytest.fixture(scope="module")
def tiny_pipe(tiny_components, tiny_controlnets):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={"canny": tiny_controlnets[0]}, name="tiny")


@pytest.fixture(scope="module")
def server(tiny_pipe, tiny_components, tmp_path_factory):
    from fastapi.testclient import TestClient

    from controlstack import Pipeline
    from controlstack.serve.app import create_app

    other = Pipeline(tiny_components, controlnets={"canny": tiny_pipe.controlnets["canny"]}, name="anime")
    return TestClient(create_app({"default": lambda: tiny_pipe, "anime": lambda: other},
                                 data=tmp_path_factory.mktemp("jobs")))


# ---------------------------------------------------------------------------------------- webuiapi, as written
def raw_b64_img(image: Image.Image) -> str:
    """webuiapi's raw_b64_img: PNG bytes (its text chunks kept), base64, no header."""
    with io.BytesIO() as out:
        meta = None
        for key, value in image.info.items():
            if isinstance(key, str) and isinstance(value, str):
                meta = meta or PngImagePlugin.PngInfo()
                meta.add_text(key, value)
        image.save(out, format="PNG", pnginfo=meta)
        return base64.b64encode(out.getvalue()).decode()


def b64_img(image: Image.Image) -> str:
    return "data:image/png;base64," + raw_b64_img(image)


def unit_dict(image=None, mask=None, module="none", model="None", weight=1.0, resize_mode="Resize and Fill",
              low_vram=False, processor_res=512, threshold_a=64, threshold_b=64, guidance_start=0.0, guidance_end=1.0,
              control_mode=0, pixel_perfect=False, hr_option="Both", enabled=True) -> dict:
    """webuiapi's ControlNetUnit(...).to_dict()."""
    mode = {0: "Balanced", 1: "My prompt is more important", 2: "ControlNet is more important"}.get(control_mode,
                                                                                                   control_mode)
    return {"image": raw_b64_img(image) if image else "", "mask": raw_b64_img(mask) if mask is not None else None,
            "module": module, "model": model, "weight": weight, "resize_mode": resize_mode, "low_vram": low_vram,
            "processor_res": processor_res, "threshold_a": threshold_a, "threshold_b": threshold_b,
            "guidance_start": guidance_start, "guidance_end": guidance_end, "control_mode": mode,
            "pixel_perfect": pixel_perfect, "hr_option": hr_option, "enabled": enabled}


class WebUIApi:
    """The parts of webuiapi.WebUIApi these tests use, its bodies and parsing as the library has them
    (its ``session`` is the test client; defaults: sampler "Euler a", scheduler "automatic", 20 steps)."""

    def __init__(self, session, sampler="Euler a", scheduler="automatic", steps=20):
        self.session, self.baseurl = session, "/sdapi/v1"
        self.default_sampler, self.default_scheduler, self.default_steps = sampler, scheduler, steps

    def _to_api_result(self, response):
        if response.status_code != 200:
            raise RuntimeError(response.status_code, response.text)
        r = response.json()
        images = [Image.open(io.BytesIO(base64.b64decode(i))) for i in r.get("images", [])]
        info = r.get("info", "")
        try:
            info = json.loads(info)
        except (TypeError, ValueError):
            pass
        return {"images": images, "parameters": r.get("parameters", ""), "info": info, "json": r}

    def _common(self, kw: dict) -> dict:
        return {"prompt": kw.get("prompt", ""), "styles": [], "seed": kw.get("seed", -1), "subseed": -1,
                "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
                "batch_size": kw.get("batch_size", 1), "n_iter": kw.get("n_iter", 1),
                "steps": kw.get("steps", self.default_steps), "cfg_scale": 7.0, "width": kw.get("width", 512),
                "height": kw.get("height", 512), "restore_faces": False, "tiling": False, "do_not_save_samples": False,
                "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
                "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
                "sampler_name": kw.get("sampler_name", self.default_sampler), "scheduler": self.default_scheduler,
                "sampler_index": self.default_sampler, "script_name": None, "script_args": [], "send_images": True,
                "save_images": False, "alwayson_scripts": {}}

    def txt2img(self, controlnet_units=(), **kw):
        payload = {"enable_hr": kw.get("enable_hr", False), "hr_scale": kw.get("hr_scale", 2),
                   "hr_upscaler": kw.get("hr_upscaler", "Latent"), "hr_second_pass_steps": 0, "hr_resize_x": 0,
                   "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
                   "hr_prompt": "", "hr_negative_prompt": "", "denoising_strength": kw.get("denoising_strength", 0.7),
                   "firstphase_width": 0, "firstphase_height": 0, **self._common(kw)}
        if controlnet_units:
            payload["alwayson_scripts"]["ControlNet"] = {"args": list(controlnet_units)}
        return self._to_api_result(self.session.post(f"{self.baseurl}/txt2img", json=payload))

    def img2img(self, images=(), mask_image=None, controlnet_units=(), **kw):
        payload = {"init_images": [b64_img(x) for x in images], "resize_mode": 0,
                   "denoising_strength": kw.get("denoising_strength", 0.75), "mask_blur": kw.get("mask_blur", 4),
                   "inpainting_fill": kw.get("inpainting_fill", 0), "inpaint_full_res": kw.get("inpaint_full_res", True),
                   "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": 1,
                   "image_cfg_scale": 1.5, "include_init_images": False, **self._common(kw)}
        if mask_image is not None:
            payload["mask"] = b64_img(mask_image)
        if controlnet_units:
            payload["alwayson_scripts"]["ControlNet"] = {"args": list(controlnet_units)}
        return self._to_api_result(self.session.post(f"{self.baseurl}/img2img", json=payload))

    def png_info(self, image):
        return self._to_api_result(self.session.post(f"{self.baseurl}/png-info", json={"image": b64_img(image)}))

    def controlnet_detect(self, images, module="none", processor_res=512, threshold_a=64, threshold_b=64):
        payload = {"controlnet_module": module, "controlnet_images": [b64_img(x) for x in images],
                   "controlnet_processor_res": processor_res, "controlnet_threshold_a": threshold_a,
                   "controlnet_threshold_b": threshold_b}
        return self._to_api_result(self.session.post("/controlnet/detect", json=payload))

    def get(self, endpoint):  # get_options, get_samplers, get_memory, ...: response.json()
        return self.session.get(f"{self.baseurl}/{endpoint}").json()

    def post(self, endpoint, payload=None):  # interrupt, skip, set_options: response.json()
        return self.session.post(f"{self.baseurl}/{endpoint}", json=payload).json()

    def util_set_model(self, name):
        models = sorted(m["title"] for m in self.get("sd-models"))
        assert name.lower() in models, models
        return self.post("options", {"sd_model_checkpoint": name.lower()})

    def util_get_current_model(self):
        return self.get("options")["sd_model_checkpoint"]

    def util_wait_for_ready(self):
        result = self.get("progress")
        return result["progress"] == 0.0 and result["state"]["job_count"] == 0


@pytest.fixture()
def api(server):
    return WebUIApi(server)


def canny_unit(**kw):
    return unit_dict(image=Image.fromarray(EDGES), module="none", model="control_v11p_sd15_canny [d14c016b]", **kw)


def test_webuiapi_txt2img_with_a_controlnet_unit(api):
    result = api.txt2img(prompt="a red box", seed=11, steps=2, width=64, height=64, batch_size=2, n_iter=2,
                         controlnet_units=[canny_unit(control_mode=2)])
    assert len(result["images"]) == 4 and all(im.size == (64, 64) for im in result["images"])
    info = result["info"]  # json.loads of the answer's info: sd-webui's Processed.js() fields
    assert info["seed"] == 11 and info["all_seeds"] == [11, 11, 13, 13] and info["sampler_name"] == "Euler a"
    assert len(info["all_subseeds"]) == 4 and info["infotexts"][0] == result["images"][0].info["parameters"]
    assert "ControlNet is more important" in info["infotexts"][0] and "Model: canny" in info["infotexts"][0]
    assert result["parameters"]["n_iter"] == 2 and result["parameters"]["scheduler"] == "automatic"
    assert result["parameters"]["alwayson_scripts"]["ControlNet"]["args"][0]["hr_option"] == "Both"


def test_webuiapi_hires_fix_and_img2img_inpainting(api):
    result = api.txt2img(prompt="a red box", seed=3, steps=2, width=64, height=64, enable_hr=True, hr_scale=2,
                         denoising_strength=0.7)
    assert result["images"][0].size == (128, 128) and result["info"]["width"] == 64
    assert "Hires upscaler: Latent" in result["info"]["infotexts"][0]
    init = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 255
    result = api.img2img(images=[Image.fromarray(init)], mask_image=Image.fromarray(mask), prompt="a red box",
                         seed=3, steps=2, width=64, height=64, denoising_strength=0.9)
    out = np.asarray(result["images"][0].convert("RGB"))
    far = np.ones((64, 64), bool)
    far[24 - 11:40 + 11, 24 - 11:40 + 11] = False  # beyond the blur of 4 (a 21 px kernel)
    assert np.array_equal(out[far], init[far]) and not np.array_equal(out[24:40, 24:40], init[24:40, 24:40])
    text = result["info"]["infotexts"][0]
    assert "Mask blur: 4" in text and "Inpaint area: Only masked" in text and "Masked content: fill" in text
    assert result["parameters"]["init_images"] is None and result["parameters"]["mask"] is None
    # a unit without an image conditions on the init image (sd-webui-controlnet's rule)
    result = api.img2img(images=[Image.fromarray(init)], prompt="x", seed=3, steps=2, width=64, height=64,
                         controlnet_units=[unit_dict(model="canny", module="canny")])
    assert len(result["images"]) == 1 and "Module: canny" in result["info"]["infotexts"][0]


def test_webuiapi_detect_png_info_and_the_utilities(api):
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[16:48, 16:48] = 220
    result = api.controlnet_detect([Image.fromarray(photo)], module="canny", processor_res=64)
    assert result["info"] == "Success" and np.asarray(result["images"][0]).max() == 255
    image = api.txt2img(prompt="a red box", seed=5, steps=2, width=64, height=64)["images"][0]
    info = api.png_info(image)
    assert info["info"] == image.info["parameters"] and info["parameters"]["Seed"] == "5"
    assert sorted(s["name"] for s in api.get("samplers"))[:2] == ["DDIM", "DPM++ 2M"]
    assert sorted(s["name"] for s in api.get("schedulers")) == ["automatic", "karras"]
    assert "Latent" in [m["name"] for m in api.get("latent-upscale-modes")] and api.get("upscalers")[0]["name"]
    assert set(api.get("memory")) == {"ram", "cuda"} and api.get("cmd-flags")["api"] is True
    assert api.post("interrupt") == {} and api.post("skip") is None
    assert api.util_wait_for_ready()
    assert api.util_set_model("Anime") is None and api.util_get_current_model() == "anime"
    assert "Model: anime" in api.txt2img(prompt="x", steps=1, width=64, height=64)["info"]["infotexts"][0]
    api.util_set_model("default")
    with pytest.raises(RuntimeError, match="404"):  # a route this server does not have: JSON, not a page
        api._to_api_result(api.session.post("/sdapi/v1/interrogate", json={"image": ""}))


# ---------------------------------------------------------------------------------------- sd-webui-controlnet
DEFAULT_UNIT = {"control_mode": "Balanced", "enabled": True, "guidance_end": 1, "guidance_start": 0,
                "pixel_perfect": True, "processor_res": 512, "resize_mode": "Crop and Resize", "threshold_a": -1,
                "threshold_b": -1, "weight": 1, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]"}
TXT2IMG_PAYLOAD = {
    "batch_size": 1, "cfg_scale": 7, "comments": {}, "disable_extra_networks": False, "do_not_save_grid": False,
    "do_not_save_samples": False, "enable_hr": False, "height": 768, "hr_negative_prompt": "", "hr_prompt": "",
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_scale": 2, "hr_second_pass_steps": 0, "hr_upscaler": "Latent",
    "n_iter": 1, "negative_prompt": "", "override_settings": {}, "override_settings_restore_afterwards": True,
    "prompt": "(masterpiece: 1.3), (highres: 1.3), best quality,", "restore_faces": False, "s_churn": 0.0,
    "s_min_uncond": 0, "s_noise": 1.0, "s_tmax": None, "s_tmin": 0.0, "sampler_name": "Euler a", "script_args": [],
    "script_name": None, "seed": 42, "seed_enable_extras": True, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "steps": 10, "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 512,
}
IMG2IMG_PAYLOAD = {
    "batch_size": 1, "cfg_scale": 7, "height": 768, "width": 512, "n_iter": 1, "steps": 10, "sampler_name": "Euler a",
    "prompt": "(masterpiece: 1.3), (highres: 1.3), best quality,", "negative_prompt": "", "seed": 42,
    "seed_enable_extras": False, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "subseed": -1,
    "subseed_strength": 0, "override_settings": {}, "override_settings_restore_afterwards": False,
    "do_not_save_grid": False, "do_not_save_samples": False, "s_churn": 0, "s_min_uncond": 0, "s_noise": 1,
    "s_tmax": None, "s_tmin": 0, "script_args": [], "script_name": None, "styles": [], "denoising_strength": 0.75,
    "initial_noise_multiplier": 1, "inpaint_full_res": 0, "inpaint_full_res_padding": 32, "inpainting_fill": 1,
    "inpainting_mask_invert": 0, "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": 4, "resize_mode": 0,
}


def template(gen_type: str, payload_overrides: dict, unit_overrides, image: str) -> dict:
    """sd-webui-controlnet's APITestTemplate payload, with its CI run's steps 3 and 64 x 64."""
    payload = {**(TXT2IMG_PAYLOAD if gen_type == "txt2img" else IMG2IMG_PAYLOAD), "steps": 3, "width": 64,
               "height": 64, **payload_overrides}
    if gen_type == "img2img":
        payload["init_images"] = [image]
    units = unit_overrides if isinstance(unit_overrides, list) else [unit_overrides]
    payload["alwayson_scripts"] = {"ControlNet": {"args": [
        {**DEFAULT_UNIT, **u, **({"image": image} if gen_type == "txt2img" else {})} for u in units]}}
    return payload


@pytest.mark.parametrize("gen_type", ["txt2img", "img2img"])
@pytest.mark.parametrize("name, payload_overrides, unit_overrides, count", [
    ("no_unit", {}, [], 1),
    ("unrecognized_param", {}, {"foo": True, "is_ui": False}, 1),
    ("multiple_iter", {"n_iter": 2}, {}, 2),
    ("batch_size", {"batch_size": 2}, {}, 2),
    ("2_units", {}, [{}, {}], 1),
    ("invalid_processor_res", {}, {"processor_res": -100}, 1),  # -100: the preprocessor's default
    ("invalid_threshold_a", {}, {"threshold_a": -100}, 1),
])
def test_sd_webui_controlnets_generation_tests(server, gen_type, name, payload_overrides, unit_overrides, count):
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[16:48, 16:48] = 220
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    r = server.post(f"/sdapi/v1/{gen_type}", json=template(gen_type, payload_overrides, unit_overrides, image))
    assert r.status_code == 200, r.text
    response = r.json()
    assert len(response["images"]) == count  # exec_cq's n_iter * batch_size (no detected maps here)
    info = json.loads(response["info"])
    assert info["all_seeds"][0] == 42 and info["sampler_name"] == "Euler a" and len(info["infotexts"]) == count
    assert ("Module: canny" in info["infotexts"][0]) == bool(unit_overrides != [])
