"""The web UI: it builds and mounts beside the API, and the functions its widgets call work (no browser)."""

from __future__ import annotations

import threading
import time

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
    from controlstack.serve.app import create_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import generate, preview

    photo = np.zeros((64, 64, 3), np.uint8)
    photo[20:44, 20:44] = 200
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[:, :32, 3] = 255  # the left half drawn
    value = {"background": photo, "layers": [layer], "composite": photo}
    edges = preview(value, "canny", 64)
    assert edges.size == (64, 64) and np.asarray(edges).max() == 255
    app = create_app(lambda: tiny_pipe)
    jobs, limits = app.state.jobs, Limits()  # the UI's backend (serve/ui/)
    steps = []
    images, text = generate(jobs, limits, "a red box", "", "Euler a", 2, 5, 3, 64, 64, 1,
                            "ControlNet is more important", [(True, value, "canny", "canny", 0.8, 0.0, 1.0)],
                            progress=lambda frac, desc: steps.append((frac, desc)))
    assert len(images) == 1 and "Sampler: Euler a" in text and "Module: canny" in text and steps[-1][0] == 1.0
    # a job of the server's queue, stored like /v1's: its record has the images and the UI's values
    job_id = text.splitlines()[0]
    record = app.state.jobs.get(job_id)
    assert record["status"] == "done" and len(record["images"]) == 1 and record["parameters"]["seed"] == 3
    assert record["parameters"]["steps"] == 2 and steps[0] == (0.0, f"{job_id} queued")
    with pytest.raises(ControlstackError, match="Unit 0 is enabled but has no image"):
        generate(jobs, limits, "x", "", "UniPC", 1, 5, 0, 64, 64, 1, "Balanced",
                 [(True, None, "none", "canny", 1.0, 0.0, 1.0)])
    with pytest.raises(ControlstackError, match="'Width' must be a multiple of 8"):
        generate(jobs, limits, "x", "", "UniPC", 1, 5, 0, 60, 64, 1, "Balanced", [])
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


def test_ui_jobs_share_the_queue_bound_deadline_and_cancel(tiny_pipe):
    from controlstack.serve.app import create_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import generate

    app = create_app(lambda: tiny_pipe, queue_size=1)
    worker, jobs, limits = app.state.worker, app.state.jobs, Limits()
    args = ("a box", "", "UniPC", 2, 5, 1, 64, 64, 1, "Balanced", [])
    with worker.run_lock:  # the worker is held: the next job it claims waits at the lock
        from controlstack.serve.spec import JobSpec

        first = jobs.submit(JobSpec(prompt="held", steps=1, width=64, height=64))
        deadline = time.time() + 10
        while jobs.get(first)["status"] != "running" and time.time() < deadline:
            time.sleep(0.05)
        second = jobs.submit(JobSpec(prompt="waits", steps=1, width=64, height=64))  # the one queue slot
        with pytest.raises(ControlstackError, match="^the queue is full, try again$"):
            generate(jobs, limits, *args)
        jobs.cancel(second)
    jobs.wait(first)
    # the per-job deadline stops a UI job as it stops a /v1 one
    worker.job_seconds = 0.0
    with pytest.raises(ControlstackError, match=r"job-\d+: the job ran longer than the server's 0 s limit"):
        generate(jobs, limits, *args)
    worker.job_seconds = 600.0
    # cancelled from outside (DELETE /v1/jobs/{id}, /sdapi/v1/interrupt) while it runs: the UI says so
    def cancel_when_running():
        while not jobs.running:
            time.sleep(0.01)
        for job_id in list(jobs.running):
            jobs.cancel(job_id)
    threading.Thread(target=cancel_when_running, daemon=True).start()
    with pytest.raises(ControlstackError, match=r"job-\d+: the job was cancelled"):
        generate(jobs, limits, "a box", "", "UniPC", 150, 5, 1, 64, 64, 1, "Balanced", [])


def test_interactive_jobs_are_claimed_before_batch_jobs(tmp_path):
    from controlstack.serve.spec import JobSpec
    from controlstack.serve.store import Store

    store = Store(tmp_path)
    batch = [store.add(JobSpec(prompt=f"batch {i}")) for i in range(2)]
    ui = store.add(JobSpec(prompt="ui"), priority=1)
    later = store.add(JobSpec(prompt="sd-webui"), priority=1)
    assert [store.claim() for _ in range(4)] == [ui, later, *batch]
    assert store.claim() is None
    store.close()
    # a store made before the priority column gets it when opened, its jobs at priority 0
    import sqlite3

    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute("ALTER TABLE jobs DROP COLUMN priority")
    store = Store(tmp_path)
    old, new = store.add(JobSpec(prompt="old")), store.add(JobSpec(prompt="new"), priority=1)
    assert [store.claim(), store.claim()] == [new, old]
    store.close()


def test_a_browser_logs_in_with_the_token_and_bearer_clients_still_work(tiny_pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app
    from controlstack.serve.auth import COOKIE, session_value

    app = create_app(lambda: tiny_pipe, token="s3cret", ui=True)
    browser = TestClient(app, follow_redirects=False)
    page = {"Accept": "text/html,application/xhtml+xml"}
    # without the token: a page load goes to the login form, the UI's own API calls get 401
    assert browser.get("/", headers=page).status_code == 303
    assert browser.get("/", headers=page).headers["location"] == "/login"
    for path in ("/", "/config", "/gradio_api/info", "/controlnet/version"):
        answer = browser.get(path)
        assert answer.status_code == 401 and "log in at /login" in answer.json()["error"]
    assert browser.get("/login").status_code == 200 and 'name="token"' in browser.get("/login").text
    wrong = browser.post("/login", data={"token": "s3cre"})
    assert wrong.status_code == 401 and "wrong token" in wrong.text and COOKIE not in browser.cookies
    assert browser.post("/login", content=b"token=" + b"x" * 5000,
                        headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 413
    # the raw token as the cookie is not the session: the cookie holds an HMAC of it
    assert TestClient(app, cookies={COOKIE: "s3cret"}).get("/controlnet/version").status_code == 401
    ok = browser.post("/login", data={"token": "s3cret"})
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "s3cret" not in cookie
    assert browser.cookies[COOKIE] == session_value("s3cret")
    # logged in: the page, gradio's config and API, and the HTTP API answer
    assert browser.get("/", headers=page).status_code == 200 and "gradio" in browser.get("/").text.lower()
    assert browser.get("/config").status_code == 200 and browser.get("/gradio_api/info").status_code == 200
    assert browser.get("/controlnet/version").json() == {"version": 2}
    bearer = TestClient(app, headers={"Authorization": "Bearer s3cret"})
    assert bearer.get("/controlnet/version").json() == {"version": 2} and bearer.get("/config").status_code == 200
    assert TestClient(app, headers={"Authorization": "Bearer wrong"}).get("/controlnet/version").status_code == 401


# ------------------------------------------------------------------------------ issue 35: the new widgets
def test_control_type_sets_a_preprocessor_and_model_pair():
    from controlstack import assets
    from controlstack.serve.ui.units import control_type_pair, control_types, unit_header

    nets = sorted(assets.bundled_controlnets())  # canny depth mi-canny mi-depth mi-seg omni pose seg
    assert control_types(nets) == ["All", "Canny", "Depth", "Pose", "Seg", "MI", "Omni"]
    assert control_type_pair("Canny", nets) == ("canny", "canny", ["none", "canny"], ["canny"])
    assert control_type_pair("Seg", nets) == ("seg_estimate", "seg", ["none", "seg_estimate", "seg"], ["seg"])
    assert control_type_pair("Pose", nets)[:2] == ("pose_estimate", "pose")
    pre, model, pres, models = control_type_pair("MI", nets)
    assert (pre, model, models) == ("canny", "mi-canny", ["mi-canny", "mi-depth", "mi-seg"])
    assert pres == ["none", "canny", "depth", "seg_estimate", "seg"]
    assert control_type_pair("Omni", nets)[:2] == ("canny", "omni")
    pre, model, pres, models = control_type_pair("All", nets)
    assert (pre, model, models) == ("none", None, nets) and len(pres) > 15
    with pytest.raises(ControlstackError, match="no registered ControlNet is of type Lineart"):
        control_type_pair("Lineart", nets)
    # the accordion header says which units are active, with the model's type
    assert unit_header(0, False, "canny", "canny") == "ControlNet Unit 0"
    assert unit_header(0, True, "canny", "canny") == "ControlNet Unit 0 [Canny]"
    assert unit_header(2, True, "seg_estimate", "mi-seg") == "ControlNet Unit 2 [MI Seg]"
    assert unit_header(1, True, "none", None) == "ControlNet Unit 1 [enabled]"


def test_omni_units_take_their_task_from_the_preprocessor():
    from controlstack.io.settings import model_folder
    from controlstack.serve.ui.units import omni_task, omni_tasks

    class Bundle:  # a base whose ControlNets are the bundle's folders (the omni one lists its tasks)
        folder_of = staticmethod(lambda name: model_folder(name, None))

    class Front:  # a broker front: no folders, the name tells
        folder_of = staticmethod(lambda name: None)

    assert omni_tasks(Bundle(), "omni") == ["canny", "depth", "seg", "pose", "hed", "scribble", "normal"]
    assert omni_tasks(Bundle(), "canny") is None and omni_tasks(Front(), "omni") == []
    assert omni_task(Bundle(), "omni", "seg_estimate", "U") == "seg" and omni_task(Front(), "omni", "canny", "U") == "canny"
    assert omni_task(Bundle(), "canny", "canny", "U") is None  # not an Omni ControlNet: no task
    with pytest.raises(ControlstackError, match="U: the Omni model takes its task from the preprocessor"):
        omni_task(Bundle(), "omni", None, "U")
    with pytest.raises(ControlstackError, match="choose one of canny, depth, seg_estimate"):
        omni_task(Bundle(), "omni", "lineart", "U")  # lineart: an Omni task in general, not this model's


def test_preprocessor_parameters_and_pixel_perfect_resolution(tiny_pipe):
    from controlstack.serve.app import create_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import Unit, job_spec
    from controlstack.serve.ui.units import annotator_values, param_slots, pixel_perfect, slot_updates

    # canny's thresholds on sliders with the registry's ranges, its flag on a checkbox, the rest hidden
    assert [(kind, slot, f.name) for kind, slot, f in param_slots("canny")] == [
        ("slider", 0, "low_threshold"), ("slider", 1, "high_threshold"), ("check", 0, "l2_gradient")]
    updates = slot_updates("canny")
    assert (updates[0]["label"], updates[0]["minimum"], updates[0]["maximum"], updates[0]["value"]) == \
        ("Low threshold", 1, 255, 100)
    assert updates[1]["value"] == 200 and updates[2] == {"__type__": "update", "visible": False}
    assert updates[6]["label"] == "L2 gradient" and updates[9]["visible"] is False
    assert slot_updates("lineart")[9]["choices"] == ["standard", "xdog"]
    assert annotator_values("canny", [50.0, 150.0, 0, 0, 0, 0], [True, False, False], ["-"]) == \
        {"low_threshold": 50, "high_threshold": 150, "l2_gradient": True}
    assert param_slots("none") == [] and annotator_values("invert", [0] * 6, [False] * 3, ["-"]) == {}
    # sd-webui-controlnet's pixel perfect: the short side at the cover (crop) or fit (fill) scale
    assert pixel_perfect((640, 480), 512, 512, "Crop and Resize") == 512
    assert pixel_perfect((640, 480), 512, 512, "Resize and Fill") == 384
    assert pixel_perfect((100, 100), 64, 128, "Just Resize") == 128
    jobs, limits = create_app(lambda: tiny_pipe).state.jobs, Limits()
    photo = np.zeros((96, 128, 3), np.uint8)
    photo[30:60, 40:90] = 255
    args = ("x", "", "UniPC", 2, 5, 1, 64, 64, 1, "Balanced")
    unit = Unit(True, photo, "canny", "canny", resize_mode="Resize and Fill",
                params={"low_threshold": 20, "high_threshold": 90})
    control = job_spec(jobs, limits, *args, [unit]).controls[0]
    # the generation uses the unit's resolution (pixel perfect: 96 * min(64/96, 64/128)), its thresholds
    assert control.annotator_params == {"low_threshold": 20, "high_threshold": 90, "resolution": 48}
    assert control.resize_mode == "resize_and_fill" and control.preprocess == "canny"
    control = job_spec(jobs, limits, *args, [unit._replace(pixel_perfect=False, resolution=200)]).controls[0]
    assert control.annotator_params["resolution"] == 200
    # the API's default resize mode (sd-webui's 1), and the old 7-value units still work
    control = job_spec(jobs, limits, *args, [(True, photo, "none", "canny", 1.0, 0.0, 1.0)]).controls[0]
    assert control.resize_mode == "crop_and_resize" and control.annotator_params == {} and control.preprocess is False
    with pytest.raises(ControlstackError, match="ControlNet Unit 0.*low_threshold"):  # the annotator's own check
        job_spec(jobs, limits, *args, [unit._replace(params={"low_threshold": 300})])


def test_job_spec_for_img2img_inpaint_hires_and_batch_count(tiny_pipe):
    from controlstack.inpaint import InpaintOptions
    from controlstack.serve.app import create_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import Hires, Img2img, job_spec

    jobs, limits = create_app(lambda: tiny_pipe).state.jobs, Limits()
    args = ("a box", "", "Euler a", 4, 5, 7, 64, 64, 2, "Balanced", [])
    spec = job_spec(jobs, limits, *args, n_iter=3, hires=Hires("Latent (bicubic)", 1.5, 0, 0.4))
    assert (spec.n_iter, spec.hires, spec.hires_upscaler, spec.hires_steps, spec.hires_strength) == \
        (3, 1.5, "latent_bicubic", None, 0.4)
    assert job_spec(jobs, limits, *args, hires=Hires("Lanczos", 2.0, 6, 0.5)).hires_steps == 6
    assert job_spec(jobs, limits, *args).hires is None and job_spec(jobs, limits, *args).n_iter == 1
    photo = np.full((80, 80, 3), 90, np.uint8)
    layer = np.zeros((80, 80, 4), np.uint8)
    layer[10:30, 40:70, 3] = 255  # a drawn stroke: inpaint there
    drawn = {"background": photo, "layers": [layer], "composite": photo}
    spec = job_spec(jobs, limits, *args, img2img=Img2img(drawn, 0.6, 8, "Only masked", 16, "latent noise",
                                                           "Inpaint not masked"))
    assert spec.init_image.size == (80, 80) and spec.strength == 0.6
    mask = np.asarray(spec.inpaint_mask)
    assert spec.inpaint_mask.mode == "L" and mask[20, 50] == 255 and mask[50, 10] == 0 and mask.sum() == 255 * 600
    assert spec.inpaint == InpaintOptions(mask_blur=8, invert=True, full_res=True, padding=16, fill="latent_noise",
                                          paste_back=True)
    plain = job_spec(jobs, limits, *args, img2img=Img2img(photo, 0.3))  # nothing drawn: plain img2img
    assert plain.inpaint_mask is None and plain.inpaint is None and plain.strength == 0.3 and plain.hires is None
    with pytest.raises(ControlstackError, match="upload an image to the img2img / inpaint tab"):
        job_spec(jobs, limits, *args, img2img=Img2img(None))
    with pytest.raises(ControlstackError, match="'Batch count' must be an integer in \\[1, 16\\], got 17"):
        job_spec(jobs, limits, *args, n_iter=17)
    with pytest.raises(ControlstackError, match="Upscaler 'Bicubic' is unknown"):
        job_spec(jobs, limits, *args, hires=Hires("Bicubic"))
    with pytest.raises(ControlstackError, match="'Upscale by' must be a number in \\[1, 8\\]"):
        job_spec(jobs, limits, *args, hires=Hires("Latent", 0.5))


def test_outputs_are_saved_as_pngs_with_their_parameters_and_png_info_reads_them(tiny_pipe, tmp_path):
    import datetime

    from controlstack.sampling.schedulers import SAMPLER_TABLE
    from controlstack.serve.app import create_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import generate
    from controlstack.serve.ui.pnginfo import read_info, txt2img_values

    jobs, limits = create_app(lambda: tiny_pipe).state.jobs, Limits()
    values = ("a red box\nsecond line", "blurry", "Euler a", 2, 6.5, 11, 64, 48, 2, "Balanced", [])

    class Bar:  # gr.Progress is falsy (its __len__ is 0): generate must report to it all the same
        def __init__(self):
            self.calls = []

        def __len__(self):
            return 0

        def __call__(self, fraction, desc=None):
            self.calls.append((fraction, desc))

    class Slow:  # the server's queue, its wait reporting steps as a slow run does
        def __getattr__(self, name):
            return getattr(jobs, name)

        def wait(self, job_id, report=None):
            report(1, 4)
            report(2, 4)
            return jobs.wait(job_id, report)

    bar = Bar()
    images, text = generate(Slow(), limits, *values, n_iter=2, progress=bar, outputs=tmp_path)
    job_id = text.splitlines()[0]
    assert bar.calls[:3] == [(0.0, f"{job_id} queued"), (0.25, f"{job_id} step 1/4"), (0.5, f"{job_id} step 2/4")]
    assert bar.calls[-1] == (1.0, f"{job_id} done")
    day = tmp_path / "txt2img-images" / datetime.date.today().isoformat()
    # sd-webui's names: a running number and each image's seed (its Batch count call's + batch position)
    assert sorted(p.name for p in day.iterdir()) == ["00000-11.png", "00001-12.png", "00002-13.png", "00003-14.png"]
    assert [name for _, name in images] == ["00000-11.png", "00001-12.png", "00002-13.png", "00003-14.png"]
    shown = images[3][0]  # the gallery gets the saved files' images, their parameters in .info (PNG, not WebP)
    assert shown.size == (64, 48) and "Seed: 13" in shown.info["parameters"]
    assert "Batch pos: 1" in shown.info["parameters"]
    text3, fields = read_info(day / "00002-13.png")
    assert "Seed: 13" in text3 and fields["prompt"] == "a red box\nsecond line" and fields["negative_prompt"] == "blurry"
    assert txt2img_values(fields, [s.webui for s in SAMPLER_TABLE]) == {
        "prompt": "a red box\nsecond line", "negative": "blurry", "steps": 2, "cfg": 6.5, "seed": 13,
        "sampler": "Euler a", "width": 64, "height": 48}
    generate(jobs, limits, *values[:8], 1, "Balanced", [], outputs=tmp_path)
    assert len(list(day.iterdir())) == 5 and (day / "00004-11.png").is_file()  # numbered on, nothing overwritten
    # a picture without parameters: one line, not a traceback
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ControlstackError, match="this PNG image has no generation parameters"):
        read_info(tmp_path / "plain.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ControlstackError, match="not an image PIL can read"):
        read_info(tmp_path / "junk.png")


def test_png_info_sends_hires_images_as_their_first_pass_with_the_hires_fix():
    from controlstack.io.png import parse_parameters
    from controlstack.serve.ui.pnginfo import txt2img_values

    # Size is the first pass's (sd-webui's convention, which controlstack writes too): txt2img gets it + the fix
    text = ('masterpiece, a cat\nNegative prompt: lowres, bad\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, '
            'Seed: 1234, Size: 512x384, Model: x, Denoising strength: 0.45, Hires upscale: 2, Hires steps: 12, '
            'Hires upscaler: Latent (bicubic), ControlNet 0: "Module: canny, Model: canny, Weight: 1.0"')
    values = txt2img_values(parse_parameters(text), ["DPM++ 2M Karras", "UniPC"])
    assert values == {"prompt": "masterpiece, a cat", "negative": "lowres, bad", "steps": 30, "cfg": 7.0,
                      "seed": 1234, "sampler": "DPM++ 2M Karras", "width": 512, "height": 384, "hires": True,
                      "hires_scale": 2.0, "hires_upscaler": "Latent (bicubic)", "hires_steps": 12,
                      "hires_strength": 0.45}
    assert txt2img_values(parse_parameters("just a prompt"), []) == {"prompt": "just a prompt", "negative": ""}


def test_interrupt_keeps_the_partial_image_and_skip_runs_the_next_call(tiny_pipe):
    from controlstack.serve.app import create_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import generate, job_control

    jobs, limits = create_app(lambda: tiny_pipe).state.jobs, Limits()
    assert job_control(jobs, "interrupt") == "nothing to interrupt: no job of this page is running"

    def when_running(action, at=3):
        def go():
            deadline = time.time() + 60
            while time.time() < deadline and not any(p[0] >= at for p in list(jobs.running.values())):
                time.sleep(0.005)
            said.append(job_control(jobs, action))
        said = []
        threading.Thread(target=go, daemon=True).start()
        return said

    said = when_running("interrupt")
    images, text = generate(jobs, limits, "a box", "", "UniPC", 150, 5, 1, 64, 64, 1, "Balanced", [], n_iter=3)
    job_id = text.splitlines()[0]
    record = jobs.get(job_id)
    assert said == [f"interrupted {job_id}"] and len(images) == 1 and record["status"] == "done"
    assert 3 <= record["progress"][0] < 150  # stopped mid-run, the partial image kept, later calls not run
    said = when_running("skip")
    images, text = generate(jobs, limits, "a box", "", "UniPC", 8, 5, 1, 64, 64, 1, "Balanced", [], n_iter=2)
    assert said == [f"skipped {text.splitlines()[0]}"] and len(images) == 2

    class Old:  # a backend without the buttons' methods: a one-line answer
        pass
    with pytest.raises(ControlstackError, match="this server cannot skip jobs"):
        job_control(Old(), "skip")


def test_the_page_has_png_outputs_a_bright_brush_and_short_labels(tiny_pipe, tmp_path):
    import gradio as gr

    from controlstack.serve.app import create_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import build

    demo = build(create_app(lambda: tiny_pipe).state.jobs, Limits(), outputs=tmp_path)
    blocks = list(demo.blocks.values())
    gallery = next(b for b in blocks if isinstance(b, gr.Gallery))
    assert gallery.format == "png" and gallery.interactive is False  # the files with their infotext; no uploads
    masks = [b for b in blocks if isinstance(b, gr.ImageMask)]
    assert len(masks) == 4 and all(m.brush.default_color == "#ff00ff" for m in masks)
    labels = {b.label for b in blocks if getattr(b, "label", None)}
    assert {"Image", "Image for img2img", "Control Type", "Resize Mode", "Pixel Perfect", "Batch count",
            "Upscaler", "Masked content", "Inpaint area", "Mask mode", "Source"} <= labels
    assert max(len(b.label) for b in blocks if isinstance(b, (gr.Image, gr.ImageMask))) < 24
    buttons = {b.value for b in blocks if isinstance(b, gr.Button)}
    assert {"Generate", "Interrupt", "Skip", "Send to txt2img", "Send to img2img"} <= buttons


def test_a_unit_with_an_ip_adapter_model_is_an_image_prompt(tmp_path, tiny_components):
    import copy
    import dataclasses

    from controlstack import Pipeline
    from controlstack.serve.app import create_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import Unit, job_spec
    from controlstack.serve.ui.units import controlnet_names
    from tests.core.test_ip_adapter import image_encoder, ip_adapter_file

    # a copy of the shared tiny U-Net: loading the adapter changes its attention processors
    pipe = Pipeline(dataclasses.replace(tiny_components, unet=copy.deepcopy(tiny_components.unet)))
    pipe.load_ip_adapter(ip_adapter_file(tmp_path, pipe.unet, 1, "style"), image_encoder=image_encoder())
    jobs = create_app(lambda: pipe, data=tmp_path / "data").state.jobs
    assert "style" in controlnet_names(jobs)
    photo = np.full((64, 64, 3), 120, np.uint8)
    spec = job_spec(jobs, Limits(), "a box", "", "Euler a", 2, 5, 7, 64, 64, 1, "Balanced",
                    [Unit(True, photo, "none", "style", 0.6)])
    assert spec.controls == [] and [(p.model, p.scale) for p in spec.image_prompts] == [("style", 0.6)]
