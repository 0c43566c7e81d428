"""``controlstack asym`` on a tiny (base, ControlNet) pair: one line, deterministic, one-line errors."""

from __future__ import annotations

import re

import pytest

from controlstack.cli.main import main


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from controlstack.models.tiny import tiny_controlnet, tiny_sd
    from controlstack.training.base import export_pipeline

    root = tmp_path_factory.mktemp("asym")
    sd = tiny_sd(seed=0, max_length=16)
    export_pipeline(root / "base", sd.vae, sd.text_encoder, sd.tokenizer, sd.unet)
    tiny_controlnet(sd.unet, seed=1, randomize=True).save_pretrained(root / "cn")
    return root


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["asym", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_asym_prints_one_line_and_is_seeded(tiny_pair, capsys):
    args = ["--model", str(tiny_pair / "base"), "--controlnet", str(tiny_pair / "cn"), "--condition", "canny",
            "--batch", "2", "--steps", "2", "--seed", "3"]
    code, out, _ = _run(capsys, *args)
    assert code == 0
    line = out.strip().splitlines()[-1]
    m = re.fullmatch(r"Asym=(\S+) NAsym=(\S+)", line)
    assert m, line
    asym, nasym = float(m.group(1)), float(m.group(2))
    assert asym != 0 and abs(nasym) <= 1.0  # NAsym = ½ Asym / tr(JJᵀ) and Asym <= 2 tr(JJᵀ)
    assert _run(capsys, *args)[1].strip().splitlines()[-1] == line  # same seed, same numbers
    assert _run(capsys, *args[:-1], "4")[1].strip().splitlines()[-1] != line


def test_asym_errors_are_one_line(tiny_pair, capsys):
    code, _, err = _run(capsys, "--model", str(tiny_pair / "base"), "--controlnet", str(tiny_pair / "cn"),
                        "--batch", "1", "--steps", "1")
    assert code == 2 and "--condition" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "--model", str(tiny_pair / "base"), "--controlnet", str(tiny_pair / "cn"),
                        "--condition", "canny", "--batch", "0")
    assert code == 2 and "--batch" in err
    code, _, err = _run(capsys, "--model", str(tiny_pair / "base"), "--controlnet", "no-such-net")
    assert code == 2 and "no-such-net" in err
