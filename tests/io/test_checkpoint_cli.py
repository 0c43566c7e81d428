"""``controlstack convert / transfer / inspect`` end to end (subprocess) and their bad inputs
(exit 2, one line on stderr, no traceback, no partial output)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controlstack.cli.main import main
from controlstack.io.checkpoints import load_base, load_controlnet, save_base, transfer_controlnet
from controlstack.io.sd_single_file import load_unet
from controlstack.models.tiny import tiny_sd, tiny_unet

EXE = str(Path(sys.executable).parent / "controlstack")


def cli(*args):
    return subprocess.run([EXE, *map(str, args)], check=False, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def new_base(tmp_path_factory, tiny_components):
    comps = copy.copy(tiny_components)
    comps.unet = copy.deepcopy(tiny_components.unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in comps.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    path = tmp_path_factory.mktemp("newbase") / "new"
    save_base(comps, path)
    return path


def test_convert_cli_original_to_diffusers(same_tensors, ckpt_dir, cn, tmp_path):
    r = cli("convert", ckpt_dir / "cn.safetensors", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {tmp_path / 'out'} (diffusers controlnet)"
    same_tensors(load_controlnet(tmp_path / "out"), cn)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left over


def test_transfer_cli(same_tensors, ckpt_dir, cn, tiny_components, new_base, tmp_path):
    out = tmp_path / "moved.safetensors"
    r = cli("transfer", "--controlnet", ckpt_dir / "cn.safetensors", "--base", ckpt_dir / "base.safetensors",
            "--new-base", new_base, "--out", out)
    assert r.returncode == 0, r.stderr
    expected = transfer_controlnet(cn, tiny_components.unet, load_unet(new_base))
    same_tensors(load_controlnet(out), expected)


def test_inspect_cli(ckpt_dir):
    r = cli("inspect", ckpt_dir / "cn.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["kind"], info["format"], info["params"], info["dtype"]) == ("controlnet", "original", 705224, "float32")


def test_pickle_without_opt_in_exits_2_in_a_subprocess(ckpt_dir, tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "cn.ckpt")
    r = cli("convert", tmp_path / "cn.ckpt", tmp_path / "out.safetensors")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "pass --allow-pickle / allow_pickle=True if you trust the file" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def _fails(capsys, argv, match):
    capsys.readouterr()  # drop earlier output (progress bars of fixtures)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err


def test_convert_bad_inputs(capsys, ckpt_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    _fails(capsys, ["convert", ckpt_dir / "cn.safetensors", tmp_path / "taken"], "already exists; pass --overwrite")
    _fails(capsys, ["convert", tmp_path / "missing.safetensors", tmp_path / "a"], "does not exist")
    _fails(capsys, ["convert", ckpt_dir / "cn", tmp_path / "a.ckpt", "--to", "original"], "name the output")
    _fails(capsys, ["convert", ckpt_dir / "cn", tmp_path / "a.safetensors", "--to", "diffusers"], "without a file extension")
    _fails(capsys, ["convert", ckpt_dir / "base.safetensors", tmp_path / "b"], "carries no tokenizer; pass --config DIR")
    (tmp_path / "noconfig").mkdir()
    _fails(capsys, ["convert", tmp_path / "noconfig", tmp_path / "c"], "neither config.json nor model_index.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noconfig", "taken"]  # nothing partial


def test_convert_half_overwrite_and_bases(same_tensors, capsys, ckpt_dir, cn, tiny_components, tmp_path):
    out = tmp_path / "h.safetensors"
    out.write_text("old")
    assert main(["convert", str(ckpt_dir / "cn"), str(out), "--half", "--overwrite"]) == 0
    half = load_controlnet(out, torch_dtype=None)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert torch.equal(half.conv_in.weight, cn.conv_in.weight.half())
    # bases too: folder -> single file -> folder (the tokenizer comes from --config)
    assert main(["convert", str(ckpt_dir / "base"), str(tmp_path / "sd.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "sd.safetensors"), str(tmp_path / "sd"), "--config", str(ckpt_dir / "base")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {tmp_path / 'sd'} (diffusers base)"
    back = load_base(tmp_path / "sd")
    for part in ("unet", "vae", "text_encoder"):
        same_tensors(getattr(back, part), getattr(tiny_components, part))


def test_transfer_and_inspect_bad_inputs(capsys, ckpt_dir, tmp_path):
    other = tmp_path / "other"
    wide = tiny_sd(seed=1)
    wide.unet = tiny_unet(cross_attention_dim=48)
    save_base(wide, other)
    _fails(capsys, ["transfer", "--controlnet", ckpt_dir / "cn", "--base", ckpt_dir / "base", "--new-base", other,
                    "--out", tmp_path / "t"], "cross-attention dim 32 vs base 48")
    assert not (tmp_path / "t").exists()
    _fails(capsys, ["inspect", tmp_path / "nothing"], "does not exist")


def test_convert_keeps_the_source_dtype_permissions_and_half_is_quiet(tmp_path, capfd):
    import os
    import stat

    import torch
    from safetensors.torch import load_file

    from controlstack.cli.main import main as cli
    from controlstack.io.checkpoints import save_controlnet
    from controlstack.models.tiny import tiny_controlnet, tiny_unet

    save_controlnet(tiny_controlnet(tiny_unet(0)).to(torch.float16), tmp_path / "cn16", format="diffusers")
    capfd.readouterr()
    assert cli(["convert", str(tmp_path / "cn16"), str(tmp_path / "a.safetensors")]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "a.safetensors")).values()} == {torch.float16}
    assert cli(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b")]) == 0
    weights = tmp_path / "b" / "diffusion_pytorch_model.safetensors"
    assert {v.dtype for v in load_file(str(weights)).values()} == {torch.float16}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask
    save_controlnet(tiny_controlnet(tiny_unet(0)), tmp_path / "cn32", format="diffusers")
    capfd.readouterr()
    assert cli(["convert", str(tmp_path / "cn32"), str(tmp_path / "c.safetensors"), "--half"]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "c.safetensors")).values()} == {torch.float16}
    assert "float32" not in capfd.readouterr().err  # no stray "modules to keep in float32" note
