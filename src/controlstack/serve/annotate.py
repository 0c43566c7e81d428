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
from starlette.concurrency import run_in_threadpool

from controlstack import annotators
from controlstack.errors import ControlstackError
from controlstack.serve.bodies import ClientError, parse_json, read_json
from controlstack.serve.spec import Limits, decode_image, encode_png, number, short

#: parameters that configure the server's own files or code: never from a client
SERVER_ONLY = {"weights": "a folder on the server", "detector": "a class loaded from 'weights'",
               "loader": "Python code"}
MAX_FIGURES = 100  # people + animals in one inline pose JSON (each is drawn: the cost is per figure)
#: sd-webui-controlnet's two preprocessor sliders (a unit's threshold_a / threshold_b, /controlnet/detect's
#: controlnet_threshold_a / _b) -> the annotator parameter each sets where the meaning is the same:
#: (parameter, lo, hi, integer, value when unset: None = the annotator's default)
SLIDERS = {
    "canny": (("low_threshold", 1, 255, True, 100), ("high_threshold", 1, 255, True, 200)),
    "lines": (("value_threshold", 0.01, 2.0, False, None), None),   # sd-webui-controlnet's mlsd
    "binary": (("threshold", 0, 255, True, None), None),           # ... its "threshold"
    "tile": (("down_sampling_rate", 1, 8, False, None), None),      # ... tile_resample
    "normal": (("bg_threshold", 0, 1, False, None), None),          # ... normal_midas
}


def unset(value) -> bool:
    """sd-webui-controlnet's "the preprocessor's default": null, -1 (any negative number, as its
    sliders fall back to the default for them)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0)


def slider_params(module: str, values, names) -> dict:
    """The annotator parameters a module's two slider values set (:data:`SLIDERS`); ``names``: the
    client's field names, for messages. A slider the module has no use for is typed, then unused."""
    out = {}
    for value, name, slot in zip(values, names, SLIDERS.get(module, (None, None))):
        if slot is None:
            if value is not None:  # typed even where unused: a client's wrong type is a mistake to show
                number(value, name)
            continue
        param, lo, hi, integer, default = slot
        if not unset(value):
            v = number(value, name, lo, hi)  # sd-webui's sliders send floats: 100.0 is canny's 100
            out[param] = int(v) if integer else v
        elif default is not None:
            out[param] = default
    return out


def inline_pose(value, what: str):
    """A pose JSON given inline (an object, or its text) -> PoseData. A string that is not JSON is
    refused as it is -- it is never tried as a file name."""
    from controlstack.annotators.pose import parse_openpose  # local: heavy, only this path needs it

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


def run_annotator(annotator, image, call: dict, where: str = "params", mask_name: str | None = None):
    """Run it, with the HTTP wording for a missing inpaint mask (the Python API's says ``mask=PATH``;
    ``mask_name``: the client's field for it, ``{where}.mask`` unless given)."""
    if getattr(annotator, "NAME", "") == "inpaint" and "mask" not in call and image.mode not in ("RGBA", "LA", "PA") \
            and not (image.mode == "P" and "transparency" in image.info):
        raise ClientError(f"'{mask_name or where + '.mask'}' is missing: give a base64 mask image (white = inpaint), or an image with "
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
    @app.get("/controlnet/module_list")
    def module_list():
        return {"module_list": ["none", *annotators.available()]}

    @app.post("/controlnet/detect")
    async def detect(request: Request):
        """sd-webui-controlnet's preprocessor endpoint: run one annotator on each image (the images as
        ``controlnet_input_images``, or ``controlnet_images`` as webuiapi sends them; the inpaint
        module's masks as ``controlnet_masks``)."""
        try:
            b = await read_json(request, max_body)
            module = b.get("controlnet_module", "none")
            if not isinstance(module, str) or module not in annotators.available():
                raise ClientError(f"'controlnet_module' {short(module)} is unknown; see /controlnet/module_list")
            key = "controlnet_input_images" if "controlnet_input_images" in b else "controlnet_images"
            images, masks = b.get(key), b.get("controlnet_masks") or []
            if not isinstance(images, list) or not images or len(images) > limits.max_batch:
                raise ClientError(f"'{key}' must be a list of 1-{limits.max_batch} base64 images")
            if not isinstance(masks, list) or len(masks) > len(images):
                raise ClientError("'controlnet_masks' must be a list of base64 masks, one per image at most")
            res = b.get("controlnet_processor_res")
            params = {"resolution": 512 if unset(res) else
                      number(res, "controlnet_processor_res", 64, limits.max_side * 2, integer=True)}
            params |= slider_params(module, (b.get("controlnet_threshold_a"), b.get("controlnet_threshold_b")),
                                    ("controlnet_threshold_a", "controlnet_threshold_b"))
            try:
                annotator = annotators.get(module, **params)
            except ControlstackError as exc:
                raise ClientError(str(exc)) from None

            def run() -> list:
                out = []
                for i, im in enumerate(images):
                    call = {"mask": decode_image(masks[i], f"controlnet_masks[{i}]", limits)} if i < len(masks) \
                        and module == "inpaint" else {}
                    out.append(run_annotator(annotator, decode_image(im, f"{key}[{i}]", limits), call,
                                             mask_name=f"controlnet_masks[{i}]"))
                return out

            out = await run_in_threadpool(run)
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
