"""ControlNet checkpoints: original single files and diffusers folders, both ways, exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from controlstack.errors import ControlstackError
from controlstack.io.checkpoints import check_compatible, load_controlnet, save_controlnet
from controlstack.models.tiny import tiny_unet


def _config(model):
    return {k: v for k, v in json.loads(model.to_json_string()).items() if k != "_name_or_path"}


def test_original_write_read_is_exact(same_tensors, ckpt_dir, cn):
    raw = load_file(ckpt_dir / "cn.safetensors")
    assert all(k.startswith("control_model.") for k in raw) and len(raw) == 178
    assert torch.equal(raw["control_model.zero_convs.3.0.weight"], cn.controlnet_down_blocks[3].weight)
    back = load_controlnet(ckpt_dir / "cn.safetensors")
    same_tensors(back, cn)
    assert _config(back) == _config(cn)  # the config travels in the safetensors metadata


def test_diffusers_original_round_trip(same_tensors, ckpt_dir, cn, tmp_path):
    a = load_controlnet(ckpt_dir / "cn")                      # folder -> model
    save_controlnet(a, tmp_path / "a.safetensors")             # -> original
    b = load_controlnet(tmp_path / "a.safetensors")
    save_controlnet(b, tmp_path / "b")                          # -> diffusers again
    c = load_controlnet(tmp_path / "b")
    for m in (a, b, c):
        same_tensors(m, cn)
    assert _config(c) == _config(cn)


def test_diffusers_from_single_file_reads_our_file_offline(same_tensors, ckpt_dir, cn, monkeypatch):
    from diffusers import ControlNetModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # config= a local folder and local_files_only=True keep diffusers off the Hub
    theirs = ControlNetModel.from_single_file(str(ckpt_dir / "cn.safetensors"), config=str(ckpt_dir / "cn"),
                                              local_files_only=True)
    same_tensors(theirs, cn)


def test_unprefixed_and_diffusers_named_single_files(same_tensors, ckpt_dir, cn, tmp_path):
    raw = load_file(ckpt_dir / "cn.safetensors")
    save_file({k.removeprefix("control_model."): v for k, v in raw.items()}, tmp_path / "bare.safetensors")
    save_file(load_file(ckpt_dir / "cn" / "diffusion_pytorch_model.safetensors"), tmp_path / "dn.safetensors")
    for name in ("bare.safetensors", "dn.safetensors"):
        m = load_controlnet(tmp_path / name, config=ckpt_dir / "cn")
        same_tensors(m, cn)
        assert _config(m) == _config(cn)


def test_architecture_inferred_from_tensors_without_config(same_tensors, ckpt_dir, cn, tmp_path):
    save_file(load_file(ckpt_dir / "cn.safetensors"), tmp_path / "nometa.safetensors")  # drops our metadata
    m = load_controlnet(tmp_path / "nometa.safetensors")
    same_tensors(m, cn)
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                "conditioning_embedding_out_channels", "in_channels", "conditioning_channels"):
        assert list(m.config[key]) == list(cn.config[key]) if isinstance(cn.config[key], tuple) else \
            m.config[key] == cn.config[key]
    # invisible in the weights -> SD-1.x defaults (the tiny model uses 4 heads and 8 groups)
    assert (m.config.attention_head_dim, m.config.norm_num_groups) == (8, 32)


def test_pickle_refused_without_opt_in_and_loaded_with_it(same_tensors, ckpt_dir, cn, tmp_path):
    torch.save({"state_dict": load_file(ckpt_dir / "cn.safetensors"), "epoch": 3}, tmp_path / "cn.ckpt")
    with pytest.raises(ControlstackError, match="allow-pickle / allow_pickle=True"):
        load_controlnet(tmp_path / "cn.ckpt")
    m = load_controlnet(tmp_path / "cn.ckpt", allow_pickle=True, config=ckpt_dir / "cn")
    same_tensors(m, cn)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_rejected_by_weights_only(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ControlstackError, match="weights_only=True"):
        load_controlnet(tmp_path / "evil.pth", allow_pickle=True)


@pytest.mark.parametrize("case,match", [
    ("missing", "does not exist"),
    ("empty_dir", "no config.json"),
    ("txt", "unknown checkpoint format"),
    ("truncated", "corrupt or truncated"),
    ("random", "do not look like a ControlNet"),
    ("base", "base checkpoint, not a ControlNet"),
    ("dropped_key", "1 missing"),
])
def test_bad_controlnet_inputs(ckpt_dir, tmp_path, case, match):
    path = tmp_path / "x.safetensors"
    if case == "missing":
        path = tmp_path / "nope.safetensors"
    elif case == "empty_dir":
        path = tmp_path / "folder"
        path.mkdir()
    elif case == "txt":
        path = tmp_path / "x.txt"
        path.write_text("hello")
    elif case == "truncated":
        path.write_bytes((ckpt_dir / "cn.safetensors").read_bytes()[:5000])
    elif case == "random":
        save_file({"a.weight": torch.zeros(2)}, path)
    elif case == "base":
        save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, path)
    elif case == "dropped_key":
        raw = load_file(ckpt_dir / "cn.safetensors")
        del raw["control_model.zero_convs.2.0.bias"]
        save_file(raw, path, metadata={"controlstack.config": json.dumps(_config_of(ckpt_dir))})
    with pytest.raises(ControlstackError, match=match) as info:
        load_controlnet(path)
    assert "\n" not in str(info.value)


def _config_of(ckpt_dir):
    return json.loads((ckpt_dir / "cn" / "config.json").read_text())


def test_check_compatible_names_the_mismatch(cn, tiny_components):
    check_compatible(cn, tiny_components.unet)  # its own base: fine
    with pytest.raises(ControlstackError, match=r"cross-attention dim 32 vs base 48"):
        check_compatible(cn, tiny_unet(cross_attention_dim=48))
    with pytest.raises(ControlstackError, match=r"block channels \[32, 64\] vs base \[64, 128\]"):
        check_compatible(cn, tiny_unet(block_out_channels=(64, 128)))


def test_failed_save_leaves_nothing(cn, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_controlnet(cn, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ControlstackError, match="unknown checkpoint format"):
        save_controlnet(cn, tmp_path / "x", format="ckpt")


def test_save_replaces_an_existing_output_atomically(same_tensors, cn, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "stale.txt").write_text("old")
    save_controlnet(cn, tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    (tmp_path / "f.safetensors").mkdir()  # a folder where the file goes
    save_controlnet(cn, tmp_path / "f.safetensors")
    same_tensors(load_controlnet(tmp_path / "f.safetensors"), cn)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.safetensors"]
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o644 == 0o644
