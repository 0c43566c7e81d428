"""What a ControlNet unit's widgets derive from the registries: the Control Type radio and the
preprocessor + model pair each type sets, the preprocessor's own sliders (from the annotator
registry's parameter ranges), Pixel Perfect's resolution, the Omni task, the accordion header."""

from __future__ import annotations

import re
import typing

from controlstack import annotators
from controlstack.annotators import FOR_TASK, condition_in_name
from controlstack.annotators.base import _base_type
from controlstack.errors import ControlstackError
from controlstack.io.images import RESIZE_TABLE, pixel_perfect_resolution
from controlstack.io.settings import controlnet_recommendation, read_settings

ALL = "All"
RESIZE_BY_LABEL = {r.webui: r.name for r in RESIZE_TABLE}
SLIDERS, CHECKS, CHOICES = 6, 3, 1  # generic widgets per unit, relabelled for the chosen preprocessor
#: condition words -> the Control Type label sd-webui-controlnet users know (others: capitalised)
TYPE_LABELS = {"lines": "MLSD", "normal": "NormalMap", "hed": "SoftEdge (HED)"}


def _words(name: str) -> list[str]:
    return re.split(r"[^a-z0-9]+", str(name).lower())


def is_mi(name: str) -> bool:
    """A Minimal Impact ControlNet, by its name (``mi-canny``: the bundle's and the recipes' naming)."""
    return "mi" in _words(name)


def omni_tasks(base, model) -> list[str] | None:
    """An Omni ControlNet's task tokens (its folder's ``omni.tasks``; a front without the folders: the
    word "omni" in its name, any task), else None."""
    folder = base.folder_of(model) if base is not None and model else None
    if folder is not None:
        omni = read_settings(folder).get("omni")
        tasks = omni.get("tasks") if isinstance(omni, dict) else None
        return list(tasks) if tasks else ([] if omni else None)
    return [] if model and "omni" in _words(model) else None


def omni_task(base, model, preprocessor: str | None, where: str) -> str | None:
    """The ``task`` a unit's control takes: for an Omni ControlNet, the condition its preprocessor
    makes (the Omni task of that name); None for any other ControlNet."""
    tasks = omni_tasks(base, model)
    if tasks is None:
        return None
    by_annotator = {annotator: task for task, annotator in FOR_TASK.items()}
    task = preprocessor if preprocessor in FOR_TASK else by_annotator.get(preprocessor)
    if task is None or (tasks and task not in tasks):
        raise ControlstackError(f"{where}: the Omni model takes its task from the preprocessor; choose one of "
                                f"{', '.join(FOR_TASK[t] for t in (tasks or FOR_TASK))}")
    return task


def model_condition(name: str) -> str | None:
    return condition_in_name(name)


def control_types(controlnets) -> list[str]:
    """The Control Type radio: All, each condition a registered (plain) ControlNet takes, then MI and
    Omni where such models are registered."""
    plain = sorted({model_condition(n) for n in controlnets if not is_mi(n) and "omni" not in _words(n)} - {None})
    return [ALL, *(type_label(c) for c in plain), *(["MI"] if any(is_mi(n) for n in controlnets) else []),
            *(["Omni"] if any("omni" in _words(n) for n in controlnets) else [])]


def type_label(condition: str) -> str:
    return TYPE_LABELS.get(condition, condition.capitalize())


def control_type_pair(label: str, controlnets) -> tuple[str, str | None, list[str], list[str]]:
    """A Control Type -> (preprocessor, model, the preprocessors it lists, the models it lists): the
    annotator that makes the condition from a photo and the ControlNet taking it, as
    sd-webui-controlnet sets them. All: every preprocessor and model, none chosen."""
    names = sorted(controlnets)
    if label == ALL:
        return "none", None, ["none", *annotators.available()], names
    if label == "MI":
        models = [n for n in names if is_mi(n)]
    elif label == "Omni":
        models = [n for n in names if "omni" in _words(n)]
    else:
        models = [n for n in names if not is_mi(n) and "omni" not in _words(n)
                  and model_condition(n) and type_label(model_condition(n)) == label]
    if not models:
        raise ControlstackError(f"no registered ControlNet is of type {label}")
    conditions = [model_condition(m) for m in models] if label != "Omni" else list(annotators.FOR_TASK)
    pres = []
    for c in conditions:  # the annotator that makes condition c from a photo, then c itself (a label map ...)
        for a in (annotators.FOR_TASK.get(c), c):
            if a in annotators.available() and a not in pres:
                pres.append(a)
    model = min(models, key=lambda m: (model_condition(m) not in conditions[:1], len(m), m))
    return (pres[0] if pres else "none"), model, ["none", *pres], models


def pixel_perfect(image_size, width: int, height: int, resize_label: str) -> int:
    """sd-webui-controlnet's Pixel Perfect resolution: the image's short side at the scale its resize
    mode maps it onto the output with (cover for Crop and Resize / Just Resize, fit for Resize and
    Fill)."""
    return pixel_perfect_resolution(image_size, int(width), int(height), RESIZE_BY_LABEL[resize_label])


def param_slots(preprocessor: str | None) -> list[tuple[str, int, object]]:
    """The preprocessor's parameters the unit shows, as (kind, slot, dataclass field): numbers with a
    range on sliders, flags on checkboxes, a list of choices on a dropdown; free text (weights,
    pose JSON) and lists stay the server's (the HTTP API refuses them too)."""
    if not preprocessor or preprocessor == "none":
        return []
    cls = annotators.annotator_class(preprocessor)
    hints = typing.get_type_hints(cls)
    used = {"slider": 0, "check": 0, "choice": 0}
    room = {"slider": SLIDERS, "check": CHECKS, "choice": CHOICES}
    slots = []
    for f in cls.parameters():
        kind, _ = _base_type(hints[f.name])
        meta = f.metadata
        if f.name == "resolution":
            continue
        slot = ("check" if kind is bool else "choice" if meta.get("choices") else
                "slider" if kind in (int, float) and meta.get("lo") is not None and meta.get("hi") is not None
                else None)
        if slot is not None and used[slot] < room[slot]:
            slots.append((slot, used[slot], f))
            used[slot] += 1
    return slots


def annotator_values(preprocessor: str | None, sliders, checks, choices) -> dict:
    """The generic widgets' values -> the preprocessor's parameters by name."""
    values = {"slider": list(sliders), "check": list(checks), "choice": list(choices)}
    out = {}
    for kind, slot, f in param_slots(preprocessor):
        v = values[kind][slot]
        out[f.name] = int(v) if kind == "slider" and isinstance(f.default, int) else v
    return out


def slot_updates(preprocessor: str | None) -> list[dict]:
    """gr.update()s for the unit's generic widgets (sliders, checkboxes, dropdown, in that order):
    the preprocessor's parameters labelled, ranged and at their defaults; the rest hidden."""
    import gradio as gr  # local: heavy, only this path needs it

    shown = {(kind, slot): f for kind, slot, f in param_slots(preprocessor)}
    out = []
    for kind, n in (("slider", SLIDERS), ("check", CHECKS), ("choice", CHOICES)):
        for slot in range(n):
            f = shown.get((kind, slot))
            if f is None:
                out.append(gr.update(visible=False))
                continue
            label, info = f.name.replace("_", " ").capitalize(), f.metadata["help"]
            if kind == "slider":
                lo, hi = f.metadata["lo"], f.metadata["hi"]
                step = 1 if isinstance(f.default, int) else 0.01
                out.append(gr.update(visible=True, label=label, info=info, minimum=lo, maximum=hi, step=step,
                                     value=f.default))
            elif kind == "check":
                out.append(gr.update(visible=True, label=label, info=info, value=f.default))
            else:
                out.append(gr.update(visible=True, label=label, info=info, choices=list(f.metadata["choices"]),
                                     value=f.default))
    return out


def unit_header(i: int, enabled: bool, preprocessor: str | None, model: str | None) -> str:
    """The unit's accordion label: which units are active shows with them closed
    ("ControlNet Unit 0 [Canny]")."""
    if not enabled:
        return f"ControlNet Unit {i}"
    if model:
        tag = "MI " if is_mi(model) else "Omni " if "omni" in _words(model) else ""
        cond = model_condition(model)
        what = f"{tag}{type_label(cond)}" if cond else (tag.strip() or model)
    else:
        what = preprocessor if preprocessor and preprocessor != "none" else "enabled"
    return f"ControlNet Unit {i} [{what}]"


def recommended_window(pipe, model: str | None) -> tuple[float, float]:
    """The start / end a unit's sliders take when its model is chosen: the ControlNet's recommended
    window, else the base's, else 0 / 1 -- what the API gives a control that leaves them unset."""
    if pipe is None:  # a front with no worker up yet: the API's own defaults
        return 0.0, 1.0
    rec = {k: pipe.recommended[k] for k in ("start", "end") if k in pipe.recommended}
    rec.update({k: v for k, v in controlnet_recommendation(pipe.folder_of(model)).items()
                if k in ("start", "end")} if model else {})
    return float(rec.get("start", 0.0)), float(rec.get("end", 1.0))


def preprocessor_choices(names=None) -> list[tuple[str, str]]:
    """(label, annotator name) for the Preprocessor dropdown: a learned one's label says it is for
    world scenes (its one-line note, with what to use on photos, is in ``annotate --list``)."""
    names = ["none", *annotators.available()] if names is None else names
    return [(f"{n} (learned: world scenes, not photos)" if n in annotators.LEARNED else n, n) for n in names]


def current_base(backend):
    """The backend's base now, or None (a front whose workers are all gone)."""
    try:
        return backend.ui_base()[1]
    except ControlstackError:
        return None


def controlnet_names(backend) -> list[str]:
    base = current_base(backend)  # the ControlNets, T2I-Adapters and IP-Adapters a unit may use
    return sorted([*base.controlnets, *getattr(base, "ip_adapter_names", [])]) if base is not None else []
