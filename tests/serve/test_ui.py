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
    jobs, limits = app.state.jobs, Limits()  # the UI's backend (serve/ui.py)
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
