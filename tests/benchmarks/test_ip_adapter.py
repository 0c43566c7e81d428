"""benchmarks/ip_adapter.py runs end to end on 2 scenes (its numbers are reported, not asserted) and
refuses what it cannot measure in one line. In-process, as the other benchmark tests."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "ip_adapter.py")


def test_the_script_measures_every_row_on_two_scenes(tmp_path, monkeypatch, capsys):
    from controlstack import assets

    if assets.ip_adapter_files() is None:
        pytest.skip("this checkout has no bundled IP-Adapter")
    out = tmp_path / "ip.json"
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--scenes", "2", "--steps", "1", "--out", str(tmp_path / "g"),
                                      "--json", str(out)])
    runpy.run_path(SCRIPT, run_name="__main__")
    report = json.loads(out.read_text())
    assert list(report["rows"]) == ["text", "text + image", "canny", "canny + image", "image"]
    for row in report["rows"].values():
        assert 0 <= row["colour"] <= 1 and 0 <= row["structure_f1"] <= 1 and 0 <= row["clip_score"] <= 100
    assert (tmp_path / "g" / "ip_adapter.png").is_file() and "canny + image" in capsys.readouterr().out


def test_no_scenes_is_a_one_line_refusal(monkeypatch):
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--scenes", "0"])
    with pytest.raises(SystemExit, match="--scenes must be at least 1"):
        runpy.run_path(SCRIPT, run_name="__main__")
