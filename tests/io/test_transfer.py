"""Transfer: cn' = cn + (base' - base) exactly on the shared encoder weights, the rest unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.io.checkpoints import SHARED_PREFIXES, transfer_controlnet
from controlstack.models.tiny import tiny_unet


@pytest.fixture(scope="module")
def bases(tiny_components):
    old = tiny_components.unet
    new = copy.deepcopy(old)  # a "fine-tuned" base: every weight moved a little
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return old, new


def test_transfer_adds_the_base_difference_exactly(cn, bases):
    old, new = bases
    out = transfer_controlnet(cn, old, new)
    a, b, o, n = cn.state_dict(), out.state_dict(), old.state_dict(), new.state_dict()
    shared = [k for k in a if k.startswith(SHARED_PREFIXES)]  # all but 8 hint convs and 7 zero convs
    assert len(shared) == 178 - 16 - 14 and "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in shared
    for k in a:
        if k in shared:
            assert torch.equal(b[k], a[k] + (n[k] - o[k])), k
            assert not torch.equal(b[k], a[k]), k
        else:  # hint encoder and zero convolutions
            assert torch.equal(b[k], a[k]), k
    assert torch.equal(cn.state_dict()["conv_in.weight"], a["conv_in.weight"])  # input left untouched


def test_transfer_to_the_same_base_is_identity(cn, bases, same_tensors):
    same_tensors(transfer_controlnet(cn, bases[0], bases[0]), cn)


def test_transfer_refuses_a_base_of_another_architecture(cn, bases):
    with pytest.raises(ControlstackError, match="block channels"):
        transfer_controlnet(cn, bases[0], tiny_unet(block_out_channels=(64, 128)))
