"""The durable job store: specs round-trip through SQLite and content-addressed blobs, a restart
requeues what a stopped process left queued or running, ids are never reused, a cancel survives a
restart, retention deletes old finished jobs and unreferenced files; and with a real process:
``kill -9`` mid-job, restart on the same ``--data``, every job completes with a clean run's image."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from controlstack.errors import ControlstackError
from tests.serve.test_api import EDGES, UNIT


@pytest.fixture(scope="module")
def tiny_pipe(tiny_components, tiny_controlnets):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={"canny": tiny_controlnets[0]}, name="tiny")


def v1_spec(tiny_pipe, **body):
    from controlstack.serve.spec import Limits, spec_from_v1

    body = {"prompt": "a red box", "steps": 2, "width": 64, "height": 64, "seed": 3} | body
    return spec_from_v1(body, lambda name: tiny_pipe, Limits())


def test_a_spec_round_trips_with_its_images_as_shared_blobs(tmp_path, tiny_pipe):
    from controlstack.serve.store import Store

    mask = base64.b64encode(_png(Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)))).decode()
    spec = v1_spec(tiny_pipe, init_image=UNIT["image"], inpaint_mask=mask, strength=0.6, seed=-1,
                   controls=[{"model": "canny", "image": UNIT["image"], "weight": [[0.0, 1.0], [1.0, 0.2]]}])
    store = Store(tmp_path)
    job_id = store.add(spec)
    stored = json.loads(store.row(job_id)["spec"])
    # images are sha256-named PNG files, referenced from the JSON; the same image is one file
    assert stored["init_image"] == stored["controls"][0]["image"] and len(stored["init_image"]["blob"]) == 64
    assert sorted(p.stem for p in (tmp_path / "blobs").iterdir()) == sorted(
        {stored["init_image"]["blob"], stored["inpaint_mask"]["blob"]})
    assert "base64" not in store.row(job_id)["spec"] and len(store.row(job_id)["spec"]) < 2000
    assert 0 <= stored["seed"] < 2**32  # -1 was drawn at acceptance and stored
    back = store.spec(job_id)
    assert back.to_dict() == spec.to_dict() and back.controls[0].weight == ((0.0, 1.0), (1.0, 0.2))
    assert np.array_equal(np.asarray(back.controls[0].image), EDGES)


def test_restart_requeues_running_jobs_keeps_cancels_and_never_reuses_ids(tmp_path, tiny_pipe):
    from controlstack.serve.store import Store

    store = Store(tmp_path)
    ids = [store.add(v1_spec(tiny_pipe, seed=s)) for s in range(5)]
    assert ids == ["job-1", "job-2", "job-3", "job-4", "job-5"]
    assert store.claim() == "job-1" and store.claim() == "job-2"  # both "running" when the process dies
    assert store.cancel("job-2") == "running" and store.cancel("job-3") == "cancelled"
    store.finish("job-4", "done", images=[Image.fromarray(EDGES)], parameters={"seed": 3}, progress=[2, 2])
    store.prune(keep_jobs=0, keep_days=None)  # deletes job-3 and job-4, the newest ids
    with pytest.raises(ControlstackError, match="is in use by another controlstack serve"):
        Store(tmp_path)  # a second server would requeue, and run twice, the jobs this one runs
    store.close()

    store = Store(tmp_path)  # the restart
    assert store.requeue() == ["job-1"]
    statuses = {i: (store.record(i) or {}).get("status") for i in ids}
    # the running job runs again; the one cancelled while running stays cancelled; deleted ones are gone
    assert statuses == {"job-1": "queued", "job-2": "cancelled", "job-3": None, "job-4": None, "job-5": "queued"}
    assert store.add(v1_spec(tiny_pipe)) == "job-6"  # not job-4 or job-5 again
    assert [store.claim(), store.claim(), store.claim()] == ["job-1", "job-5", "job-6"]  # oldest first
    assert store.record("job-1")["attempts"] == 2 and store.record("job-5")["attempts"] == 1
    assert store.record("nope") is None and store.record("job-1; DROP TABLE jobs") is None


def test_jobs_rerun_after_a_restart_in_process_with_the_same_image(tmp_path, tiny_pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app
    from controlstack.serve.store import Store
    from tests.serve.test_api import _wait

    store = Store(tmp_path)  # a process that accepted two jobs, started one, cancelled the other, died
    first = store.add(v1_spec(tiny_pipe, seed=-1))
    cancelled = store.add(v1_spec(tiny_pipe, prompt="y"))
    assert store.claim() == first and store.cancel(cancelled) == "cancelled"
    store.close()

    app = create_app(lambda: tiny_pipe, data=tmp_path)
    client = TestClient(app)
    record = _wait(client, first)
    assert record["status"] == "done" and record["attempts"] == 2 and record["progress"] == [2, 2]
    assert client.get(f"/v1/jobs/{cancelled}").json()["status"] == "cancelled"
    # a clean run of the stored spec (its drawn seed included) makes the same PNG
    clean = client.post("/v1/generate", json=app.state.jobs.store.spec(first).to_dict()).json()["id"]
    assert clean == "job-3" and _wait(client, clean)["images"] == record["images"]
    app.state.jobs.close()
    app.state.jobs.store.close()

    client = TestClient(create_app(lambda: tiny_pipe, data=tmp_path))  # finished jobs are served after a restart
    again = client.get(f"/v1/jobs/{first}").json()
    assert again["images"] == record["images"] and again["parameters"] == record["parameters"]
    assert client.get(f"/v1/jobs/{cancelled}").json()["status"] == "cancelled"


def test_retention_deletes_old_finished_jobs_and_their_files_never_queued_ones(tmp_path, tiny_pipe):
    from controlstack.serve.store import Store

    store = Store(tmp_path)
    other = base64.b64encode(_png(Image.fromarray(255 - EDGES))).decode()
    a = store.add(v1_spec(tiny_pipe, controls=[{"model": "canny", "image": UNIT["image"]}]))
    b = store.add(v1_spec(tiny_pipe, controls=[{"model": "canny", "image": other}]))
    c = store.add(v1_spec(tiny_pipe, controls=[{"model": "canny", "image": UNIT["image"]}]))
    queued = store.add(v1_spec(tiny_pipe, controls=[{"model": "canny", "image": other}]))
    for job_id in (a, b, c):
        store.claim()
        store.finish(job_id, "done", images=[Image.fromarray(EDGES)], parameters={}, progress=[2, 2])
    assert len(list((tmp_path / "blobs").iterdir())) == 2 and (tmp_path / "results" / a / "0.png").is_file()
    store.db.execute("UPDATE jobs SET finished = ? WHERE n = 1", (time.time() - 40 * 86400,))  # a is 40 days old
    assert store.prune(keep_jobs=10, keep_days=30) == [a]
    assert not (tmp_path / "results" / a).exists() and (tmp_path / "results" / b / "0.png").is_file()
    assert len(list((tmp_path / "blobs").iterdir())) == 2  # c still refers to a's control image
    assert store.prune(keep_jobs=0, keep_days=30) == [b, c]  # keep none finished; the queued one stays
    assert store.record(queued)["status"] == "queued" and list((tmp_path / "results").iterdir()) == []
    # only the queued job's image is left
    assert [p.stem for p in (tmp_path / "blobs").iterdir()] == [json.loads(store.row(queued)["spec"])[
        "controls"][0]["image"]["blob"]]


def test_serve_refuses_bad_retention_flags(capsys):
    from controlstack.cli.main import main

    assert main(["serve", "--keep-jobs", "-1"]) == 2
    assert "--keep-jobs must be >= 0" in capsys.readouterr().err
    assert main(["serve", "--keep-days", "nan"]) == 2
    assert "--keep-days must be >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- a real process
def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _serve(model, data, port, log):
    proc = subprocess.Popen([sys.executable, "-m", "controlstack.cli.main", "serve", "--no-ui", "--port", str(port),
                             "--models", str(model), "--data", str(data)], stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            if _call(port, "GET", "/v1/jobs/job-0")[0] == 404:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not answer within 120 s")


def _until(port, job_ids, ok, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = {i: _call(port, "GET", f"/v1/jobs/{i}")[1] for i in job_ids}
        if ok(records):
            return records
        time.sleep(0.02)
    raise AssertionError(f"timed out: {[(i, r.get('status'), r.get('progress')) for i, r in records.items()]}")


def test_kill_9_mid_job_then_restart_every_job_completes_as_a_clean_run(tmp_path, tiny_components):
    from controlstack.io.checkpoints import save_base

    save_base(tiny_components, tmp_path / "tinysd")
    data, port = tmp_path / "data", _free_port()
    bodies = [{"prompt": f"box {s}", "base": "tinysd", "steps": 150, "width": 64, "height": 64, "seed": s,
               "controls": []} for s in (11, 12, 13)]
    with open(tmp_path / "serve.log", "wb") as log:
        proc = _serve(tmp_path / "tinysd", data, port, log)
        try:
            ids = [_call(port, "POST", "/v1/generate", b)[1]["id"] for b in bodies]
            records = _until(port, ids, lambda r: r[ids[0]]["status"] == "running" and r[ids[0]]["progress"][0] >= 3)
            assert [records[i]["status"] for i in ids[1:]] == ["queued", "queued"]
        finally:
            proc.kill()  # SIGKILL: no clean-up runs
            proc.wait(timeout=30)
        assert proc.returncode == -9

        port = _free_port()
        proc = _serve(tmp_path / "tinysd", data, port, log)
        try:
            done = _until(port, ids, lambda r: all(x["status"] == "done" for x in r.values()))
            assert [done[i]["attempts"] for i in ids] == [2, 1, 1]  # the killed job ran again from the start
            assert [done[i]["parameters"]["seed"] for i in ids] == [11, 12, 13]
            clean_ids = [_call(port, "POST", "/v1/generate", b)[1]["id"] for b in bodies]
            assert clean_ids == ["job-4", "job-5", "job-6"]
            clean = _until(port, clean_ids, lambda r: all(x["status"] == "done" for x in r.values()))
        finally:
            proc.kill()
            proc.wait(timeout=30)
    for job_id, clean_id in zip(ids, clean_ids):
        image, reference = (Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
                            for r in (done[job_id], clean[clean_id]))
        assert np.array_equal(np.asarray(image), np.asarray(reference))
        assert image.info["parameters"] == reference.info["parameters"] and "Seed: 1" in image.info["parameters"]
    assert sorted(p.name for p in (data / "results").iterdir()) == sorted(ids + clean_ids)


def test_sd_webui_generations_are_jobs_of_the_one_queue(tmp_path, tiny_pipe):
    import threading

    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app
    from tests.serve.test_api import BODY, _wait

    app = create_app(lambda: tiny_pipe, data=tmp_path, queue_size=1)
    client = TestClient(app)
    v1 = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    with app.state.worker.run_lock:  # the worker takes job-1, then waits for the lock
        client.post("/v1/generate", json=v1)
        time.sleep(0.3)
        client.post("/v1/generate", json=v1)  # job-2 waits: the queue (size 1) is full for every endpoint
        r = client.post("/sdapi/v1/txt2img", json=BODY)
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2
    assert _wait(client, "job-2")["status"] == "done"
    # a txt2img is a stored job: /sdapi/v1/progress reports it and /sdapi/v1/interrupt stops it
    answer = {}
    slow = threading.Thread(target=lambda: answer.update(r=client.post("/sdapi/v1/txt2img", json={
        **BODY, "steps": 150})))
    slow.start()
    deadline = time.time() + 60
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_steps"] != 150 and time.time() < deadline:
        time.sleep(0.01)
    state = client.get("/sdapi/v1/progress").json()["state"]
    assert state["sampling_steps"] == 150 and state["job_count"] == 1
    client.post("/sdapi/v1/interrupt")
    slow.join(timeout=60)
    # as sd-webui: the interrupted request answers with the image it reached (one, partly denoised)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
    record = client.get("/v1/jobs/job-3").json()
    assert record["status"] == "done" and 0 < record["progress"][0] < 150
    r = client.post("/sdapi/v1/txt2img", json=BODY)
    assert r.status_code == 200 and json.loads(r.json()["info"])["seed"] == 7
    assert client.get("/v1/jobs/job-4").json()["images"] == r.json()["images"]  # kept as /v1 jobs are


def test_keep_jobs_0_deletes_each_job_as_it_ends_and_sd_webui_still_gets_its_images(tmp_path, tiny_pipe):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app
    from tests.serve.test_api import BODY

    client = TestClient(create_app(lambda: tiny_pipe, data=tmp_path, keep_jobs=0))
    r = client.post("/sdapi/v1/txt2img", json=BODY)
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert client.get("/v1/jobs/job-1").status_code == 404
    assert list((tmp_path / "results").iterdir()) == [] and list((tmp_path / "blobs").iterdir()) == []


def test_the_default_data_folder_follows_xdg(monkeypatch, tmp_path):
    from pathlib import Path

    from controlstack.serve.store import default_data_dir

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "controlstack" / "serve"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == Path(tmp_path / "home" / ".local" / "share" / "controlstack" / "serve")
