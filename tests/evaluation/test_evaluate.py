"""``controlstack evaluate``: the grid, its validation, the cache / resume and the report's schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.evaluation.evaluate import EvaluateConfig, row_key


def test_grid_rows_and_validation():
    cfg = EvaluateConfig(scenes=2, controls=("canny", "none"), models=("plain", "omni"), modes=("balanced", "controlnet"),
                         cfg=(1.0, 7.0), prompt_styles=("empty", "full"))
    rows = cfg.rows()
    assert len(rows) == 2 * 2 * 2 * 2 + 2 * 2  # no-control rows: once per CFG x style
    assert {row_key(r) for r in rows if r["control"] is None} == {"base-none-cfg1-empty", "base-none-cfg1-full",
                                                                    "base-none-cfg7-empty", "base-none-cfg7-full"}
    assert EvaluateConfig(controls="depth").controls == ("depth",)  # one value from YAML / Python
    from controlstack.evaluation.evaluate import parse_mode

    assert parse_mode("controlnet:layer_weights=uniform") == ("controlnet", {"layer_weights": "uniform"})
    assert parse_mode("mi:lambda_max=20") == ("mi", {"lambda_max": 20.0})
    with pytest.raises(ControlstackError, match="layer_weights must be one of"):
        EvaluateConfig(modes=("controlnet:layer_weights=loud",))
    for bad, match in [({"scenes": 1}, "--scenes must be >= 2"), ({"controls": ("mlsd",)}, "unknown control type"),
                       ({"prompt_styles": ("long",)}, "unknown prompt style"), ({"modes": ("loud",)}, "unknown mode"),
                       ({"cfg": (0.5,)}, r"--cfg values must be in \[1, 30\]"), ({"models": ("nowhere",)}, "nor a path"),
                       ({"steps": "ten"}, "must be an integer")]:
        with pytest.raises(ControlstackError, match=match):
            EvaluateConfig(**bad)


def test_yaml_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("scenes: 3\ncolour: red\n")
    with pytest.raises(ControlstackError, match="unknown config key 'colour'"):
        EvaluateConfig.from_yaml(path)
    path.write_text("scenes: 3\ncontrols: [canny, none]\ncfg: [3, 7]\n")
    cfg = EvaluateConfig.from_yaml(path, steps=2)
    assert cfg.scenes == 3 and cfg.cfg == (3.0, 7.0) and cfg.steps == 2


@pytest.fixture(scope="module")
def tiny_networks(tmp_path_factory):
    """Random (untrained) feature and CLIP networks: the report's plumbing, not its numbers."""
    from controlstack.evaluation.networks import (
        ClipNetConfig,
        FeatureNet,
        FeatureNetConfig,
        build_clip,
        save_clip,
        save_feature_net,
    )
    from controlstack.training.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    save_feature_net(FeatureNet(FeatureNetConfig(image_size=32, widths=[8, 16], num_features=4)), root / "features")
    tok = build_tokenizer("world", 16)
    clip = build_clip(ClipNetConfig(image_size=32, width=32, layers=1, heads=2, projection_dim=8, max_length=16), tok)
    save_clip(clip, tok, root / "clip")
    return root


def test_evaluate_writes_the_report_and_resumes(tiny_networks, tmp_path, capsys, caplog):
    from controlstack.cli.main import main
    from controlstack.evaluation.quality import KID_NOTE

    out = tmp_path / "ev"
    args = ["evaluate", "--scenes", "2", "--controls", "canny,none", "--steps", "2", "--out", str(out),
            "--features", str(tiny_networks / "features"), "--clip", str(tiny_networks / "clip")]
    with caplog.at_level("WARNING", logger="controlstack"):
        assert main(args) == 0
    printed = capsys.readouterr().out
    # 2 scenes, 4 features: below the 8 FID needs -- said once, in one line, before generating
    small = [r.getMessage() for r in caplog.records if "FID needs" in r.getMessage()]
    assert small == [("2 scenes is below the 8 FID needs with this feature network (2 x its 4 features, so each half "
                      "of the real-vs-real reference has a full-rank covariance): FID here is mostly small-sample "
                      "bias, the real-vs-real FID can exceed the rows', and KID can be negative; use more --scenes "
                      "before reading FID")]
    # the scenes' own captions never warn, though scene 1's is longer than the bundle's window
    from controlstack import Pipeline
    from controlstack.evaluation.evaluate import held_out_scenes

    tokenizer = Pipeline.from_pretrained().tokenizer
    caption = held_out_scenes(2, 128)[1]["text"]
    assert len(tokenizer(caption, verbose=False).input_ids) > tokenizer.model_max_length
    assert "the text encoder reads" not in caplog.text
    assert "plain / canny / auto / cfg 7.5 / full" in printed and "reference: real renders" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert [(r["model"], r["control"]) for r in report["rows"]] == [("plain", "canny"), ("base", None)]
    for r in report["rows"]:
        assert {"model", "control", "mode", "cfg", "prompt_style", "fid", "kid", "clip_score", "fidelity"} <= set(r)
        assert np.isfinite(r["fid"]) and 0 <= r["clip_score"] <= 100
    assert set(report["rows"][0]["fidelity"]) == {"edge_f1", "tv"}
    assert set(report["rows"][1]["fidelity"]) == {"canny.edge_f1", "tv"}  # the no-control baseline
    assert {"clip_real_matched", "clip_real_shuffled", "fid_real_split"} <= set(report["reference"])
    assert report["sample"] == {"feature_dim": 4, "fid_min_scenes": 8, "fid_reliable": False}
    assert report["notes"][0] == small[0]
    assert (KID_NOTE in report["notes"]) == any(k < 0 for k in [r["kid"] for r in report["rows"]]
                                                 + [report["reference"]["kid_real_split"]])
    page = (out / "report.html").read_text()
    assert "<p class=warn>2 scenes is below the 8 FID needs" in page
    assert "FID needs at least 8 scenes" in page and "KID is an unbiased estimate of the squared MMD" in page
    for section in ("Reference points", "<h2>Rows</h2>", "canny.edge_f1", "FID against CLIP score", "data:image/png;base64,"):
        assert section in page
    assert "src='http" not in page and 'src="http' not in page  # self-contained

    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 4
    stamps = {p: p.stat().st_mtime_ns for p in pngs}
    assert main(args) == 0  # same settings: every image comes from the cache
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert json.loads((out / "metrics.json").read_text())["rows"] == report["rows"]
    assert main([*args[:6], "3", *args[7:]]) == 0  # --steps 3: the rows are made again
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items())


def test_missing_controlnet_is_named_before_generating(tiny_networks, tmp_path, capsys):
    from controlstack.cli.main import main

    code = main(["evaluate", "--scenes", "2", "--controls", "normal", "--steps", "1", "--out", str(tmp_path / "x"),
                 "--features", str(tiny_networks / "features"), "--clip", str(tiny_networks / "clip")])
    assert code == 2 and "needs the ControlNet 'normal'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "images").exists()


def test_the_fid_sample_threshold_is_twice_the_feature_dimension():
    from controlstack.evaluation.networks import load_feature_extractor
    from controlstack.evaluation.quality import FID_SCENES_PER_FEATURE, fid_min_scenes, small_sample_note

    assert FID_SCENES_PER_FEATURE == 2
    bundled = load_feature_extractor(None).num_features
    assert bundled == 64 and fid_min_scenes(bundled) == 128
    assert fid_min_scenes(2048) == 4096  # NVIDIA's Inception (--features inception-2015-12-05.pt)
    assert small_sample_note(128, 64) is None
    note = small_sample_note(127, 64)
    assert note.startswith("127 scenes is below the 128 FID needs") and "\n" not in note


def test_evaluate_on_a_users_dataset(tiny_networks, tmp_path):
    """``--data DIR``: a datasets folder of the user's (here one ``controlstack dataset build`` made from
    photos) replaces the world's held-out scenes; its captions, images and conditions are what the rows
    read; a control type it lacks is one line naming its columns."""
    from PIL import Image

    from controlstack.cli.main import main
    from controlstack.evaluation.evaluate import EvaluateConfig, dataset_scenes

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        a = np.full((96, 80, 3), 40 * i, np.uint8)
        a[20:60, 20 + 5 * i:50] = (200, 60, 30)
        Image.fromarray(a).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"a red box {i}")
    assert main(["dataset", "build", str(photos), "--annotators", "canny", "--out", str(tmp_path / "d"),
                 "--quiet"]) == 0
    scenes = dataset_scenes(str(tmp_path / "d"), 2, 64, 1, ("canny",))
    assert [s["text"] for s in scenes] == ["a red box 1", "a red box 2"]
    assert scenes[0]["image"].shape == scenes[0]["canny"].shape == (64, 64, 3)
    out = tmp_path / "ev"
    assert main(["evaluate", "--data", str(tmp_path / "d"), "--scenes", "2", "--controls", "canny", "--steps", "1",
                 "--out", str(out), "--features", str(tiny_networks / "features"),
                 "--clip", str(tiny_networks / "clip")]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["data"] == str(tmp_path / "d") and set(report["rows"][0]["fidelity"]) == {"edge_f1", "tv"}
    with pytest.raises(ControlstackError, match="has no column depth"):
        dataset_scenes(str(tmp_path / "d"), 2, 64, 0, ("depth",))
    with pytest.raises(ControlstackError, match="has 3 rows"):
        dataset_scenes(str(tmp_path / "d"), 3, 64, 1, ("canny",))
    assert EvaluateConfig(data=str(tmp_path / "d")).data


def test_the_controlnet_plus_plus_preset_end_to_end(tiny_networks, tmp_path):
    """``--preset controlnet++``: its settings (20 UniPC steps, CFG 7.5, balanced, 4 images per scene, each
    its own seed) and its measures in metrics.json; the reference set holds each real image once."""
    from controlstack.cli.main import main

    out = tmp_path / "cnpp"
    assert main(["evaluate", "--preset", "controlnet++", "--scenes", "2", "--controls", "canny", "--out", str(out),
                 "--features", str(tiny_networks / "features"), "--clip", str(tiny_networks / "clip")]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert (report["scenes"], report["images"]) == (2, 8)
    (row,) = report["rows"]
    assert (row["mode"], row["cfg"]) == ("balanced", 7.5) and set(row["fidelity"]) == {"f1", "tv"}
    assert report["config"]["steps"] == 20 and report["config"]["protocol"] == "controlnet++"
    pngs = sorted((out / "images").rglob("*.png"))
    assert len(pngs) == 8 and len({p.read_bytes() for p in pngs}) == 8  # 4 seeds per scene: 8 different images
