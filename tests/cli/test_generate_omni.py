"""``controlstack generate`` with an Omni ControlNet: ``--control MODEL/TASK:IMAGE`` and the
integrated ``--from-image PHOTO --tasks ...`` path, on a tiny base folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack.cli.generate import split_task
from controlstack.cli.main import main
from controlstack.io.png import read_parameters

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--no-progress", "--seed", "4"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from controlstack.models.task_tokens import save_task_tokens
    from controlstack.models.tiny import tiny_controlnet, tiny_sd
    from controlstack.training.base import export_pipeline

    root = tmp_path_factory.mktemp("omni-cli")
    sd = tiny_sd(seed=0, max_length=16)
    export_pipeline(root / "base", sd.vae, sd.text_encoder, sd.tokenizer, sd.unet)
    tiny_controlnet(sd.unet, seed=7).save_pretrained(root / "omni")
    g = torch.Generator().manual_seed(0)
    save_task_tokens({t: torch.randn(sd.text_encoder.config.hidden_size, generator=g) for t in ("canny", "depth")},
                     root / "omni")
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[20:44, 12:52] = (200, 40, 40)
    Image.fromarray(photo).save(root / "photo.png")
    return root


def test_split_task():
    assert split_task("omni/depth") == ("omni", "depth")
    assert split_task("canny") == ("canny", None)
    assert split_task("models/omni/seg") == ("models/omni", "seg")


def test_control_with_a_task_writes_it_into_the_metadata(folders, tmp_path):
    args = ["generate", "--model", str(folders / "base"), "--prompt", "a box", "--out", str(tmp_path), *FAST]
    assert main([*args, "--control", f"{folders / 'omni'}/depth:{folders / 'photo.png'}:0.8"]) == 0
    meta = read_parameters(tmp_path / "00000-4.png")["controlstack"]
    assert meta["controls"][0]["task"] == "depth" and meta["controls"][0]["weight"] == 0.8


def test_from_image_writes_the_image_and_the_grid(folders, tmp_path):
    args = ["generate", "--model", str(folders / "base"), "--prompt", "a box", "--out", str(tmp_path), *FAST,
            "--from-image", str(folders / "photo.png"), "--tasks", "canny", "--omni", str(folders / "omni"), "--grid"]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-4.png", "grid-00000-4.png"]
    grid = Image.open(tmp_path / "grid-00000-4.png")
    assert grid.size[0] >= 3 * 64 and grid.size[0] < 4 * 64  # photo | canny | generated
    assert read_parameters(tmp_path / "00000-4.png")["controlstack"]["from_image"] == {"tasks": ["canny"]}


@pytest.mark.parametrize("extra, message", [
    (["--control", "{omni}/normal:{photo}"], "Omni ControlNet '{omni}' has no task 'normal'; choose one of canny, depth"),
    (["--from-image", "{photo}"], "--from-image and --tasks go together"),
    (["--from-image", "{photo}", "--tasks", "depth", "--control", "{omni}/depth:{photo}"],
     "--from-image makes its own controls"),
    (["--from-image", "{photo}", "--tasks", "seg", "--omni", "{omni}"],
     "unknown task(s) seg; the Omni ControlNet has canny, depth"),
])
def test_omni_errors_exit_2_with_one_line(folders, tmp_path, capsys, extra, message):
    fill = {"omni": folders / "omni", "photo": folders / "photo.png"}
    args = ["generate", "--model", str(folders / "base"), "--prompt", "x", "--out", str(tmp_path), *FAST,
            *[e.format(**fill) for e in extra]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
