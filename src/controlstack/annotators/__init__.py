"""Annotators: photo (or label map, depth map, pose JSON) -> ControlNet condition image, offline.

One registry; the names are contracts (the core's ``generate --preprocess`` calls
``get(control_name)(image)``)::

    from controlstack import annotators
    edges = annotators.get("canny", low_threshold=50)(photo)      # PIL RGB
    annotators.available()                                        # every name

Families live one per module (``edges``, ``lines``, ``transforms``, ``normal``, ``seg``, ``pose``,
``learned``); they are imported on first use so ``import controlstack.annotators.pose`` stays light
(numpy + OpenCV) for the world generator.
"""

from __future__ import annotations

import importlib
import re
from os import PathLike
from pathlib import PurePath

from controlstack.errors import ControlstackError
from controlstack.io.settings import model_folder, training_record
from controlstack.tasks import FOR_TASK  # the task table: each condition type's annotator

# name -> "module:Class" (modules relative to this package)
_REGISTRY = {
    "canny": "edges:Canny",
    "lines": "lines:Lines",
    "softedge": "edges:SoftEdge",
    "scribble": "edges:Scribble",
    "lineart": "edges:Lineart",
    "shuffle": "transforms:Shuffle",
    "tile": "transforms:Tile",
    "inpaint": "transforms:Inpaint",
    "normal": "normal:NormalFromDepth",
    "seg": "seg:Seg",
    "pose": "pose_annotator:Pose",
    "binary": "transforms:Binary",
    "invert": "transforms:Invert",
    # learned: the bundled multi-task predictor (OmniControlNet stage 1) or the user's weights
    "depth": "learned:Depth",
    "hed": "learned:Hed",
    "scribble_hed": "learned:ScribbleHed",
    "normal_estimate": "learned:NormalEstimate",
    "seg_estimate": "learned:SegEstimate",
    "pose_estimate": "learned:PoseEstimate",
}
LEARNED = ("depth", "hed", "scribble_hed", "normal_estimate", "seg_estimate", "pose_estimate")
#: What to use on a photograph instead of a learned annotator: the bundled predictor saw only
#: 128-px world renders, so on photos it answers with the world's priors (a sky / ground split for
#: depth and seg, blurry depth-like soft edges, a random scribble net); real weights (weights=DIR,
#: controlnet_aux's default detector named) or a classical annotator are what works there.
ON_PHOTOS = {
    "depth": "weights=DIR (local MiDaS weights; no classical annotator estimates depth)",
    "hed": "softedge, canny, lineart or lines, or weights=DIR (HED)",
    "scribble_hed": "scribble, or weights=DIR (HED)",
    "normal_estimate": "weights=DIR (NormalBae), or normal on a real depth map",
    "seg_estimate": "weights=DIR with detector=CLASS, or seg on a label map you have",
    "pose_estimate": "weights=DIR (OpenPose), or pose on a pose JSON",
}


def photo_note(name: str) -> str:
    """One line for where users choose an annotator ("" for the classical ones): a learned one is
    reliable on the procedural world's scenes, not on photographs, and what to use there."""
    if name not in LEARNED:
        return ""
    return (f"learned, trained on the procedural world: reliable on its scenes, not on photographs; "
            f"on photos use {ON_PHOTOS[name]}")


def available() -> list[str]:
    """All registered annotator names, in registry order."""
    return list(_REGISTRY)


def annotator_class(name: str):
    """The class registered under ``name`` (unknown names fail listing the known ones)."""
    if name not in _REGISTRY:
        raise ControlstackError(f"unknown annotator '{name}'; choose one of {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get(name: str, **params):
    """A configured annotator: ``get("canny", low_threshold=50)(image) -> PIL RGB``."""
    from controlstack.annotators.base import unknown_param_message  # local: heavy, only this path needs it

    cls = annotator_class(name)
    known = {f.name for f in cls.parameters()} | ({"loader"} if name in LEARNED else set())
    for key in params:
        if key not in known:
            raise ControlstackError(unknown_param_message(cls, key))
    return cls(**params)


#: words of ControlNet names that spell a condition type another way (sd-webui's model names)
NAME_WORDS = {"openpose": "pose", "mlsd": "lines", "normalbae": "normal"}


def _known(condition) -> bool:
    return isinstance(condition, str) and (condition in _REGISTRY or condition in FOR_TASK)


def condition_in_name(name: str) -> str | None:
    """The condition type a ControlNet's name names, read from its last word backwards: ``mi-canny``
    -> canny, ``control_v11p_sd15_openpose.safetensors`` -> pose; a recipe's output folder ``model``
    by its parent's name (``runs/seg-finetune/model`` -> seg). None when no word does."""
    path = PurePath(name)
    parts = [path.name] + ([path.parent.name] if path.name == "model" else [])
    for part in parts:
        for word in reversed(re.split(r"[^a-z0-9]+", part.lower().removesuffix(".safetensors"))):
            if _known(word := NAME_WORDS.get(word, word)):
                return word
    return None


def controlnet_condition(model, folder=None) -> str | None:
    """The condition a ControlNet takes: the one its folder's training record names (the recipes
    write it), else a word of its name (:func:`condition_in_name`); None when neither is a known
    condition type."""
    recorded = training_record(folder).get("condition")
    if _known(recorded):
        return recorded
    return condition_in_name(str(model)) if isinstance(model, (str, PathLike)) else None


def for_control(model, task: str | None = None, base=None) -> str:
    """The annotator ``preprocess=True`` runs for a control: its Omni task's (:func:`for_task`), else
    the one of the condition its ControlNet takes (:func:`controlnet_condition`; ``model`` resolved as
    a ControlNet name of ``base``, else a path). Unknown: a one-line error asking for one by name."""
    if task:
        return for_task(task)

    condition = controlnet_condition(model, model_folder(model, base))
    if condition is None:
        what = f"'{model}'" if isinstance(model, (str, PathLike)) else f"a {type(model).__name__}"
        raise ControlstackError(f"cannot tell which annotator control model {what} needs to preprocess its image; "
                                "name one (preprocess='canny'; on the command line --module I:canny)")
    return condition if condition in _REGISTRY else for_task(condition)


def for_task(task: str) -> str:
    """The annotator name for an Omni task (a task that is itself an annotator name maps to it)."""
    if task in FOR_TASK:
        return FOR_TASK[task]
    if task in _REGISTRY:
        return task
    raise ControlstackError(f"no annotator makes the condition of task '{task}'; tasks with one: "
                            f"{', '.join(FOR_TASK)}")


__all__ = ["FOR_TASK", "LEARNED", "ON_PHOTOS", "annotator_class", "available", "condition_in_name",
           "controlnet_condition", "for_control", "for_task", "get", "photo_note"]
