"""``/v1`` generation jobs: a JSON mirror of the Python API, queued, with progress and cancelling,
kept in a :class:`~.store.Store` so that a restart loses none.

``POST /v1/generate`` validates the whole body into a :class:`~.spec.JobSpec`
(:func:`~.spec.spec_from_v1`, before anything is queued) and stores it as a queued job (its seed
fixed: a rerun makes the same image); one worker thread runs jobs oldest first, each from its
stored spec; ``GET /v1/jobs/{id}`` reports ``queued | running | done | failed | cancelled`` with
``progress`` (sampling steps done / total) and, when done, the PNGs (base64, with their infotext)
and the parameters; ``DELETE /v1/jobs/{id}`` cancels -- a queued job never starts, a running one
stops after its current step (the pipeline's ``step_callback`` raises). At most ``size`` jobs wait
(``submit`` raises :class:`Busy` past it). On start-up, jobs a stopped
process left queued or running are run again (at least once: a job killed mid-run restarts from
its first step), and finished jobs past ``keep_jobs`` / ``keep_days`` are deleted with their files.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from controlstack.errors import ControlstackError
from controlstack.sampling.loop import StopSampling
from controlstack.serve.spec import run_spec
from controlstack.serve.store import FINISHED, Store

KEEP_JOBS = 1000  # finished jobs kept (with their PNGs) for GET ...
KEEP_DAYS = 30.0  # ... and for at most this many days


class Cancelled(Exception):
    pass


class Busy(Exception):
    """The queue is full."""


def deadline_check(seconds: float, report=None):
    """A ``step_callback`` that stops a generation (between steps) once it has run ``seconds``."""
    start = time.monotonic()

    def check(done: int, total: int) -> None:
        if report is not None:
            report(done, total)
        if time.monotonic() - start > seconds:
            raise ControlstackError(f"the job ran longer than the server's {seconds:g} s limit; lower the steps, "
                                    "size or batch")
    return check


class Jobs:
    """The worker thread over the store. Steps done of the running job are kept in memory (written
    when it ends): they change every step, and a restart reruns the job from step 0 anyway."""

    def __init__(self, worker, size: int, store: Store, keep_jobs: int | None = KEEP_JOBS,
                 keep_days: float | None = KEEP_DAYS):
        self.worker, self.size, self.store = worker, max(size, 1), store
        self.keep_jobs, self.keep_days = keep_jobs, keep_days
        self.running: dict[str, list] = {}   # job id -> [done, total] while it runs
        self.cancelling: set[str] = set()
        self.stopping: dict[str, str] = {}   # job id -> "skip" (its current call) / "interrupt" (the job)
        self.finished: dict[str, threading.Event] = {}  # job id -> set when it ends (Jobs.wait)
        self.outcome: dict[str, dict] = {}  # ... and its record, read before retention may delete it
        self.wake = threading.Condition()
        self.requeued = store.requeue()
        store.prune(keep_jobs, keep_days)
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, spec, priority: int = 0) -> str:
        """Queue ``spec``; ``priority`` 1 for a job someone waits on (web UI, sd-webui): it goes first."""
        job_id = self.store.add(spec, limit=self.size, priority=priority)
        if job_id is None:
            raise Busy()
        with self.wake:
            self.wake.notify()
        return job_id

    def ui_base(self):
        """The web UI's base (serve/ui/'s backend): the default one, loaded (None: the default)."""
        return None, self.worker.pipe

    def get(self, job_id: str, images: bool = True) -> dict | None:
        record = self.store.record(job_id, images=images)
        if record is not None and record["status"] == "running" and job_id in self.running:
            record["progress"] = list(self.running[job_id])
        return record

    def cancel(self, job_id: str) -> dict | None:
        if self.store.cancel(job_id) == "running":
            self.cancelling.add(job_id)
        return self.get(job_id)

    def interrupt(self) -> list[str]:
        """sd-webui's "Interrupt": the running job stops after its current step and ends ``done``
        with the images made so far (the current call's partly denoised); no further batch-count
        call starts. The ids it reached."""
        running = list(self.running)
        self.stopping.update(dict.fromkeys(running, "interrupt"))
        return running

    def skip(self) -> list[str]:
        """sd-webui's "Skip": the running job's current call (one batch of its batch count) ends
        after its current step with its partly denoised images; the next call runs."""
        running = [j for j in self.running if self.stopping.get(j) != "interrupt"]
        self.stopping.update(dict.fromkeys(running, "skip"))
        return running

    def wait(self, job_id: str, report=None) -> dict:
        """Block until ``job_id`` ends; its record (sd-webui's requests answer when their job is done).
        ``report(done, total)``: called while it runs (the web UI's progress bar)."""
        event = self.finished.setdefault(job_id, threading.Event())
        try:
            # the event is set when the worker ends the job; the store is read too, each poll, in
            # case it ended between submit and this line
            while not event.wait(0.25 if report else 1.0):
                steps = self.running.get(job_id)  # .get: the worker may pop it meanwhile
                if report is not None and steps is not None:
                    report(*steps)
                record = self.get(job_id, images=False)
                if record is None or record["status"] in FINISHED:
                    break
        finally:
            self.finished.pop(job_id, None)
        record = self.outcome.pop(job_id, None) or self.get(job_id)
        return record or {"id": job_id, "status": "failed", "error": "the job's record was deleted (retention)"}

    def close(self) -> None:
        """Stop the worker after its current job (tests restart a store in one process)."""
        self._stop = True
        with self.wake:
            self.wake.notify()
        self.thread.join(timeout=60)

    def _next(self) -> str | None:
        with self.wake:
            while not self._stop:
                job_id = self.store.claim()
                if job_id is not None:
                    return job_id
                self.wake.wait(timeout=5)
        return None

    def _run(self) -> None:
        while (job_id := self._next()) is not None:
            try:
                self._one(job_id)
            except Exception:  # the store failed (a full disk): the thread lives on, the job reruns at restart
                logging.getLogger(__name__).exception("job %s could not be recorded", job_id)
                if job_id in self.finished:  # its sd-webui request answers now rather than waiting forever
                    self.outcome[job_id] = {"id": job_id, "status": "failed", "error": "internal error"}
                    self.finished[job_id].set()
            try:
                self.store.prune(self.keep_jobs, self.keep_days)
            except (OSError, sqlite3.Error) as exc:  # a full disk, a permission: the next job's prune tries again
                logging.getLogger(__name__).warning("job retention failed: %s", exc)

    def _one(self, job_id: str) -> None:
        """Run one claimed job from its stored spec and record how it ended."""
        try:
            spec = self.store.spec(job_id)
        except (OSError, ValueError, KeyError, TypeError):  # unreadable (a deleted blob): it fails, others run
            self.store.finish(job_id, "failed", error="the stored job could not be read")
            return
        progress = self.running[job_id] = [0, spec.steps or 0]

        def report(done: int, total: int, job_id=job_id, progress=progress) -> None:
            progress[:] = [done, total]
            if job_id in self.cancelling:
                raise Cancelled()
            how = self.stopping.get(job_id)
            if how is not None:
                if how == "skip":  # this call only
                    self.stopping.pop(job_id, None)
                raise StopSampling()

        try:
            pipe = self.worker.base(spec.base)
            with self.worker.run_lock:
                self.worker.current = progress  # /sdapi/v1/progress reports the job that runs
                try:
                    images, params = run_spec(pipe, spec, deadline_check(self.worker.job_seconds, report),
                                              lambda: self.stopping.get(job_id) == "interrupt")
                finally:
                    self.worker.current = [0, 0]
            self.store.finish(job_id, "done", images=images, progress=progress, parameters=parameters(params))
        except Cancelled:
            self.store.finish(job_id, "cancelled", progress=progress)
        except ControlstackError as exc:
            self.store.finish(job_id, "failed", error=str(exc), progress=progress)
        except Exception:  # a bug: the job fails, the server stays up
            self.store.finish(job_id, "failed", error="internal error", progress=progress)
        finally:
            self.running.pop(job_id, None)
            self.cancelling.discard(job_id)
            self.stopping.pop(job_id, None)
            if job_id in self.finished:
                self.outcome[job_id] = self.get(job_id)
                self.finished[job_id].set()


def parameters(p: dict) -> dict:
    """The result's parameters as JSON values (what the response showed before: ``controls`` left out)."""
    from fastapi.encoders import jsonable_encoder  # local: heavy, only this path needs it

    return jsonable_encoder({k: v for k, v in p.items() if k != "controls"})
