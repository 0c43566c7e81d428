"""benchmarks/fidelity.py runs end to end on 2 scenes (its numbers are reported, not asserted).
In-process: a subprocess would spend most of each test importing torch and diffusers again."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "fidelity.py")


def run(monkeypatch, capsys, *args) -> str:
    """Runs the script as ``__main__`` with ``args``; its stdout (a failed run raises SystemExit)."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, args)])
    runpy.run_path(SCRIPT, run_name="__main__")
    return capsys.readouterr().out


def fails(monkeypatch, *args) -> str:
    """The message of a run that refuses its arguments (``raise SystemExit(message)``: one line, no traceback)."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(SCRIPT, run_name="__main__")
    return str(exc.value.code)


def test_fidelity_script_on_two_scenes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "fidelity.json"
    (tmp_path / "README.md").write_text("# x\n<!-- fidelity:start -->\nold\n<!-- fidelity:end -->\ntail\n")
    stdout = run(monkeypatch, capsys, "--scenes", "2", "--steps", "1", "--out", tmp_path / "grids", "--json", out,
                 "--readme", tmp_path / "README.md")
    report = json.loads(out.read_text())
    from controlstack import assets

    # every ControlNet the evaluated model has: the bundle's trained ones (all four once complete),
    # or the placeholder's random ones in a checkout without a trained bundle
    trained = assets.has_trained_base()
    expected = {n for n in assets.trained_controlnets() if not n.startswith("mi-") and n != "omni"} if trained \
        else {"canny", "depth", "seg", "pose"}
    assert report["scenes"] == 2 and expected <= set(report["f1"])
    assert all(0.0 <= v["control"] <= 1.0 for v in report["f1"].values())
    assert set(report["prompt_fidelity"]) == ({"cfg 1", "cfg 7"} if "seg" in expected else set())
    assert "no control" in report["fid"] and 0.0 <= report["vae_roundtrip_f1"] <= 1.0
    assert 0.0 <= report["prompt_fidelity_vae"] <= 1.0 and "VAE round trips" in stdout
    assert all((tmp_path / "grids" / f"{name}.png").is_file() for name in expected)
    assert "F1 control" in stdout and "| condition | F1 with control |" in stdout
    # headline numbers in the bundle's mode, the balanced column beside them on both scenes
    assert report["mode"] == "controlnet" and report["layer_weights"] == "uniform"
    assert report["balanced_scenes"] == 2 and all("balanced" in v for v in report["f1"].values())
    assert 0.0 <= report["chance_f1"] <= 1.0
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and readme.endswith("<!-- fidelity:end -->\ntail\n") and "| canny |" in readme
    assert all((tmp_path / "docs" / "images" / f"fidelity-{name}.png").is_file() for name in expected)


def test_fidelity_script_measures_a_named_bundle_folder_and_chosen_conditions(tmp_path, monkeypatch, capsys):
    from controlstack import assets

    if not assets.has_trained_base():
        pytest.skip("no trained bundle in this checkout")
    out = tmp_path / "fidelity.json"
    run(monkeypatch, capsys, "--scenes", "2", "--steps", "1", "--bundle", assets.BUNDLE_DIR, "--conditions", "seg",
        "--balanced-scenes", "0", "--out", tmp_path / "grids", "--json", out)
    report = json.loads(out.read_text())
    assert set(report["f1"]) == {"seg"} and set(report["prompt_fidelity"]) == {"cfg 1", "cfg 7"}
    assert "balanced_scenes" not in report


def test_fidelity_script_rejects_a_folder_without_a_base_and_an_unknown_condition(tmp_path, monkeypatch):
    assert fails(monkeypatch, "--bundle", tmp_path) == f"fidelity: no trained base (model_index.json) in {tmp_path}"
    assert fails(monkeypatch, "--conditions", "nope").startswith("fidelity: no ControlNet nope in the bundle")
    assert fails(monkeypatch, "--scenes", "1") == "fidelity: --scenes must be at least 2 (FID needs a covariance)"
