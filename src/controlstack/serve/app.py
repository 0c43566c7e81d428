"""The HTTP server: sd-webui's API (the subset sd-webui-controlnet's clients use) and the project's
own ``/v1``, over the Python API, one FastAPI app.

Safety first: no field is ever opened as a server path (images are base64 data, models and bases
registered names, annotator parameters content only: ``spec``, ``annotate``), bodies are read under
caps on size, nesting and values before they are parsed (``bodies``), every field is validated
when the request arrives, into one :class:`~.spec.JobSpec` for ``/v1`` and sd-webui alike, so only
valid jobs are queued; caps on images, steps, size and batch (``spec.Limits``), one bounded queue for
``/v1`` and sd-webui's generations alike that answers 429 with ``Retry-After`` when full, kept in a
SQLite store (``store``: a restart loses no job), generation in a worker thread (the event loop keeps
answering), a Bearer token (or the web UI's login cookie, ``auth``) compared in constant time when
one is set (``controlstack serve`` requires it off loopback), and errors as JSON naming the
problem -- 4xx for the client's, a bare 500 for a bug: never a traceback or a path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from controlstack.errors import ControlstackError
from controlstack.serve import auth
from controlstack.serve.bodies import ClientError, read_json
from controlstack.serve.jobs import Busy, deadline_check  # noqa: F401 (here for clients and tests, as before)
from controlstack.serve.spec import JobSpec, Limits, spec_from_v1
from controlstack.serve.webui import parse_generation

MAX_BODY = 64 * 2**20
VERSION = 2  # what sd-webui-controlnet's /controlnet/version answers to clients that check it


SCRIPTS = {"txt2img": ["controlnet"], "img2img": ["controlnet"]}  # /sdapi/v1/scripts: clients check "controlnet"


def options_of(name: str, model_hash: str | None) -> dict:
    """``/sdapi/v1/options``: the settings sd-webui clients read (the checkpoint, the PNG format)."""
    return {"sd_model_checkpoint": name, "sd_checkpoint_hash": model_hash, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1}


def infotext(png_b64: str) -> str:
    """The ``parameters`` text of a base64 PNG (PIL reads the text chunks before the pixels)."""
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as im:
        return im.info.get("parameters", "")


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def add_guard(app: FastAPI, token: str | None) -> None:
    """The middleware every server shape shares: the token (the Bearer header, or the web UI's
    session cookie: a browser logs in at /login), the body cap, and no traceback for a bug."""
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None and request.url.path != auth.LOGIN and not auth.authorized(request, token):
            if auth.wants_page(request):
                return RedirectResponse(auth.LOGIN, status_code=303)
            return error(401, "missing or wrong token: send 'Authorization: Bearer <token>' (a browser: log in "
                              "at /login)")
        length = request.headers.get("content-length") or "0"
        if not length.isdigit():  # int() of it would raise here, outside the try: a 500
            return error(400, "the Content-Length header is not a number")
        if int(length) > MAX_BODY:
            return error(413, f"request body larger than {MAX_BODY // 2**20} MiB")
        try:
            return await call_next(request)
        except Exception:  # noqa: BLE001 (a bug, or a broker away): say so, without a traceback or a path
            return error(500, "internal error")

    if token is not None:
        auth.add_login(app, token)


def webui_answer(record: dict) -> dict:
    """sd-webui's txt2img / img2img answer for a finished job record; a job that did not end
    ``done`` raises a ClientError: 500 for a bug, 400 for the time limit or a cancel."""
    if record["status"] != "done":
        if record.get("error") == "internal error":
            raise ClientError("internal error", status=500)
        raise ClientError(record.get("error") or f"the job was {record['status']}")
    p = record["parameters"]
    infotexts = [infotext(im) for im in record["images"]]
    info = {"prompt": p["prompt"], "negative_prompt": p["negative_prompt"], "seed": p["seed"],
            "all_seeds": [p["seed"]] * len(infotexts), "steps": p["steps"], "cfg_scale": p["cfg"],
            "width": p["width"], "height": p["height"], "sampler_name": p["scheduler"], "infotexts": infotexts}
    return {"images": record["images"], "parameters": {k: v for k, v in p.items()
            if isinstance(v, (str, int, float, bool))}, "info": json.dumps(info)}


def model_bytes(pipe) -> int:
    """The weights a loaded pipeline holds (base and the ControlNets it has loaded so far)."""
    import torch

    modules = [pipe.unet, pipe.vae, pipe.text_encoder,
               *(c for c in pipe.controlnets.values() if isinstance(c, torch.nn.Module))]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


class Worker:
    """One generation at a time; at most ``queue_size`` waiting. Bases are registered by name
    (``factories``: name -> loader; the first is the default), loaded on first use and kept, the
    least recently used unloaded when their weights pass ``memory_bytes`` (one always stays)."""

    def __init__(self, pipeline_factory: Callable | dict, queue_size: int, job_seconds: float = 600.0,
                 memory_bytes: float = 8 * 2**30):
        from collections import OrderedDict

        self.factories = pipeline_factory if isinstance(pipeline_factory, dict) else {"default": pipeline_factory}
        self.default = next(iter(self.factories))
        self.loaded: OrderedDict = OrderedDict()
        self.memory_bytes = memory_bytes
        # one generation at a time: the job worker and the web UI take this lock
        self.run_lock = threading.Lock()
        self.current = [0, 0]       # steps done / total of the running job (/sdapi/v1/progress)
        self._load = threading.Lock()
        self.job_seconds = job_seconds
        self.jobs = None            # the job queue (create_app sets it): sd-webui's generations go through it

    def base(self, name: str | None = None):
        """The pipeline of a registered base (``None``: the default); unknown names name the known."""
        name = self.default if name in (None, "") else name
        if not isinstance(name, str) or name not in self.factories:
            raise ControlstackError(f"base model {name!r} is not registered; choose one of {', '.join(self.factories)}")
        with self._load:
            if name not in self.loaded:
                self.loaded[name] = self.factories[name]()
                while len(self.loaded) > 1 and sum(map(model_bytes, self.loaded.values())) > self.memory_bytes:
                    oldest = next(k for k in self.loaded if k != name)
                    del self.loaded[oldest]  # its memory goes with the last reference
            self.loaded.move_to_end(name)
            return self.loaded[name]

    @property
    def pipe(self):
        return self.base(None)

    def generate(self, spec: JobSpec) -> dict:
        """Run ``spec`` as a job of the one queue (sd-webui's txt2img / img2img) and wait for it: its
        finished record. The queue's limit, the time limit and cancelling apply as to ``/v1`` jobs;
        raises :class:`Busy` when the queue is full."""
        return self.jobs.wait(self.jobs.submit(spec, priority=1))  # someone waits: before batch /v1 jobs


def create_app(pipeline_factory: Callable | dict | None = None, token: str | None = None, limits: Limits | None = None,
               queue_size: int = 4, ui: bool = False, memory_gib: float = 8.0, data=None,
               keep_jobs: int | None = None, keep_days: float | None = None):
    """The app. ``pipeline_factory``: a loader of the one base, or ``{name: loader}`` for several
    (clients pick one by name: sd-webui's ``override_settings.sd_model_checkpoint``, ``/v1``'s
    ``base``); ``memory_gib`` bounds the weights kept loaded. ``data``: the job store's folder
    (``store``; None: a temporary one, removed at exit -- nothing survives that process);
    ``keep_jobs`` / ``keep_days``: retention of finished jobs (None: ``jobs.KEEP_JOBS`` / ``KEEP_DAYS``)."""
    if pipeline_factory is None:
        from controlstack import Pipeline

        pipeline_factory = Pipeline.from_pretrained
    from controlstack.serve.jobs import KEEP_DAYS, KEEP_JOBS, Jobs
    from controlstack.serve.store import Store

    if data is None:
        import atexit
        import shutil
        import tempfile

        data = tempfile.mkdtemp(prefix="controlstack-serve-")
        atexit.register(shutil.rmtree, data, ignore_errors=True)
    limits = limits or Limits()
    worker = Worker(pipeline_factory, queue_size, limits.job_seconds, memory_gib * 2**30)
    jobs = worker.jobs = Jobs(worker, queue_size, Store(data), KEEP_JOBS if keep_jobs is None else keep_jobs,
                              KEEP_DAYS if keep_days is None else keep_days)
    app = FastAPI(title="controlstack", version=str(VERSION))
    app.state.worker, app.state.jobs = worker, jobs  # for operators and tests (holding run_lock pauses generation)

    def refused(exc: ControlstackError) -> JSONResponse:
        """A client's mistake: its status (400 unless a ClientError says otherwise), one line."""
        return error(getattr(exc, "status", 400), str(exc))

    add_guard(app, token)

    async def generation(request: Request, img2img: bool):
        try:
            payload = await read_json(request, MAX_BODY)
            # decoding images and loading a base take CPU time: off the event loop
            spec = await run_in_threadpool(parse_generation, payload, worker.base, limits, img2img)
            record = await run_in_threadpool(worker.generate, spec)  # a job of the one queue, waited for
            return webui_answer(record)
        except Busy:
            return error(429, "the queue is full; retry later", **{"Retry-After": "5"})
        except ControlstackError as exc:
            return refused(exc)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generation(request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generation(request, img2img=True)

    @app.get("/sdapi/v1/samplers")
    def samplers():
        from controlstack.sampling.schedulers import SAMPLER_TABLE

        return [{"name": s.webui, "aliases": [s.name], "options": {}} for s in SAMPLER_TABLE]

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [{"title": name, "model_name": name, "hash": worker.loaded[name].model_hash if name in worker.loaded
                 else None, "filename": name} for name in worker.factories]

    @app.get("/sdapi/v1/options")
    def options():
        pipe = worker.pipe
        return options_of(pipe.name, pipe.model_hash)

    @app.get("/sdapi/v1/progress")
    def progress():
        """The job that runs now, from whichever endpoint it came; job_count counts the waiting too."""
        done, total = worker.current
        return {"progress": done / total if total else 0.0, "eta_relative": 0.0, "current_image": None,
                "state": {"sampling_step": done, "sampling_steps": total,
                          "job_count": jobs.store.queued() + len(jobs.running)}}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        """sd-webui's "stop": the running job stops after its current step (its request answers 400)."""
        for job_id in list(jobs.running):
            jobs.cancel(job_id)
        return {}

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return SCRIPTS

    @app.get("/controlnet/version")
    def version():
        return {"version": VERSION}

    @app.get("/controlnet/model_list")
    def model_list():
        return {"model_list": sorted(worker.pipe.controlnets)}

    from controlstack.serve.annotate import add_routes

    add_routes(app, limits, refused, MAX_BODY)  # annotators: shared with a broker front (serve/front.py)

    @app.post("/v1/generate", status_code=202)
    async def generate(request: Request):
        try:
            b = await read_json(request, MAX_BODY)
            # the whole job is validated now, off the event loop: only valid jobs take a queue slot
            spec = await run_in_threadpool(spec_from_v1, b, worker.base, limits)
            return {"id": jobs.submit(spec)}
        except Busy:
            return error(429, "the queue is full; retry later", **{"Retry-After": "5"})
        except ControlstackError as exc:
            return refused(exc)

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str):
        record = jobs.get(job_id)
        return record if record is not None else error(404, f"no job '{job_id[:40]}' (finished jobs are kept "
                                                            f"for the last {jobs.keep_jobs}, {jobs.keep_days:g} days)")

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str):
        """Server-sent events: the job's record whenever it changes, until it ends."""
        import asyncio

        from fastapi.responses import StreamingResponse

        if jobs.get(job_id, images=False) is None:
            return error(404, f"no job '{job_id[:40]}'")

        async def stream():
            last = None
            while True:
                view = jobs.get(job_id, images=False)  # the PNGs stay on disk: polled ten times a second
                if view is None:
                    return
                if view != last:
                    yield f"data: {json.dumps(view)}\n\n"
                    last = view
                if view["status"] in ("done", "failed", "cancelled"):
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str):
        record = jobs.cancel(job_id)
        return record if record is not None else error(404, f"no job '{job_id[:40]}'")

    @app.get("/v1/models")
    def models():
        """Bases and ControlNets by name, each with its model card (README.md) where it has one."""
        from controlstack.io.settings import recommended

        def card(folder) -> str | None:
            path = None if folder is None else folder / "README.md"
            return path.read_text() if path is not None and path.is_file() else None

        pipe = worker.pipe
        return {"bases": [{"name": n, "loaded": n in worker.loaded} for n in worker.factories],
                "default": {"name": pipe.name, "native_size": pipe.native_size, "recommended": pipe.recommended},
                "controlnets": [{"name": n, "recommended": recommended(pipe.folder_of(n)), "card": card(pipe.folder_of(n))}
                                for n in sorted(pipe.controlnets)]}

    if ui:  # the web UI at "/", over the same worker and queue; mounted last (a mount at "/" matches all)
        import gradio as gr

        from controlstack.serve.ui import build

        app = gr.mount_gradio_app(app, build(jobs, limits), path="/")
    return app
