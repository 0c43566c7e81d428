"""``controlstack demo``: one labelled grid (a row per control, two combined, the photograph)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from controlstack.cli.main import main
from controlstack.io.png import read_parameters

TOO_LONG = "the text encoder reads"  # prompting.check_prompt's length warning


def test_demo_writes_one_labelled_grid_with_parameters(tmp_path, capsys, caplog):
    from controlstack import Pipeline, assets
    from controlstack.cli.demo import scene

    pipe = Pipeline.from_pretrained()
    names = sorted(n for n in pipe.controlnets if not n.startswith("mi-") and n != "omni")
    omni = ["photo -> depth + canny (omni)"] * ("omni" in pipe.controlnets and assets.predictor_folder() is not None)
    window = pipe.tokenizer.model_max_length
    captions = [scene(i, pipe.native_size)["text"] for i in range(len(names) + 1)]
    assert max(len(pipe.tokenizer(c, verbose=False).input_ids) for c in captions) > window  # a caption the encoder cuts
    with caplog.at_level("WARNING", logger="controlstack"):
        assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 0
    assert TOO_LONG not in caplog.text  # the project's own captions: no warning
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


def test_a_long_user_prompt_still_warns_and_project_prompts_only_silence_the_length(caplog):
    from controlstack import Pipeline
    from controlstack.prompting import project_prompts

    pipe = Pipeline.from_pretrained()
    long = "a red cube on grass, " * 8
    with caplog.at_level("WARNING", logger="controlstack"):
        pipe.check_prompt(long)
    assert f"prompt is {len(pipe.tokenizer(long, verbose=False).input_ids)} tokens; {TOO_LONG} " \
           f"{pipe.tokenizer.model_max_length}, the rest is ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="controlstack"), project_prompts():
        pipe.check_prompt(long)
        pipe.check_prompt("a red zebra")  # an unknown word is still news
    assert TOO_LONG not in caplog.text and "words the model was not trained on: zebra" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="controlstack"):
        pipe.check_prompt(long)  # the context is left behind on exit
    assert TOO_LONG in caplog.text
