"""sd-webui's API payloads <-> the Python API: the subset clients of sd-webui-controlnet send.

``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` bodies (``prompt``, ``negative_prompt``, ``steps``,
``cfg_scale``, ``sampler_name``, ``seed``, ``width``, ``height``, ``batch_size``, ``init_images``,
``denoising_strength``, ``mask``) with ControlNet units in ``alwayson_scripts.ControlNet.args``
(also ``controlnet``): ``image``, ``mask``, ``module``, ``model``, ``weight``, ``resize_mode``,
``processor_res``, ``threshold_a``, ``threshold_b``, ``guidance_start``, ``guidance_end``,
``control_mode``, ``pixel_perfect``, ``enabled``. Spellings are sd-webui's (``io/png.py``).

Everything a client sends is validated here, once, into the same :class:`~.spec.JobSpec` that
``/v1/generate`` builds (and :func:`~.spec.check_spec` on it): every field this server reads is typed
and ranged, and sd-webui's other fields (:data:`IGNORED_FIELDS`: hires fix, face restoration,
scripts, ...) are type-checked as sd-webui's pydantic models would, then ignored; unknown fields are
ignored as sd-webui ignores them. ``override_settings`` must be an object: its
``sd_model_checkpoint`` (a string) picks the base, its other keys are ignored (clients send
sd-webui's settings; this server has none of them). Images are base64 data under size caps, and
**models are addressed by registered name only** -- sd-webui's ``"control_v11p_sd15_canny
[d14c016b]"`` resolves to the registered name it contains, and a path is never opened.
"""

from __future__ import annotations

from controlstack.errors import ControlstackError
from controlstack.injection.modes import CONTROL_MODE_TABLE
from controlstack.io.images import RESIZE_TABLE
from controlstack.sampling.schedulers import SAMPLER_BY_LABEL, SCHEDULERS
from controlstack.serve.bodies import ClientError
from controlstack.serve.spec import (  # noqa: F401  (Limits, decode_image, encode_png: this module's old API)
    ControlSpec,
    JobSpec,
    Limits,
    check_spec,
    decode_image,
    draw_seed,
    encode_png,
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
         "inpaint_mask": "mask", "strength": "denoising_strength"}

# sd-webui's txt2img / img2img fields this server does not use, by type (null allowed, as sd-webui's
# Optional fields): a wrong type is a 400 as sd-webui's 422 would be; a right one is ignored
_INT, _NUM, _BOOL, _STR, _LIST, _OBJ = (int,), (int, float), (bool,), (str,), (list,), (dict,)
IGNORED_FIELDS = {
    "styles": _LIST, "subseed": _INT, "subseed_strength": _NUM, "seed_resize_from_h": _INT,
    "seed_resize_from_w": _INT, "scheduler": _STR, "n_iter": _INT, "restore_faces": _BOOL, "tiling": _BOOL,
    "do_not_save_samples": _BOOL, "do_not_save_grid": _BOOL, "eta": _NUM, "s_min_uncond": _NUM, "s_churn": _NUM,
    "s_tmax": _NUM, "s_tmin": _NUM, "s_noise": _NUM, "override_settings_restore_afterwards": _BOOL,
    "refiner_checkpoint": _STR, "refiner_switch_at": _NUM, "disable_extra_networks": _BOOL, "comments": _OBJ,
    "enable_hr": _BOOL, "firstphase_width": _INT, "firstphase_height": _INT, "hr_scale": _NUM,
    "hr_upscaler": _STR, "hr_second_pass_steps": _INT, "hr_resize_x": _INT, "hr_resize_y": _INT,
    "hr_checkpoint_name": _STR, "hr_sampler_name": _STR, "hr_scheduler": _STR, "hr_prompt": _STR,
    "hr_negative_prompt": _STR, "force_task_id": _STR, "script_name": _STR, "script_args": _LIST,
    "send_images": _BOOL, "save_images": _BOOL, "infotext": _STR, "firstpass_image": _STR,
    # img2img
    "resize_mode": _INT, "image_cfg_scale": _NUM, "mask_blur_x": _INT, "mask_blur_y": _INT, "mask_blur": _INT,
    "mask_round": _BOOL, "inpainting_fill": _INT, "inpaint_full_res": (bool, int), "inpaint_full_res_padding": _INT,
    "inpainting_mask_invert": _INT, "initial_noise_multiplier": _NUM, "latent_mask": _STR,
    "include_init_images": _BOOL,
}
#: sd-webui-controlnet unit fields this server does not use, by type
IGNORED_UNIT_FIELDS = {"low_vram": _BOOL, "save_detected_map": _BOOL, "input_mode": _STR, "batch_images": _STR,
                       "hr_option": _STR, "advanced_weighting": _LIST, "effective_region_mask": _STR,
                       "union_control_type": _STR, "is_ui": _BOOL}


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


def _unset(u: dict, key: str) -> bool:
    """sd-webui-controlnet sends -1 for a preprocessor value it leaves to the preprocessor."""
    return u.get(key) is None or u.get(key) == -1


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


def parse_unit(u: dict, i: int, registered, limits: Limits, modes: set) -> ControlSpec:
    from controlstack import annotators

    where = f"ControlNet unit {i}"
    check_types(u, IGNORED_UNIT_FIELDS, f"{where}.")
    if u.get("image", u.get("input_image")) is None:
        raise ClientError(f"'{where}.image' is missing (a base64 condition or photo)")
    raw = u.get("image", u.get("input_image"))
    raw = raw.get("image") if isinstance(raw, dict) else raw  # sd-webui also sends {"image": ..., "mask": ...}
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
    end = None if u.get("guidance_end") is None else number(u["guidance_end"], f"{where}.guidance_end", 0, 1)
    if start is not None and end is not None and start > end:
        raise ClientError(f"'{where}': guidance_start {start} is after guidance_end {end}")
    params: dict = {}
    if module.startswith("canny"):
        params = {"low_threshold": 100 if _unset(u, "threshold_a") else
                  int(number(u["threshold_a"], f"{where}.threshold_a", 1, 255)),
                  "high_threshold": 200 if _unset(u, "threshold_b") else
                  int(number(u["threshold_b"], f"{where}.threshold_b", 1, 255))}
    else:  # typed even where unused: a client's wrong type is a mistake to show
        for key in ("threshold_a", "threshold_b"):
            if u.get(key) is not None:
                number(u[key], f"{where}.{key}")
    if not _unset(u, "processor_res"):
        res = number(u["processor_res"], f"{where}.processor_res", 64, limits.max_side * 2, integer=True)
        if not pixel_perfect:
            params["resolution"] = res
    mask = u.get("mask")
    return ControlSpec(
        model=model, image=image, weight=number(get(u, "weight", 1.0), f"{where}.weight", -10, 10), start=start,
        end=end, resize_mode=_choice(get(u, "resize_mode", 1), WEBUI_RESIZE_MODES, RESIZE_BY_INDEX,
                                     f"{where}.resize_mode"),
        preprocess=False if module in ("none", "None") else module, annotator_params=params,
        mask=None if mask in (None, "") else decode_image(mask, f"{where}.mask", limits))


def parse_generation(payload: dict, base_of, limits: Limits, img2img: bool = False) -> JobSpec:
    """An sd-webui txt2img / img2img body -> a validated :class:`~.spec.JobSpec` (``base_of(name)``:
    a registered base's pipeline; :func:`~.spec.check_spec` included)."""
    if not isinstance(payload, dict):
        raise ClientError("the request body must be a JSON object")
    check_types(payload, IGNORED_FIELDS)
    base = base_name(payload)
    try:
        pipe = base_of(base)
    except ControlstackError as exc:
        raise ClientError(f"'override_settings.sd_model_checkpoint': {exc}") from None
    # sampler_index: sd-webui's older name, used when sampler_name is absent (typed either way)
    index = text(payload.get("sampler_index"), "sampler_index", 100, allow_none=True)
    sampler = text(payload.get("sampler_name"), "sampler_name", 100, allow_none=True) or index or "Euler a"
    if sampler not in WEBUI_SAMPLERS and sampler not in SCHEDULERS:
        raise ClientError(f"'sampler_name' {short(sampler)} is unknown; choose one of {', '.join(WEBUI_SAMPLERS)}")
    spec = JobSpec(
        prompt=text(get(payload, "prompt", ""), "prompt", limits.max_prompt),
        negative_prompt=text(get(payload, "negative_prompt", ""), "negative_prompt", limits.max_prompt),
        steps=number(get(payload, "steps", 20), "steps", 1, limits.max_steps, integer=True),
        cfg=number(get(payload, "cfg_scale", 7.0), "cfg_scale", 0, 30),
        width=number(get(payload, "width", 512), "width", 8, limits.max_side, integer=True),
        height=number(get(payload, "height", 512), "height", 8, limits.max_side, integer=True),
        batch=number(get(payload, "batch_size", 1), "batch_size", 1, limits.max_batch, integer=True),
        scheduler=WEBUI_SAMPLERS.get(sampler, sampler), seed=draw_seed(payload.get("seed", -1), "seed"), base=base)
    if img2img:
        images = payload.get("init_images")
        if not isinstance(images, list) or not images:
            raise ClientError("img2img needs 'init_images': a list with one base64 image")
        spec.init_image = decode_image(images[0], "init_images[0]", limits)
        spec.strength = number(get(payload, "denoising_strength", 0.75), "denoising_strength", 0, 1)
        if payload.get("mask") not in (None, ""):
            spec.inpaint_mask = decode_image(payload["mask"], "mask", limits)
    else:
        for key in ("init_images", "mask"):  # txt2img has no such fields: typed, not used
            if payload.get(key) is not None and not isinstance(payload[key], (list if key == "init_images" else str)):
                raise ClientError(f"'{key}' has the wrong type for txt2img, got {short(payload[key])}")
        if payload.get("denoising_strength") is not None:  # sd-webui's hires fix strength: not used here
            number(payload["denoising_strength"], "denoising_strength", 0, 1)
    us = units(payload)
    if len(us) > limits.max_controls:
        raise ClientError(f"{len(us)} ControlNet units; at most {limits.max_controls}")
    modes: set = set()
    registered = set(pipe.controlnets)
    spec.controls = [parse_unit(u, i, registered, limits, modes) for i, u in us]
    if len(modes) > 1:
        raise ClientError(f"ControlNet units ask for different control modes ({', '.join(sorted(modes))}); "
                          "this server applies one mode per generation: give them the same one")
    if modes:
        spec.mode = modes.pop()
    check_spec(spec, pipe, limits, {**NAMES, **{f"controls[{k}]": f"ControlNet unit {i}" for k, (i, _) in enumerate(us)}})
    return spec
