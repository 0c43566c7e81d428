"""What every annotator shares: typed, validated parameters and the image -> condition contract.

An annotator is a small dataclass. Its fields are the user-facing parameters, each declared with
:func:`param` (help text plus a valid range or a list of choices); construction validates them and
fails with one line naming the parameter and its valid range. ``__call__(image)`` takes anything
``io.images.validate_image`` accepts (PIL in any mode, numpy arrays) and returns a PIL RGB condition.

Resolution follows sd-webui-controlnet's "Preprocessor Resolution": the image is scaled so its
short side equals ``resolution`` before the annotator runs (``None``: the image's own size), and the
condition comes back at that size. The core picks ``resolution`` with
``controlstack.io.images.pixel_perfect_resolution`` ("pixel perfect"); :meth:`Annotator.pixel_perfect`
is the one-liner for that.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from controlstack.errors import ControlstackError
from controlstack.io.images import (
    MAX_SIDE,
    pixel_perfect_resolution,
    resize_image,
    to_rgb,
    validate_image,
)


def param(default: Any, help: str, lo: float | None = None, hi: float | None = None,
          choices: tuple | None = None):
    """A dataclass field carrying what validation, ``--list`` and the docs need."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices})


def _range_text(meta: dict) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f"in [{lo:g}, {hi:g}]"
    if lo is not None:
        return f">= {lo:g}"
    if hi is not None:
        return f"<= {hi:g}"
    return "valid"


def _base_type(hint) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of an annotation like ``int | None``."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    origin = typing.get_origin(hint)
    return (origin or hint), optional


@dataclass(kw_only=True)
class Annotator:
    """Base class: subclasses set ``NAME`` and implement :meth:`detect` on an RGB uint8 array."""

    NAME: ClassVar[str] = ""
    LEARNED: ClassVar[bool] = False

    resolution: int | None = param(
        512, "short side (px) the annotator runs at and the condition comes back at; "
             "none = the image's own size (pixel perfect sets this)", lo=1, hi=MAX_SIDE)

    # ------------------------------------------------------------------ parameters
    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.metadata:
                continue
            self._check_field(f, hints[f.name])
        self.check()

    def _check_field(self, f: dataclasses.Field, hint) -> None:
        value = getattr(self, f.name)
        kind, optional = _base_type(hint)
        meta = f.metadata
        where = f"{self.NAME}: {f.name}"
        if value is None:
            if optional:
                return
            raise ControlstackError(f"{where} must be set ({_range_text(meta)})")
        if kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise ControlstackError(f"{where} must be true or false, got {value!r}")
            return
        if kind in (int, float):
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            ok = ok and bool(np.isfinite(float(value)))
            if kind is int and ok and float(value) != int(value):
                ok = False
            if not ok:
                noun = "an integer" if kind is int else "a number"
                raise ControlstackError(f"{where} must be {noun} {_range_text(meta)}, got {value!r}")
            lo, hi = meta.get("lo"), meta.get("hi")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ControlstackError(f"{where} must be {_range_text(meta)}, got {value!r}")
            # store plain Python numbers so dataclasses.replace / repr stay predictable
            object.__setattr__(self, f.name, kind(value))
        if kind is tuple:
            try:
                vals = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ControlstackError(f"{where} must be a list of numbers {_range_text(meta)}, got {value!r}")
            lo, hi = meta.get("lo"), meta.get("hi")
            if not vals or any((lo is not None and v < lo) or (hi is not None and v > hi) for v in vals):
                raise ControlstackError(f"{where} must be a non-empty list of numbers {_range_text(meta)}, "
                                        f"got {value!r}")
            object.__setattr__(self, f.name, vals)
        if meta.get("choices") and value not in meta["choices"]:
            raise ControlstackError(f"{where} must be {_range_text(meta)}, got {value!r}")

    def check(self) -> None:
        """Cross-parameter rules (e.g. low <= high); subclasses override."""

    @classmethod
    def parameters(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata]

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str, str]]:
        """(name, type, default, valid range, help) per parameter: for ``--list`` and the docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in cls.parameters():
            kind, optional = _base_type(hints[f.name])
            tname = kind.__name__ + (" | none" if optional else "")
            rng = "true or false" if kind is bool else _range_text(f.metadata)
            if kind is str and not f.metadata.get("choices"):
                rng = "text"
            rows.append((f.name, tname, f.default, rng, f.metadata["help"]))
        return rows

    @classmethod
    def parse(cls, pairs: dict[str, str]) -> dict[str, Any]:
        """Command-line strings -> typed values, by each field's annotation."""
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in cls.parameters()}
        out: dict[str, Any] = {}
        for key, text in pairs.items():
            if key not in known:
                raise ControlstackError(unknown_param_message(cls, key))
            kind, optional = _base_type(hints[key])
            t = text.strip()
            where = f"{cls.NAME}: {key}"
            rng = _range_text(known[key].metadata)
            if optional and t.lower() in ("none", "null", ""):
                out[key] = None
                continue
            try:
                if kind is bool:
                    low = t.lower()
                    if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError(t)
                    out[key] = low in ("true", "1", "yes", "on")
                elif kind is int:
                    out[key] = int(t)
                elif kind is float:
                    out[key] = float(t)
                elif kind is tuple:
                    out[key] = tuple(float(v) for v in t.split(",") if v.strip())
                else:
                    out[key] = t
            except ValueError:
                noun = {bool: "true or false", int: f"an integer {rng}", float: f"a number {rng}",
                        tuple: f"comma-separated numbers {rng}"}[kind]
                raise ControlstackError(f"{where} must be {noun}, got '{text}'")
        return out

    # ------------------------------------------------------------------ running
    def pixel_perfect(self, image_size: tuple[int, int], width: int, height: int,
                      resize_mode: str = "just_resize") -> Annotator:
        """A copy whose resolution maps ``image_size`` 1:1 onto the ``width`` x ``height`` target."""
        res = pixel_perfect_resolution(image_size, width, height, resize_mode)
        return dataclasses.replace(self, resolution=max(1, min(MAX_SIDE, res)))

    def target_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) the condition is computed at: short side scaled to ``resolution``."""
        w, h = size
        if self.resolution is None:
            return w, h
        k = self.resolution / min(w, h)
        tw, th = max(1, round(w * k)), max(1, round(h * k))
        if max(tw, th) > MAX_SIDE:
            raise ControlstackError(
                f"{self.NAME}: resolution {self.resolution} makes this {w}x{h} image {tw}x{th}, larger "
                f"than {MAX_SIDE}; lower resolution to at most {int(MAX_SIDE * min(w, h) / max(w, h))}")
        return tw, th

    def prepare(self, image) -> np.ndarray:
        """User image -> validated RGB uint8 array at the annotator's resolution."""
        rgb = to_rgb(validate_image(image))
        tw, th = self.target_size(rgb.size)
        rgb = resize_image(rgb, tw, th, "just_resize")
        return np.asarray(rgb, dtype=np.uint8)

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """RGB uint8 HxWx3 -> condition: uint8 or float-in-[0,1], HxW or HxWx3."""
        raise NotImplementedError

    def __call__(self, image) -> Image.Image:
        return to_condition(self.detect(self.prepare(image)))


def to_condition(a: np.ndarray) -> Image.Image:
    """uint8 / float [0,1] arrays, 1 or 3 channels -> PIL RGB (the ControlNet hint convention)."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    if a.ndim == 2:
        import cv2  # local: heavy, only this path needs it

        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_GRAY2RGB)  # ~4x faster than np.repeat
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def unknown_param_message(cls: type[Annotator], key: str) -> str:
    names = ", ".join(f.name for f in cls.parameters())
    return f"{cls.NAME} has no parameter '{key}'; valid parameters: {names}"


def gray(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma as float32 in [0, 1] (OpenCV's RGB2GRAY weights)."""
    import cv2  # local: heavy, only this path needs it

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
