"""Bad output locations are one line, before any work (generate, annotate, world export, convert)."""

from __future__ import annotations

import pytest

from controlstack.cli.main import main


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--steps", "1", "--out", "{file}"], "--out '{file}' is a file; pass a folder"),
    (["generate", "--prompt", "x", "--steps", "1", "--out", "{file}/sub"], "'{file}' is a file, not a folder"),
    (["generate", "--prompt", "x", "--steps", "1", "--control", "canny:{dir}", "--out", "{dir}/o"],
     "image '{dir}' is a folder; pass an image file"),
    (["annotate", "canny", "{png}", "--out", "{file}/x.png"], "--out '{file}/x.png': '{file}' is a file"),
    (["annotate", "canny", "{png}", "--out", "{dir}"], "--out '{dir}' is a folder; pass a file name"),
    (["world", "export", "--scenes", "1", "--out", "{file}/w"], "'{file}' is a file, not a folder"),
    (["convert", "{dir}/missing", "{file}/cn.safetensors"], "'{file}' is a file, not a folder"),
])
def test_bad_outputs_exit_2_with_one_line(tmp_path, capsys, argv, message):
    import numpy as np
    from PIL import Image

    (tmp_path / "file.txt").write_text("x")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    fill = {"file": tmp_path / "file.txt", "dir": tmp_path, "png": tmp_path / "a.png"}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err and err.count("\n") == 1 and "internal error" not in err
