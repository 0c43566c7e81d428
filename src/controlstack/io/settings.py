"""A model folder's own settings: ``controlstack.json`` next to its ``config.json``.

Schema (every key optional)::

    {"recommended": {"mode": "mi", "mode_options": {"reduce": "layer"}, "cfg": 7.0, "steps": 20},
     "training": {...the recipe options that made the model (injection, rebalancing, conservativity)...},
     "omni": {"tasks": [...]}}

A base model folder may hold one too (its ``recommended`` cfg and steps, or a mode for every
control); a ControlNet folder's ``recommended`` mode is how that ControlNet is meant to be sampled.
``Pipeline`` uses a recommendation wherever the caller leaves a value unset (``None``).

``recommended`` is how the model is meant to be used: a Minimal Impact ControlNet was trained with
the ``mi`` injection in its forward pass, so it is sampled (and combined with others) in
``mode="mi"``. ``training`` is a record for people and tools (``controlstack asym`` reads the mode
from it when none is given).
"""

from __future__ import annotations

import json
from pathlib import Path

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


def model_folder(model) -> Path | None:
    """The folder a Control's model names: an existing folder, else the bundled ControlNet of that
    name; None for anything else (a single file, a model object, an unknown name)."""
    import os

    if not isinstance(model, (str, os.PathLike)):
        return None
    if Path(model).is_dir():
        return Path(model)
    from controlstack import assets

    folder = assets.BUNDLE_DIR / "controlnets" / str(model)
    return folder if folder.is_dir() else None


def write_settings(folder: str | Path, settings: dict) -> Path:
    path = Path(folder) / SETTINGS
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return path


def recommended_mode(folder: str | Path) -> tuple[str, dict] | None:
    """``(mode, mode_options)`` a model folder recommends, or None."""
    rec = read_settings(folder).get("recommended") or {}
    return (str(rec["mode"]), dict(rec.get("mode_options") or {})) if "mode" in rec else None


#: recommended key -> (type check, what it must be)
RECOMMENDED = {"mode": (lambda v: isinstance(v, str) and v != "", "a mode name"),
               "mode_options": (lambda v: isinstance(v, dict), "an object of mode options"),
               "cfg": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number >= 0"),
               "steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
               # the fast tier's graph precision for this model (docs/speed.md), where measured to matter
               "precision": (lambda v: v in ("fp32", "bf16"), "fp32 or bf16")}


def recommended(folder: str | Path | None) -> dict:
    """A model folder's validated ``recommended`` settings (``{}`` without any)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    rec = read_settings(folder).get("recommended") or {}
    for key, value in rec.items():
        if key not in RECOMMENDED:
            raise ControlstackError(f"'{Path(folder) / SETTINGS}': unknown recommended key '{key}'; known: "
                                    f"{', '.join(RECOMMENDED)}")
        ok, what = RECOMMENDED[key]
        if not ok(value):
            raise ControlstackError(f"'{Path(folder) / SETTINGS}': recommended {key} must be {what}, got {value!r}")
    return dict(rec)
