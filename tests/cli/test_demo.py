"""``controlstack demo``: one labelled grid (a row per control, two combined, the photograph)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from controlstack.cli.main import main
from controlstack.io.png import read_parameters


def test_demo_writes_one_labelled_grid_with_parameters(tmp_path, capsys):
    from controlstack import Pipeline

    from controlstack import assets

    pipe = Pipeline.from_pretrained()
    names = sorted(n for n in pipe.controlnets if not n.startswith("mi-") and n != "omni")
    omni = ["photo -> depth + canny (omni)"] * ("omni" in pipe.controlnets and assets.predictor_folder() is not None)
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 0
    path = tmp_path / "demo.png"
    assert str(path) in capsys.readouterr().out
    grid = np.asarray(Image.open(path).convert("RGB"))
    meta = read_parameters(path)["controlstack"]
    labels = [part.split(":")[0] for part in meta["prompt"].split(" | ")]
    combined = ["depth + pose"] if {"depth", "pose"} <= set(names) else []
    assert labels == names + combined + ["photo canny"] * ("canny" in names) + omni
    assert meta["steps"] == 1 and meta["photo"] == "skimage.data.astronaut"
    # 4 tiles per row (condition | generated | real | no control) below a title bar
    size = meta["width"]
    assert grid.shape[1] > 4 * size and grid.shape[0] > len(labels) * size
    assert (grid[-size // 2] != 255).any()  # the last row holds pixels, not padding
