"""``controlstack generate`` refuses what its flags alone can tell before any model is read: every
loader is replaced by one that counts and refuses, so an error found after a load fails the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack.cli.main import main
from controlstack.cli.preflight import base_configs, controlnet_folders, omni_tasks
from controlstack.io.settings import model_folder

BUNDLED_OMNI = model_folder("omni")
needs_bundled_omni = pytest.mark.skipif(BUNDLED_OMNI is None or omni_tasks(BUNDLED_OMNI) is None,
                                        reason="this checkout has no bundled Omni ControlNet")


@pytest.fixture()
def loads(monkeypatch):
    """The names of the loaders called (each refuses: a load would make ``main`` return 1, not 2)."""
    from controlstack import Pipeline, assets
    from controlstack.io import checkpoints

    calls: list[str] = []

    def refuse(name):
        def loader(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called before the flags were checked")
        return loader

    monkeypatch.setattr(Pipeline, "from_pretrained", refuse("Pipeline.from_pretrained"))
    monkeypatch.setattr(assets, "default_pipeline", refuse("assets.default_pipeline"))
    monkeypatch.setattr(checkpoints, "load_base", refuse("load_base"))
    monkeypatch.setattr(checkpoints, "load_controlnet", refuse("load_controlnet"))
    return calls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A condition image and an Omni ControlNet folder that has only what is read without loading:
    its config and its task tokens (canny, depth)."""
    from controlstack.models.task_tokens import save_task_tokens

    root = tmp_path_factory.mktemp("preflight")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "a.png")
    (root / "omni").mkdir()
    (root / "omni" / "config.json").write_text("{}")
    save_task_tokens({"canny": torch.zeros(4), "depth": torch.ones(4)}, root / "omni")
    return root


def _generate(capsys, tmp_path, files, extra: list[str]) -> tuple[int, str]:
    fill = {"png": files / "a.png", "omni": files / "omni"}
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "x", "--steps", "2", "--no-progress", "--out", str(out),
                 *[e.format(**fill) for e in extra]])
    err = capsys.readouterr().err
    assert not out.exists()
    return code, err


CASES = [
    (["--control", "sketchy:{png}"], "control model 'sketchy' is neither a bundled ControlNet (canny, depth"),
    (["--control", "canny:{png}", "--control", "sketchy/depth:{png}"], "control model 'sketchy' is neither"),
    (["--control", "{omni}/normal:{png}"], "Omni ControlNet '{omni}' has no task 'normal'; choose one of canny, depth"),
    (["--control", "{omni}:{png}"], "Omni ControlNet '{omni}' needs a task: --control {omni}/TASK:IMAGE"),
    (["--control", "canny/depth:{png}"], "control model 'canny' has no task tokens; 'canny/depth' is for an Omni"),
    (["--width", "65"], "--width must be a multiple of 8 between 8 and 4096, got 65"),
    (["--height", "0"], "--height must be a multiple of 8 between 8 and 4096, got 0"),
    (["--width", "8192"], "--width must be a multiple of 8 between 8 and 4096, got 8192"),
    (["--batch", "0"], "--batch must be a positive integer, got 0"),
    (["--batch", "100000000"], "more than the"),
    (["--hires", "0.5"], "--hires must be an upscale factor in [1, 8], got 0.5"),
    (["--hires", "nan"], "--hires must be an upscale factor in [1, 8], got nan"),
    (["--hires", "8", "--width", "1024", "--height", "64"], "--hires 8 takes 1024x64 to 8192x512, over 4096"),
    (["--hires", "2", "--hires-strength", "1.5"], "--hires-strength must be in [0, 1], got 1.5"),
    (["--control", "canny:{png}:1:0.8:0.2"], "control window start=0.8, end=0.2 is invalid"),
    (["--control", "canny:{png}:1@1,0@0"], "schedule progress values must be ascending"),
    (["--control", "canny:{png}", "--resize-mode", "stretch"], "unknown resize mode 'stretch'"),
    (["--from-image", "{png}", "--tasks", "depth", "--omni", "{omni}", "--width", "12"], "--width must be a multiple"),
    (["--from-image", "{png}", "--tasks", "depth,seg", "--omni", "{omni}"],
     "unknown task(s) seg; the Omni ControlNet has canny, depth"),
    (["--from-image", "{png}", "--tasks", "depth", "--omni", "canny"],
     "--omni 'canny' is not an Omni ControlNet (it has no task tokens)"),
    (["--from-image", "{png}", "--tasks", "depth", "--omni", "sketchy"], "control model 'sketchy' is neither"),
]


@pytest.mark.parametrize("extra, message", CASES, ids=[" ".join(e) for e, _ in CASES])
def test_flag_errors_come_before_any_model_is_read(loads, files, tmp_path, capsys, extra, message):
    code, err = _generate(capsys, tmp_path, files, extra)
    assert code == 2 and loads == [], (err, loads)
    assert message.format(omni=files / "omni") in err and err.count("\n") == 1, err


@needs_bundled_omni
@pytest.mark.parametrize("extra", [["--control", "omni/xyz:{png}"],
                                   ["--from-image", "{png}", "--tasks", "depth,xyz"]])
def test_an_unknown_task_of_the_bundled_omni_controlnet_is_refused_before_loading(loads, files, tmp_path, capsys,
                                                                                  extra):
    tasks = json.loads((BUNDLED_OMNI / "controlstack.json").read_text())["omni"]["tasks"]
    code, err = _generate(capsys, tmp_path, files, extra)
    assert code == 2 and loads == [], err
    assert "xyz" in err and ", ".join(sorted(tasks)) in err, err  # the tokens file lists them sorted


def test_the_checks_let_through_what_the_pipeline_takes(monkeypatch, files, tmp_path, capsys):
    """Good flags reach the load (once), with the controls already built."""
    from controlstack import Pipeline

    seen = []

    def stop(*args, **kwargs):
        seen.append(args)
        raise KeyboardInterrupt  # main's exit 130: it got as far as the load

    monkeypatch.setattr(Pipeline, "from_pretrained", stop)
    code, _ = _generate(capsys, tmp_path, files, ["--control", "canny:{png}:0@1,1@0.3:0:0.8", "--control",
                                                  "{omni}/depth:{png}", "--width", "64", "--hires", "2",
                                                  "--batch", "2"])
    assert code == 130 and len(seen) == 1


def test_controlnet_folders_and_base_configs_read_no_weights(loads, files):
    from controlstack import assets

    names = controlnet_folders(None)
    assert set(names) == set(assets.bundled_controlnets())
    assert all(folder is None or (folder / "config.json").is_file() for folder in names.values())
    assert omni_tasks(files / "omni") == ["canny", "depth"]
    assert omni_tasks(files) is None
    configs = base_configs(None, None)
    if not assets.is_placeholder():
        unet, vae = configs
        assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == 128  # the bundle's native size
    assert base_configs(str(files / "a.png"), None) is None  # a single file without --config: only loading tells
    assert loads == []
