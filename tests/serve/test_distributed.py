"""Scale-out with real processes: Redis, ``controlstack serve --broker`` fronts and ``controlstack
worker`` processes. ``kill -9`` of the worker running a job: all six jobs complete, the killed one on
the other worker with the image a clean run makes, none run twice, none lost; a cancel reaches the
worker; progress reaches the front; sd-webui's synchronous requests go before queued /v1 jobs; the
queue limit holds across fronts; a base no worker holds is answered clearly (503 at submit; a queued
job waits, saying why); a front checks the token and refuses invalid jobs before they take a slot;
a front answers the annotator endpoints as the single server does, and the web UI's Generate runs
through it on a worker (and its interrupt stops that job). Skipped without ``redis-server``."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.serve.test_store import _call, _free_port

pytest.importorskip("celery", reason="the scale-out tests need celery and redis (pip install celery redis)")
pytest.importorskip("redis", reason="the scale-out tests need celery and redis (pip install celery redis)")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (apt-get install redis-server)")
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
JOB_SECONDS = 20  # the workers' deadline: a killed worker's job is handed out again ~32 s later


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    import redis

    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.time() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.time() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.1)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tinysd(tmp_path_factory, tiny_components):
    from controlstack.io.checkpoints import save_base

    path = tmp_path_factory.mktemp("models") / "tinysd"
    save_base(tiny_components, path)
    return path


def _cli(*args, log):
    return subprocess.Popen([sys.executable, "-m", "controlstack.cli.main", *args], stdout=log,
                            stderr=subprocess.STDOUT, env=ENV)


def _worker(broker, model, name, log):
    import redis

    proc = _cli("worker", "--broker", broker, "--models", str(model), "--no-default", "--name", name,
                "--job-seconds", str(JOB_SECONDS), log=log)
    r = redis.Redis.from_url(broker)
    deadline = time.time() + 120
    while not r.exists(f"cs:worker:{name}"):  # announced once its base is loaded; consuming a moment later
        assert proc.poll() is None and time.time() < deadline, f"worker {name} did not start"
        time.sleep(0.2)
    time.sleep(2)
    return proc


def _front(broker, port, log, queue=8):
    proc = _cli("serve", "--no-ui", "--broker", broker, "--port", str(port), "--queue", str(queue),
                "--job-seconds", str(JOB_SECONDS), log=log)
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None and time.time() < deadline, "the front did not start"
        try:
            if _call(port, "GET", "/v1/jobs/job-0")[0] == 404:
                return proc
        except OSError:
            time.sleep(0.2)


def _stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _until(port, ids, ok, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = {i: _call(port, "GET", f"/v1/jobs/{i}")[1] for i in ids}
        if ok(records):
            return records
        time.sleep(0.05)
    raise AssertionError(f"timed out: {[(i, r.get('status'), r.get('progress')) for i, r in records.items()]}")


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_kill_9_of_a_worker_mid_job_every_job_completes_once_on_the_other(tmp_path, redis_port, tinysd):
    import redis

    broker = f"redis://127.0.0.1:{redis_port}/0"
    r = redis.Redis.from_url(broker, decode_responses=True)
    port = _free_port()
    bodies = [{"prompt": f"box {s}", "base": "tinysd", "steps": 150, "width": 64, "height": 64, "seed": s}
              for s in range(31, 37)]
    with open(tmp_path / "cluster.log", "wb") as log:
        workers = {n: _worker(broker, tinysd, n, log) for n in ("wa", "wb")}
        front = _front(broker, port, log)
        try:
            ids = [_call(port, "POST", "/v1/generate", b)[1]["id"] for b in bodies]
            # progress reaches the front while a job runs
            records = _until(port, ids, lambda rs: any(x["status"] == "running" and x["progress"][0] >= 3
                                                        for x in rs.values()), 60)
            victim = next(i for i, x in records.items() if x["status"] == "running" and x["progress"][0] >= 3)
            assert records[victim]["progress"][1] == 150
            dead = r.hget(f"cs:job:{victim}", "worker")
            workers[dead].kill()  # SIGKILL: its message stays unacknowledged in Redis
            workers[dead].wait(timeout=30)
            assert workers[dead].returncode == -9
            done = _until(port, ids, lambda rs: all(x["status"] == "done" for x in rs.values()), 240)
            attempts = {i: done[i]["attempts"] for i in ids}
            assert attempts[victim] == 2 and sum(attempts.values()) == 7  # one rerun, nothing ran twice else
            survivor = next(n for n in workers if n != dead)
            assert r.hget(f"cs:job:{victim}", "worker") == survivor
            assert [done[i]["parameters"]["seed"] for i in ids] == list(range(31, 37))
            assert all(len(done[i]["images"]) == 1 for i in ids)
            assert r.scard("cs:active") == 0  # every slot freed
            # the rerun makes the image a clean run makes (spec and seed fix it)
            again = _call(port, "POST", "/v1/generate", bodies[ids.index(victim)])[1]["id"]
            clean = _until(port, [again], lambda rs: rs[again]["status"] == "done", 60)[again]
        finally:
            _stop(front, *workers.values())
    first, second = _image(done[victim]["images"][0]), _image(clean["images"][0])
    assert np.array_equal(np.asarray(first), np.asarray(second))
    assert first.info["parameters"] == second.info["parameters"]
    assert f"Seed: {bodies[ids.index(victim)]['seed']}" in first.info["parameters"]


def test_cancel_reaches_the_worker_checks_needing_weights_fail_there_interactive_jobs_go_first(tmp_path, redis_port, tinysd):
    broker = f"redis://127.0.0.1:{redis_port}/1"
    port = _free_port()
    with open(tmp_path / "cluster.log", "wb") as log:
        worker = _worker(broker, tinysd, "wc", log)
        front = _front(broker, port, log)
        try:
            long = {"prompt": "box", "base": "tinysd", "steps": 150, "width": 256, "height": 256, "seed": 1}
            job = _call(port, "POST", "/v1/generate", long)[1]["id"]
            _until(port, [job], lambda rs: rs[job]["status"] == "running" and rs[job]["progress"][0] >= 1, 60)
            status, record = _call(port, "DELETE", f"/v1/jobs/{job}")
            assert status == 200 and record["id"] == job
            end = _until(port, [job], lambda rs: rs[job]["status"] == "cancelled", 30)[job]
            assert 1 <= end["progress"][0] < 150 and end["finished"] is not None and "images" not in end
            # a width the base's VAE cannot take: accepted by the front (no weights), failed by the worker
            odd = _call(port, "POST", "/v1/generate", long | {"width": 60, "steps": 2})[1]["id"]
            failed = _until(port, [odd], lambda rs: rs[odd]["status"] == "failed", 60)[odd]
            assert "'width' must be a multiple of 8" in failed["error"]
            assert _call(port, "GET", "/v1/jobs/job-nosuch") == (404, {"error": "no job 'job-nosuch'"})
            # priority: while a job runs, an sd-webui request (someone waits) goes before queued /v1 jobs
            busy = _call(port, "POST", "/v1/generate", long | {"seed": 2})[1]["id"]
            _until(port, [busy], lambda rs: rs[busy]["status"] == "running", 60)
            batch = [_call(port, "POST", "/v1/generate", long | {"seed": s, "width": 64, "height": 64})[1]["id"]
                     for s in (3, 4)]
            status, answer = _call(port, "POST", "/sdapi/v1/txt2img", {
                "prompt": "disc", "steps": 3, "width": 64, "height": 64, "seed": 9,
                "override_settings": {"sd_model_checkpoint": "tinysd"}})
            assert status == 200 and json.loads(answer["info"])["seed"] == 9
            assert _image(answer["images"][0]).size == (64, 64)
            after = {i: _call(port, "GET", f"/v1/jobs/{i}")[1]["status"] for i in (busy, *batch)}
            assert after[busy] == "done" and after[batch[1]] == "queued" and after[batch[0]] != "done", after
            _until(port, batch, lambda rs: all(x["status"] == "done" for x in rs.values()), 60)
        finally:
            _stop(front, worker)


def test_queue_limit_holds_across_fronts_and_an_unheld_base_is_answered_clearly(tmp_path, redis_port):
    import redis

    broker = f"redis://127.0.0.1:{redis_port}/2"
    r = redis.Redis.from_url(broker, decode_responses=True)
    # a worker's announcement without a worker: jobs are accepted and wait (no model loads here)
    r.set("cs:worker:ghost", json.dumps({"tinysd": []}), ex=60)
    ports = [_free_port(), _free_port()]
    body = {"prompt": "box", "base": "tinysd", "steps": 2, "width": 64, "height": 64}
    with open(tmp_path / "fronts.log", "wb") as log:
        fronts = [_front(broker, p, log, queue=2) for p in ports]
        try:
            a = _call(ports[0], "POST", "/v1/generate", body)
            b = _call(ports[1], "POST", "/v1/generate", body)
            assert a[0] == b[0] == 202
            import urllib.error
            import urllib.request

            request = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/v1/generate", method="POST",
                                             data=json.dumps(body).encode(),
                                             headers={"content-type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as full:
                urllib.request.urlopen(request, timeout=30)
            assert full.value.code == 429 and full.value.headers["Retry-After"] == "5"
            assert json.loads(full.value.read()) == {"error": "the queue is full; retry later"}
            # a cancel on the other front frees the slot for everyone
            assert _call(ports[1], "DELETE", f"/v1/jobs/{a[1]['id']}")[1]["status"] == "cancelled"
            c = _call(ports[0], "POST", "/v1/generate", body)
            assert c[0] == 202
            # the base's last worker is gone: the queued job waits and says why
            r.delete("cs:worker:ghost")
            record = _call(ports[0], "GET", f"/v1/jobs/{c[1]['id']}")[1]
            assert record["status"] == "queued"
            assert record["note"] == "no running worker holds base 'tinysd' now; the job waits for one"
            # and a new job for it is refused at once, naming what is held
            assert _call(ports[1], "POST", "/v1/generate", body) == (
                503, {"error": "no running worker holds base 'tinysd' (held now: none: start a controlstack worker)"})
        finally:
            _stop(*fronts)


def test_a_front_checks_the_token_and_refuses_before_queueing(redis_port):
    from fastapi.testclient import TestClient

    from controlstack.serve.distributed import Cluster
    from controlstack.serve.front import create_front_app

    cluster = Cluster(f"redis://127.0.0.1:{redis_port}/3", queue_size=2, job_seconds=20)
    client = TestClient(create_front_app(cluster, token="s3cret"))
    assert client.get("/v1/jobs/job-1").status_code == 401
    auth = {"authorization": "Bearer s3cret"}
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x"}, headers=auth)
    assert (answer.status_code, answer.json()) == (400, {"error": "'override_settings.sd_model_checkpoint': no "
                                                        "running worker holds base 'default' (held now: none: "
                                                        "start a controlstack worker)"})
    cluster.redis.set("cs:worker:ghost", json.dumps({"tinysd": ["canny"]}), ex=60)
    bad = client.post("/v1/generate", json={"prompt": "x", "base": "tinysd", "steps": 0}, headers=auth)
    assert (bad.status_code, bad.json()) == (400, {"error": "'steps' must be an integer in [1, 150], got 0"})
    unknown = client.post("/v1/generate", json={"prompt": "x", "base": "tinysd", "controls": [
        {"model": "depth", "image": "AAAA"}]}, headers=auth)
    assert unknown.status_code == 400 and "not a registered model; choose one of canny" in unknown.json()["error"]
    assert cluster.queued() == 0  # invalid requests never take a slot
    assert client.get("/v1/models", headers=auth).json() == {"bases": [{"name": "tinysd", "controlnets": ["canny"]}]}


def test_a_front_runs_annotators_itself_as_the_embedded_server_does(tmp_path, redis_port):
    from fastapi.testclient import TestClient

    from controlstack.serve.app import create_app
    from controlstack.serve.distributed import Cluster
    from controlstack.serve.front import create_front_app

    cluster = Cluster(f"redis://127.0.0.1:{redis_port}/4", queue_size=2, job_seconds=20)
    front = TestClient(create_front_app(cluster, ui=True))  # no worker yet: the UI builds on defaults
    page = front.get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()
    embedded = TestClient(create_app(lambda: None, data=tmp_path))  # annotators never load the base
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[16:48, 16:48] = 220
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    for path, body in [
        ("/v1/annotate", {"annotator": "canny", "image": png, "params": {"resolution": 64}}),
        ("/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [png],
                                "controlnet_processor_res": 64}),
        ("/v1/annotate", {"annotator": "canny", "image": png, "params": {"weights": "/etc"}}),  # refused alike
    ]:
        ours, theirs = front.post(path, json=body), embedded.post(path, json=body)
        assert (ours.status_code, ours.json()) == (theirs.status_code, theirs.json()), path
    edges = _image(front.post("/v1/annotate", json={"annotator": "canny", "image": png}).json()["image"])
    assert np.asarray(edges).max() == 255 and np.asarray(edges)[0, 0].max() == 0  # the square's edges only
    assert front.post("/v1/annotate", json={"annotator": "canny", "image": png, "params": {"weights": "/etc"}}
                      ).json() == {"error": "'params.weights' cannot be set over HTTP (it is a folder on the "
                                            "server); the server's annotators use the weights it was started with"}
    for path in ("/v1/annotators", "/controlnet/module_list", "/sdapi/v1/scripts"):
        assert front.get(path).json() == embedded.get(path).json(), path
    # options: the UI's base, once a worker holds one ('default' first, else the first by name)
    assert front.get("/sdapi/v1/options").status_code == 503
    cluster.redis.set("cs:worker:ghost", json.dumps({"tinysd": ["canny"], "atiny": []}), ex=60)
    assert front.get("/sdapi/v1/options").json() == {"sd_model_checkpoint": "atiny", "sd_checkpoint_hash": None,
                                                      "samples_format": "png", "CLIP_stop_at_last_layers": 1}
    assert front.post("/sdapi/v1/interrupt").json() == {} and cluster.waiting == set()


def test_the_web_ui_generates_through_a_front_and_interrupt_ends_its_job(tmp_path, redis_port, tinysd):
    import threading

    from fastapi.testclient import TestClient

    from controlstack.errors import ControlstackError
    from controlstack.serve.distributed import Cluster
    from controlstack.serve.front import create_front_app
    from controlstack.serve.spec import Limits
    from controlstack.serve.ui import generate

    broker = f"redis://127.0.0.1:{redis_port}/5"
    cluster = Cluster(broker, queue_size=4, job_seconds=JOB_SECONDS)
    limits = Limits(job_seconds=JOB_SECONDS)
    with open(tmp_path / "cluster.log", "wb") as log:
        worker = _worker(broker, tinysd, "wu", log)
        try:
            steps = []
            # what the Generate button calls, with the front's Cluster as the UI's backend
            images, text = generate(cluster, limits, "a box", "", "UniPC", 3, 5, 7, 64, 64, 1, "Balanced", [],
                                    progress=lambda frac, desc: steps.append((frac, desc)))
            job_id = text.splitlines()[0]
            record = cluster.get(job_id)  # the PNGs the worker left in the result backend
            assert record["status"] == "done" and record["base"] == "tinysd" and record["parameters"]["seed"] == 7
            assert len(images) == len(record["images"]) == 1 and images[0].size == (64, 64)
            assert np.array_equal(np.asarray(images[0]), np.asarray(_image(record["images"][0])))
            assert "Seed: 7" in text and "Steps: 3" in text
            assert steps[0] == (0.0, f"{job_id} queued") and steps[-1] == (1.0, f"{job_id} done")
            # /sdapi/v1/interrupt on the front stops the running job its UI waits on, which keeps the
            # image it reached (sd-webui's interrupt)
            failure, done = [], []

            def long_job():
                try:
                    done.append(generate(cluster, limits, "a box", "", "UniPC", 150, 5, 1, 256, 256, 1, "Balanced",
                                         []))
                except ControlstackError as exc:
                    failure.append(str(exc))

            thread = threading.Thread(target=long_job, daemon=True)
            thread.start()
            deadline = time.time() + 60
            while not any(cluster.get(i, False)["status"] == "running" for i in list(cluster.waiting)):
                assert time.time() < deadline, "the UI's job did not start"
                time.sleep(0.1)
            waited = next(iter(cluster.waiting))
            front = TestClient(create_front_app(cluster))
            # sd-webui's progress on the front follows the job its UI waits on
            state = front.get("/sdapi/v1/progress").json()["state"]
            assert state["sampling_steps"] == 150 and 0 <= state["sampling_step"] <= 150 and state["job_count"] >= 1
            assert front.post("/sdapi/v1/interrupt").json() == {}
            thread.join(timeout=60)
            assert not thread.is_alive() and failure == [] and len(done[0][0]) == 1
            record = cluster.get(waited)
            assert record["status"] == "done" and record["progress"][0] < 150 and cluster.waiting == set()
        finally:
            _stop(worker)
