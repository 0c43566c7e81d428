"""What the models recommend, as a mixin of :class:`controlstack.pipeline.Pipeline`.

A model folder's ``controlstack.json`` (``io/settings.py``) recommends how it is sampled: the
ControlNets' mode and control window, the base's cfg and steps and the mode / window of the
ControlNets that declare none. A call's unset values (``None``) resolve here; explicit ones win.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controlstack.control import Control
from controlstack.errors import ControlstackError
from controlstack.io.settings import CONTROLNET_KEYS, controlnet_recommendation, model_folder, read_settings
from controlstack.models.adapter import is_adapter
from controlstack.tasks import BASE_CONDITION

#: ControlNets with fewer parameters than this (a tenth of SD-1.5's 361M) that declare no mode get a
#: one-time warning when sampled in the ``balanced`` fallback (:meth:`Pipeline.warn_if_weak`).
SMALL_CONTROLNET = 36_000_000
#: λ cap of the ``mi`` mode for ControlNets that were not trained with it (``Pipeline.mi_options``).
INFERENCE_ONLY_LAMBDA_MAX = 2.0


class Recommendations:
    """Resolution of a :class:`~controlstack.pipeline.Pipeline` call's unset settings (its ``recommended``
    base settings and ``controlnet()`` loader)."""

    def folder_of(self, model: Any):
        """The folder a control's model names for this pipeline (``io.settings.model_folder``): a
        ControlNet name of the base it was loaded from, else an existing folder. A pipeline built from
        components in memory (no ``source``) names its ControlNets by name only: none of them has a
        folder, so a name never picks up the bundled ControlNet's settings."""
        if self.source is None:
            return Path(model) if isinstance(model, (str, os.PathLike)) and Path(model).is_dir() else None
        return model_folder(model, self.source)

    def trained_with_mi(self, model: Any) -> bool:
        """Whether a Control's model was trained with the ``mi`` injection (its folder's
        ``controlstack.json`` says so; bundled names and paths are looked up; a model object counts as
        plain: pass ``mode_options={"lambda_max": 20}`` for an MI model loaded by hand)."""
        folder = self.folder_of(model)
        return folder is not None and (read_settings(folder).get("training") or {}).get("injection") == "mi"

    def control_recommendations(self, controls: Sequence[Control]) -> list[dict]:
        """Each control's recommended ControlNet settings (``io/settings.py``): its folder's mode with its
        options, else the mode the base declares for its ControlNets; its folder's ``start`` / ``end``,
        else the base's, key by key; a base's ``control_window`` over every folder's window."""
        base = {k: self.recommended[k] for k in CONTROLNET_KEYS if k in self.recommended}
        window = self.recommended.get("control_window")
        recs = []
        for c in controls:
            own = controlnet_recommendation(self.folder_of(c.model))
            rec = {**{k: v for k, v in base.items() if k in ("start", "end")}, **own}
            if window is not None:
                rec.update(start=float(window[0]), end=float(window[1]))
            if "mode" not in own and "mode" in base:  # a mode's options belong to it: never mixed across folders
                rec.update({k: base[k] for k in ("mode", "mode_options") if k in base})
            recs.append(rec)
        return recs

    def recommended_mode(self, controls: Sequence[Control]) -> tuple[str, dict | None] | None:
        """``(mode, mode_options)`` the controls' ControlNets all recommend (:meth:`control_recommendations`);
        None when one has none, they disagree, or there is no control (the mode then changes nothing,
        and the record keeps diffusers' default)."""
        if not controls:
            return None
        recs = self.control_recommendations(controls)
        modes = {(r.get("mode"), repr(r.get("mode_options") or {})) for r in recs}
        if len(modes) != 1 or "mode" not in recs[0]:
            return None
        return recs[0]["mode"], recs[0].get("mode_options")

    def settings(self, controls: Sequence[Control], steps, cfg, mode, mode_options) -> dict:
        """The values a call uses: each one given explicitly; else recommended -- the mode (with its
        options) by the controls' ControlNets, the base standing in for those that declare none, when
        they all recommend the same one (:meth:`recommended_mode`); cfg and steps by the base --; else the
        defaults (20 steps, CFG 7.5, ``balanced``). An explicit mode that equals the recommended one
        takes the recommended options unless options are given."""
        rec_mode, rec_options = self.recommended_mode(controls) or (None, None)
        if mode is None:
            mode, mode_options = rec_mode or "balanced", mode_options if mode_options is not None else rec_options
        elif mode == rec_mode and mode_options is None:
            mode_options = rec_options
        return {"steps": steps if steps is not None else self.recommended.get("steps", 20),
                "cfg": cfg if cfg is not None else self.recommended.get("cfg", 7.5),
                "mode": mode, "mode_options": dict(mode_options) if mode_options else None}

    def with_windows(self, controls: Sequence[Control]) -> list[Control]:
        """The controls with their window set: an explicit ``start`` / ``end``, else the recommended one
        (:meth:`control_recommendations`), else 0.0 / 1.0 (the whole run, diffusers' default). The
        caller's Control objects are left as they are (copies carry the resolved window)."""
        out = []
        for c, rec in zip(controls, self.control_recommendations(controls)):
            if c.start is not None and c.end is not None:
                out.append(c)
                continue
            start = c.start if c.start is not None else float(rec.get("start", 0.0))
            end = c.end if c.end is not None else float(rec.get("end", 1.0))
            if start > end:
                raise ControlstackError(f"control '{_name(c)}': window start={start:g}, end={end:g} (the unset one from "
                                        "the model's recommendation) is invalid; set both start and end")
            c = copy.copy(c)
            c.start, c.end = start, end
            out.append(c)
        return out

    def warn_if_weak(self, controls: Sequence[Control]) -> None:
        """One warning per pipeline when controls fall back to ``balanced`` though a small ControlNet
        (under :data:`SMALL_CONTROLNET` parameters) among them declares no mode and neither does the
        base: measured on the bundled model, such ControlNets follow their control weakly on both CFG
        halves (held-out canny F1 0.48 vs 0.80 in ``controlnet`` + uniform; README, "Control modes")."""
        if self._warned_weak or not controls or self.recommended_mode(controls) is not None:
            return
        for c, rec in zip(controls, self.control_recommendations(controls)):
            if c.model == BASE_CONDITION or "mode" in rec or is_adapter(self.controlnet(c.model)):
                continue  # modes act on ControlNets' residuals only
            n = sum(p.numel() for p in self.controlnet(c.model).parameters())
            if n < SMALL_CONTROLNET:
                self._warned_weak = True
                logging.getLogger("controlstack").warning(
                    f"ControlNet '{_name(c)}' ({n / 1e6:.1f}M parameters) declares no recommended mode and neither "
                    "does the base: sampled in 'balanced', a ControlNet this small follows its control weakly; pass "
                    "--mode controlnet --layer-weights uniform (mode='controlnet', mode_options={'layer_weights': "
                    "'uniform'}) or declare it in its controlstack.json")
                return

    def mi_options(self, mode: str, options: dict | None, controls: Sequence[Control]) -> dict | None:
        """``mode="mi"`` without an explicit ``lambda_max``: the paper's 20 when every control was
        trained with the mi injection, else :data:`INFERENCE_ONLY_LAMBDA_MAX`. A ControlNet trained
        with the plain sum puts out residuals that are small next to the U-Net's own features at the
        high-resolution skips (|c| / |h| ~ 0.14 for the bundled canny's first skip), where the balanced
        λ ~ |h|² / |c|² then saturates at 20: the injected feature is ~3x the U-Net's own and the
        image turns to multicoloured speckle (docs/mi.md, "inference-only mi")."""
        if mode != "mi" or not controls or "lambda_max" in (options or {}):
            return options
        if all(self.trained_with_mi(c.model) for c in controls):
            return options
        return {**(options or {}), "lambda_max": INFERENCE_ONLY_LAMBDA_MAX}


def _name(control: Control) -> str:
    return str(control.model) if isinstance(control.model, (str, os.PathLike)) else type(control.model).__name__
