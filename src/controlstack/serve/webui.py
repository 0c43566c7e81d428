"""sd-webui's API payloads <-> the Python API: txt2img / img2img bodies, their answers, PNG info.

``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` bodies with ControlNet units in
``alwayson_scripts.ControlNet.args`` (also ``controlnet``). Spellings are sd-webui's (``io/png.py``);
docs/webui-api.md lists every field of sd-webui's request models and of a ControlNet unit, and
whether this server uses it.

Everything a client sends is validated here, once, into the same :class:`~.spec.JobSpec` that
``/v1/generate`` builds (and :func:`~.spec.check_spec` on it): every field this server reads is typed
and ranged, and sd-webui's other fields (:data:`IGNORED_FIELDS`: face restoration, scripts, ...) are
type-checked as sd-webui's pydantic models would, then ignored; unknown fields are ignored as
sd-webui ignores them. Defaults are those of sd-webui's API models (:data:`TXT2IMG_DEFAULTS`,
:data:`IMG2IMG_DEFAULTS`: 50 steps, "Euler", an inpainting mask blurred by 4 and repainted "only
masked"), and the answer's ``parameters`` echoes the request in their terms, as sd-webui's does.
``override_settings`` must be an object: its ``sd_model_checkpoint`` (a string) picks the base,
its other keys are ignored. Images are base64 data under size caps, and **models are addressed by
registered name only** -- sd-webui's ``"control_v11p_sd15_canny [d14c016b]"`` resolves to the
registered name it contains, and a path is never opened.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

from PIL import Image

from controlstack import annotators
from controlstack.errors import ControlstackError
from controlstack.hires import MAX_HIRES, UPSCALER_BY_LABEL, UPSCALERS, hires_size
from controlstack.injection.modes import CONTROL_MODE_TABLE
from controlstack.inpaint import FILL_BY_INDEX, MAX_BLUR, MAX_PADDING, InpaintOptions
from controlstack.io.images import RESIZE_TABLE, resize_image
from controlstack.sampling.schedulers import SAMPLER_BY_LABEL, SCHEDULERS, WEBUI_SAMPLER_LABELS
from controlstack.serve.bodies import ClientError
from controlstack.serve.spec import (
    MAX_N_ITER,
    ControlSpec,
    ImagePromptSpec,
    JobSpec,
    Limits,
    check_spec,
    decode_image,
    draw_seed,
    flag,
    number,
    resolve_model,
    short,
    text,
)

# sd-webui label -> our name, and sd-webui index -> our name: views of the one table of each vocabulary
WEBUI_SAMPLERS = dict(SAMPLER_BY_LABEL)
WEBUI_CONTROL_MODES = {m.webui: m.name for m in CONTROL_MODE_TABLE}
WEBUI_RESIZE_MODES = {r.webui: r.name for r in RESIZE_TABLE}
MODE_BY_INDEX = [m.name for m in sorted(CONTROL_MODE_TABLE, key=lambda m: m.index)]
RESIZE_BY_INDEX = [r.name for r in sorted(RESIZE_TABLE, key=lambda r: r.index)]
#: the JobSpec field -> the sd-webui field a message names
NAMES = {"cfg": "cfg_scale", "batch": "batch_size", "scheduler": "sampler_name", "init_image": "init_images[0]",
         "inpaint_mask": "mask", "strength": "denoising_strength", "hires": "hr_scale",
         "hires_strength": "denoising_strength", "hires_steps": "hr_second_pass_steps", "n_iter": "n_iter"}
#: sd-webui's schedulers (its ``scheduler`` field, 1.9+) this server has: each sampler's own schedule
#: ("Automatic"), and Karras sigmas where the sampler has a Karras variant
SCHEDULER_ROWS = ({"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                   "need_inner_model": False},
                  {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False})
KARRAS = {"dpmpp_2m": "dpmpp_2m_karras", "dpmpp_2m_karras": "dpmpp_2m_karras"}

# sd-webui's txt2img / img2img request models (modules/api/models.py over modules/processing.py):
# every field and its default. What ran is echoed in these terms (the answer's "parameters").
COMMON_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": 0.75,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None, "override_settings": None,
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "firstpass_image": None, "comments": None, "sampler_index": "Euler",
    "script_name": None, "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
    "force_task_id": None, "infotext": None,
}
TXT2IMG_DEFAULTS = {
    **COMMON_DEFAULTS, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0,
    "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
}
IMG2IMG_DEFAULTS = {
    **COMMON_DEFAULTS, "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None, "mask_blur_x": 4,
    "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None, "latent_mask": None,
    "include_init_images": False,
}

# sd-webui's txt2img / img2img fields this server does not use, by type (null allowed, as sd-webui's
# Optional fields): a wrong type is a 400 as sd-webui's 422 would be; a right one is ignored
_INT, _NUM, _BOOL, _STR, _LIST, _OBJ = (int,), (int, float), (bool,), (str,), (list,), (dict,)
IGNORED_FIELDS = {
    "styles": _LIST, "seed_resize_from_h": _INT, "seed_resize_from_w": _INT, "restore_faces": _BOOL,
    "tiling": _BOOL, "do_not_save_samples": _BOOL, "do_not_save_grid": _BOOL, "eta": _NUM, "s_min_uncond": _NUM,
    "s_churn": _NUM, "s_tmax": _NUM, "s_tmin": _NUM, "s_noise": _NUM, "override_settings_restore_afterwards": _BOOL,
    "refiner_checkpoint": _STR, "refiner_switch_at": _NUM, "disable_extra_networks": _BOOL, "comments": _OBJ,
    "firstphase_width": _INT, "firstphase_height": _INT, "hr_checkpoint_name": _STR, "hr_sampler_name": _STR,
    "hr_scheduler": _STR, "hr_prompt": _STR, "hr_negative_prompt": _STR, "force_task_id": _STR, "script_name": _STR,
    "script_args": _LIST, "save_images": _BOOL, "infotext": _STR, "firstpass_image": _STR,
    # img2img
    "image_cfg_scale": _NUM, "mask_round": _BOOL, "initial_noise_multiplier": _NUM,
    "latent_mask": _STR,
}
#: switches of the answer (``answer()``): typed here with the rest
READ_SWITCHES = {"send_images": _BOOL, "include_init_images": _BOOL}
#: sd-webui-controlnet unit fields this server does not use, by type
IGNORED_UNIT_FIELDS = {"low_vram": _BOOL, "lowvram": _BOOL, "save_detected_map": _BOOL, "input_mode": _STR,
                       "batch_images": _STR, "output_dir": _STR, "loopback": _BOOL, "hr_option": _STR,
                       "advanced_weighting": _LIST, "effective_region_mask": _STR, "union_control_type": _STR,
                       "inpaint_crop_input_image": _BOOL, "pulid_mode": _STR, "is_ui": _BOOL}


def check_types(payload: dict, table: dict, where: str = "") -> None:
    for key, kinds in table.items():
        value = payload.get(key)
        if value is None:
            continue
        ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
        if ok and kinds == _INT and isinstance(value, float):
            ok = False
        if not ok:
            noun = {_INT: "an integer", _NUM: "a number", _BOOL: "true or false", _STR: "a string", _LIST: "a list",
                    _OBJ: "an object"}.get(kinds, "true / false or an integer")
            raise ClientError(f"'{where}{key}' must be {noun}, got {short(value)}")


def _choice(value, table: dict, by_index: list, key: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(by_index):
        return by_index[value]
    if isinstance(value, str) and value in table:
        return table[value]
    if isinstance(value, str) and value in by_index:
        return value
    raise ClientError(f"'{key}' {short(value)} is unknown; choose one of {', '.join(table)} (or 0-{len(by_index) - 1})")


def get(payload: dict, key: str, default):
    """A field's value; null is the default, as in sd-webui's Optional fields."""
    value = payload.get(key)
    return default if value is None else value


def units(payload: dict) -> list[tuple[int, dict]]:
    """The enabled ControlNet units, each with its index among all the units sent."""
    scripts = payload.get("alwayson_scripts")
    if scripts is None:
        return []
    if not isinstance(scripts, dict):
        raise ClientError("'alwayson_scripts' must be an object")
    key = "ControlNet" if "ControlNet" in scripts else "controlnet"
    entry = scripts.get(key)
    if entry is None:
        return []
    args = entry.get("args", []) if isinstance(entry, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
        raise ClientError(f"'alwayson_scripts.{key}.args' must be a list of unit objects")
    return [(i, a) for i, a in enumerate(args) if flag(get(a, "enabled", True), f"ControlNet unit {i}.enabled")]


def base_name(payload: dict) -> str | None:
    """``override_settings.sd_model_checkpoint``: the base a request picks (None: the default)."""
    settings = payload.get("override_settings")
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ClientError(f"'override_settings' must be an object, got {short(settings)}")
    return text(settings.get("sd_model_checkpoint"), "override_settings.sd_model_checkpoint", 200, allow_none=True)


def parse_unit(u: dict, i: int, registered, limits: Limits, modes: set, init=None) -> ControlSpec:
    """One unit. ``init``: img2img's ``(init image, its resize mode)``, the condition of a unit that
    sends no image (sd-webui-controlnet's rule: the img2img input)."""
    from controlstack.serve.annotate import slider_params, unset  # local: heavy, only this path needs it

    where = f"ControlNet unit {i}"
    check_types(u, IGNORED_UNIT_FIELDS, f"{where}.")
    raw = u.get("image", u.get("input_image"))
    if isinstance(raw, dict):  # sd-webui also sends {"image": ..., "mask": ...}
        if not isinstance(raw.get("image"), str):
            raise ClientError(f"'{where}.image' must be a base64 image, or an object with one as 'image'")
        raw = raw["image"]
    resize = get(u, "resize_mode", 1)
    if raw in (None, "") and init is not None:
        image, resize = init
    elif raw in (None, ""):  # webuiapi sends "" for a unit without an image
        raise ClientError(f"'{where}.image' is missing (a base64 condition or photo)")
    else:
        image = decode_image(raw, f"{where}.image", limits)
    model = resolve_model(u.get("model"), registered, f"{where}.model")
    module = u.get("module", "none") or "none"
    if not isinstance(module, str) or (module not in ("none", "None") and module not in annotators.available()):
        raise ClientError(f"'{where}.module' {short(module)} is unknown; see /controlnet/module_list")
    pixel_perfect = flag(get(u, "pixel_perfect", False), f"{where}.pixel_perfect")
    if u.get("control_mode") is not None:  # absent: the models' recommended mode, as the Python API does
        modes.add(_choice(u["control_mode"], WEBUI_CONTROL_MODES, MODE_BY_INDEX, f"{where}.control_mode"))
    # unset: the model's recommended window (sd-webui's clients usually send both)
    start = None if u.get("guidance_start") is None else number(u["guidance_start"], f"{where}.guidance_start", 0, 1)
    end_key = "guidance_end" if "guidance_end" in u else "guidance"  # sd-webui-controlnet's older name
    end = None if u.get(end_key) is None else number(u[end_key], f"{where}.{end_key}", 0, 1)
    if start is not None and end is not None and start > end:
        raise ClientError(f"'{where}': guidance_start {start} is after guidance_end {end}")
    params = slider_params(module, (u.get("threshold_a"), u.get("threshold_b")),
                           (f"{where}.threshold_a", f"{where}.threshold_b"))
    if not unset(u.get("processor_res")):
        res = number(u["processor_res"], f"{where}.processor_res", 64, limits.max_side * 2, integer=True)
        if not pixel_perfect:
            params["resolution"] = res
    mask = u.get("mask", u.get("mask_image"))  # mask_image: sd-webui-controlnet's alias (SD Forge's name)
    return ControlSpec(
        model=model, image=image, weight=number(get(u, "weight", 1.0), f"{where}.weight", -10, 10), start=start,
        end=end, resize_mode=_choice(resize, WEBUI_RESIZE_MODES, RESIZE_BY_INDEX, f"{where}.resize_mode"),
        preprocess=False if module in ("none", "None") else module, annotator_params=params,
        mask=None if mask in (None, "") else decode_image(mask, f"{where}.mask", limits))


def is_image_prompt(u: dict) -> bool:
    """A unit with sd-webui-controlnet's ``ip-adapter_*`` preprocessor: an IP-Adapter image prompt."""
    return isinstance(u.get("module"), str) and u["module"].startswith("ip-adapter")


def parse_image_prompt(u: dict, i: int, names, limits: Limits) -> ImagePromptSpec:
    """An IP-Adapter unit -> an :class:`~.spec.ImagePromptSpec`: its ``model`` one of the server's
    ``--ip-adapters`` (``names``; None on a front: the worker checks), ``image`` the reference,
    ``weight`` the adapter's scale, ``mask`` its region."""
    where = f"ControlNet unit {i}"
    check_types(u, IGNORED_UNIT_FIELDS, f"{where}.")
    raw = u.get("image", u.get("input_image"))
    raw = raw.get("image") if isinstance(raw, dict) else raw
    if raw in (None, ""):
        raise ClientError(f"'{where}.image' is missing (the image prompt's reference image)")
    if names is not None:
        model = resolve_model(u.get("model"), set(names), f"{where}.model")
    else:
        model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", text(u.get("model") or "", f"{where}.model", 200)).strip()
        if not model:
            raise ClientError(f"'{where}.model': give the IP-Adapter's name")
    mask = u.get("mask", u.get("mask_image"))
    return ImagePromptSpec(model=model, image=decode_image(raw, f"{where}.image", limits),
                           scale=number(get(u, "weight", 1.0), f"{where}.weight", -10, 10),
                           mask=None if mask in (None, "") else decode_image(mask, f"{where}.mask", limits))


def _bit(value, what: str) -> bool:
    """true / false, or sd-webui's 0 / 1 (its int fields that act as switches)."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ClientError(f"'{what}' must be true / false or 0 / 1, got {short(value)}")


def parse_scheduler(payload: dict) -> str:
    """``sampler_name`` (else sd-webui's older ``sampler_index``; neither: "Euler", sd-webui's API
    default) with its ``scheduler`` -> our scheduler name."""
    index = text(payload.get("sampler_index"), "sampler_index", 100, allow_none=True)
    sampler = text(payload.get("sampler_name"), "sampler_name", 100, allow_none=True) or index or "Euler"
    if sampler not in WEBUI_SAMPLERS and sampler not in SCHEDULERS:
        raise ClientError(f"'sampler_name' {short(sampler)} is unknown; choose one of {', '.join(WEBUI_SAMPLERS)}")
    name = WEBUI_SAMPLERS.get(sampler, sampler)
    schedule = (text(payload.get("scheduler"), "scheduler", 100, allow_none=True) or "automatic").lower()
    if schedule == "karras" and name in KARRAS:
        return KARRAS[name]
    if schedule != "automatic":
        raise ClientError(f"'scheduler' {short(payload['scheduler'])} is not available for {sampler}: this server "
                          "has 'Automatic' (each sampler's own schedule) and 'Karras' with DPM++ 2M")
    return name


def parse_hires(payload: dict, width: int, height: int, factor: int, limits: Limits) -> dict:
    """sd-webui's hires fix fields -> the JobSpec's ``hires*`` fields ({} when ``enable_hr`` is off;
    the fields are typed either way)."""
    on = flag(get(payload, "enable_hr", False), "enable_hr")
    scale = number(get(payload, "hr_scale", 2.0), "hr_scale", 1 if on else None, MAX_HIRES if on else None)
    rx, ry = (number(get(payload, k, 0), k, 0, limits.max_side * 2, integer=True) for k in ("hr_resize_x",
                                                                                           "hr_resize_y"))
    steps = number(get(payload, "hr_second_pass_steps", 0), "hr_second_pass_steps", 0, limits.max_steps, integer=True)
    strength = number(get(payload, "denoising_strength", 0.75), "denoising_strength", 0, 1)
    label = text(payload.get("hr_upscaler"), "hr_upscaler", 100, allow_none=True) or "Latent"  # sd-webui's default
    if not on:
        return {}
    if label not in UPSCALER_BY_LABEL and label not in UPSCALERS:
        raise ClientError(f"'hr_upscaler' {short(label)} is unknown; choose one of {', '.join(UPSCALER_BY_LABEL)}")
    if rx or ry:  # a target size instead of a factor: the factor that covers it, as sd-webui computes
        scale = max(rx / width, ry / height)
        if not 1 <= scale <= MAX_HIRES:
            raise ClientError(f"'hr_resize_x' / 'hr_resize_y' {rx}x{ry} from {width}x{height} is an upscale of "
                              f"{scale:g}; it must be in [1, {MAX_HIRES:g}]")
        if rx and ry and hires_size(width, height, scale, factor) != (rx, ry):
            raise ClientError(f"'hr_resize_x' x 'hr_resize_y' {rx}x{ry} has another aspect ratio than {width}x{height} "
                              "(sd-webui crops the upscale, this server does not): give one of them, or hr_scale")
    return {"hires": scale, "hires_strength": strength, "hires_steps": steps or None,
            "hires_upscaler": UPSCALER_BY_LABEL.get(label, label)}


def parse_inpaint(payload: dict):
    """sd-webui's img2img inpainting fields (its API defaults) -> InpaintOptions."""
    if payload.get("mask_blur") is not None:  # sd-webui: mask_blur, when given, sets both
        bx = by = number(payload["mask_blur"], "mask_blur", 0, MAX_BLUR, integer=True)
    else:
        bx, by = (number(get(payload, k, 4), k, 0, MAX_BLUR, integer=True) for k in ("mask_blur_x", "mask_blur_y"))
    if bx != by:
        raise ClientError(f"'mask_blur_x' {bx} and 'mask_blur_y' {by} differ; this server blurs the mask alike in "
                          "both directions: give one 'mask_blur'")
    fill = number(get(payload, "inpainting_fill", 0), "inpainting_fill", 0, len(FILL_BY_INDEX) - 1, integer=True)
    return InpaintOptions(
        mask_blur=bx, invert=_bit(get(payload, "inpainting_mask_invert", 0), "inpainting_mask_invert"),
        full_res=_bit(get(payload, "inpaint_full_res", True), "inpaint_full_res"), fill=FILL_BY_INDEX[fill],
        padding=number(get(payload, "inpaint_full_res_padding", 0), "inpaint_full_res_padding", 0, MAX_PADDING,
                       integer=True))


def parse_generation(payload: dict, base_of, limits: Limits, img2img: bool = False) -> JobSpec:
    """An sd-webui txt2img / img2img body -> a validated :class:`~.spec.JobSpec` (``base_of(name)``:
    a registered base's pipeline; :func:`~.spec.check_spec` included)."""
    if not isinstance(payload, dict):
        raise ClientError("the request body must be a JSON object")
    check_types(payload, IGNORED_FIELDS)
    check_types(payload, READ_SWITCHES)
    base = base_name(payload)
    try:
        pipe = base_of(base)
    except ControlstackError as exc:
        raise ClientError(f"'override_settings.sd_model_checkpoint': {exc}") from None
    draw_seed(payload.get("subseed", -1), "subseed")  # typed; drawn for the answer (answer())
    if number(get(payload, "subseed_strength", 0), "subseed_strength", 0, 1) > 0:
        raise ClientError("'subseed_strength' > 0 asks for variation seeds, which this server does not support; "
                          "send 0")
    spec = JobSpec(
        prompt=text(get(payload, "prompt", ""), "prompt", limits.max_prompt),
        negative_prompt=text(get(payload, "negative_prompt", ""), "negative_prompt", limits.max_prompt),
        steps=number(get(payload, "steps", 50), "steps", 1, limits.max_steps, integer=True),
        cfg=number(get(payload, "cfg_scale", 7.0), "cfg_scale", 0, 30),
        width=number(get(payload, "width", 512), "width", 8, limits.max_side, integer=True),
        height=number(get(payload, "height", 512), "height", 8, limits.max_side, integer=True),
        batch=number(get(payload, "batch_size", 1), "batch_size", 1, limits.max_batch, integer=True),
        scheduler=parse_scheduler(payload), seed=draw_seed(payload.get("seed", -1), "seed"), base=base,
        n_iter=number(get(payload, "n_iter", 1), "n_iter", 1, MAX_N_ITER, integer=True))
    init = None
    if img2img:
        images = payload.get("init_images")
        if not isinstance(images, list) or not images:
            raise ClientError("img2img needs 'init_images': a list with one base64 image")
        spec.init_image = decode_image(images[0], "init_images[0]", limits)
        spec.strength = number(get(payload, "denoising_strength", 0.75), "denoising_strength", 0, 1)
        inpaint = parse_inpaint(payload)  # typed with or without a mask
        if payload.get("mask") not in (None, ""):
            spec.inpaint_mask = decode_image(payload["mask"], "mask", limits)
            spec.inpaint = inpaint
        mode = number(get(payload, "resize_mode", 0), "resize_mode", 0, 3, integer=True)
        resize = RESIZE_BY_INDEX[mode] if mode < len(RESIZE_BY_INDEX) else "just_resize"  # 3: sd-webui's latent one
        if spec.inpaint is None or not spec.inpaint.full_res:  # "Only masked" keeps the init image's size
            spec.init_image = resize_image(spec.init_image, spec.width, spec.height, resize)
            if spec.inpaint_mask is not None:
                spec.inpaint_mask = resize_image(spec.inpaint_mask, spec.width, spec.height, resize)
        init = (spec.init_image, resize)
    else:
        for key in ("init_images", "mask"):  # txt2img has no such fields: typed, not used
            if payload.get(key) is not None and not isinstance(payload[key], (list if key == "init_images" else str)):
                raise ClientError(f"'{key}' has the wrong type for txt2img, got {short(payload[key])}")
        factor = getattr(pipe, "vae_scale_factor", 8)  # a front's weightless base: SD's 8 (workers check again)
        for key, value in parse_hires(payload, spec.width, spec.height, factor, limits).items():
            setattr(spec, key, value)
    us = units(payload)
    if len(us) > limits.max_controls:
        raise ClientError(f"{len(us)} ControlNet units; at most {limits.max_controls}")
    modes: set = set()
    registered = set(pipe.controlnets)
    names = getattr(pipe, "ip_adapter_names", None)  # a front's weightless base has none: the worker checks
    spec.image_prompts = [parse_image_prompt(u, i, names, limits) for i, u in us if is_image_prompt(u)]
    us = [(i, u) for i, u in us if not is_image_prompt(u)]
    spec.controls = [parse_unit(u, i, registered, limits, modes, init) for i, u in us]
    if len(modes) > 1:
        raise ClientError(f"ControlNet units ask for different control modes ({', '.join(sorted(modes))}); "
                          "this server applies one mode per generation: give them the same one")
    if modes:
        spec.mode = modes.pop()
    check_spec(spec, pipe, limits, {**NAMES, **{f"controls[{k}]": f"ControlNet unit {i}" for k, (i, _) in enumerate(us)}})
    return spec


# ---------------------------------------------------------------------------------------- answers
def echo(payload: dict, img2img: bool) -> dict:
    """The request as sd-webui's answer echoes it (``vars`` of its request model): every field of the
    model, as sent or its default, numbers of float fields as floats; ``init_images`` and ``mask``
    null unless ``include_init_images``. Fields the model does not have are not echoed."""
    defaults = IMG2IMG_DEFAULTS if img2img else TXT2IMG_DEFAULTS
    out = {}
    for key, default in defaults.items():
        value = payload.get(key, default)
        floats = isinstance(default, float) or IGNORED_FIELDS.get(key) == _NUM
        out[key] = float(value) if floats and isinstance(value, int) and not isinstance(value, bool) else value
    if img2img and not payload.get("include_init_images"):
        out["init_images"] = out["mask"] = None
    return out


def infotext(png_b64: str) -> str:
    """The ``parameters`` text of a base64 PNG (PIL reads the text chunks before the pixels)."""
    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as im:
        return im.info.get("parameters", "")


def answer(record: dict, payload: dict, img2img: bool) -> dict:
    """sd-webui's txt2img / img2img answer for a finished job record and the request it ran: images,
    ``parameters`` (:func:`echo`) and ``info`` (``Processed.js()``'s fields, as JSON text). A job that
    did not end ``done`` raises a ClientError: 500 for a bug, 400 for the time limit or a cancel."""
    if record["status"] != "done":
        if record.get("error") == "internal error":
            raise ClientError("internal error", status=500)
        raise ClientError(record.get("error") or f"the job was {record['status']}")
    p, images = record["parameters"], record["images"]
    req = echo(payload, img2img)
    infotexts = [infotext(im) for im in images]
    total = int(req["n_iter"]) * int(req["batch_size"])
    seeds = p.get("all_seeds") or [p["seed"]] * len(images)
    subseed = draw_seed(payload.get("subseed", -1), "subseed")  # -1 drawn, as sd-webui draws it
    hires = p.get("hires")
    width, height = hires["first_pass"] if hires else (p["width"], p["height"])  # sd-webui: the asked size
    extra = {}
    if hires:
        extra = {"Hires upscale": hires["scale"], "Hires upscaler": UPSCALERS[hires["upscaler"]].webui,
                 **({"Hires steps": hires["steps"]} if hires.get("steps") else {})}
    info = {
        "prompt": p["prompt"], "all_prompts": [p["prompt"]] * total, "negative_prompt": p["negative_prompt"],
        "all_negative_prompts": [p["negative_prompt"]] * total, "seed": seeds[0] if seeds else p["seed"],
        "all_seeds": seeds, "subseed": subseed, "all_subseeds": [subseed + i for i in range(total)],
        "subseed_strength": 0.0, "width": width, "height": height,
        "sampler_name": WEBUI_SAMPLER_LABELS.get(p["scheduler"], p["scheduler"]), "cfg_scale": p["cfg"],
        "steps": p["steps"], "batch_size": req["batch_size"], "restore_faces": req["restore_faces"],
        "face_restoration_model": None, "sd_model_name": p.get("model"), "sd_model_hash": p.get("model_hash"),
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": req["seed_resize_from_w"],
        "seed_resize_from_h": req["seed_resize_from_h"], "denoising_strength": req["denoising_strength"],
        "extra_generation_params": extra, "index_of_first_image": 0, "infotexts": infotexts,
        "styles": req["styles"] or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "controlstack",
    }
    return {"images": images if req["send_images"] else [], "parameters": req, "info": json.dumps(info)}


# sd-webui's infotext grammar: "Key: value" pairs on the last line, a value quoted when it has commas
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text_: str) -> dict:
    """An infotext -> sd-webui's PNG-info ``parameters``: ``Prompt``, ``Negative prompt`` and each
    key's value as text (``io.png.parse_parameters``' grammar; ``Size`` as ``Size-1`` / ``Size-2``)."""
    from controlstack.io.png import parse_parameters  # local: heavy, only this path needs it

    fields = parse_parameters(text_, typed=False)
    out = {"Prompt": fields.pop("prompt"), "Negative prompt": fields.pop("negative_prompt")}
    for key, value in fields.items():
        size = _SIZE.match(value)
        if size:  # as sd-webui: the two numbers, not the text
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out


def png_info(payload: dict, limits: Limits) -> dict:
    """``/sdapi/v1/png-info``: the ``parameters`` text of a base64 image, its other text chunks
    (``items``) and the text parsed (``parameters``)."""
    image = decode_image(payload.get("image"), "image", limits)
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    geninfo = items.pop("parameters", "")
    return {"info": geninfo, "items": items, "parameters": parse_infotext(geninfo) if geninfo else {}}
