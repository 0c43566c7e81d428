"""One table per vocabulary (samplers, control modes, resize modes): the views derived from each agree."""

from __future__ import annotations

import pytest

from controlstack.injection import available
from controlstack.injection.modes import CONTROL_MODE_TABLE
from controlstack.io import png
from controlstack.io.images import RESIZE_MODES, RESIZE_TABLE
from controlstack.sampling import SCHEDULERS
from controlstack.sampling.schedulers import SAMPLER_BY_LABEL, SAMPLER_TABLE, WEBUI_SAMPLER_LABELS
from controlstack.serve import webui


@pytest.mark.parametrize("table", [SAMPLER_TABLE, CONTROL_MODE_TABLE, RESIZE_TABLE], ids=["samplers", "modes", "resize"])
def test_names_and_labels_unique_and_labels_map_back(table):
    names = [row.name for row in table]
    labels = [row.webui for row in table]
    assert len(set(names)) == len(names)
    assert len(set(labels)) == len(labels)
    back = {row.webui: row.name for row in table}
    assert all(back[row.webui] == row.name for row in table)


@pytest.mark.parametrize("table", [CONTROL_MODE_TABLE, RESIZE_TABLE], ids=["modes", "resize"])
def test_indices_contiguous_from_zero(table):
    assert sorted(row.index for row in table) == list(range(len(table)))


def test_sampler_views():
    names = [s.name for s in SAMPLER_TABLE]
    assert list(SCHEDULERS) == names
    assert list(WEBUI_SAMPLER_LABELS) == names and png.SAMPLERS == WEBUI_SAMPLER_LABELS
    assert {v: k for k, v in png.SAMPLERS.items()} == SAMPLER_BY_LABEL == webui.WEBUI_SAMPLERS


def test_control_mode_views():
    assert all(m.name in available() for m in CONTROL_MODE_TABLE)  # every sd-webui mode is a registered one
    assert png.CONTROL_MODES == {m.name: m.webui for m in CONTROL_MODE_TABLE}
    assert webui.WEBUI_CONTROL_MODES == {v: k for k, v in png.CONTROL_MODES.items()}
    assert webui.MODE_BY_INDEX == ["balanced", "prompt", "controlnet"]  # sd-webui's 0, 1, 2


def test_resize_mode_views():
    assert RESIZE_MODES == tuple(png.RESIZE_MODES) == tuple(r.name for r in RESIZE_TABLE)
    assert webui.WEBUI_RESIZE_MODES == {v: k for k, v in png.RESIZE_MODES.items()}
    assert webui.RESIZE_BY_INDEX == ["just_resize", "crop_and_resize", "resize_and_fill"]  # sd-webui's 0, 1, 2


def test_the_task_table_is_the_one_vocabulary_of_condition_types():
    from controlstack.annotators import FOR_TASK, available
    from controlstack.models.union import UNION_TASKS
    from controlstack.tasks import TASK_TABLE
    from controlstack.training.omni_tasks import TASK_COLUMNS

    names = [t.name for t in TASK_TABLE]
    assert len(names) == len(set(names))
    assert FOR_TASK == {t.name: t.annotator for t in TASK_TABLE if t.annotator}
    assert set(FOR_TASK.values()) <= set(available())  # every task's annotator is registered
    # the Omni tasks in their token order: trained models depend on it
    assert list(TASK_COLUMNS) == ["canny", "depth", "seg", "pose", "hed", "scribble", "normal"]
    assert UNION_TASKS["canny"] == 3 and UNION_TASKS["openpose"] == 0 and max(UNION_TASKS.values()) == 7
    assert list(UNION_TASKS.values()) == sorted(UNION_TASKS.values())
