"""``/v1`` generation jobs: a JSON mirror of the Python API, queued, with progress and cancelling.

``POST /v1/generate`` validates the whole body into a :class:`~.spec.JobSpec`
(:func:`~.spec.spec_from_v1`, before anything is queued) and queues it; one worker thread runs
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
from controlstack.serve.spec import JobSpec, encode_png

KEEP = 100  # finished jobs remembered for GET


class Cancelled(Exception):
    pass


class Jobs:
    """The queue, the worker thread and the job records."""

    def __init__(self, worker, size: int):
        self.worker = worker
        self.queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self.records: OrderedDict[str, dict] = OrderedDict()
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, spec: JobSpec) -> str:
        from controlstack.serve.app import Busy

        job_id = f"job-{next(self.ids)}-{int(time.time() * 1000) % 100000:05d}"
        record = {"id": job_id, "status": "queued", "progress": [0, spec.steps or 0], "cancel": False}
        with self.lock:
            self.records[job_id] = record
        try:
            self.queue.put_nowait((record, spec))
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
            record, spec = self.queue.get()
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
                prompt, controls, kw = spec.call_args()
                pipe = self.worker.base(spec.base)
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
