"""Load on ``controlstack serve``: N concurrent clients on loopback for a bounded time.

Starts the server (bundled model, API only) in this process on a free port, then runs each client
count in ``--clients`` for ``--seconds``: every client posts sd-webui txt2img requests with one canny
unit back to back. Prints, per count: requests/s, p50 / p95 latency of the answered ones, how many
were refused with 429 (the queue was full: expected once clients outnumber ``--queue`` + 1), how many
failed otherwise (must be 0), and the process's resident memory before and after (flat = no leak).

    .venv/bin/python benchmarks/serve_load.py --clients 2 12 --seconds 30
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(steps: int) -> bytes:
    a = np.zeros((128, 128, 3), np.uint8)
    a[30:90, 60] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    unit = {"image": base64.b64encode(buf.getvalue()).decode(), "model": "canny"}
    return json.dumps({"prompt": "a red cube on grass", "steps": steps, "width": 128, "height": 128, "seed": 1,
                       "sampler_name": "Euler a", "alwayson_scripts": {"ControlNet": {"args": [unit]}}}).encode()


def client(url: str, payload: bytes, until: float, out: list) -> None:
    while time.time() < until:
        t0 = time.perf_counter()
        req = urllib.request.Request(url, data=payload, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                json.load(r)
                out.append((r.status, time.perf_counter() - t0))
        except urllib.error.HTTPError as exc:
            out.append((exc.code, time.perf_counter() - t0))
            if exc.code == 429:
                time.sleep(float(exc.headers.get("Retry-After", 1)) / 10)  # a polite client backs off
        except OSError:
            out.append((0, time.perf_counter() - t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[2, 12])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--queue", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import uvicorn

    from controlstack.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(queue_size=args.queue), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
    payload = body(args.steps)
    client(url, payload, time.time() + 0.1, [])  # load the model before measuring
    print(f"queue {args.queue}, {args.steps} steps at 128 px, {args.seconds:g} s per run")
    for n in args.clients:
        before, results = rss_mib(), []
        until = time.time() + args.seconds
        threads = [threading.Thread(target=client, args=(url, payload, until, results)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ok = sorted(t for code, t in results if code == 200)
        refused = sum(code == 429 for code, _ in results)
        failed = sum(code not in (200, 429) for code, _ in results)
        p = (lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan"))
        print(f"{n:3d} clients: {len(ok) / args.seconds:5.2f} req/s, p50 {p(0.5):5.2f} s, p95 {p(0.95):5.2f} s, "
              f"429 {refused}, failed {failed}, RSS {before:.0f} -> {rss_mib():.0f} MiB")
    server.should_exit = True


if __name__ == "__main__":
    main()
