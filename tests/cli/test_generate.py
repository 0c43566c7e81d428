"""Acceptance 6: ``controlstack generate`` end to end, and one-line errors with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlstack.cli.main import main
from controlstack.io.png import read_parameters

FAST = ["--steps", "2", "--width", "64", "--height", "64", "--no-progress"]


@pytest.fixture()
def edge_png(tmp_path, hint_images):
    path = tmp_path / "edges.png"
    hint_images[0].save(path)
    return path


def test_generate_subprocess_writes_pngs_with_metadata(tmp_path, edge_png):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "controlstack.cli.main", "generate", "--prompt", "a red box",
           "--negative", "blurry", "--control", f"canny:{edge_png}:0.7:0.1:0.9", "--seed", "5",
           "--batch", "2", "--grid", "--scheduler", "euler_a", "--out", str(out), *FAST]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000-5.png", "00001-5.png", "grid-00000-5.png"]
    meta = read_parameters(out / "00001-5.png")
    text = meta["parameters"]
    # CFG 7.0: the bundle's recommendation (its controlstack.json), as no --cfg was given
    assert text.startswith("a red box\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7.0, Seed: 5")
    assert "Model hash: " in text and "Resize Mode: Just Resize, Control Mode: ControlNet is more important" in text
    assert 'ControlNet 0: "Module: none, Model: canny, Weight: 0.7, Guidance Start: 0.1, Guidance End: 0.9' in text
    assert meta["controlstack"]["batch_pos"] == 1 and meta["controlstack"]["controls"][0]["weight"] == 0.7
    # a second run never overwrites: numbering continues
    assert main(["generate", "--prompt", "x", "--seed", "5", "--out", str(out), *FAST]) == 0
    assert (out / "00002-5.png").is_file()


def test_same_seed_same_image(tmp_path, edge_png):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert main(["generate", "--prompt", "p", "--seed", "11", "--control", f"depth:{edge_png}",
                     "--out", str(d), *FAST]) == 0
    assert np.array_equal(np.asarray(Image.open(a / "00000-11.png")), np.asarray(Image.open(b / "00000-11.png")))


def test_error_is_one_line_exit_2_subprocess(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "controlstack.cli.main", "generate", "--prompt", "x",
                           "--control", f"canny:{bad}", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an image" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def _bad_inputs(tmp_path: Path, hint_images) -> dict[str, tuple[list[str], str]]:
    good = tmp_path / "good.png"
    hint_images[0].save(good)
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(noisy)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(noisy.read_bytes()[: noisy.stat().st_size // 2])
    zero = tmp_path / "zero.png"
    zero.write_bytes(good.read_bytes()[:16] + b"\x00" * 8 + good.read_bytes()[24:])  # width=height=0
    huge = tmp_path / "huge.png"
    Image.new("L", (4100, 2)).save(huge)
    text = tmp_path / "text.png"
    text.write_text("hello")
    empty_dir = tmp_path / "no_config"
    empty_dir.mkdir()
    pickle = tmp_path / "cn.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    c = lambda spec: ["--control", spec]
    return {
        "truncated image": (c(f"canny:{trunc}"), "corrupt or truncated"),
        "zero-size image": (c(f"canny:{zero}"), str(zero.name)),
        "huge image": (c(f"canny:{huge}"), "larger than 4096x4096"),
        "non-image file": (c(f"canny:{text}"), "not an image"),
        "missing image": (c(f"canny:{tmp_path / 'nope.png'}"), "does not exist"),
        "unknown scheduler": (["--scheduler", "heunpp"], "unknown scheduler 'heunpp'"),
        "unknown mode": (["--mode", "loud"], "unknown mode 'loud'"),
        "layer weights without controlnet mode": (["--mode", "balanced", "--layer-weights", "uniform"],
                                                  "applies to --mode controlnet"),
        "unknown control type": (c(f"sketchy:{good}"), "neither a bundled ControlNet"),
        "folder without config": (c(f"{empty_dir}:{good}"), "config"),
        "pickle without opt-in": (c(f"{pickle}:{good}"), "pickle"),
        "negative steps": (["--steps", "-3"], "--steps"),
        "negative cfg": (["--cfg", "-1"], "--cfg"),
        "bad control spec": (["--control", "canny"], "MODEL:IMAGE"),
        "bad window": (c(f"canny:{good}:1.0:0.8:0.2"), "window"),
        "width not multiple of 8": (["--width", "65"], "multiple of 8"),
        "mask index out of range": (c(f"canny:{good}") + ["--mask", f"3:{good}"], "only 1 given"),
    }


@pytest.mark.parametrize("case", [
    "truncated image", "zero-size image", "huge image", "non-image file", "missing image",
    "unknown scheduler", "unknown mode", "layer weights without controlnet mode",
    "unknown control type", "folder without config",
    "pickle without opt-in", "negative steps", "negative cfg", "bad control spec", "bad window",
    "width not multiple of 8", "mask index out of range",
])
def test_bad_input_exit_2_one_line(tmp_path, hint_images, capsys, case):
    args, expected = _bad_inputs(tmp_path, hint_images)[case]
    out = tmp_path / "out"
    argv = ["generate", "--prompt", "x", "--steps", "2", "--no-progress", "--out", str(out)] + args
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("controlstack: no trained bundle")]
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


def test_channel_mismatch(tmp_path, hint_images, capsys):
    from controlstack.models.tiny import tiny_controlnet, tiny_unet

    other = tiny_controlnet(tiny_unet(0, block_out_channels=(16, 32)))
    folder = tmp_path / "cn16"
    other.save_pretrained(folder)
    good = tmp_path / "good.png"
    hint_images[0].save(good)
    assert main(["generate", "--prompt", "x", "--steps", "2", "--no-progress", "--out", str(tmp_path / "o"),
                 "--control", f"{folder}:{good}"]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err or "mismatch" in err, err
    assert not (tmp_path / "o").exists()


@pytest.fixture()
def photo_png(tmp_path):
    from skimage import data

    photo = tmp_path / "photo.png"
    Image.fromarray(data.astronaut()).resize((64, 64)).save(photo)
    return photo


@pytest.mark.parametrize("model", ["canny", "mi-canny"])
def test_preprocess_runs_the_annotator_of_the_controls_condition(tmp_path, photo_png, model):
    """--preprocess on a photo == passing the canny annotator's output (pixel-perfect) directly;
    ``mi-canny`` takes canny edges too (its training record says so)."""
    from controlstack import annotators

    edges = tmp_path / "edges.png"
    annotators.get("canny", resolution=64)(Image.open(photo_png)).save(edges)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, image, pre in ((a, photo_png, ["--preprocess"]), (b, edges, []), (c, photo_png, [])):
        assert main(["generate", "--prompt", "p", "--seed", "1", *pre, "--control", f"{model}:{image}",
                     "--out", str(out), *FAST]) == 0
    img = lambda d: np.asarray(Image.open(d / "00000-1.png"))
    assert np.array_equal(img(a), img(b))
    assert not np.array_equal(img(a), img(c))
    assert f"Module: canny, Model: {model}," in read_parameters(a / "00000-1.png")["parameters"]


def test_preprocess_fails_before_loading_where_nothing_tells_the_condition(tmp_path, photo_png, monkeypatch, capsys):
    from controlstack import Pipeline

    photo = photo_png
    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    capsys.readouterr()
    assert main(["generate", "--prompt", "p", "--preprocess", "--control", f"{folder}:{photo}",
                 "--out", str(tmp_path / "c"), *FAST]) == 2
    assert capsys.readouterr().err == (f"controlstack generate: error: cannot tell which annotator control model "
                                       f"'{folder}' needs to preprocess its image; name one (preprocess='canny'; "
                                       "on the command line --module I:canny)\n")


def test_parse_control_takes_numbers_and_schedules_from_the_right(tmp_path):
    from controlstack.cli.generate import parse_control

    image = tmp_path / "a:b.png"  # a path that holds ':' stays whole
    image.write_bytes(b"")
    assert parse_control(f"canny:{image}") == ("canny", str(image), 1.0, None, None)  # None: recommended
    assert parse_control(f"canny:{image}:0.5:0.1:0.9") == ("canny", str(image), 0.5, 0.1, 0.9)
    assert parse_control(f"depth:{image}:0@1,1@0.3") == ("depth", str(image), ((0.0, 1.0), (1.0, 0.3)), None, None)
    assert parse_control(f"depth:{image}:0@1,0.5@0.8,1@0.3:0:0.8") == (
        "depth", str(image), ((0.0, 1.0), (0.5, 0.8), (1.0, 0.3)), 0.0, 0.8)
    assert parse_control("omni/depth:d.png:0.8:0.2") == ("omni/depth", "d.png", 0.8, 0.2, None)


@pytest.mark.parametrize("tail, message", [
    (":abc", "weight 'abc' is not a number; use MODEL:IMAGE[:WEIGHT[:START[:END]]]"),
    (":0.8:x", "start 'x' is not a number; use MODEL:IMAGE[:WEIGHT[:START[:END]]]"),
    (":0.8:0:1e", "end '1e' is not a number"),
    (":0.8:0@1", "start '0@1' is not a number (a P@W schedule goes in the WEIGHT field)"),
    (":1:0:1:1", "has too many fields; use MODEL:IMAGE[:WEIGHT[:START[:END]]]"),
    (":0@1,1@x", "weight schedule '0@1,1@x' must be PROGRESS@WEIGHT pairs separated by commas, e.g. 0@1,1@0.3"),
    (":0@1,1", "weight schedule '0@1,1' must be PROGRESS@WEIGHT pairs"),
    (":1@1,0@0.3", "schedule progress values must be ascending in [0, 1], got [1.0, 0.0]; e.g. 0@1,1@0.3"),
    (":0@1,2@0.3", "schedule progress values must be ascending in [0, 1], got [0.0, 2.0]"),
])
def test_a_bad_weight_field_is_named_not_taken_for_part_of_the_image(edge_png, tail, message):
    from controlstack.cli.generate import parse_control
    from controlstack.errors import ControlstackError

    spec = f"canny:{edge_png}{tail}"
    with pytest.raises(ControlstackError) as exc:
        parse_control(spec)
    assert str(exc.value).startswith(f"--control '{spec}'") and message in str(exc.value)
    assert "does not exist" not in str(exc.value) and "\n" not in str(exc.value)


def test_a_number_like_tail_is_a_bad_weight_even_when_the_image_is_missing(tmp_path):
    from controlstack.cli.generate import parse_control
    from controlstack.errors import ControlstackError

    with pytest.raises(ControlstackError, match=r"weight '0,8' is not a number"):
        parse_control(f"canny:{tmp_path / 'missing.png'}:0,8")
    # a tail that is not number-like stays part of the (missing) image: load_image says so
    assert parse_control(f"canny:{tmp_path / 'missing.png'}:v2")[1] == f"{tmp_path / 'missing.png'}:v2"


def test_a_schedule_from_the_command_line_equals_the_python_api(tmp_path, edge_png):
    """``--control canny:IMAGE:0@1,1@0.3`` is ``Control('canny', IMAGE, weight=[(0, 1), (1, 0.3)])``."""
    from controlstack import Control, Pipeline

    fast = ["--steps", "3", "--width", "64", "--height", "64", "--no-progress", "--seed", "5"]
    assert main(["generate", "--prompt", "a red box", "--control", f"canny:{edge_png}:0@1,1@0.3",
                 "--out", str(tmp_path / "s"), *fast]) == 0
    assert main(["generate", "--prompt", "a red box", "--control", f"canny:{edge_png}",
                 "--out", str(tmp_path / "c"), *fast]) == 0
    cli = np.asarray(Image.open(tmp_path / "s" / "00000-5.png").convert("RGB"))
    schedule = [(0.0, 1.0), (1.0, 0.3)]
    api = Pipeline.from_pretrained()("a red box", [Control("canny", Image.open(edge_png), weight=schedule)],
                                     steps=3, seed=5, width=64, height=64, progress=False)[0]
    assert np.array_equal(cli, np.asarray(api.convert("RGB")))
    assert not np.array_equal(cli, np.asarray(Image.open(tmp_path / "c" / "00000-5.png").convert("RGB")))
    meta = read_parameters(tmp_path / "s" / "00000-5.png")
    assert meta["controlstack"]["controls"][0]["weight"] == [[0.0, 1.0], [1.0, 0.3]]
    # canny's recommended window starts half-way
    assert "Model: canny, Weight: 0@1,1@0.3, Guidance Start: 0.5" in meta["parameters"]
    assert meta["parameters"].replace(", Batch pos: 0", "") == api.info["parameters"]  # the CLI numbers every file
