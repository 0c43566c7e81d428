"""Scale-out on one machine: one ``controlstack worker`` vs two, through Redis and one front.

Starts redis-server on a free loopback port and a front (``serve --broker``), then for each worker
count starts that many workers (the bundled model, one torch thread each), submits ``--jobs``
``/v1`` jobs (one canny control, ``--steps`` steps at 128 px) at once and waits for all of them.
Prints per count: jobs/s over the whole batch, p50 / p95 of each job's time from acceptance to its
end (its wait in the queue included), and lost jobs (not done within the time limit; must be 0).

    .venv/bin/python benchmarks/serve_distributed.py --jobs 16 --steps 4
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def job_body(seed: int, steps: int) -> dict:
    a = np.zeros((128, 128, 3), np.uint8)
    a[30:90, 60] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return {"prompt": "a red cube on grass", "steps": steps, "width": 128, "height": 128, "seed": seed,
            "controls": [{"model": "canny", "image": base64.b64encode(buf.getvalue()).decode()}]}


def cli(*args) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "controlstack.cli.main", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(workers: int, broker: str, port: int, jobs: int, steps: int, limit: float) -> dict:
    import redis

    r = redis.Redis.from_url(broker)
    procs = [cli("worker", "--broker", broker, "--name", f"bench{workers}-{i}") for i in range(workers)]
    try:
        deadline = time.time() + 300
        while sum(r.exists(f"cs:worker:bench{workers}-{i}") for i in range(workers)) < workers:
            assert time.time() < deadline, "the workers did not start"
            time.sleep(0.5)
        time.sleep(3)
        t0 = time.time()
        ids = [call(port, "POST", "/v1/generate", job_body(s, steps))["id"] for s in range(jobs)]
        done: dict = {}
        while len(done) < jobs and time.time() - t0 < limit:
            for i in ids:
                if i not in done:
                    rec = call(port, "GET", f"/v1/jobs/{i}")
                    if rec["status"] in ("done", "failed", "cancelled"):
                        done[i] = rec
            time.sleep(0.2)
        span = max((d["finished"] for d in done.values()), default=time.time()) - t0
        lat = sorted(d["finished"] - d["created"] for d in done.values() if d["status"] == "done")
        return {"workers": workers, "jobs_per_s": sum(d["status"] == "done" for d in done.values()) / span,
                "p50": float(np.percentile(lat, 50)) if lat else None,
                "p95": float(np.percentile(lat, 95)) if lat else None,
                "lost": jobs - sum(d["status"] == "done" for d in done.values()),
                "attempts": sum(d["attempts"] for d in done.values())}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--limit", type=float, default=600, help="seconds to wait for a batch")
    args = ap.parse_args()
    rport, port = free_port(), free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL)
    broker = f"redis://127.0.0.1:{rport}/0"
    front = cli("serve", "--no-ui", "--broker", broker, "--port", str(port), "--queue", str(args.jobs))
    try:
        time.sleep(5)
        rows = [run(n, broker, port, args.jobs, args.steps, args.limit) for n in args.workers]
    finally:
        front.terminate()
        front.wait(timeout=30)
        redis_proc.terminate()
        redis_proc.wait(timeout=30)
    for row in rows:
        print(json.dumps(row))
    if len(rows) == 2:
        print(f"throughput ratio {rows[1]['workers']} / {rows[0]['workers']} workers: "
              f"{rows[1]['jobs_per_s'] / rows[0]['jobs_per_s']:.2f}")


if __name__ == "__main__":
    main()
