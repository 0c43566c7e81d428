"""Scale-out: ``controlstack serve --broker redis://...`` fronts and ``controlstack worker`` processes,
over Celery with Redis as broker and result store.

A front loads no model and runs no job: it validates a request into a :class:`~.spec.JobSpec` (the
checks that need no weights; a :class:`Weightless` stand-in makes :func:`~.spec.check_spec` skip the
rest) and sends it as one Celery task -- the spec JSON and its images as PNG bytes (base64) inside
the message, never a path -- to the queue of the base it asks for (``controlstack.<base>``: only
workers holding that base consume it). The task id is the job id. A worker runs the base-dependent
checks with its weights (a job failing them fails with the check's message), then generates,
reporting progress with ``update_state`` and returning the PNGs and parameters as the task's result.

Redis keys besides Celery's (``cs:`` prefix; each expires after the retention time):

| key | what |
| --- | --- |
| ``cs:job:<id>`` | hash: created / started / finished times, base, attempts, worker (front and worker write it) |
| ``cs:cancel:<id>`` | set by DELETE; a worker checks it before it starts and between steps |
| ``cs:active`` | set of unfinished job ids: the queue limit across all fronts (429 past it) |
| ``cs:worker:<name>`` | JSON ``{base: [controlnets]}``, refreshed every 10 s with a 30 s TTL: the live workers |

At least once: ``task_acks_late`` (a message is acknowledged when its job ends), prefetch 1, and a
``visibility_timeout`` longer than the per-job deadline: a message a killed worker held is handed to
another worker once that time has passed, and runs again from its first step (same seed, same image).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import threading
import time
import uuid

from controlstack.errors import ControlstackError
from controlstack.serve.bodies import ClientError

PREFIX = "cs:"
ANNOUNCE_SECONDS, ANNOUNCE_TTL = 10, 30
INTERACTIVE, BATCH = 0, 6       # Redis priorities: 0 is taken first (someone waits on an interactive job)
FINISHED = ("done", "failed", "cancelled")
TASK = "controlstack.generate"


def visibility_timeout(job_seconds: float) -> int:
    """Longer than the longest job (its deadline) plus a margin for loading a base and writing results."""
    return int(job_seconds + 10 + job_seconds * 0.1)


def queue_of(base: str) -> str:
    return f"controlstack.{base}"


def make_celery(broker: str, job_seconds: float, keep_days: float = 30.0):
    from celery import Celery  # local: heavy, only this path needs it

    app = Celery("controlstack", broker=broker, backend=broker)
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=True, task_serializer="json", result_serializer="json", accept_content=["json"],
        result_expires=int(keep_days * 86400) or None, task_default_priority=BATCH,
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
        # priority steps are separate Redis lists polled in order: interactive jobs before batch ones
        # a killed worker's message is handed out again once visibility_timeout has passed, found by
        # any worker's sweep of unacknowledged messages: every 5 s (kombu's default is ~100 s)
        broker_transport_options={"visibility_timeout": visibility_timeout(job_seconds),
                                  "unacked_restore_interval": 5, "unacked_restore_throttle": 1,
                                  "priority_steps": [0, 3, 6, 9], "sep": ":", "queue_order_strategy": "priority"},
    )
    return app


def redis_client(broker: str):
    import redis  # local: heavy, only this path needs it

    return redis.Redis.from_url(broker, decode_responses=True)


class Weightless:
    """A base as a front knows it: its name and ControlNet names (announced by workers), no weights."""

    weightless = True
    native_size = 512  # the web UI's default size: a front cannot read the base's (workers check the size)
    def __init__(self, name: str, controlnets):
        self.name, self.controlnets = name, dict.fromkeys(controlnets)
        self.recommended: dict = {}  # the base's recommendation is in its folder, on the workers

    def folder_of(self, name):  # the model cards are on the workers' disks, not here
        return None


# ---------------------------------------------------------------------------------------- the front
class Cluster:
    """A front's view of the workers: submit, read, cancel and wait for jobs through Redis."""

    def __init__(self, broker: str, queue_size: int, job_seconds: float = 600.0, keep_days: float = 30.0):
        self.celery = make_celery(broker, job_seconds, keep_days)
        self.redis = redis_client(broker)
        self.size, self.job_seconds = max(queue_size, 1), job_seconds
        self.ttl = max(int(keep_days * 86400), 60)
        self.waiting: set[str] = set()  # jobs a request of this front waits on (/sdapi/v1/interrupt)

    def bases(self) -> dict[str, set]:
        """Base -> ControlNet names, over the workers alive now."""
        out: dict[str, set] = {}
        for key in self.redis.scan_iter(f"{PREFIX}worker:*"):
            held = self.redis.get(key)
            for base, nets in (json.loads(held) if held else {}).items():
                out.setdefault(base, set()).update(nets)
        return out

    def base_of(self, name: str | None) -> Weightless:
        name = name or "default"
        held = self.bases()
        if name not in held:
            raise ClientError(f"no running worker holds base '{name[:200]}' (held now: "
                              f"{', '.join(sorted(held)) or 'none: start a controlstack worker'})", 503)
        return Weightless(name, held[name])

    def ui_base(self) -> tuple[str, Weightless]:
        """The web UI's base (serve/ui/'s backend): 'default' where a worker holds it, else the first
        held by name; a ClientError (503) while no worker runs."""
        held = self.bases()
        base = self.base_of("default" if "default" in held or not held else min(held))
        return base.name, base

    def queued(self) -> int:
        return self.redis.scard(f"{PREFIX}active")

    def submit(self, spec, priority: int = 0) -> str:
        """Send ``spec`` to its base's queue; its job id. Raises ``Busy`` past the limit (all fronts).
        ``priority`` 1 (as :meth:`.jobs.Jobs.submit`): someone waits on it, it goes before batch jobs."""
        from controlstack.serve.jobs import Busy  # local: heavy, only this path needs it
        from controlstack.serve.store import dump_spec  # local: heavy, only this path needs it

        job_id = f"job-{uuid.uuid4().hex[:16]}"
        active = f"{PREFIX}active"
        # add, then count: two fronts racing for the last slot may both refuse, never both exceed it
        self.redis.sadd(active, job_id)
        if self.redis.scard(active) > self.size:
            self.redis.srem(active, job_id)
            raise Busy()
        data, blobs = dump_spec(spec)
        base = spec.base or "default"
        self.redis.hset(f"{PREFIX}job:{job_id}", mapping={"created": time.time(), "base": base, "attempts": 0,
                                                          "total": spec.steps or 0})
        self.redis.expire(f"{PREFIX}job:{job_id}", self.ttl)
        self.celery.send_task(TASK, args=[data, {k: base64.b64encode(v).decode() for k, v in blobs.items()}],
                              task_id=job_id, queue=queue_of(base), priority=INTERACTIVE if priority > 0 else BATCH)
        return job_id

    def get(self, job_id: str, images: bool = True) -> dict | None:
        meta = self.redis.hgetall(f"{PREFIX}job:{job_id}") if isinstance(job_id, str) and len(job_id) < 64 else {}
        if not meta:
            return None
        number = lambda k: None if meta.get(k) in (None, "") else float(meta[k])
        out = {"id": job_id, "status": "queued", "progress": [0, int(meta.get("total") or 0)],
               "created": number("created"), "started": number("started"), "finished": number("finished"),
               "attempts": int(meta.get("attempts") or 0), "base": meta.get("base")}
        result = self.celery.AsyncResult(job_id)
        state, info = result.state, result.info
        if state in ("STARTED", "PROGRESS"):
            out["status"] = "running"
            if isinstance(info, dict) and "progress" in info:
                out["progress"] = info["progress"]
        elif state == "SUCCESS" and isinstance(info, dict):
            out["status"] = info["status"]
            out["progress"] = info.get("progress", out["progress"])
            for key in ("error", "parameters", *(["images"] if images else [])):
                if key in info:
                    out[key] = info[key]
        elif state == "FAILURE":  # a bug in the worker, not the job's fault: no traceback for the client
            out |= {"status": "failed", "error": "internal error"}
        elif self.redis.exists(f"{PREFIX}cancel:{job_id}"):
            out["status"] = "cancelled"  # queued and cancelled: a worker that takes it skips it
        if out["status"] == "queued" and out["base"] not in self.bases():
            out["note"] = f"no running worker holds base '{out['base']}' now; the job waits for one"
        return out

    def cancel(self, job_id: str) -> dict | None:
        if self.get(job_id, images=False) is None:
            return None
        self.redis.set(f"{PREFIX}cancel:{job_id}", 1, ex=self.ttl)
        if self.celery.AsyncResult(job_id).state == "PENDING":  # not started: its slot is free now
            self.redis.srem(f"{PREFIX}active", job_id)
        return self.get(job_id)

    def wait(self, job_id: str, report=None) -> dict:
        """Block until the job ends (sd-webui's synchronous requests, the web UI); bounded by the
        deadline + the queue. ``report(done, total)``: called while it runs (the UI's progress bar)."""
        deadline = time.monotonic() + visibility_timeout(self.job_seconds) * (self.size + 1)
        self.waiting.add(job_id)
        try:
            while time.monotonic() < deadline:
                record = self.get(job_id, images=False)
                if record is None or record["status"] in FINISHED:
                    break
                if report is not None and record["status"] == "running":
                    report(*record["progress"])
                time.sleep(0.1)
        finally:
            self.waiting.discard(job_id)
        return self.get(job_id) or {"id": job_id, "status": "failed", "error": "the job's record expired"}

    def interrupt(self) -> list[str]:
        """sd-webui's "Interrupt" on a front, for the running jobs a request of *this* front waits on
        (its synchronous txt2img / img2img, its web UI's Generate) -- not other fronts' nor /v1 batch
        jobs, which a client cancels by id: each stops after its current step and ends ``done`` with
        the images made so far (:meth:`.jobs.Jobs.interrupt`)."""
        return self._stop("interrupt")

    def skip(self) -> list[str]:
        """sd-webui's "Skip" for the same jobs: their current batch-count call ends (:meth:`.jobs.Jobs.skip`)."""
        return self._stop("skip")

    def _stop(self, how: str) -> list[str]:
        stopped = []
        for job_id in list(self.waiting):
            record = self.get(job_id, images=False)
            if record is not None and record["status"] == "running":
                self.redis.set(f"{PREFIX}{how}:{job_id}", 1, ex=self.ttl)
                stopped.append(job_id)
        return stopped


# ---------------------------------------------------------------------------------------- the worker
class Cancelled(Exception):
    pass


def start_worker(broker: str, factories: dict, job_seconds: float = 600.0, concurrency: int = 1,
                 name: str | None = None, keep_days: float = 30.0, limits=None) -> None:
    """Load every base in ``factories`` (name -> loader), announce them, and consume their queues
    until stopped (a solo pool: one job at a time; threads past ``concurrency`` 1)."""
    from controlstack.serve.spec import Limits  # local: heavy, only this path needs it

    limits = limits or Limits(job_seconds=job_seconds)
    loaded = {base: load() for base, load in factories.items()}  # loaded now: a worker holds what it announces
    app = make_celery(broker, job_seconds, keep_days)
    r = redis_client(broker)
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    ttl = max(int(keep_days * 86400), 60)
    register_task(app, r, loaded, limits, name, ttl)

    def announce() -> None:
        held = json.dumps({base: sorted(pipe.controlnets) for base, pipe in loaded.items()})
        while True:
            try:
                r.set(f"{PREFIX}worker:{name}", held, ex=ANNOUNCE_TTL)
            except Exception as exc:  # noqa: BLE001 (Redis away for a while: the next round tries again)
                logging.getLogger(__name__).warning("could not announce this worker: %s", exc)
            time.sleep(ANNOUNCE_SECONDS)

    threading.Thread(target=announce, daemon=True).start()
    pool = "solo" if concurrency == 1 else "threads"
    app.worker_main(["worker", "--pool", pool, "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
                     "--queues", ",".join(queue_of(b) for b in loaded), "--loglevel", "INFO",
                     "--without-gossip", "--without-mingle", "--without-heartbeat"])


def register_task(app, r, loaded: dict, limits, name: str, ttl: int):
    from PIL import Image  # local: heavy, only this path needs it

    from controlstack.sampling.loop import StopSampling  # local: heavy, only this path needs it
    from controlstack.serve.jobs import deadline_check, parameters  # local: heavy, only this path needs it
    from controlstack.serve.spec import (  # local: heavy, only this path needs it
        check_spec,
        encode_png,
        run_spec,
    )
    from controlstack.serve.store import load_spec  # local: heavy, only this path needs it

    @app.task(bind=True, name=TASK, acks_late=True)
    def generate(self, data: dict, blobs: dict) -> dict:
        job_id = self.request.id
        key = f"{PREFIX}job:{job_id}"
        progress = [0, int(data.get("steps") or 0)]
        try:
            if r.exists(f"{PREFIX}cancel:{job_id}"):
                raise Cancelled()
            r.hincrby(key, "attempts", 1)  # 2 or more: a worker died running it and another ran it again
            r.hset(key, mapping={"started": time.time(), "worker": name})
            r.expire(key, ttl)
            self.update_state(state="PROGRESS", meta={"progress": progress, "worker": name})
            spec = load_spec(data, lambda sha: Image.open(io.BytesIO(base64.b64decode(blobs[sha]))))
            base = spec.base or "default"
            if base not in loaded:  # routed by queue, so only a misconfigured worker sees this
                raise ControlstackError(f"this worker does not hold base '{base}'")
            pipe = loaded[base]
            check_spec(spec, pipe, limits)  # what the front could not check without weights
            last = [0.0]

            def report(done: int, total: int) -> None:
                progress[:] = [done, total]
                if r.exists(f"{PREFIX}cancel:{job_id}"):
                    raise Cancelled()
                # a skip ends this batch-count call only (consumed); an interrupt ends every call
                if r.exists(f"{PREFIX}interrupt:{job_id}") or r.getdel(f"{PREFIX}skip:{job_id}"):
                    raise StopSampling()
                if time.monotonic() - last[0] > 0.1 or done == total:  # a Redis write per step is wasted
                    last[0] = time.monotonic()
                    self.update_state(state="PROGRESS", meta={"progress": list(progress), "worker": name})

            images, params = run_spec(pipe, spec, deadline_check(limits.job_seconds, report),
                                      lambda: bool(r.exists(f"{PREFIX}interrupt:{job_id}")))
            out = {"status": "done", "images": [encode_png(im) for im in images], "parameters": parameters(params)}
        except Cancelled:
            out = {"status": "cancelled"}
        except ControlstackError as exc:
            out = {"status": "failed", "error": str(exc)}
        except Exception:  # a bug: the job fails, the worker stays up
            logging.getLogger(__name__).exception("job %s failed", job_id)
            out = {"status": "failed", "error": "internal error"}
        r.hset(key, "finished", time.time())
        r.srem(f"{PREFIX}active", job_id)
        return out | {"progress": progress, "worker": name}

    return generate
