"""The HTTP front of a distributed server (``controlstack serve --broker ...``): ``/v1`` jobs and
sd-webui's synchronous txt2img / img2img, validated here and run by ``controlstack worker``
processes (:mod:`.distributed`). Same bodies, checks and answers as :func:`.app.create_app`,
except what needs weights: base-dependent checks run at the worker (the job fails with their
message). What needs no diffusion model runs here, through the embedded server's code: the
annotators (``/v1/annotate``, ``/controlnet/detect``: :func:`.annotate.add_routes`) and the web UI
(:func:`.ui.build` over the :class:`~.distributed.Cluster`: Generate submits through the broker).
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from controlstack.errors import ControlstackError
from controlstack.serve.annotate import add_routes
from controlstack.serve.app import MAX_BODY, SCRIPTS, VERSION, add_guard, error, options_of, webui_answer
from controlstack.serve.bodies import read_json
from controlstack.serve.distributed import FINISHED, Cluster
from controlstack.serve.jobs import Busy
from controlstack.serve.spec import Limits, spec_from_v1
from controlstack.serve.webui import parse_generation


def create_front_app(cluster: Cluster, token: str | None = None, limits: Limits | None = None, ui: bool = False):
    """The front's app; ``ui``: the web UI at ``/`` (gradio), as the embedded server mounts it."""
    limits = limits or Limits(job_seconds=cluster.job_seconds)
    app = FastAPI(title="controlstack (front)", version=str(VERSION))
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
            spec = await run_in_threadpool(spec_from_v1, b, cluster.base_of, limits)
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
        import asyncio

        from fastapi.responses import StreamingResponse

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
            spec = await run_in_threadpool(parse_generation, payload, cluster.base_of, limits, img2img)
            job_id = await run_in_threadpool(cluster.submit, spec, 1)  # interactive: before batch jobs
            record = await run_in_threadpool(cluster.wait, job_id)
            return webui_answer(record)
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

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        """sd-webui's "stop": the running jobs this front's synchronous requests and web UI wait on
        stop after their current step (Cluster.interrupt: other fronts' and /v1 jobs go on)."""
        cluster.interrupt()
        return {}

    @app.get("/sdapi/v1/options")
    def options():
        """The web UI's base (Cluster.ui_base); no hash: the weights are on the workers."""
        try:
            name, _ = cluster.ui_base()
        except ControlstackError as exc:
            return refused(exc)
        return options_of(name, None)

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return SCRIPTS

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        return [{"title": n, "model_name": n, "hash": None, "filename": n} for n in sorted(cluster.bases())]

    @app.get("/controlnet/version")
    def version():
        return {"version": VERSION}

    @app.get("/controlnet/model_list")
    def model_list():
        return {"model_list": sorted(set().union(*cluster.bases().values()))}

    @app.get("/v1/models")
    def models():
        return {"bases": [{"name": n, "controlnets": sorted(c)} for n, c in sorted(cluster.bases().items())]}

    add_routes(app, limits, refused, MAX_BODY)  # annotators run here, with the embedded server's code
    if ui:  # mounted last (a mount at "/" matches all); Generate goes through the broker, at priority 1
        import gradio as gr

        from controlstack.serve.ui import build

        app = gr.mount_gradio_app(app, build(cluster, limits), path="/")
    return app
