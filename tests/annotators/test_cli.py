"""``controlstack annotate``: outputs, batch, --list, and exit 2 with one line on bad input.

Two tests go through the installed entry point in a subprocess (``.venv/bin/controlstack``); the
many bad-input cases call the same ``main()`` in-process, because each subprocess pays the full
package import (seconds on a shared 2-core machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

EXE = Path(sys.executable).parent / "controlstack"


def cli(*args):
    return subprocess.run([str(EXE), "annotate", *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=120)


def main(capsys, *args):
    from controlstack.cli.main import main as entry

    code = entry(["annotate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("in")
    Image.fromarray(data.astronaut()).resize((128, 128)).save(d / "astro.png")
    Image.fromarray(data.camera()).resize((96, 64)).save(d / "camera.png")
    return d


def test_single_image_and_batch(photo, tmp_path):
    out = tmp_path / "edges.png"
    r = cli("canny", photo / "astro.png", "--param", "low_threshold=50", "--param", "resolution=none",
            "--out", out)
    assert r.returncode == 0, r.stderr
    ref = cv2.Canny(np.asarray(Image.open(photo / "astro.png").convert("RGB")), 50, 200)
    assert np.array_equal(np.asarray(Image.open(out))[..., 0], ref)
    r = cli("invert", photo, "--out", tmp_path / "batch")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["astro.png", "camera.png"]
    assert Image.open(tmp_path / "batch" / "camera.png").size == (768, 512)
    assert "100%" in r.stderr  # tqdm progress bar


def test_bad_parameter_exits_2_through_the_entry_point(photo, tmp_path):
    out = tmp_path / "out.png"
    r = cli("canny", photo / "astro.png", "--param", "low_threshold=250", "--param", "high_threshold=100",
            "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == ("controlstack annotate: error: canny: low_threshold (250) is above high_threshold (100); "
                        "choose low <= high, both in [1, 255]\n")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_list(capsys):
    code, out, _ = main(capsys, "--list")
    assert code == 0
    assert "canny" in out and "low_threshold: int = 100  (in [1, 255])" in out
    # where users choose: a learned annotator says it is for world scenes, and what photos need
    assert ("depth (learned, trained on the procedural world: reliable on its scenes, not on photographs; "
            "on photos use weights=DIR (local MiDaS weights; no classical annotator estimates depth))") in out
    assert "hed (learned, trained on the procedural world" in out and "use softedge, canny, lineart or lines," in out
    assert "canny  [edges]" in out  # classical ones carry no such note


@pytest.mark.parametrize("args, message", [
    (["canny", "{img}", "--param", "low_threshold=250", "--param", "high_threshold=100"],
     "canny: low_threshold (250) is above high_threshold (100); choose low <= high, both in [1, 255]"),
    (["canny", "{img}", "--param", "low_threshold=abc"], "canny: low_threshold must be an integer in [1, 255]"),
    (["canny", "{img}", "--param", "nope=1"], "canny has no parameter 'nope'"),
    (["canny", "{img}", "--param", "low_threshold"], "--param 'low_threshold' must look like NAME=VALUE"),
    (["cany", "{img}"], "unknown annotator 'cany'; choose one of canny"),
    (["canny", "{missing}"], "does not exist"),
    (["canny", "{bad}"], "is not an image PIL can read"),
    (["depth", "{img}", "--param", "weights={missing}"], "depth: weights folder"),
    (["seg", "{img}"], "seg: colour"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(capsys, photo, tmp_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out.png"
    args = [a.format(img=photo / "astro.png", missing=tmp_path / "missing.png", bad=bad) for a in args]
    code, _, err = main(capsys, *args, "--out", out)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.png"]


def test_pose_json_in_and_out(capsys, tmp_path):
    doc = {"people": [{"pose_keypoints_2d": [v for i in range(18) for v in (10.0 + 5 * i, 20.0 + 3 * i, 1.0)]}],
           "canvas_width": 128, "canvas_height": 96}
    src = tmp_path / "pose.json"
    src.write_text(json.dumps(doc))
    assert main(capsys, "pose", src, "--param", "resolution=none", "--out", tmp_path / "pose.png")[0] == 0
    assert Image.open(tmp_path / "pose.png").size == (128, 96)
    assert main(capsys, "pose", src, "--param", "mirror=true", "--out", tmp_path / "mirrored.json")[0] == 0
    m = json.loads((tmp_path / "mirrored.json").read_text())
    assert m["people"][0]["pose_keypoints_2d"][0] == 127 - 10.0  # the nose, flipped
