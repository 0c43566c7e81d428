"""The HTTP front of a distributed server (``controlstack serve --broker ...``): ``/v1`` jobs and
sd-webui's synchronous txt2img / img2img, validated here and run by ``controlstack worker``
processes (:mod:`.distributed`). Same bodies, checks and answers as :func:`.app.create_app`,
except what needs weights: base-dependent checks run at the worker (the job fails with their
message). What needs no diffusion model runs here, through the embedded server's code: the
annotators (``/v1/annotate``, ``/controlnet/detect``: :func:`.annotate.add_routes`), sd-webui's other
endpoints (:func:`.app.add_webui_routes` over :class:`FrontControl`) and the web UI (:func:`.ui.build`
over the same: Generate submits through the broker).
"""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from controlstack.errors import ControlstackError
from controlstack.serve.annotate import add_routes
from controlstack.serve.app import MAX_BODY, VERSION, add_guard, add_not_found, add_webui_routes, error
from controlstack.serve.bodies import ClientError, read_json
from controlstack.serve.distributed import FINISHED, Cluster
from controlstack.serve.jobs import Busy
from controlstack.serve.spec import Limits, short, spec_from_v1
from controlstack.serve.webui import answer, parse_generation


class FrontControl:
    """A front's view of its Cluster for sd-webui's endpoints (:func:`.app.add_webui_routes`) and the
    web UI's backend (``serve/ui``), with the base a request that names none runs on: ``default``,
    set by ``POST /sdapi/v1/options`` (None: the workers' 'default'; the UI: ``Cluster.ui_base``)."""

    def __init__(self, cluster: Cluster, lora_dir=None):
        self.cluster, self.default, self.lora_dir = cluster, None, lora_dir

    def base_of(self, name: str | None):
        return self.cluster.base_of(name or self.default)

    def ui_base(self):
        if self.default is None:
            return self.cluster.ui_base()
        base = self.cluster.base_of(self.default)
        return base.name, base

    def submit(self, spec, priority: int = 0) -> str:
        return self.cluster.submit(spec, priority)

    def wait(self, job_id: str, report=None) -> dict:
        return self.cluster.wait(job_id, report)

    def interrupt(self) -> list:
        return self.cluster.interrupt()

    def skip(self) -> list:
        return self.cluster.skip()

    def current(self) -> tuple[str, None]:
        """The UI's base (no hash: the weights are on the workers)."""
        return self.ui_base()[0], None

    def select(self, name: str) -> None:
        held = self.cluster.bases()
        if name not in held:
            raise ClientError(f"'sd_model_checkpoint' {short(name)} is not held by a running worker; choose one of "
                              f"{', '.join(sorted(held)) or 'none (start a controlstack worker)'}")
        self.default = name

    def models(self) -> list[dict]:
        return [{"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n, "config": None}
                for n in sorted(self.cluster.bases())]


def create_front_app(cluster: Cluster, token: str | None = None, limits: Limits | None = None, ui: bool = False,
                     lora_dir=None):
    """The front's app; ``ui``: the web UI at ``/`` (gradio), as the embedded server mounts it."""
    limits = limits or Limits(job_seconds=cluster.job_seconds)
    app = FastAPI(title="controlstack (front)", version=str(VERSION))
    control = app.state.control = FrontControl(cluster, lora_dir)  # lora_dir: the workers' --lora-dir, as seen here
    app.state.cluster = cluster

    def refused(exc: ControlstackError) -> JSONResponse:
        status = getattr(exc, "status", 400)
        return error(status, str(exc), **({"Retry-After": "10"} if status == 503 else {}))

    add_guard(app, token)
    busy = {"Retry-After": "5"}

    @app.post("/v1/generate", status_code=202)
    async def generate(request: Request):
        try:
            b = await read_json(request, MAX_BODY)
            spec = await run_in_threadpool(spec_from_v1, b, control.base_of, limits)
            spec.base = spec.base or control.default
            return {"id": await run_in_threadpool(cluster.submit, spec)}
        except Busy:
            return error(429, "the queue is full; retry later", **busy)
        except ControlstackError as exc:
            return refused(exc)

    @app.get("/v1/jobs/{job_id}")
    def job(job_id: str):
        record = cluster.get(job_id)
        return record if record is not None else error(404, f"no job '{job_id[:40]}'")

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str):
        if await run_in_threadpool(cluster.get, job_id, False) is None:
            return error(404, f"no job '{job_id[:40]}'")

        async def stream():
            last = None
            while True:
                view = await run_in_threadpool(cluster.get, job_id, False)
                if view is None:
                    return
                if view != last:
                    yield f"data: {json.dumps(view)}\n\n"
                    last = view
                if view["status"] in FINISHED:
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str):
        record = cluster.cancel(job_id)
        return record if record is not None else error(404, f"no job '{job_id[:40]}'")

    async def generation(request: Request, img2img: bool):
        try:
            payload = await read_json(request, MAX_BODY)
            spec = await run_in_threadpool(parse_generation, payload, control.base_of, limits, img2img)
            spec.base = spec.base or control.default
            job_id = await run_in_threadpool(cluster.submit, spec, 1)  # interactive: before batch jobs
            record = await run_in_threadpool(cluster.wait, job_id)
            return await run_in_threadpool(answer, record, payload, img2img)
        except Busy:
            return error(429, "the queue is full; retry later", **busy)
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
        """The running job this front's synchronous requests or web UI wait on (a cluster runs many at
        once; sd-webui's progress is its own client's view); job_count counts unfinished jobs of every
        front."""
        records = (cluster.get(job_id, images=False) for job_id in sorted(cluster.waiting))
        running = next((r for r in records if r and r["status"] == "running"), None)
        done, total = running["progress"] if running else (0, 0)
        return {"progress": done / total if total else 0.0, "eta_relative": 0.0, "current_image": None,
                "state": {"sampling_step": done, "sampling_steps": total, "job_count": cluster.queued()}}

    @app.get("/controlnet/model_list")
    def model_list():
        return {"model_list": sorted(set().union(*cluster.bases().values()))}

    @app.get("/v1/models")
    def models():
        return {"bases": [{"name": n, "controlnets": sorted(c)} for n, c in sorted(cluster.bases().items())]}

    add_routes(app, limits, refused, MAX_BODY)  # annotators run here, with the embedded server's code
    add_webui_routes(app, control, limits, refused, ui)  # sd-webui's other endpoints: the embedded server's
    add_not_found(app)  # after the last route, before the web UI's mount
    if ui:  # mounted last (a mount at "/" matches all); Generate goes through the broker, at priority 1
        import gradio as gr  # local: heavy, only this path needs it

        from controlstack.serve.ui import build  # local: heavy, only this path needs it

        app = gr.mount_gradio_app(app, build(control, limits), path="/")  # the UI follows POST options too
    return app
