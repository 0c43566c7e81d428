"""A model folder's own settings: ``controlstack.json`` next to its ``config.json``.

Schema (every key optional)::

    {"recommended": {"mode": "mi", "mode_options": {"reduce": "layer"}, "start": 0.0, "end": 1.0,
                     "cfg": 7.0, "steps": 20, "scheduler": "lcm", "control_window": [0.0, 1.0]},
     "training": {...the recipe options that made the model (injection, rebalancing, conservativity)...},
     "omni": {"tasks": [...]}}

``recommended`` is how the model is meant to be used. ``Pipeline`` uses it wherever the caller
leaves a value unset (``None``); an explicit value always wins:

* A ControlNet folder's ``mode`` / ``mode_options`` are how that ControlNet is sampled (a Minimal
  Impact ControlNet was trained with the ``mi`` injection in its forward pass, so it is sampled and
  combined in ``mode="mi"``), its ``start`` / ``end`` the control window (diffusers'
  ``control_guidance_start`` / ``_end``, in [0, 1], start <= end) of a ``Control`` that sets none.
* A base folder's ``cfg`` and ``steps`` are the call's; its ``mode`` / ``mode_options`` and
  ``start`` / ``end`` are the ones *its* ControlNets work best with: they stand in for every
  ControlNet that declares none (a user's own, a model object; the mode with its options as one,
  ``start`` and ``end`` each). So a bundled ControlNet and a user's undeclared one resolve to the
  same mode on the bundled base, and the call's mode is the one they all recommend (``balanced``,
  diffusers' default, when they disagree or nothing declares one; a small ControlNet left there
  warns, ``recommendations.py``).
* A base's ``control_window`` ``[start, end]`` is the window of every Control that sets none, over
  the ControlNets' own: a ControlNet's window is measured on its base's schedule, and a few-step
  student distilled under those ControlNets over the whole run (``training/lcm.py``) has another.

``training`` is a record for people and tools (``controlstack asym`` reads the mode from it when
none is given). The ControlNet recipe writes ``recommended`` into what it exports: the mode it
trained under (``mi``) or, for a plain or Omni run, the recommendation of ``init_from`` else the
base's (:func:`inherited`), so a ControlNet a user trains keeps the mode its parents were measured in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from controlstack import assets
from controlstack.errors import ControlstackError

SETTINGS = "controlstack.json"


def read_settings(folder: str | Path) -> dict:
    """The folder's settings, ``{}`` when it has none (a plain diffusers folder or a single file)."""
    path = Path(folder) / SETTINGS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ControlstackError(f"'{path}' is not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(data, dict):
        raise ControlstackError(f"'{path}' must hold a JSON object")
    return data


def controlnets_root(base: str | Path | None) -> Path:
    """Where a base's ControlNet names live: ``base/controlnets`` for a base folder in the bundle's
    layout (``Pipeline.from_pretrained`` loads those), else the bundle's own ``controlnets``."""
    own = Path(base) / "controlnets" if base is not None else None
    return own if own is not None and own.is_dir() else assets.BUNDLE_DIR / "controlnets"


def model_folder(model, base: str | Path | None = None) -> Path | None:
    """The folder a Control's model names, resolved as ``Pipeline.controlnet`` resolves it: a
    ControlNet name of the base (``base/controlnets/NAME`` for a base folder in the bundle's layout,
    else the bundled ControlNet of that name), else an existing folder; None for anything else (a
    single file, a model object, an unknown name)."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    root = controlnets_root(base)
    if Path(model).name == str(model) and (root / str(model)).is_dir():  # a plain name, names first
        return root / str(model)
    return Path(model) if Path(model).is_dir() else None


def training_record(folder: str | Path | None) -> dict:
    """A model folder's ``training`` record (``{}`` without one)."""
    record = read_settings(folder).get("training") if folder is not None and Path(folder).is_dir() else None
    return record if isinstance(record, dict) else {}


def write_settings(folder: str | Path, settings: dict) -> Path:
    path = Path(folder) / SETTINGS
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return path


def recommended_mode(folder: str | Path) -> tuple[str, dict] | None:
    """``(mode, mode_options)`` a model folder recommends, or None."""
    rec = read_settings(folder).get("recommended") or {}
    return (str(rec["mode"]), dict(rec.get("mode_options") or {})) if "mode" in rec else None


def _number_01(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


#: recommended key -> (type check, what it must be)
RECOMMENDED = {"mode": (lambda v: isinstance(v, str) and v != "", "a mode name"),
               "mode_options": (lambda v: isinstance(v, dict), "an object of mode options"),
               # the control window of a Control that sets none (diffusers' control_guidance_start / _end)
               "start": (_number_01, "a number in [0, 1]"),
               "end": (_number_01, "a number in [0, 1]"),
               "cfg": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number >= 0"),
               "steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
               # a base's sampler (a consistency-distilled student: lcm), where the call names none
               "scheduler": (lambda v: isinstance(v, str) and v != "", "a sampler name"),
               # a base's control window for every ControlNet, over their own: a few-step student
               # distilled under its ControlNets over the whole run, whose windows fit the teacher's schedule
               "control_window": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_number_01, v))
                                  and v[0] <= v[1], "[start, end] in [0, 1] with start <= end"),
               # the fast tier's graph precision for this model (docs/speed.md), where measured to matter
               "precision": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16")}
#: the recommended keys that describe how a ControlNet is sampled (a base's stand in for its ControlNets')
CONTROLNET_KEYS = ("mode", "mode_options", "start", "end")


def recommended(folder: str | Path | None) -> dict:
    """A model folder's validated ``recommended`` settings (``{}`` without any)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    rec = read_settings(folder).get("recommended") or {}
    where = Path(folder) / SETTINGS
    if not isinstance(rec, dict):
        raise ControlstackError(f"'{where}': recommended must be an object of settings, got {rec!r}")
    for key, value in rec.items():
        if key not in RECOMMENDED:
            raise ControlstackError(f"'{where}': unknown recommended key '{key}'; known: {', '.join(RECOMMENDED)}")
        ok, what = RECOMMENDED[key]
        if not ok(value):
            raise ControlstackError(f"'{where}': recommended {key} must be {what}, got {value!r}")
    if rec.get("start", 0.0) > rec.get("end", 1.0):
        raise ControlstackError(f"'{where}': recommended start {rec.get('start', 0.0)} is after end "
                                f"{rec.get('end', 1.0)}; need start <= end")
    return dict(rec)


def controlnet_recommendation(folder: str | Path | None) -> dict:
    """The ControlNet part (:data:`CONTROLNET_KEYS`) of a folder's validated recommendation."""
    rec = recommended(folder)
    return {k: rec[k] for k in CONTROLNET_KEYS if k in rec}


def inherited(init_from: str | Path | None, base: str | Path | None, injection: str = "sum") -> dict:
    """What a ControlNet trained with ``injection`` from ``init_from`` (or fresh, "") on ``base``
    should recommend: the ControlNet part of ``init_from``'s recommendation when it declares a mode
    and was trained with the same injection, else the base's (the mode the base declares for its
    ControlNets), else ``{}``. Fine-tuning keeps the architecture and the base, and with them the
    mode its residuals were measured to work in; a plain fine-tune of an MI model does not keep the
    ``mi`` injection its parent's mode assumes (λ would be capped as for a plain ControlNet)."""
    same = init_from and training_record(init_from).get("injection", "sum") == injection
    own = controlnet_recommendation(init_from) if same else {}
    if "mode" in own:
        return own
    return controlnet_recommendation(base) if base else {}
