"""``controlstack world export`` end to end, in a subprocess through the console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from datasets import load_from_disk

from controlstack.world import COLUMNS

SCRIPT = Path(sys.executable).parent / "controlstack"


def _run(*args):
    return subprocess.run(
        [str(SCRIPT), "world", "export", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_cli_export_end_to_end(tmp_path):
    out = tmp_path / "ds"
    proc = _run(
        "--scenes", "3", "--size", "64", "--seed", "4", "--out", str(out), "--workers", "2", "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 scenes" in proc.stdout
    ds = load_from_disk(str(out))
    assert ds.column_names == list(COLUMNS) and len(ds) == 3
    # A second export onto the now non-empty folder: refused, one line, exit 2, data untouched.
    again = _run("--scenes", "2", "--out", str(out), "--quiet")
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and "Traceback" not in again.stderr
    assert len(load_from_disk(str(out))) == 3


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    # In-process (the subprocess path is covered above): same main(), same stderr contract.
    from controlstack.cli.main import main

    out = tmp_path / "ds"
    assert main(["world", "export", "--scenes", "3", "--size", "100", "--out", str(out)]) == 2
    want = (
        "controlstack world: error: world size must be a multiple of 8 between 32 and 1024 "
        "(e.g. 64, 128, 256, 512), got 100"
    )
    assert capsys.readouterr().err.strip().splitlines() == [want]
    assert main(["world", "export", "--scenes", "many", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "controlstack world: error: --scenes must be an integer, got 'many'"
    ]
    assert not out.exists() and list(tmp_path.iterdir()) == []
