"""benchmarks/mi_tables.py runs end to end on 2 scenes and writes docs/mi.md's tables (numbers not
asserted: they are the report's, measured on the full protocol). In-process: a subprocess would
spend most of the test importing torch and diffusers again."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mi_tables_on_two_scenes(tmp_path, monkeypatch):
    doc = tmp_path / "docs" / "mi.md"
    doc.parent.mkdir()
    doc.write_text("# old\n\n## Findings\n\nkept by hand\n")
    script = str(ROOT / "benchmarks" / "mi_tables.py")
    argv = [script, "--pairs", "1", "--scenes", "2", "--steps", "1",
           "--asym-batch", "1", "--asym-steps", "1", "--out", str(tmp_path / "out"), "--doc", str(doc)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(script, run_name="__main__")
    report = json.loads((tmp_path / "out" / "mi.json").read_text())
    rows = report["ablation"]["canny+seg"]["rows"]
    assert rows[0]["variant"] == "plain ControlNets + sum" and len(rows) >= 2
    assert {r["prompt"] for r in report["texture"]} == {"empty", "brief", "full"}
    assert {r["model"] for r in report["asym"]} >= {"plain"}
    text = doc.read_text()
    assert "## Ablation: canny (left) + seg (right)" in text and "## Asym" in text
    assert "kept by hand" in text  # the hand-written findings survive a re-run
    assert (doc.parent / "images" / "mi-canny+seg.png").is_file()
