"""Typed training configs: one dataclass per recipe, validated on construction.

YAML is only the storage format (torchtune keeps recipes and configs apart the same way): a file
is read into a dict, every key is checked against the dataclass's fields, and the dataclass's
``__post_init__`` validates the values. Anything a user can get wrong raises
:class:`~controlstack.errors.ControlstackError` with one line naming the key and the fix.

``TrainConfig`` holds what every recipe shares (data, optimiser, schedule, checkpointing,
validation, precision); ``vae.py``, ``base.py`` and ``controlnet.py`` extend it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml
from typing_extensions import Self

from controlstack.errors import ControlstackError, require

MIXED_PRECISION = ("no", "bf16", "auto")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")

C = TypeVar("C", bound="TrainConfig")


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Coerce YAML scalars to the field's type (int -> float, list -> tuple) or fail with one line."""
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ())
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ControlstackError(f"config key '{name}' must not be empty; give it a value")
    if origin is not None and type(None) in args:  # Optional[X] -> X
        inner = [a for a in args if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else Any
        origin, args = getattr(hint, "__origin__", None), getattr(hint, "__args__", ())
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ControlstackError(f"config key '{name}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ControlstackError(f"config key '{name}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ControlstackError(f"config key '{name}' must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ControlstackError(f"config key '{name}' must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise ControlstackError(f"config key '{name}' must be a string, got {value!r}")
        return str(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ControlstackError(f"config key '{name}' must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    return value


def coerce_fields(config) -> None:
    """Check and coerce every field of a dataclass instance to its annotated type (one-line errors)."""
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        setattr(config, f.name, _check_type(f.name, getattr(config, f.name), hints[f.name]))


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict, with one-line errors for a missing file or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ControlstackError(f"config file '{path}' not found; pass an existing YAML file")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ControlstackError(f"config file '{path}' is not valid YAML{where}; fix its syntax") from None


def check_keys(cls, values: dict) -> None:
    """Every key of ``values`` must be a field of dataclass ``cls``."""
    if not isinstance(values, dict):
        raise ControlstackError(f"a {cls.__name__} must be a mapping of keys to values, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ControlstackError(f"unknown config key '{key}' for {cls.__name__}; known keys: {', '.join(sorted(names))}")


@dataclass
class TrainConfig:
    """Fields shared by every recipe. Steps count optimiser updates (after gradient accumulation)."""

    # data: an HF datasets folder (datasets.save_to_disk / `controlstack world export`)
    data: str = ""
    validation_data: str = ""  # empty: the first rows of ``data``
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 128
    # object-weighted loss: objects are ~10% of a world image but carry what captions name (their
    # colours); a plain mean spends the model's capacity on sky and ground and greys them out
    object_column: str = ""    # grey id map column (the world's ``instances``) naming object pixels
    object_min_id: int = 2     # ids >= this are objects (world: 0 sky, 1 ground)
    object_weight: float = 0.0  # extra loss weight on object pixels: w = 1 + object_weight; 0: plain mean
    # output and run length
    output_dir: str = "outputs/train"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    num_workers: int = 0
    # optimiser (AdamW) and schedule
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    # precision: "auto" measures bf16 against fp32 at start-up and keeps the faster one
    mixed_precision: str = "no"
    # bookkeeping
    checkpoint_every: int = 500
    checkpoints_total_limit: int = 3
    validate_every: int = 500
    log_every: int = 10
    num_validation_images: int = 4

    def __post_init__(self) -> None:
        coerce_fields(self)
        positive = ("resolution", "max_steps", "batch_size", "gradient_accumulation_steps",
                    "checkpoint_every", "checkpoints_total_limit", "validate_every", "log_every")
        for name in positive:
            require(getattr(self, name) >= 1, f"config key '{name}' must be >= 1, got {getattr(self, name)}")
        require(self.num_workers >= 0, f"config key 'num_workers' must be >= 0, got {self.num_workers}")
        require(self.num_validation_images >= 0, "config key 'num_validation_images' must be >= 0")
        require(self.lr_warmup_steps >= 0, "config key 'lr_warmup_steps' must be >= 0")
        require(self.learning_rate > 0, f"config key 'learning_rate' must be > 0, got {self.learning_rate}")
        require(self.max_grad_norm > 0, "config key 'max_grad_norm' must be > 0")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
                "config keys 'adam_beta1' / 'adam_beta2' must be in [0, 1)")
        require(self.mixed_precision in MIXED_PRECISION,
                f"config key 'mixed_precision' is '{self.mixed_precision}'; choose one of "
                f"{', '.join(MIXED_PRECISION)}")
        require(self.lr_scheduler in LR_SCHEDULERS,
                f"config key 'lr_scheduler' is '{self.lr_scheduler}'; choose one of {', '.join(LR_SCHEDULERS)}")
        require(self.data != "", "config key 'data' is missing; set it to a datasets folder (save_to_disk)")
        require(self.object_weight >= 0 and self.object_min_id >= 1,
                "config keys 'object_weight' / 'object_min_id' must be >= 0 / >= 1")
        require(self.object_weight == 0 or self.object_column,
                "config key 'object_weight' needs 'object_column' (a grey id map column, e.g. instances)")

    # -- storage -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict, **overrides: Any) -> Self:
        check_keys(cls, values)
        merged = {**values, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Self:
        return cls.from_dict(read_yaml(path), **overrides)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def list_field(*values: Any):
    """A tuple default for a dataclass field (tuples keep configs hashable and immutable)."""
    return field(default_factory=lambda: tuple(values))
