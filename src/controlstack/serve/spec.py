"""One validated, plain description of a generation (:class:`JobSpec`), checked when it is submitted.

Every way into the server that generates (``/v1/generate``; sd-webui's txt2img / img2img,
``webui.parse_generation``) turns the client's JSON into a :class:`JobSpec` and runs
:func:`check_spec` on it before anything is queued, so a job that is accepted (202) can only fail
for reasons no request could have shown (out of memory, the time limit, a cancel), and invalid
requests never take a queue slot. A spec holds plain values -- numbers, strings, decoded and
size-checked PIL images, registered model names -- and :meth:`JobSpec.to_dict` writes it as JSON
(images as base64 PNG); :meth:`JobSpec.call_args` is what ``Pipeline.__call__`` gets.

**Content only.** No field is ever opened as a server path: images are base64 data
(:func:`decode_image` never looks at the filesystem, so a path is "not valid base64" whether or not
the file exists), models and bases are registered names (:func:`resolve_model`).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import math
import random
import re
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin

from controlstack.errors import ControlstackError
from controlstack.hires import MAX_HIRES, UPSCALERS, hires_size
from controlstack.inpaint import FILLS, MAX_BLUR, MAX_PADDING, InpaintOptions
from controlstack.io.images import RESIZE_MODES, validate_image
from controlstack.serve.bodies import ClientError

MAX_SEED = 2**63 - 1
MAX_KEYFRAMES = 64


@dataclass
class Limits:
    """What one request may ask for (the server's caps)."""

    max_side: int = 1024        # width / height of the output and of every uploaded image
    max_steps: int = 150
    max_batch: int = 8
    max_controls: int = 4
    max_bytes: int = 20 * 2**20  # one decoded base64 image
    max_prompt: int = 10_000     # characters of a prompt / negative prompt (CLIP reads 77 tokens of it)
    job_seconds: float = 600.0   # a generation running longer is stopped between steps


# ---------------------------------------------------------------------------------------- values
def decode_image(data, what: str, limits: Limits) -> Image.Image:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> a loaded PIL image. Content
    only: the string is never used as a file name, so a server path gets the same answer whether the
    file exists or not."""
    if not isinstance(data, str) or not data:
        raise ClientError(f"'{what}' must be a base64-encoded image string")
    data = data.split(",", 1)[1] if data.startswith("data:") else data
    if len(data) * 3 // 4 > limits.max_bytes:
        raise ClientError(f"'{what}': image larger than {limits.max_bytes // 2**20} MiB", 413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"'{what}': not valid base64 (send the image's bytes; a server path is never "
                          "opened)") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if max(im.size) > limits.max_side * 4 or im.size[0] * im.size[1] > (limits.max_side * 4) ** 2:
                raise ClientError(f"'{what}': {im.size[0]}x{im.size[1]} is too large (max side "
                                  f"{limits.max_side * 4})", 413)
            im.load()
            return validate_image(im.copy(), what)  # the project's own checks (empty images, odd modes)
    except ControlstackError:
        raise
    except Image.DecompressionBombError:  # PIL refuses it at open: a small file claiming a huge image
        raise ClientError(f"'{what}': the image is too large (a decompression bomb?)", 413) from None
    except (OSError, SyntaxError, ValueError):
        raise ClientError(f"'{what}': not an image PIL can read (PNG, JPEG or WebP)") from None


def encode_png(image: Image.Image) -> str:
    """PIL -> base64 PNG, the infotext in its ``parameters`` chunk (as sd-webui's API returns)."""
    info = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def resolve_model(name, registered, what: str = "model") -> str:
    """A registered name from a client's model string (sd-webui sends file names with a hash)."""
    if not isinstance(name, str) or not name.strip():
        raise ClientError(f"'{what}': give a model name, one of {', '.join(sorted(registered))}")
    text = name.strip()
    if text in registered:
        return text
    stem = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", text)  # "control_v11p_sd15_canny [d14c016b]"
    candidates = [r for r in registered if re.search(rf"(^|[_\-.]){re.escape(r)}($|[_\-.])", stem)]
    if len(candidates) == 1 and "/" not in text and "\\" not in text and ".." not in text:
        return candidates[0]
    raise ClientError(f"{what} '{name[:200]}' is not a registered model; choose one of {', '.join(sorted(registered))}")


def number(value, what: str, lo=None, hi=None, integer: bool = False):
    """A finite JSON number in [lo, hi] (an integer where ``integer``; 7.0 counts), else a ClientError
    naming ``what`` and the range."""
    def show(x) -> str:  # 2**63 - 1 in full, not 9.22337e+18
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    noun = "an integer" if integer else "a number"
    rng = f" in [{show(lo)}, {show(hi)}]" if lo is not None and hi is not None else \
        f" >= {show(lo)}" if lo is not None else ""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and int(value) != value:
        ok = False
    if ok and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        ok = False
    if not ok:
        raise ClientError(f"'{what}' must be {noun}{rng}, got {short(value)}")
    return int(value) if integer else float(value)


def text(value, what: str, limit: int, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise ClientError(f"'{what}' must be a string, got {short(value)}")
    if len(value) > limit:
        raise ClientError(f"'{what}' is longer than {limit} characters")
    return value


def flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise ClientError(f"'{what}' must be true or false, got {short(value)}")
    return value


def short(value) -> str:
    """A client value for an error message: its repr, cut (a 20 MiB string is not echoed back)."""
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def weight(value, what: str):
    """A control weight: a number, or keyframes ``[[progress, weight], ...]`` (numbers only: the
    Python API's tuple unpacking would take the string "12" as the keyframe (1, 2))."""
    from controlstack.control import validate_weight  # local: heavy, only this path needs it

    if isinstance(value, list):
        if not 0 < len(value) <= MAX_KEYFRAMES or not all(isinstance(k, list) and len(k) == 2 for k in value):
            raise ClientError(f"'{what}' must be a number or 1-{MAX_KEYFRAMES} keyframes [[progress, weight], ...]")
        frames = [[number(p, f"{what}[{i}][0]", 0, 1), number(w, f"{what}[{i}][1]", -10, 10)]
                  for i, (p, w) in enumerate(value)]
        try:
            return validate_weight(frames)
        except ControlstackError as exc:
            raise ClientError(f"'{what}': {exc}") from None
    return number(value, what, -10, 10)


# ---------------------------------------------------------------------------------------- the spec
@dataclass
class ControlSpec:
    """One control, validated: ``Control``'s arguments with the model a registered name."""

    model: str
    image: Image.Image
    weight: float | tuple = 1.0
    start: float | None = None        # None: the model's recommended window
    end: float | None = None
    mask: Image.Image | None = None
    resize_mode: str = "just_resize"
    preprocess: bool | str = False
    annotator_params: dict = field(default_factory=dict)  # numbers and choices only (never a path)
    task: str | None = None

    def control(self):
        from controlstack import Control  # local: heavy, only this path needs it

        return Control(self.model, self.image, weight=self.weight, start=self.start, end=self.end, mask=self.mask,
                       resize_mode=self.resize_mode, preprocess=self.preprocess,
                       annotator_params=dict(self.annotator_params), task=self.task)


@dataclass
class ImagePromptSpec:
    """One image prompt, validated: the IP-Adapter by its registered name, the reference image, its
    scale and region mask (``ip_adapter.ImagePrompt``'s arguments)."""

    model: str
    image: Image.Image
    scale: float = 1.0
    mask: Image.Image | None = None


@dataclass
class JobSpec:
    """A validated generation (what ``/v1/generate`` takes, field for field). None: the models'
    recommendation (steps, cfg, mode, a control's window) or the base's native size (width, height)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    cfg: float | None = None
    seed: int = 0                     # -1 / null from a client is drawn at acceptance and recorded here
    width: int | None = None
    height: int | None = None
    batch: int = 1
    scheduler: str | None = None      # None: the base family's (unipc; euler on a flow-matching base)
    mode: str | None = None
    mode_options: dict | None = None
    base: str | None = None           # a registered base name; None: the default
    controls: list[ControlSpec] = field(default_factory=list)
    init_image: Image.Image | None = None
    strength: float = 0.75
    inpaint_mask: Image.Image | None = None
    hires: float | None = None
    hires_strength: float = 0.5
    hires_steps: int | None = None    # None: the first pass's steps
    hires_upscaler: str = "lanczos"
    inpaint: InpaintOptions | None = None  # sd-webui's inpainting options (with inpaint_mask)
    n_iter: int = 1                   # batch count: n_iter runs of ``batch`` images (seed + j * batch)
    image_prompts: list[ImagePromptSpec] = field(default_factory=list)  # IP-Adapters, by name

    def call_args(self) -> tuple[str, list, dict]:
        """``(prompt, controls, kwargs)`` for one ``Pipeline.__call__`` (``base`` is the caller's to
        pick; ``n_iter``: :func:`run_spec` calls it that many times)."""
        kw = {k: getattr(self, k) for k in ("negative_prompt", "steps", "cfg", "seed", "width", "height", "batch",
                                           "scheduler", "mode", "mode_options", "init_image", "strength",
                                           "inpaint_mask", "hires", "hires_strength", "hires_steps",
                                           "hires_upscaler", "inpaint")}
        return self.prompt, [c.control() for c in self.controls], kw

    def to_dict(self) -> dict:
        """JSON-ready: ``/v1/generate``'s body for this job (images as base64 PNG)."""
        def value(v):
            if isinstance(v, Image.Image):
                return encode_png(v)
            if isinstance(v, InpaintOptions):
                return v.parameters()
            if isinstance(v, tuple):
                return [value(x) for x in v]
            return v

        unused = {"controls", "image_prompts", *(["strength"] if self.init_image is None else []),
                  *(["hires_strength", "hires_upscaler"] if self.hires is None else [])}  # /v1 refuses them alone
        out = {k: value(v) for k, v in vars(self).items() if k not in unused and v is not None}
        out["controls"] = [{k: value(v) for k, v in vars(c).items() if v is not None and v != {}}
                           for c in self.controls]
        if self.image_prompts:
            out["image_prompts"] = [{k: value(v) for k, v in vars(p).items() if v is not None}
                                    for p in self.image_prompts]
        return out


# ---------------------------------------------------------------------------------------- /v1
V1_FIELDS = {"prompt", "negative_prompt", "steps", "cfg", "seed", "width", "height", "scheduler", "mode",
             "mode_options", "batch", "controls", "init_image", "strength", "inpaint_mask", "hires",
             "hires_strength", "hires_steps", "hires_upscaler", "inpaint", "n_iter", "image_prompts", "base"}
MAX_N_ITER = 16
V1_CONTROL_FIELDS = {"model", "image", "weight", "start", "end", "mask", "resize_mode", "preprocess", "task"}


def draw_seed(value, what: str) -> int:
    """-1 (and null) draw a seed now, so the spec and the PNG record the one used."""
    if value is None:
        return random.randrange(2**32)
    seed = number(value, what, -1, MAX_SEED, integer=True)
    return random.randrange(2**32) if seed == -1 else seed


def spec_from_v1(body: dict, base_of, limits: Limits) -> JobSpec:
    """``/v1/generate``'s body -> a :class:`JobSpec`, every field validated (:func:`check_spec`
    included). ``base_of(name)``: the pipeline of a registered base (None: the default)."""
    from controlstack.annotators import available as annotator_names  # local: heavy, only this path needs it
    from controlstack.injection.base import available as modes  # local: heavy, only this path needs it
    from controlstack.sampling.schedulers import SCHEDULERS  # local: heavy, only this path needs it

    unknown = sorted(set(body) - V1_FIELDS)
    if unknown:
        raise ClientError(f"unknown field(s) {', '.join(u[:40] for u in unknown[:5])}; known: {', '.join(sorted(V1_FIELDS))}")
    if "prompt" not in body:
        raise ClientError("'prompt' is missing (a string)")
    base = text(body.get("base"), "base", 200, allow_none=True)
    try:
        pipe = base_of(base)
    except ClientError:
        raise
    except ControlstackError as exc:
        raise ClientError(f"'base': {exc}") from None

    def opt(key, check):
        return None if body.get(key) is None else check(body[key])

    def image(value, what):
        return None if value is None else decode_image(value, what, limits)

    def one_of(value, what, choices):
        if not isinstance(value, str) or value not in choices:
            raise ClientError(f"'{what}' {short(value)} is unknown; choose one of {', '.join(choices)}")
        return value

    spec = JobSpec(
        prompt=text(body["prompt"], "prompt", limits.max_prompt),
        negative_prompt=text(body.get("negative_prompt", ""), "negative_prompt", limits.max_prompt),
        steps=opt("steps", lambda v: number(v, "steps", 1, limits.max_steps, integer=True)),
        cfg=opt("cfg", lambda v: number(v, "cfg", 0, 30)),
        seed=draw_seed(body.get("seed"), "seed"),  # absent: drawn and recorded, as sd-webui's -1
        width=opt("width", lambda v: number(v, "width", 8, limits.max_side, integer=True)),
        height=opt("height", lambda v: number(v, "height", 8, limits.max_side, integer=True)),
        batch=number(body.get("batch", 1), "batch", 1, limits.max_batch, integer=True),
        scheduler=opt("scheduler", lambda v: one_of(v, "scheduler", list(SCHEDULERS))),
        mode=opt("mode", lambda v: one_of(v, "mode", modes())),
        mode_options=opt("mode_options", lambda v: v),  # typed against the mode in check_spec
        base=base,
        init_image=image(body.get("init_image"), "init_image"),
        strength=number(body.get("strength", 0.75), "strength", 0, 1),
        inpaint_mask=image(body.get("inpaint_mask"), "inpaint_mask"),
        hires=opt("hires", lambda v: number(v, "hires", 1, MAX_HIRES)),
        hires_strength=number(body.get("hires_strength", 0.5), "hires_strength", 0, 1),
        hires_steps=opt("hires_steps", lambda v: number(v, "hires_steps", 1, limits.max_steps, integer=True)),
        hires_upscaler=one_of(body.get("hires_upscaler", "lanczos"), "hires_upscaler", list(UPSCALERS)),
        inpaint=opt("inpaint", lambda v: inpaint_options(v, "inpaint")),
        n_iter=number(body.get("n_iter", 1), "n_iter", 1, MAX_N_ITER, integer=True),
    )
    if "strength" in body and spec.init_image is None:
        raise ClientError("'strength' applies to img2img: give 'init_image' too")
    for key in ("hires_strength", "hires_steps", "hires_upscaler"):
        if key in body and spec.hires is None:
            raise ClientError(f"'{key}' applies to the hires fix: give 'hires' too")
    if spec.inpaint is not None and spec.inpaint_mask is None:
        raise ClientError("'inpaint' options apply to inpainting: give 'inpaint_mask' too")
    controls = body.get("controls", [])
    if not isinstance(controls, list) or len(controls) > limits.max_controls:
        raise ClientError(f"'controls' must be a list of at most {limits.max_controls} objects")
    registered = set(pipe.controlnets)
    for i, c in enumerate(controls):
        where = f"controls[{i}]"
        if not isinstance(c, dict):
            raise ClientError(f"'{where}' must be an object")
        extra = sorted(set(c) - V1_CONTROL_FIELDS)
        if extra:
            raise ClientError(f"'{where}': unknown field(s) {', '.join(e[:40] for e in extra[:5])}; known: "
                              f"{', '.join(sorted(V1_CONTROL_FIELDS))}")
        preprocess = c.get("preprocess", False)
        if not isinstance(preprocess, bool):
            preprocess = one_of(preprocess, f"{where}.preprocess", annotator_names())
        spec.controls.append(ControlSpec(
            model=resolve_model(c.get("model"), registered, f"{where}.model"),
            image=decode_image(c.get("image"), f"{where}.image", limits),
            weight=weight(c.get("weight", 1.0), f"{where}.weight"),
            start=None if c.get("start") is None else number(c["start"], f"{where}.start", 0, 1),
            end=None if c.get("end") is None else number(c["end"], f"{where}.end", 0, 1),
            mask=image(c.get("mask"), f"{where}.mask"),
            resize_mode=one_of(c.get("resize_mode", "just_resize"), f"{where}.resize_mode", list(RESIZE_MODES)),
            preprocess=preprocess,
            task=None if c.get("task") is None else text(c["task"], f"{where}.task", 64)))
    prompts = body.get("image_prompts", [])
    if not isinstance(prompts, list) or len(prompts) > limits.max_controls:
        raise ClientError(f"'image_prompts' must be a list of at most {limits.max_controls} objects")
    for i, p in enumerate(prompts):
        where = f"image_prompts[{i}]"
        if not isinstance(p, dict) or set(p) - {"model", "image", "scale", "mask"}:
            raise ClientError(f"'{where}' must be an object with model, image, scale and mask")
        spec.image_prompts.append(ImagePromptSpec(
            model=text(p.get("model") or "", f"{where}.model", 200), image=decode_image(p.get("image"), f"{where}.image",
                                                                                       limits),
            scale=number(p.get("scale", 1.0), f"{where}.scale", -10, 10), mask=image(p.get("mask"), f"{where}.mask")))
    check_spec(spec, pipe, limits)
    return spec


def inpaint_options(value, what: str) -> InpaintOptions:
    """An object of :class:`~controlstack.inpaint.InpaintOptions` fields, each typed and ranged."""
    if not isinstance(value, dict):
        raise ClientError(f"'{what}' must be an object, got {short(value)}")
    known = ("mask_blur", "invert", "full_res", "padding", "fill", "paste_back")
    extra = sorted(set(value) - set(known))
    if extra:
        raise ClientError(f"'{what}': unknown field(s) {', '.join(e[:40] for e in extra[:5])}; known: {', '.join(known)}")
    out = {}
    for key in ("mask_blur", "padding"):
        if key in value:
            out[key] = number(value[key], f"{what}.{key}", 0, MAX_BLUR if key == "mask_blur" else MAX_PADDING,
                              integer=True)
    for key in ("invert", "full_res", "paste_back"):
        if key in value:
            out[key] = flag(value[key], f"{what}.{key}")
    if "fill" in value:
        if value["fill"] not in FILLS:
            raise ClientError(f"'{what}.fill' {short(value['fill'])} is unknown; choose one of {', '.join(FILLS)}")
        out["fill"] = value["fill"]
    return InpaintOptions(**out)


def run_spec(pipe, spec: JobSpec, step_callback, interrupted=lambda: False) -> tuple[list, dict]:
    """Run ``spec`` on ``pipe``: ``n_iter`` calls of ``batch`` images, call ``j`` with seed
    ``seed + j * batch`` (sd-webui's batch count). ``step_callback`` as ``Pipeline.__call__``'s
    (raising :class:`~controlstack.sampling.loop.StopSampling` ends the current call with its
    partial images: skip / interrupt); ``interrupted()`` true: no further call starts. Returns
    ``(images, parameters)``, the first call's parameters with ``all_seeds``: each image's seed (its
    call's; image ``k`` of a batch is that seed at batch position ``k``, as its infotext says)."""
    prompt, controls, kw = spec.call_args()
    if spec.image_prompts:  # by name -> one per loaded IP-Adapter, in its order
        from controlstack.ip_adapter import ImagePrompt  # local: heavy, only this path needs it

        kw["image_prompts"] = pipe.image_prompts_by_name({p.model: ImagePrompt(p.image, p.scale, p.mask)
                                                          for p in spec.image_prompts})
    images, seeds, parameters = [], [], None
    for j in range(spec.n_iter):
        if j and interrupted():
            break
        seed = spec.seed + j * spec.batch
        result = pipe(prompt, controls, progress=False, return_result=True, step_callback=step_callback,
                      **{**kw, "seed": seed})
        images += result.images
        seeds += [seed] * len(result.images)
        parameters = parameters or result.parameters
    return images, {**parameters, "all_seeds": seeds, "n_iter": spec.n_iter}


# ---------------------------------------------------------------------------------------- checks
def _option(value, kind: str, what: str):
    """A mode option's value by its constructor's annotation (``str``, ``float``, ``bool``, ``int``)."""
    if kind == "bool":
        return flag(value, what)
    if kind in ("float", "int"):
        return number(value, what, integer=kind == "int")
    if kind == "str" and not isinstance(value, str):
        raise ClientError(f"'{what}' must be a string, got {short(value)}")
    if not isinstance(value, (str, int, float, bool)):
        raise ClientError(f"'{what}' must be a number, a string or true / false, got {short(value)}")
    return value


def check_mode_options(mode: str, options, what: str = "mode_options") -> dict:
    """``options`` typed against the keyword arguments the mode's constructor takes."""
    from controlstack.injection.base import make_injection  # local: heavy, only this path needs it

    if not isinstance(options, dict):
        raise ClientError(f"'{what}' must be an object, got {short(options)}")
    params = inspect.signature(type(make_injection(mode))).parameters
    out = {}
    for key, value in options.items():
        if key not in params:
            known = ", ".join(params) or "none"
            raise ClientError(f"'{what}.{key[:40]}' is not an option of mode '{mode}' (its options: {known})")
        out[key] = _option(value, str(params[key].annotation), f"{what}.{key}")
    try:
        make_injection(mode, **out)
    except ControlstackError as exc:
        raise ClientError(f"'{what}': {exc}") from None
    return out


def check_task(controlnet, task: str | None, name: str) -> None:
    """The pipeline's rules for ``task``: a ControlNet-Union needs one of its types, an Omni ControlNet
    one of its task tokens, any other ControlNet none."""
    from controlstack.models.union import control_id, is_union  # local: heavy, only this path needs it

    if is_union(controlnet):
        control_id(controlnet, task, name)
        return
    tokens = getattr(controlnet, "task_tokens", None)
    if tokens is None and task is not None:
        raise ControlstackError(f"control model '{name}' has no task tokens; 'task' is for an Omni ControlNet or "
                                "a ControlNet-Union")
    if tokens is not None and task not in tokens:
        what = "needs a 'task'" if task is None else f"has no task '{task}'"
        raise ControlstackError(f"Omni ControlNet '{name}' {what}; choose one of {', '.join(tokens)}")


def check_spec(spec: JobSpec, pipe, limits: Limits, names: dict | None = None) -> None:
    """What needs the base to check: sizes by its VAE factor, the hires size, the controls (windows,
    preprocessors) and the mode as the pipeline will resolve them, the scheduler rule, and memory.
    ``names``: the client's spelling of spec fields in messages (sd-webui's ``cfg_scale`` ...)."""
    from controlstack import annotators  # local: heavy, only this path needs it
    from controlstack.injection.base import make_injection  # local: heavy, only this path needs it
    from controlstack.pipeline import MAX_CFG_HIGH_ORDER, speckles  # local: heavy, only this path needs it

    def n(key: str) -> str:
        return (names or {}).get(key, key)

    if getattr(pipe, "weightless", False):  # a broker front (serve/distributed.py) holds no weights: the
        return                              # worker runs these checks before it generates, failing the job
    if spec.image_prompts:  # IP-Adapters the server loaded, by name
        try:
            pipe.image_prompts_by_name({p.model: None for p in spec.image_prompts})
        except ControlstackError as exc:
            raise ClientError(str(exc)) from None
    for key in ("prompt", "negative_prompt"):  # sd-webui's <lora:NAME:WEIGHT>: a file of the server's --lora-dir
        if "<lora:" in getattr(spec, key):
            try:
                pipe.prompt_loras(getattr(spec, key), pipe.lora_dir)
            except ControlstackError as exc:
                raise ClientError(f"'{n(key)}': {exc}") from None
    factor = pipe.vae_scale_factor
    width, height = spec.width or pipe.native_size, spec.height or pipe.native_size
    for key, v in (("width", width), ("height", height)):
        if v % factor or not factor <= v <= limits.max_side:
            raise ClientError(f"'{n(key)}' must be a multiple of {factor} in [{factor}, {limits.max_side}] for this "
                              f"base, got {v}")
    if spec.hires is not None:
        w2, h2 = hires_size(width, height, spec.hires, factor)
        if max(w2, h2) > limits.max_side * 2:
            raise ClientError(f"'{n('hires')}' {spec.hires:g} makes {w2}x{h2}, over this server's "
                              f"{limits.max_side * 2} px")
    if spec.inpaint_mask is not None and spec.init_image is None:
        raise ClientError(f"'{n('inpaint_mask')}' needs '{n('init_image')}' (the image to repaint)")
    if pipe.inpainting_unet and spec.init_image is None:
        raise ClientError(f"this base is an inpainting model: give '{n('init_image')}' and '{n('inpaint_mask')}'")
    controls = []
    for i, c in enumerate(spec.controls):
        where = n(f"controls[{i}]")
        try:
            control = c.control()
            check_task(pipe.controlnet(c.model), c.task, c.model)  # loads it now, as the run would
            name = pipe.module_name(control)  # preprocess=True: the annotator its ControlNet's condition needs
            if name != "none":
                annotators.get(name, **c.annotator_params)
            if name == "inpaint" and spec.inpaint_mask is None and "mask" not in c.annotator_params:
                raise ClientError(f"'{where}': the inpaint preprocessor needs a mask: give '{n('inpaint_mask')}'")
        except ClientError:
            raise
        except ControlstackError as exc:
            raise ClientError(f"'{where}': {exc}") from None
        controls.append(control)
    if spec.mode_options is not None and not isinstance(spec.mode_options, dict):
        raise ClientError(f"'{n('mode_options')}' must be an object, got {short(spec.mode_options)}")
    try:
        pipe.with_windows(controls)  # an unset start / end from the recommendation must still fit
        used = pipe.settings(controls, spec.steps, spec.cfg, spec.mode, spec.mode_options)
    except ControlstackError as exc:
        raise ClientError(str(exc)) from None
    if spec.mode_options is not None:  # the client's options, typed against the mode they will apply to
        spec.mode_options = check_mode_options(used["mode"], spec.mode_options, n("mode_options"))
        used["mode_options"] = spec.mode_options or None
    from controlstack.sampling.schedulers import FLOW_SCHEDULERS  # local: heavy, only this path needs it

    family = getattr(pipe, "family", None)  # a front's weightless base has none: the worker checks
    if spec.scheduler is not None and family is not None and family.flow and spec.scheduler not in FLOW_SCHEDULERS:
        raise ClientError(f"'{n('scheduler')}' {spec.scheduler} samples noise-prediction bases; this "
                          f"{family.label} base samples with {', '.join(FLOW_SCHEDULERS)}")
    injection = make_injection(used["mode"], **(pipe.mi_options(used["mode"], used["mode_options"], controls) or {}))
    if speckles(spec.scheduler, injection, bool(controls), used["cfg"]):
        raise ClientError(f"'{n('scheduler')}' {spec.scheduler} with mode '{used['mode']}' above CFG "
                          f"{MAX_CFG_HIGH_ORDER:g} turns the image to speckle; use unipc, dpmpp_2m, euler or ddim, "
                          f"mode balanced, or '{n('cfg')}' <= {MAX_CFG_HIGH_ORDER:g}")
    try:  # the machine's free memory now: refused here rather than killed mid-run
        pipe.check_memory(spec.batch, width * (spec.hires or 1), height * (spec.hires or 1))
    except ControlstackError as exc:
        raise ClientError(str(exc)) from None
