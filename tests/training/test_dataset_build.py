"""``controlstack dataset build`` (``training/dataset_build.py``): photos + annotators -> a datasets folder
the recipes read; a corrupt photo is skipped and listed; a build killed after some chunks resumes
without redoing them and gives the one-shot dataset; two ranks give the one-process dataset."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlstack.errors import ControlstackError


@pytest.fixture()
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        a = np.zeros((40, 48, 3), np.uint8)
        a[8 + i:30, 10:20 + 2 * i] = rng.integers(50, 255, 3)
        Image.fromarray(a).save(folder / ("sub" if i % 3 == 0 else ".") / f"p{i}.png")
    (folder / "p1.txt").write_text("a red box\n")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    return folder


def rows(path):
    from datasets import load_from_disk

    d = load_from_disk(str(path))
    return [(r["text"], np.asarray(r["image"]).tobytes(), np.asarray(r["canny"]).tobytes()) for r in d]


def test_cli_builds_a_dataset_and_lists_what_it_skipped(photos, tmp_path):
    from datasets import load_from_disk

    from controlstack.cli.main import main

    out = tmp_path / "data"
    assert main(["dataset", "build", str(photos), "--annotators", "canny", "--out", str(out), "--size", "32",
                 "--quiet"]) == 0
    d = load_from_disk(str(out))
    assert len(d) == 7 and d.column_names == ["image", "text", "canny"]
    assert min(d[0]["image"].size) == 32 and d[0]["canny"].size == d[0]["image"].size
    assert "a red box" in d["text"] and d["text"].count("") == 6
    assert "broken.jpg" in (out / "skipped.txt").read_text()
    assert not (tmp_path / ".data.parts").exists()
    # what the recipes read: the ControlNet recipe's columns
    from controlstack.training.data import load_image_dataset

    assert len(load_image_dataset(str(out), {"image": "image", "text": "text", "canny": "hint"})) == 7


def test_a_killed_build_resumes_and_two_ranks_equal_one(photos, tmp_path):
    from controlstack.training import dataset_build as b

    one = b.build_dataset(photos, tmp_path / "one", ["canny"], chunk=2, progress=False)
    # "killed" after chunk 1: its part is on disk, the others are not
    paths = b.list_photos(photos)
    parts = tmp_path / ".two.parts"
    parts.mkdir()
    texts = b.read_captions(photos, paths, None)
    b._write_part(parts, 1, *b.annotate_chunk(([str(p) for p in paths[2:4]], texts[2:4], ["canny"], 0)), ["canny"])
    calls = []
    real = b.annotate_chunk
    b.annotate_chunk = lambda job: calls.append(job[0]) or real(job)
    try:
        resumed = b.build_dataset(photos, tmp_path / "two", ["canny"], chunk=2, progress=False)
    finally:
        b.annotate_chunk = real
    assert len(calls) == 3 and str(paths[2]) not in sum(calls, [])  # chunk 1 was not redone
    assert rows(resumed) == rows(one)
    # two ranks: rank 1 builds its chunks and leaves; rank 0 builds its own and merges
    assert b.build_dataset(photos, tmp_path / "r", ["canny"], chunk=2, rank=1, world=2, progress=False) is None
    merged = b.build_dataset(photos, tmp_path / "r", ["canny"], chunk=2, rank=0, world=2, progress=False)
    assert rows(merged) == rows(one)
    # a resume of another build (other annotators) is refused rather than mixed in
    (tmp_path / ".x.parts").mkdir()
    (tmp_path / ".x.parts" / "build.json").write_text("{}")
    with pytest.raises(ControlstackError, match="holds the parts of another build"):
        b.build_dataset(photos, tmp_path / "x", ["canny"], chunk=2, progress=False)
    # local worker processes share the chunks the same way
    assert rows(b.build_dataset(photos, tmp_path / "w", ["canny"], chunk=2, workers=2, progress=False)) == rows(one)


def test_bad_arguments_are_one_line(photos, tmp_path):
    from controlstack.training.dataset_build import build_dataset

    with pytest.raises(ControlstackError, match="cany"):
        build_dataset(photos, tmp_path / "x", ["cany"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ControlstackError, match="no images"):
        build_dataset(tmp_path / "empty", tmp_path / "y", ["canny"], progress=False)
    (tmp_path / "c.csv").write_text("name,caption\np0.png,x\n")
    with pytest.raises(ControlstackError, match="needs the columns file,text"):
        build_dataset(photos, tmp_path / "z", ["canny"], captions=tmp_path / "c.csv", progress=False)
