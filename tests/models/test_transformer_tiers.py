"""The speed tiers on transformer bases (``models/tiers.py``: ``CompiledModelCall``): SD3 and Flux
with a ControlNet through AOTInductor graphs give the parity tier's image up to float rounding, and
the fast tier's reuse runs the ControlNets at its key steps only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack import Control, Pipeline
from controlstack.models.graphs import call_graph, call_structure, exact_positions
from controlstack.models.tiers import CompiledModelCall
from tests.models.test_tiers import needs_compiler
from tests.parity import assert_same_image

SIZE = 32
KW = {"steps": 4, "seed": 1, "width": SIZE, "height": SIZE, "progress": False, "output_type": "np"}


@pytest.fixture(scope="module")
def bases():
    from controlstack.models.tiny_mmdit import tiny_flux, tiny_flux_controlnet, tiny_sd3, tiny_sd3_controlnet

    sd3, flux = tiny_sd3(seed=0, with_t5=False), tiny_flux(seed=0)
    return {"sd3": (sd3, tiny_sd3_controlnet(sd3.unet, seed=5), {"cfg": 5.0}),
            "flux": (flux, tiny_flux_controlnet(flux.unet, seed=5), {"cfg": 3.5})}


@pytest.fixture(scope="module")
def hint():
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def test_a_keyword_call_is_split_into_structure_and_tensors_and_rebuilt():
    a, b, c = torch.ones(1), torch.zeros(2), torch.full((3,), 2.0)
    structure, tensors = call_structure({"timestep": a, "blocks": [b, c], "guidance": None, "repeat": True})
    assert structure == (("blocks", "list", 2), ("guidance", "const", None), ("repeat", "const", True),
                         ("timestep", "tensor"))
    assert [t.shape[0] for t in tensors] == [2, 3, 1]
    assert exact_positions(structure) == (2,)  # the timestep stays float32 in a bf16 graph

    seen = {}

    def module(**kw):
        seen.update(kw)
        return (kw["timestep"] + 1, [None, kw["blocks"][1]])

    out = call_graph(module, *tensors, structure=structure)
    assert [float(o[0]) for o in out] == [2.0, 2.0] and seen["repeat"] is True and len(seen["blocks"]) == 2


@needs_compiler
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_compiled_tier_is_parity_up_to_rounding(family, bases, hint, cache):
    c, cn, kw = bases[family]
    controls = [Control(cn, hint, weight=[(0.0, 1.0), (1.0, 0.4)], end=0.8)]
    want = Pipeline(c)("a red cube", controls, **KW, **kw)
    pipe = Pipeline(c).optimize("compiled")
    got = pipe("a red cube", controls, **KW, **kw)
    assert float(np.abs(got - want).max()) > 0  # 0 would mean no graph ran
    assert_same_image(got, want)
    graphs = pipe.runners.graphs()
    # the transformer and the ControlNet (one graph each: the first call of a structure runs eagerly)
    assert sum(g.kind.startswith("transformer-") for g in graphs) == 1
    assert sum(g.kind.startswith("controlnet-mmdit") for g in graphs) == 1
    assert all(g.failed is None for g in graphs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fast_tier_runs_the_controlnets_at_key_steps_only(family, bases, hint, monkeypatch, cache):
    c, cn, kw = bases[family]
    monkeypatch.setattr(CompiledModelCall, "__call__", lambda self, **k: self.module(**k, return_dict=False))
    calls = {}
    for tier in ("parity", "fast"):
        pipe = Pipeline(c).optimize(tier, precision="fp32")
        control = Control(cn, hint)
        seen = []
        original = pipe.runners.transformer_controlnet(cn)
        monkeypatch.setattr(original, "module", lambda **k: seen.append(1) or cn(**k))
        pipe("a red cube", [control], **{**KW, "steps": 8}, **kw)
        calls[tier] = len(seen)
    # Reuse(every=2, after=0.25) over 8 steps: steps 0, 1 and then every other one -> 0 1 2 4 6
    assert calls == {"parity": 8, "fast": 5}


def test_a_none_in_the_output_comes_back_where_it_was(monkeypatch):
    """A Flux ControlNet without single blocks returns ``(double, None)``: the graph cannot return
    None, so the call puts it back into the layout the eager call had."""
    from controlstack.models.compiled import CompiledGraph

    monkeypatch.setattr(CompiledGraph, "__call__", lambda self, *args: self.eager(*args))  # the graph's own output

    class XLabsLike(torch.nn.Module):
        def forward(self, hidden_states, return_dict=False):
            return ([hidden_states + 1, hidden_states * 2], None)

    call = CompiledModelCall("controlnet-mmdit", "ControlNet", XLabsLike())
    x = torch.ones(2)
    first, second = call(hidden_states=x), call(hidden_states=x)  # eager (learns the layout), then the graph
    assert second[1] is None and len(second[0]) == 2
    torch.testing.assert_close(second[0][1], first[0][1])
