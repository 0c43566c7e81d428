"""``/v1`` generation jobs: a JSON mirror of the Python API, queued, with progress and cancelling.

``POST /v1/generate`` validates the body (:func:`parse_v1`) and queues a job; one worker thread runs
jobs in order; ``GET /v1/jobs/{id}`` reports ``queued | running | done | failed | cancelled`` with
``progress`` (sampling steps done / total) and, when done, the PNGs (base64, with their infotext)
and the parameters; ``DELETE /v1/jobs/{id}`` cancels -- a queued job never starts, a running one
stops after its current step (the pipeline's ``step_callback`` raises). The queue is bounded
(``submit`` raises :class:`~controlstack.serve.app.Busy` when full); finished jobs are kept for the
last :data:`KEEP` only.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict

from controlstack.errors import ControlstackError
from controlstack.serve.webui import Limits, decode_image, encode_png, resolve_model

KEEP = 100  # finished jobs remembered for GET


class Cancelled(Exception):
    pass


def _image(value, what, limits):
    return None if value is None else decode_image(value, what, limits)


def parse_v1(body, registered, limits: Limits) -> dict:
    """``/v1/generate``'s body -> ``Pipeline.__call__`` keyword arguments (controls built as ``Control``)."""
    from controlstack import Control

    if not isinstance(body, dict):
        raise ControlstackError("the request body must be a JSON object")
    known = {"prompt", "negative_prompt", "steps", "cfg", "seed", "width", "height", "scheduler", "mode",
             "mode_options", "batch", "controls", "init_image", "strength", "inpaint_mask", "hires", "hires_strength"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ControlstackError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not isinstance(body.get("prompt"), str):
        raise ControlstackError("'prompt' must be a string")
    kw = {k: body[k] for k in ("negative_prompt", "steps", "cfg", "seed", "width", "height", "scheduler", "mode",
                                "mode_options", "strength", "hires", "hires_strength") if k in body}
    kw["batch"] = body.get("batch", 1)
    for key, cap in (("steps", limits.max_steps), ("width", limits.max_side), ("height", limits.max_side),
                     ("batch", limits.max_batch)):
        v = kw.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= cap):
            raise ControlstackError(f"'{key}' must be an integer in [1, {cap}], got {v!r}")
    if kw.get("hires") is not None and max(kw.get("width") or 512, kw.get("height") or 512) * kw["hires"] > \
            limits.max_side * 2:
        raise ControlstackError(f"'hires' would exceed {limits.max_side * 2} px")
    kw["init_image"] = _image(body.get("init_image"), "init_image", limits)
    kw["inpaint_mask"] = _image(body.get("inpaint_mask"), "inpaint_mask", limits)
    controls = body.get("controls", [])
    if not isinstance(controls, list) or len(controls) > limits.max_controls:
        raise ControlstackError(f"'controls' must be a list of at most {limits.max_controls} objects")
    built = []
    for i, c in enumerate(controls):
        if not isinstance(c, dict):
            raise ControlstackError(f"controls[{i}] must be an object")
        extra = sorted(set(c) - {"model", "image", "weight", "start", "end", "mask", "resize_mode", "preprocess",
                                 "task"})
        if extra:
            raise ControlstackError(f"controls[{i}]: unknown field(s) {', '.join(extra)}")
        built.append(Control(resolve_model(c.get("model"), registered, f"controls[{i}].model"),
                             decode_image(c.get("image"), f"controls[{i}].image", limits),
                             weight=c.get("weight", 1.0), start=c.get("start"), end=c.get("end"),  # unset: recommended
                             mask=_image(c.get("mask"), f"controls[{i}].mask", limits),
                             resize_mode=c.get("resize_mode", "just_resize"), preprocess=c.get("preprocess", False),
                             task=c.get("task")))
    return {"prompt": body["prompt"], "controls": built, **kw}


class Jobs:
    """The queue, the worker thread and the job records."""

    def __init__(self, worker, size: int):
        self.worker = worker
        self.queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self.records: OrderedDict[str, dict] = OrderedDict()
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, kwargs: dict) -> str:
        from controlstack.serve.app import Busy

        job_id = f"job-{next(self.ids)}-{int(time.time() * 1000) % 100000:05d}"
        record = {"id": job_id, "status": "queued", "progress": [0, kwargs.get("steps") or 0], "cancel": False}
        with self.lock:
            self.records[job_id] = record
        try:
            self.queue.put_nowait((record, kwargs))
        except queue.Full:
            with self.lock:
                del self.records[job_id]
            raise Busy() from None
        return job_id

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            record = self.records.get(job_id)
            return None if record is None else {k: v for k, v in record.items() if k != "cancel"}

    def cancel(self, job_id: str) -> dict | None:
        with self.lock:
            record = self.records.get(job_id)
            if record is not None and record["status"] in ("queued", "running"):
                record["cancel"] = True
        return self.get(job_id)

    def _finish(self, record: dict, **values) -> None:
        with self.lock:
            record.update(values)
            done = [k for k, r in self.records.items() if r["status"] in ("done", "failed", "cancelled")]
            for k in done[:-KEEP]:
                del self.records[k]

    def _run(self) -> None:
        while True:
            record, kwargs = self.queue.get()
            if record["cancel"]:
                self._finish(record, status="cancelled")
                continue
            record["status"] = "running"

            def progress(done: int, total: int, record=record) -> None:
                record["progress"] = [done, total]
                if record["cancel"]:
                    raise Cancelled()

            from controlstack.serve.app import deadline_check

            try:
                kw = dict(kwargs)
                prompt, controls = kw.pop("prompt"), kw.pop("controls")
                pipe = self.worker.base(kw.pop("base", None))
                with self.worker.run_lock:
                    result = pipe(prompt, controls, progress=False, return_result=True,
                                              step_callback=deadline_check(self.worker.job_seconds, progress), **kw)
                self._finish(record, status="done", images=[encode_png(im) for im in result.images],
                             parameters={k: v for k, v in result.parameters.items() if k != "controls"})
            except Cancelled:
                self._finish(record, status="cancelled")
            except ControlstackError as exc:
                self._finish(record, status="failed", error=str(exc))
            except Exception:  # a bug: the job fails, the server stays up
                self._finish(record, status="failed", error="internal error")
