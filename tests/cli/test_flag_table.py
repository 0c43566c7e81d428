"""Every command-line flag once with an out-of-range, a wrong-type and an empty value: exit 2 with a
message naming it, never a traceback or an internal error (the table is the contract)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlstack.cli.main import main

GEN = ["generate", "--prompt", "x", "--no-progress"]
TABLE = [
    # (argv after the command's fixed part, text the error must contain)
    (GEN + ["--steps", "0"], "--steps must be >= 1"),
    (GEN + ["--steps", "abc"], "invalid int value"),
    (GEN + ["--steps", ""], "invalid int value"),
    (GEN + ["--cfg", "-1"], "--cfg must be >= 0"),
    (GEN + ["--cfg", "nan"], "--cfg must be >= 0"),
    (GEN + ["--cfg", "abc"], "invalid float value"),
    (GEN + ["--width", "65"], "width must be a multiple of 8"),
    (GEN + ["--width", "0"], "width must be a multiple of 8"),
    (GEN + ["--height", "99999"], "height must be a multiple of 8 between 8 and 4096"),
    (GEN + ["--batch", "0"], "batch must be a positive integer"),
    (GEN + ["--batch", "100000"], "more than the"),
    (GEN + ["--seed", "99999999999999999999"], "--seed must be below"),
    (GEN + ["--seed", "x"], "invalid int value"),
    (GEN + ["--scheduler", "nope"], "unknown scheduler 'nope'"),
    (GEN + ["--scheduler", ""], "unknown scheduler ''"),
    (GEN + ["--mode", "nope"], "unknown mode 'nope'"),
    (GEN + ["--layer-weights", "heavy"], "invalid choice"),
    (GEN + ["--control", "canny"], "must look like MODEL:IMAGE"),
    (GEN + ["--control", ":{png}"], "must look like MODEL:IMAGE"),
    (GEN + ["--control", "nope:{png}"], "neither a bundled ControlNet"),
    (GEN + ["--control", "canny:{png}", "--mask", "x:{png}"], "--mask 'x:"),
    (GEN + ["--control", "canny:{png}", "--module", "0:"], "--module '0:' must look like"),
    (GEN + ["--control", "canny:{png}", "--module", "0:nope"], "unknown annotator 'nope'"),
    (GEN + ["--init", "{png}", "--strength", "1.5"], "--strength must be in [0, 1]"),
    (GEN + ["--init", "{png}", "--strength", "-0.1"], "--strength must be in [0, 1]"),
    (GEN + ["--init", "{dir}"], "is a folder; pass an image file"),
    (GEN + ["--hires", "0.5"], "hires must be an upscale factor in [1, 8]"),
    (GEN + ["--hires", "abc"], "invalid float value"),
    (GEN + ["--from-image", "{png}", "--tasks", " , "], "--tasks is empty"),
    (GEN + ["--resize-mode", "stretch", "--control", "canny:{png}"], "unknown resize mode 'stretch'"),
    (["annotate", "canny", "{png}", "--out", "{dir}/o.png", "--width", "-1", "--height", "8"],
     "--width and --height must be positive"),
    (["annotate", "canny", "{png}", "--out", "{dir}/o.png", "--param", "low_threshold="], "low_threshold must be"),
    (["annotate", "canny", "{png}", "--out", "{dir}/o.jpg2"], "needs an image suffix"),
    (["convert", "{dir}/missing", "{dir}/x.safetensors"], "does not exist"),
    (["convert", "{png}", "{dir}/x.bin", "--to", "original"], "one .safetensors file"),
    (["world", "export", "--scenes", "-1", "--out", "{dir}/w"], "scenes"),
    (["world", "export", "--scenes", "2", "--size", "abc", "--out", "{dir}/w"], "size"),
    (["train", "controlnet", "--config", "{dir}/missing.yaml"], "not found"),
]


@pytest.mark.parametrize("argv, message", TABLE, ids=[" ".join(a[3:] if a[0] == "generate" else a[:3])
                                                       for a, _ in TABLE])
def test_flag_table(tmp_path, capsys, argv, message):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    fill = {"png": tmp_path / "a.png", "dir": tmp_path}
    argv = [a.format(**fill) for a in argv]
    if argv[0] == "generate":
        argv += ["--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own type / choice errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.format(**fill) in err and "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "out").exists()
