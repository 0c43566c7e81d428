"""benchmarks/windows.py runs end to end on 2 scenes and 2 steps (its numbers are reported, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_windows_script_on_two_scenes(tmp_path):
    doc = tmp_path / "docs" / "windows.md"
    doc.parent.mkdir()
    doc.write_text("# x\n<!-- windows:start -->\nold\n<!-- windows:end -->\ntail\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "windows.py"), "--scenes", "2", "--steps", "2",
           "--x0-scenes", "1", "--windows", "0-1", "0.5-1", "0-0.5", "--conditions", "canny", "seg",
           "--out", str(tmp_path / "out"), "--json", str(tmp_path / "windows.json"),
           "--images", str(tmp_path / "docs" / "images"), "--doc", str(doc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "windows.json").read_text())
    assert report["scenes"] == 2 and report["steps"] == 2
    # the bundle's recommended mode is what the windows are measured in
    assert report["settings"]["mode"] == "controlnet" and report["settings"]["cfg"] == 7.0
    assert set(report["f1"]) == {"canny", "seg"}
    for rows in report["f1"].values():
        assert set(rows) == {"0-1", "0.5-1", "0-0.5", "none"}
        # diffusers' rule at 2 steps: 0-1 computes both, a half window one, no control none
        assert [rows[w]["cn_steps"] for w in ("0-1", "0.5-1", "0-0.5", "none")] == [2, 1, 1, 0]
        assert all(0.0 <= r["f1"] <= 1.0 for r in rows.values()) and rows["0-1"]["diff_to_full"] == 0.0
        assert rows["0-1"]["f1"] > 0.0 and rows["0-1"]["gain_kept"] == 1.0
    for name, rec in report["recommended"].items():
        assert rec["window"] in report["f1"][name] and rec["start"] < rec["end"]
        assert rec["diff_to_full"] >= -report["tolerance"]
    # one decoded x0 per step, for the uncontrolled run and each control
    assert set(report["x0"]) == {"scenes", "none", "canny", "seg"}
    assert all(len(report["x0"][r]["to_final"]) == 2 and all(0.0 <= v <= 1.0 for v in report["x0"][r]["to_reference"])
               for r in ("none", "canny", "seg"))
    assert len(report["noise"]["sqrt_alpha_bar"]) == 2 and report["noise"]["sqrt_alpha_bar"][0] < report["noise"]["sqrt_alpha_bar"][1]
    assert set(report["seconds_per_image"]) == {"0-1", "0.5-1", "0-0.5", "none"}
    assert "recommended" in proc.stdout and "CN steps" in proc.stdout
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- windows:end -->\ntail\n") and "| 0.5-1 | 1 |" in text
    assert "](images/windows-grid.png)" in text
    for png in ("windows-grid.png", "windows-x0.png", "windows-plot.png"):
        assert (tmp_path / "docs" / "images" / png).stat().st_size > 1000
