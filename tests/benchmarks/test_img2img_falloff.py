"""benchmarks/img2img_falloff.py runs end to end on 2 scenes, the photo and 2 steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_img2img_falloff_script_on_two_scenes(tmp_path):
    doc = tmp_path / "img2img.md"
    doc.write_text("# x\n<!-- img2img:start -->\nold\n<!-- img2img:end -->\ntail\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "img2img_falloff.py"), "--scenes", "2", "--photo-seeds", "1",
           "--steps", "2", "--strengths", "0", "0.3", "1", "--grid-scenes", "1", "--out", str(tmp_path / "out"),
           "--json", str(tmp_path / "img2img.json"), "--doc", str(doc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "img2img.json").read_text())
    assert report["scenes"] == 2 and report["steps"] == 2 and report["settings"]["mode"] == "controlnet"
    # int(steps * strength) steps run: at 2 steps strength 0.3 runs none, like strength 0
    assert {s: v["steps_run"] for s, v in report["schedule"].items()} == {"0.0": 0, "0.3": 0, "1.0": 2}
    for src in ("world", "photo"):
        ceiling = report["vae_roundtrip"][src]
        assert 0.0 < ceiling["mad"] < 0.2 and 0.0 < ceiling["ssim"] <= 1.0 and ceiling["psnr"] > 10
        for run in ("no control", "canny"):
            by = report["similarity"][src][run]
            # no step run: the VAE round trip (one posterior sample; the bundled VAE's is close to its mean)
            for s in ("0.0", "0.3"):
                assert abs(by[s]["mad"] - ceiling["mad"]) < 0.01 and abs(by[s]["ssim"] - ceiling["ssim"]) < 0.05
            assert by["1.0"]["mad"] > by["0.0"]["mad"] and by["1.0"]["psnr"] < by["0.0"]["psnr"]
            assert all(0.0 <= v["f1"] <= 1.0 for v in by.values())
    assert "| photo | canny | 1 | 2 |" in proc.stdout
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- img2img:end -->\ntail\n") and "VAE round trip" in text
    for png in ("img2img-grid.png", "img2img-plot.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
