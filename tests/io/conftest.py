"""Checkpoint files written once per session from the tiny seeded models (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch


def _assert_same_tensors(a, b):
    """Same parameter names, bit-identical values (models or state dicts)."""
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:5]


@pytest.fixture(scope="session")
def same_tensors():
    """``same_tensors(a, b)``: asserts same parameter names and bit-identical values."""
    return _assert_same_tensors


@pytest.fixture(scope="session")
def cn(tiny_controlnets):
    return tiny_controlnets[0]


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory, tiny_components, cn):
    from controlstack.io.checkpoints import save_base, save_controlnet

    root = tmp_path_factory.mktemp("ckpt")
    save_controlnet(cn, root / "cn")                     # diffusers folder
    save_controlnet(cn, root / "cn.safetensors")         # original single file
    save_base(tiny_components, root / "base")            # diffusers SD folder
    save_base(tiny_components, root / "base.safetensors")  # SD-1.x single file
    return root
