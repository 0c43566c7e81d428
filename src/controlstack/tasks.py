"""THE table of condition types (tasks): each name with the annotator that makes its condition from
a photo, the world's column that holds its exact condition (an Omni ControlNet's tasks, in their
token order), and its control id in a ControlNet-Union model (xinsir's order; ProMax adds tile and
repaint). ``annotators.FOR_TASK``, ``training.omni_tasks.TASK_COLUMNS`` and
``models.union.UNION_TASKS`` are views of it. A leaf module: annotators, models and training
read it without reading each other."""

from __future__ import annotations

from typing import NamedTuple


class Task(NamedTuple):
    name: str
    annotator: str | None   # the annotator for photos (None: no annotator of its own)
    column: str | None      # the world column an Omni ControlNet trains on (None: not an Omni task)
    union: int | None       # ControlNet-Union's control id (None: no union type)


TASK_TABLE: tuple[Task, ...] = (
    # the Omni tasks, in their token order (trained models depend on it)
    Task("canny", "canny", "canny", 3),
    Task("depth", "depth", "depth", 1),
    Task("seg", "seg_estimate", "seg", 5),
    Task("pose", "pose_estimate", "pose", 0),
    Task("hed", "hed", "softedge", 2),
    Task("scribble", "scribble_hed", "scribble", 2),
    Task("normal", "normal_estimate", "normal", 4),
    # condition types with an annotator, not Omni tasks
    Task("softedge", "softedge", None, 2),
    Task("lineart", "lineart", None, 3),
    # names ControlNet-Union users give its types
    Task("openpose", None, None, 0),
    Task("pidi", None, None, 2),
    Task("mlsd", None, None, 3),
    Task("segment", None, None, 5),
    Task("tile", None, None, 6),
    Task("inpaint", None, None, 7),
    Task("repaint", None, None, 7),
)

FOR_TASK = {t.name: t.annotator for t in TASK_TABLE if t.annotator}
TASK_COLUMNS = {t.name: t.column for t in TASK_TABLE if t.column}
#: by control id, the common name first within an id
UNION_TASKS = {t.name: t.union for t in sorted((t for t in TASK_TABLE if t.union is not None), key=lambda t: t.union)}


#: ``Control(BASE_CONDITION, image)`` / ``--control base:IMAGE``: the condition of a base that reads it
#: itself -- Flux's Control models (Canny-dev, Depth-dev), whose input concatenates the condition's latents
BASE_CONDITION = "base"
