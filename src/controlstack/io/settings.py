"""A model folder's own settings: ``controlstack.json`` next to its ``config.json``.

Schema (every key optional)::

    {"recommended": {"mode": "mi", "mode_options": {"reduce": "layer"}},
     "training": {...the recipe options that made the model (injection, rebalancing, conservativity)...}}

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
