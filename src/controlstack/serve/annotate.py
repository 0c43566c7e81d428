"""Annotators over HTTP (``/v1/annotate``, ``/controlnet/detect``): their parameters as content only.

The Python API lets some annotator parameters name files on the machine it runs on: ``pose``'s
``json`` (a pose JSON file), ``inpaint``'s ``mask`` (a mask image file), the learned annotators'
``weights`` (a folder), ``detector`` (a class loaded from that folder) and ``loader`` (a callable).
Over HTTP that machine is the server, so here ``json`` is the pose JSON itself (an object, or its
text), ``mask`` a base64 image, and ``weights`` / ``detector`` / ``loader`` are refused: the server's
annotators run on the weights it was started with. Nothing a client sends is opened as a path, so
the answer to a path never depends on whether the file exists.
"""

from __future__ import annotations

# at module level: FastAPI resolves the handlers' string annotations (``request: Request``) here
from fastapi import Request

from controlstack.errors import ControlstackError
from controlstack.serve.bodies import ClientError, parse_json
from controlstack.serve.spec import Limits, decode_image, short

#: parameters that configure the server's own files or code: never from a client
SERVER_ONLY = {"weights": "a folder on the server", "detector": "a class loaded from 'weights'",
               "loader": "Python code"}
MAX_FIGURES = 100  # people + animals in one inline pose JSON (each is drawn: the cost is per figure)


def inline_pose(value, what: str):
    """A pose JSON given inline (an object, or its text) -> PoseData. A string that is not JSON is
    refused as it is -- it is never tried as a file name."""
    from controlstack.annotators.pose import parse_openpose

    if isinstance(value, str):
        if not value.lstrip().startswith("{"):  # not echoed: the answer to a path is the same for every path
            raise ClientError(f"'{what}' must be the pose JSON itself (an object, or its text), not a file name")
        value = parse_json(value, f"'{what}'")  # the same caps as a body: depth, values, finite numbers
    if not isinstance(value, dict):
        raise ClientError(f"'{what}' must be the pose JSON itself (an object with 'people' and "
                          f"canvas_width / canvas_height), got {short(value)}")
    figures = value.get("people") or [], value.get("animals") or []
    if not all(isinstance(f, list) for f in figures):
        raise ClientError(f"'{what}': 'people' and 'animals' must be lists")
    if len(figures[0]) + len(figures[1]) > MAX_FIGURES:
        raise ClientError(f"'{what}': more than {MAX_FIGURES} people and animals")
    try:
        return parse_openpose(value)
    except ControlstackError as exc:
        raise ClientError(f"'{what}': {exc}") from None


def http_annotator(name, params, limits: Limits, where: str = "params"):
    """``(annotator, call keyword arguments)`` for an HTTP request's annotator name and parameters,
    content only (module docstring); a ClientError naming the field otherwise."""
    from controlstack import annotators

    if not isinstance(name, str) or name not in annotators.available():
        raise ClientError(f"'annotator' {short(name)} is unknown; choose one of {', '.join(annotators.available())}")
    if not isinstance(params, dict):
        raise ClientError(f"'{where}' must be an object, got {short(params)}")
    params, call = dict(params), {}
    known = [f.name for f in annotators.annotator_class(name).parameters()]
    unknown = [k for k in params if k not in known and k not in SERVER_ONLY]
    if unknown:  # named here, cut: the Python API's message would echo a key of any length
        raise ClientError(f"'{where}.{unknown[0][:40]}' is not a parameter of {name}; its parameters: "
                          f"{', '.join(known)}")
    server_only = sorted(set(params) & set(SERVER_ONLY))
    if server_only:
        key = server_only[0]
        raise ClientError(f"'{where}.{key}' cannot be set over HTTP (it is {SERVER_ONLY[key]}); the server's "
                          "annotators use the weights it was started with")
    pose = None
    if name == "pose" and params.get("json", None) is not None:
        pose = inline_pose(params.pop("json"), f"{where}.json")
    if name == "inpaint" and params.get("mask", None) is not None:
        call["mask"] = decode_image(params.pop("mask"), f"{where}.mask", limits)
    content = {"pose": "json", "inpaint": "mask"}.get(name)
    params = {k: v for k, v in params.items() if not (k == content and v is None)}  # null: the default (none)
    # any other free-text parameter (a str without choices: what names a file) is refused too, so an
    # annotator added later cannot open a client's path before this list knows it
    free = [row[0] for row in annotators.annotator_class(name).describe() if row[1].startswith("str") and
            row[3] == "text" and row[0] in params]
    if free:
        raise ClientError(f"'{where}.{free[0]}' cannot be set over HTTP (free text this server does not take)")
    try:
        annotator = annotators.get(name, **params)
        if pose is not None:
            annotator = annotators.annotator_class("pose")(**params, pose_data=pose)
    except ControlstackError as exc:
        raise ClientError(f"'{where}': {exc}") from None
    return annotator, call


def run_annotator(annotator, image, call: dict, where: str = "params"):
    """Run it, with the HTTP wording for a missing inpaint mask (the Python API's says ``mask=PATH``)."""
    if getattr(annotator, "NAME", "") == "inpaint" and "mask" not in call and image.mode not in ("RGBA", "LA", "PA") \
            and not (image.mode == "P" and "transparency" in image.info):
        raise ClientError(f"'{where}.mask' is missing: give a base64 mask image (white = inpaint), or an image with "
                          "transparency (transparent = inpaint)")
    try:
        return annotator(image, **call)
    except ControlstackError as exc:
        raise ClientError(str(exc)) from None


def add_routes(app, limits: Limits, refused, max_body: int) -> None:
    """The annotator endpoints on ``app``: ``/v1/annotators``, ``/v1/annotate``, ``/controlnet/detect``
    and ``/controlnet/module_list``. One code path for the embedded server (serve/app.py) and a broker
    front (serve/front.py): annotators need no diffusion model (the learned ones load the bundled
    predictor on first use, in the process that serves them), so a front runs them itself.
    ``refused(exc)``: the app's 4xx answer for a ControlstackError."""
    from starlette.concurrency import run_in_threadpool

    from controlstack import annotators
    from controlstack.serve.bodies import read_json
    from controlstack.serve.spec import encode_png, number

    @app.get("/controlnet/module_list")
    def module_list():
        return {"module_list": ["none", *annotators.available()]}

    @app.post("/controlnet/detect")
    async def detect(request: Request):
        """sd-webui-controlnet's preprocessor endpoint: run one annotator on each image."""

        def value(b: dict, key: str, default, lo: int, hi: int) -> int:
            v = b.get(key)  # sd-webui-controlnet sends -1 (or null) for "the preprocessor's default"
            return default if v is None or v == -1 else int(number(v, key, lo, hi))

        try:
            b = await read_json(request, max_body)
            module = b.get("controlnet_module", "none")
            if not isinstance(module, str) or module not in annotators.available():
                raise ClientError(f"'controlnet_module' {short(module)} is unknown; see /controlnet/module_list")
            images = b.get("controlnet_input_images")
            if not isinstance(images, list) or not images or len(images) > limits.max_batch:
                raise ClientError(f"'controlnet_input_images' must be a list of 1-{limits.max_batch} base64 images")
            params = {"resolution": value(b, "controlnet_processor_res", 512, 64, limits.max_side * 2)}
            if module == "canny":
                params |= {"low_threshold": value(b, "controlnet_threshold_a", 100, 1, 255),
                           "high_threshold": value(b, "controlnet_threshold_b", 200, 1, 255)}
            try:
                annotator = annotators.get(module, **params)
            except ControlstackError as exc:
                raise ClientError(str(exc)) from None
            out = await run_in_threadpool(lambda: [
                run_annotator(annotator, decode_image(im, f"controlnet_input_images[{i}]", limits), {})
                for i, im in enumerate(images)])
        except ControlstackError as exc:
            return refused(exc)
        return {"images": [encode_png(im) for im in out], "info": "Success"}

    @app.post("/v1/annotate")
    async def annotate(request: Request):

        def run(b: dict):
            unknown = sorted(set(b) - {"annotator", "params", "image"})
            if unknown:
                raise ClientError(f"unknown field(s) {', '.join(u[:40] for u in unknown[:5])}; known: annotator, "
                                  "image, params")
            annotator, call = http_annotator(b.get("annotator"), b.get("params", {}), limits)
            return run_annotator(annotator, decode_image(b.get("image"), "image", limits), call)

        try:
            out = await run_in_threadpool(run, await read_json(request, max_body))
        except ControlstackError as exc:
            return refused(exc)
        return {"image": encode_png(out)}

    @app.get("/v1/annotators")
    def annotator_list():
        return {name: [{"name": n, "type": t, "default": d if isinstance(d, (str, int, float, bool, type(None)))
                        else str(d), "range": r, "help": h}
                       for n, t, d, r, h in annotators.annotator_class(name).describe()]
                for name in annotators.available()}
