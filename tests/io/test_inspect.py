"""inspect_checkpoint: format, kind, architecture, parameter count, dtype -- header only."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from controlstack.errors import ControlstackError
from controlstack.io.checkpoints import inspect_checkpoint


def test_inspect_controlnet_file_and_folder(ckpt_dir, cn):
    n = sum(p.numel() for p in cn.parameters())
    f = inspect_checkpoint(ckpt_dir / "cn.safetensors")
    d = inspect_checkpoint(ckpt_dir / "cn")
    assert (f["format"], f["container"], f["kind"]) == ("original", "safetensors", "controlnet")
    assert (d["format"], d["container"], d["kind"]) == ("diffusers", "folder", "controlnet")
    for info in (f, d):
        assert info["params"] == n == 705224 and info["tensors"] == 178 and info["dtype"] == "float32"
        assert info["arch"]["block_out_channels"] == [32, 64]
        assert info["arch"]["conditioning_embedding_out_channels"] == [8, 16, 32, 32]
    assert f["size_bytes"] == (ckpt_dir / "cn.safetensors").stat().st_size
    assert f["arch"]["config_source"] == "embedded config"


def test_inspect_bases_and_half_precision(ckpt_dir, tmp_path):
    f = inspect_checkpoint(ckpt_dir / "base.safetensors")
    d = inspect_checkpoint(ckpt_dir / "base")
    assert (f["kind"], f["format"], d["kind"], d["format"]) == ("base", "original", "base", "diffusers")
    assert f["params"] == d["params"] == 1542339
    assert f["arch"]["vae"] and f["arch"]["text_encoder"] and not f["arch"]["ema_weights"]
    raw = {k: v.half() for k, v in load_file(ckpt_dir / "cn.safetensors").items()}
    raw["control_model.zero_convs.0.0.bias"] = raw["control_model.zero_convs.0.0.bias"].float()
    save_file(raw, tmp_path / "h.safetensors")
    info = inspect_checkpoint(tmp_path / "h.safetensors")
    assert info["dtype"] == "mixed (float16: 177, float32: 1)"
    assert info["arch"]["config_source"] == "inferred from tensors" and info["arch"]["attention_head_dim"] == 8


def test_inspect_rejects_unknown_tensors_and_pickles(tmp_path):
    save_file({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
    with pytest.raises(ControlstackError, match="not a recognised checkpoint"):
        inspect_checkpoint(tmp_path / "w.safetensors")
    torch.save({"w": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(ControlstackError, match="allow-pickle"):
        inspect_checkpoint(tmp_path / "w.pt")
