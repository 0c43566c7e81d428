"""Jobs (``serve/jobs.py``, ``serve/spec.run_spec``): batch count, sd-webui's interrupt and skip."""

from __future__ import annotations

import time

import numpy as np
import pytest

from controlstack.serve.spec import JobSpec, run_spec


@pytest.fixture(scope="module")
def tiny_pipe(tiny_components):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={}, name="tiny")


def test_batch_count_runs_n_iter_calls_with_sd_webuis_seeds(tiny_pipe):
    spec = JobSpec("a cube", steps=2, seed=5, width=32, height=32, batch=2, n_iter=2)
    images, params = run_spec(tiny_pipe, spec, None)
    assert len(images) == 4 and params["all_seeds"] == [5, 5, 7, 7] and params["n_iter"] == 2
    again = tiny_pipe("a cube", steps=2, seed=7, width=32, height=32, batch=2, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images[2:], again))


def _run(tmp_path, tiny_pipe, spec, action):
    from controlstack.serve.app import create_app

    app = create_app(lambda: tiny_pipe, data=tmp_path)
    jobs = app.state.jobs
    job_id = jobs.submit(spec)
    deadline = time.time() + 60
    while not (job_id in jobs.running and jobs.running[job_id][0] >= 3) and time.time() < deadline:
        time.sleep(0.005)
    assert getattr(jobs, action)() == [job_id]
    record = jobs.wait(job_id)
    jobs.close()
    return record


def test_skip_ends_the_current_call_and_the_next_one_runs(tmp_path, tiny_pipe):
    record = _run(tmp_path, tiny_pipe, JobSpec("x", steps=150, seed=1, width=32, height=32, n_iter=2), "skip")
    assert record["status"] == "done" and len(record["images"]) == 2
    assert record["progress"] == [150, 150]  # the second call ran to its end
    assert record["parameters"]["all_seeds"] == [1, 2]


def test_interrupt_keeps_the_partial_image_and_starts_no_further_call(tmp_path, tiny_pipe):
    record = _run(tmp_path, tiny_pipe, JobSpec("x", steps=150, seed=1, width=32, height=32, n_iter=3), "interrupt")
    assert record["status"] == "done" and len(record["images"]) == 1 and record["progress"][0] < 150
