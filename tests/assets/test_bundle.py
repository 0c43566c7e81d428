"""The embedded default: loads with no argument, runs every bundled ControlNet, is intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack import assets


def test_default_model_generates_with_each_bundled_controlnet():
    from controlstack import Control, Pipeline

    pipe = Pipeline.from_pretrained()
    names = sorted(pipe.controlnets)
    assert {"canny", "depth", "seg", "pose"} <= set(names)
    size = pipe.native_size
    hint = np.zeros((size, size, 3), np.uint8)
    hint[size // 4: 3 * size // 4, size // 2] = 255
    for name in names:
        task = "canny" if name == "omni" else None  # the Omni ControlNet takes every type through its task
        image = pipe("a red cube on grass", controls=[Control(name, hint, task=task)], steps=2, output_type="np",
                     progress=False)
        assert image.shape == (1, size, size, 3) and np.isfinite(image).all(), name
        assert image.std() > 0.01, name  # an image, not a constant


def test_bundled_files_match_their_recorded_checksums():
    # checked from the first committed stage on, not only once the bundle is complete
    if not (assets.BUNDLE_DIR / assets.CHECKSUMS).is_file():
        pytest.skip("no trained bundle stage in this checkout (placeholder model)")
    assert assets.verify_checksums() == []


def test_a_bundle_is_the_default_only_with_every_required_controlnet(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    for name in assets.REQUIRED_CONTROLNETS:
        assert assets.is_placeholder(tmp_path)  # base + some ControlNets: still the placeholder
        (tmp_path / "controlnets" / name).mkdir(parents=True)
        (tmp_path / "controlnets" / name / "config.json").write_text("{}")
    assert not assets.is_placeholder(tmp_path)
    (tmp_path / "model_index.json").unlink()
    assert assets.is_placeholder(tmp_path)


def test_checksums_catch_a_changed_missing_or_unrecorded_file(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "README.md").write_text("card: not a model file")
    assets.write_checksums(tmp_path)
    assert assets.verify_checksums(tmp_path) == []
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"weightz")
    (tmp_path / "unet" / "extra.json").write_text("{}")
    (tmp_path / "model_index.json").unlink()
    assert sorted(assets.verify_checksums(tmp_path)) == [
        "model_index.json: missing", "unet/extra.json: not recorded in SHA256SUMS",
        "unet/w.safetensors: checksum differs"]


def test_the_bundle_folder_loads_with_its_trained_controlnets_even_when_partial():
    from controlstack import Pipeline

    if not assets.has_trained_base():
        pytest.skip("no trained base in this checkout")
    pipe = Pipeline.from_pretrained(assets.BUNDLE_DIR)
    assert pipe.name == "controlstack-bundle" and set(pipe.controlnets) == set(assets.trained_controlnets())
    image = pipe("a red cube on grass", steps=2, output_type="np", progress=False)
    assert image.shape == (1, pipe.native_size, pipe.native_size, 3) and image.std() > 0.01


def test_a_folder_in_the_bundle_layout_brings_its_own_controlnets(tmp_path, tiny_components, tiny_controlnets):
    """bundle-v2 while it is built: its own ControlNets, not the shipped bundle's of the same name."""
    from controlstack import Pipeline
    from controlstack.io.checkpoints import save_base, save_controlnet

    save_base(tiny_components, tmp_path / "plain")
    plain = Pipeline.from_pretrained(tmp_path / "plain")
    assert set(plain.controlnets) == set(assets.bundled_controlnets())  # a plain SD folder: the bundled ones
    save_base(tiny_components, tmp_path / "next")
    save_controlnet(tiny_controlnets[1], tmp_path / "next" / "controlnets" / "seg")
    pipe = Pipeline.from_pretrained(tmp_path / "next")
    assert set(pipe.controlnets) == {"seg"}
    seg = pipe.controlnet("seg")
    ref = tiny_controlnets[1].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in seg.state_dict().items())
