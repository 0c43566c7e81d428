"""Export to a datasets folder: schema, exact round trip, worker independence, overwrite rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Image, Value, load_from_disk

from controlstack.errors import ControlstackError
from controlstack.world import COLUMNS, WorldConfig, render, sample_scene
from controlstack.world.export import export_dataset

SMALL = WorldConfig(size=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "ds"
    export_dataset(out, scenes=5, seed=11, config=SMALL, workers=1, progress=False)
    return out


def test_schema_and_reload(exported):
    ds = load_from_disk(str(exported))
    assert ds.column_names == list(COLUMNS)
    assert len(ds) == 5
    for c in COLUMNS:
        assert isinstance(ds.features[c], Value if c in ("text", "keypoints") else Image), c
    row = ds[0]
    assert row["image"].mode == "RGB" and row["image"].size == (64, 64)
    for c in ("depth", "instances", "softedge", "canny", "scribble"):
        assert row[c].mode == "L", c
    assert json.loads(ds.info.description)["seed"] == 11
    assert sorted(p.name for p in exported.parent.iterdir()) == ["ds"]  # no temp dir left behind


def test_rows_are_lossless_renders_of_seed_and_index(exported):
    ds = load_from_disk(str(exported))
    for i in (0, 4):
        want = render(sample_scene([11, i], SMALL), 64)
        got = ds[i]
        for c in COLUMNS:
            if isinstance(want[c], str):
                assert got[c] == want[c], c
            else:
                np.testing.assert_array_equal(np.asarray(got[c]), want[c], err_msg=c)


def test_workers_do_not_change_the_data(exported, tmp_path):
    out = export_dataset(tmp_path / "two", scenes=5, seed=11, config=SMALL, workers=2, progress=False)
    a, b = load_from_disk(str(exported)), load_from_disk(str(out))
    assert a.data.table.equals(b.data.table)


def test_refuses_non_empty_out_unless_overwrite(exported, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ControlstackError, match="--overwrite"):
        export_dataset(target, scenes=1, config=SMALL, progress=False)
    assert (target / "keep.txt").read_text() == "mine"
    export_dataset(target, scenes=2, config=SMALL, overwrite=True, progress=False)
    assert not (target / "keep.txt").exists() and len(load_from_disk(str(target))) == 2
    with pytest.raises(ControlstackError, match="integer >= 1"):
        export_dataset(tmp_path / "none", scenes=0, config=SMALL, progress=False)
    assert not (tmp_path / "none").exists()


def test_a_crash_leaves_nothing_at_out(tmp_path, monkeypatch):
    from controlstack.world import export

    def boom(job):
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(export, "_render_chunk", boom)
    with pytest.raises(RuntimeError, match="crashed"):
        export.export_dataset(tmp_path / "ds", scenes=3, config=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []
