"""The HTTP server: sd-webui's API (with sd-webui-controlnet's; docs/webui-api.md lists every field
and endpoint) and the project's own ``/v1``, over the Python API, one FastAPI app.

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

import asyncio
import atexit
import json
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from controlstack.errors import ControlstackError
from controlstack.hires import UPSCALER_TABLE
from controlstack.io.settings import recommended
from controlstack.lora import available
from controlstack.sampling.schedulers import SAMPLER_TABLE
from controlstack.serve import auth
from controlstack.serve.annotate import add_routes
from controlstack.serve.bodies import ClientError, read_json
from controlstack.serve.jobs import KEEP_DAYS, KEEP_JOBS, Busy, Jobs, deadline_check  # noqa: F401 (here for clients and tests, as before)
from controlstack.serve.spec import JobSpec, Limits, short, spec_from_v1
from controlstack.serve.store import Store
from controlstack.serve.webui import SCHEDULER_ROWS, answer, parse_generation, png_info

MAX_BODY = 64 * 2**20
VERSION = 2  # what sd-webui-controlnet's /controlnet/version answers to clients that check it


SCRIPTS = {"txt2img": ["controlnet"], "img2img": ["controlnet"]}  # /sdapi/v1/scripts: clients check "controlnet"
API_PREFIXES = ("/sdapi/", "/controlnet/", "/v1/")  # an unknown path under these: the JSON 404


def options_of(name: str, model_hash: str | None) -> dict:
    """``/sdapi/v1/options``: the settings sd-webui clients read (the checkpoint, the PNG format)."""
    return {"sd_model_checkpoint": name, "sd_checkpoint_hash": model_hash, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1}


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


def model_bytes(pipe) -> int:
    """The weights a loaded pipeline holds (base and the ControlNets it has loaded so far)."""
    modules = [pipe.unet, pipe.vae, pipe.text_encoder,
               *(c for c in pipe.controlnets.values() if isinstance(c, torch.nn.Module))]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def add_webui_routes(app: FastAPI, control, limits: Limits, refused, ui: bool) -> None:
    """sd-webui's endpoints that differ between server shapes only in ``control``: the embedded
    server's :class:`EmbeddedControl`, a front's ``front.FrontControl`` (``interrupt()``, ``skip()``,
    ``current()`` -> (base name, hash), ``select(name)``, ``models()``); the rest is shared as it is."""
    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        """sd-webui's "stop": running jobs stop after their current step and keep the images made so
        far (the partial one included); a waiting txt2img / img2img answers 200 with them."""
        control.interrupt()
        return {}

    @app.get("/sdapi/v1/loras")
    def loras():
        """The LoRA files a prompt's ``<lora:NAME:WEIGHT>`` may name (``--lora-dir``), as sd-webui
        lists them; ``path`` relative to that folder (the server's own paths stay its own)."""
        folder = control.lora_dir
        return [{"name": name, "alias": name, "path": str(path.relative_to(folder)), "metadata": {}}
                for name, path in available(folder).items()]

    @app.post("/sdapi/v1/refresh-loras")
    def refresh_loras():
        return None  # the folder is read at every request

    @app.post("/sdapi/v1/skip")
    def skip():
        """sd-webui's "skip": the running iteration ends with its partial image, the next one runs."""
        control.skip()  # sd-webui answers null

    @app.get("/sdapi/v1/options")
    def options():
        try:
            name, model_hash = control.current()
        except ControlstackError as exc:
            return refused(exc)
        return options_of(name, model_hash)

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        """``sd_model_checkpoint`` switches the default base (a registered name); the other keys are
        sd-webui settings this server does not have: accepted and ignored."""
        try:
            name = (await read_json(request, MAX_BODY)).get("sd_model_checkpoint")  # read_json: an object
            if name is not None:
                if not isinstance(name, str):
                    raise ClientError(f"'sd_model_checkpoint' must be a string, got {short(name)}")
                await run_in_threadpool(control.select, name)  # loads it now, as sd-webui does
        except ControlstackError as exc:
            return refused(exc)
        # sd-webui answers null

    @app.get("/sdapi/v1/cmd-flags")
    def cmd_flags():
        """sd-webui's command-line flags clients read, with this server's values (no paths)."""
        return {"api": True, "nowebui": not ui, "listen": None, "port": None, "api_auth": None, "api_log": False,
                "ckpt_dir": None, "lora_dir": None, "embeddings_dir": None, "data_dir": None,
                "hide_ui_dir_config": True, "lowvram": False, "medvram": False, "no_half": False,
                "skip_torch_cuda_test": False, "api_server_stop": False}

    @app.get("/sdapi/v1/memory")
    def memory():
        return memory_report()

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return [{"name": s.webui, "aliases": [s.name], "options": {}} for s in SAMPLER_TABLE]

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return list(SCHEDULER_ROWS)

    @app.get("/sdapi/v1/upscalers")
    def upscalers():
        """The hires fix's pixel upscalers (``hr_upscaler``); none is a model (scale: what "Lanczos"
        and "Nearest" are asked for, sd-webui's 4)."""
        return [{"name": u.webui, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
                for u in UPSCALER_TABLE if u.space == "pixel"]

    @app.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": u.webui} for u in UPSCALER_TABLE if u.space == "latent"]

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return control.models()

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return SCRIPTS

    @app.post("/sdapi/v1/png-info")
    async def pnginfo(request: Request):
        try:
            return await run_in_threadpool(png_info, await read_json(request, MAX_BODY), limits)
        except ControlstackError as exc:
            return refused(exc)

    @app.get("/controlnet/version")
    def version():
        return {"version": VERSION}

    @app.get("/controlnet/settings")
    def controlnet_settings():
        return {"control_net_unit_count": limits.max_controls}


def memory_report() -> dict:
    """``/sdapi/v1/memory`` in sd-webui's shape: this process's RAM (used: its resident size, total:
    the machine's), CUDA's when there is CUDA, else ``{"error": ...}`` in place."""
    try:
        import psutil  # local: optional dependency

        used, total = psutil.Process().memory_info().rss, psutil.virtual_memory().total
        ram = {"free": total - used, "used": used, "total": total}
    except Exception as exc:  # noqa: BLE001 (psutil missing or refused: said in place, as sd-webui does)
        ram = {"error": type(exc).__name__}
    try:
        if not torch.cuda.is_available():
            return {"ram": ram, "cuda": {"error": "unavailable"}}
        free, total = torch.cuda.mem_get_info()
        s = torch.cuda.memory_stats()

        def pair(k: str) -> dict:
            return {"current": s.get(f"{k}.all.current", 0), "peak": s.get(f"{k}.all.peak", 0)}

        cuda = {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
                "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
                "inactive": pair("inactive_split_bytes"),
                "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}
    except Exception as exc:  # noqa: BLE001
        cuda = {"error": type(exc).__name__}
    return {"ram": ram, "cuda": cuda}


def add_not_found(app: FastAPI) -> None:
    """An unknown endpoint answers 404 with JSON naming the endpoints there are. Call it after the last
    route: under the API prefixes a catch-all route does it (a web UI mounted at "/" would otherwise
    answer those paths), a path that exists with other methods answers 405; elsewhere (no web UI) the
    router's 404 does."""
    def listing() -> list[str]:
        return sorted(f"{m} {r.path}" for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
                      and r.path.startswith(API_PREFIXES) for m in sorted(r.methods - {"HEAD"}))

    def methods(path: str) -> list[str]:
        return sorted({m for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
                       and r.path_regex.match(path) for m in r.methods})

    def missing(request: Request):
        path = request.url.path
        if path.endswith("/") and methods(path.rstrip("/")):  # as the router would without the catch-all
            return RedirectResponse(request.url.replace(path=path.rstrip("/")), status_code=307)
        allowed = methods(path)
        if allowed:
            return JSONResponse({"error": f"{request.method} is not allowed on {path[:100]}; use {', '.join(allowed)}"},
                                status_code=405, headers={"Allow": ", ".join(allowed)})
        return JSONResponse({"error": f"no endpoint {path[:100]!r}; the endpoints are listed in 'endpoints'",
                             "endpoints": listing()}, status_code=404)

    for prefix in API_PREFIXES:
        app.add_api_route(prefix + "{rest:path}", missing, include_in_schema=False,
                          methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])

    @app.exception_handler(HTTPException)
    async def not_found(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return missing(request)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


class EmbeddedControl:
    """:func:`add_webui_routes`' view of the embedded server: its Worker and job queue."""

    def __init__(self, worker, jobs, lora_dir=None):
        self.worker, self.jobs, self.lora_dir = worker, jobs, lora_dir

    def interrupt(self) -> list:
        return self.jobs.interrupt()

    def skip(self) -> list:
        return self.jobs.skip()

    def current(self) -> tuple[str, str | None]:
        pipe = self.worker.pipe
        return pipe.name, pipe.model_hash

    def select(self, name: str) -> None:
        if name not in self.worker.factories:
            raise ClientError(f"'sd_model_checkpoint' {short(name)} is not registered; choose one of "
                              f"{', '.join(self.worker.factories)}")
        self.worker.base(name)
        self.worker.default = name

    def models(self) -> list[dict]:
        w = self.worker
        return [{"title": n, "model_name": n, "hash": w.loaded[n].model_hash if n in w.loaded else None,
                 "sha256": None, "filename": n, "config": None} for n in w.factories]


class Worker:
    """One generation at a time; at most ``queue_size`` waiting. Bases are registered by name
    (``factories``: name -> loader; the first is the default), loaded on first use and kept, the
    least recently used unloaded when their weights pass ``memory_bytes`` (one always stays)."""

    def __init__(self, pipeline_factory: Callable | dict, queue_size: int, job_seconds: float = 600.0,
                 memory_bytes: float = 8 * 2**30):
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
               keep_jobs: int | None = None, keep_days: float | None = None, lora_dir=None):
    """The app. ``pipeline_factory``: a loader of the one base, or ``{name: loader}`` for several
    (clients pick one by name: sd-webui's ``override_settings.sd_model_checkpoint``, ``/v1``'s
    ``base``); ``memory_gib`` bounds the weights kept loaded. ``data``: the job store's folder
    (``store``; None: a temporary one, removed at exit -- nothing survives that process);
    ``keep_jobs`` / ``keep_days``: retention of finished jobs (None: ``jobs.KEEP_JOBS`` / ``KEEP_DAYS``)."""
    if pipeline_factory is None:
        from controlstack import Pipeline  # local: heavy, only this path needs it

        pipeline_factory = Pipeline.from_pretrained
    if data is None:
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
            return await run_in_threadpool(answer, record, payload, img2img)
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

    @app.get("/sdapi/v1/progress")
    def progress():
        """The job that runs now, from whichever endpoint it came; job_count counts the waiting too."""
        done, total = worker.current
        return {"progress": done / total if total else 0.0, "eta_relative": 0.0, "current_image": None,
                "state": {"sampling_step": done, "sampling_steps": total,
                          "job_count": jobs.store.queued() + len(jobs.running)}}

    @app.get("/controlnet/model_list")
    def model_list():
        """The ControlNets (and T2I-Adapters) and the IP-Adapters a unit may name."""
        return {"model_list": sorted([*worker.pipe.controlnets, *worker.pipe.ip_adapter_names])}

    add_routes(app, limits, refused, MAX_BODY)  # annotators: shared with a broker front (serve/front.py)
    add_webui_routes(app, EmbeddedControl(worker, jobs, lora_dir), limits, refused, ui)  # shared with a front too

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
        def card(folder) -> str | None:
            path = None if folder is None else folder / "README.md"
            return path.read_text() if path is not None and path.is_file() else None

        pipe = worker.pipe
        return {"bases": [{"name": n, "loaded": n in worker.loaded} for n in worker.factories],
                "default": {"name": pipe.name, "native_size": pipe.native_size, "recommended": pipe.recommended},
                "controlnets": [{"name": n, "recommended": recommended(pipe.folder_of(n)), "card": card(pipe.folder_of(n))}
                                for n in sorted(pipe.controlnets)]}

    add_not_found(app)  # after the last route, before the web UI's mount
    if ui:  # the web UI at "/", over the same worker and queue; mounted last (a mount at "/" matches all)
        import gradio as gr  # local: heavy, only this path needs it

        from controlstack.serve.ui import build  # local: heavy, only this path needs it

        app = gr.mount_gradio_app(app, build(jobs, limits), path="/")
    return app
