"""benchmarks/fidelity.py runs end to end on 2 scenes (its numbers are reported, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_fidelity_script_on_two_scenes(tmp_path):
    out = tmp_path / "fidelity.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--scenes", "2", "--steps", "1",
           "--out", str(tmp_path / "grids"), "--json", str(out), "--readme", str(tmp_path / "README.md")]
    (tmp_path / "README.md").write_text("# x\n<!-- fidelity:start -->\nold\n<!-- fidelity:end -->\ntail\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
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
    assert 0.0 <= report["prompt_fidelity_vae"] <= 1.0 and "VAE round trips" in proc.stdout
    assert all((tmp_path / "grids" / f"{name}.png").is_file() for name in expected)
    assert "F1 control" in proc.stdout and "| condition | F1 with control |" in proc.stdout
    # headline numbers in the bundle's mode, the balanced column beside them on both scenes
    assert report["mode"] == "controlnet" and report["layer_weights"] == "uniform"
    assert report["balanced_scenes"] == 2 and all("balanced" in v for v in report["f1"].values())
    assert 0.0 <= report["chance_f1"] <= 1.0
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and readme.endswith("<!-- fidelity:end -->\ntail\n") and "| canny |" in readme
    assert all((tmp_path / "docs" / "images" / f"fidelity-{name}.png").is_file() for name in expected)


def test_fidelity_script_measures_a_named_bundle_folder_and_chosen_conditions(tmp_path):
    from controlstack import assets

    if not assets.has_trained_base():
        pytest.skip("no trained bundle in this checkout")
    out = tmp_path / "fidelity.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--scenes", "2", "--steps", "1",
           "--bundle", str(assets.BUNDLE_DIR), "--conditions", "seg", "--balanced-scenes", "0",
           "--out", str(tmp_path / "grids"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["f1"]) == {"seg"} and set(report["prompt_fidelity"]) == {"cfg 1", "cfg 7"}
    assert "balanced_scenes" not in report


def test_fidelity_script_rejects_a_folder_without_a_base_and_an_unknown_condition(tmp_path):
    script = str(ROOT / "benchmarks" / "fidelity.py")
    proc = subprocess.run([sys.executable, script, "--bundle", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0 and "no trained base" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, script, "--conditions", "nope"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0 and "no ControlNet nope" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, script, "--scenes", "1"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0 and "at least 2" in proc.stderr and "Traceback" not in proc.stderr
