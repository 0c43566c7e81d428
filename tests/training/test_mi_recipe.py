"""Minimal Impact ControlNet as options of the ControlNet recipe: stage 1 (rebalanced data + the
mi injection) and stage 2 (+ the conservativity term) on tiny configs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from controlstack.errors import ControlstackError
from tests.training.conftest import tiny_controlnet_config

STAGE1 = {"rebalance_probability": 1.0, "rebalance_keep": (0.3, 0.7), "injection": "mi", "num_validation_images": 0}


def _metric(out: Path, name: str) -> dict[int, float]:
    with (Path(out) / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["metric"] == name}


def _weights(model_dir) -> dict:
    return load_file(str(Path(model_dir) / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def stage1(world_dir, tiny_base_dir, tmp_path_factory):
    from controlstack.training.controlnet import train

    out = tmp_path_factory.mktemp("mi") / "stage1"
    cfg = tiny_controlnet_config(world_dir, tiny_base_dir, out, **(STAGE1 | {"num_validation_images": 1}))
    return out, train(cfg)


def test_stage1_trains_with_rebalancing_and_the_mi_injection(stage1):
    out, model = stage1
    losses = _metric(out, "loss")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert (out / "rebalance.png").is_file()  # the grid of rebalanced samples, written at the start
    assert (out / "samples" / "step-0000002.png").is_file()  # validated with the mi injection
    settings = json.loads((Path(model) / "controlstack.json").read_text())
    assert settings["recommended"] == {"mode": "mi"}
    assert settings["training"]["rebalance_probability"] == 1.0


def test_stage2_continues_stage1_with_the_conservativity_term(stage1, world_dir, tiny_base_dir, tmp_path):
    from controlstack.training.controlnet import train

    out = tmp_path / "stage2"
    cfg = tiny_controlnet_config(world_dir, tiny_base_dir, out, init_from=str(stage1[1]), conservativity_weight=0.01,
                                 conservativity_batch=1, **STAGE1)
    train(cfg)
    losses, asym, diff = _metric(out, "loss"), _metric(out, "asym"), _metric(out, "diffusion_loss")
    assert sorted(asym) == [1, 2] and all(math.isfinite(v) and v != 0 for v in asym.values())
    # the logged loss is the diffusion loss plus 0.01 x the (differentiated) Asym estimate
    for s in (1, 2):
        assert losses[s] == pytest.approx(diff[s] + 0.01 * asym[s], rel=1e-3, abs=1e-5)


def test_mi_stage1_resumes_exactly(world_dir, tiny_base_dir, tmp_path):
    """A run stopped after its step-2 checkpoint and resumed to step 4 ends with the weights of an
    uninterrupted 4-step run (the rebalancing draws from per-step generators; stage 2 is killed with
    SIGKILL and resumed in test_resume.py)."""
    from controlstack.training.controlnet import ControlNetConfig, train

    kw = STAGE1 | {"checkpoint_every": 2}
    ref = train(tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "ref", max_steps=4, **kw))
    first = tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "cut", max_steps=2, **kw)
    train(first)
    resumed = train(ControlNetConfig(**(first.to_dict() | {"max_steps": 4})), resume=True)
    a, b = _weights(ref), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metric(tmp_path / "ref", "loss") == _metric(tmp_path / "cut", "loss")


def test_mi_config_checks(world_dir, tiny_base_dir, tmp_path):
    def cfg(**kw):
        return tiny_controlnet_config(world_dir, tiny_base_dir, tmp_path / "x", **kw)

    for kw, match in [
        ({"rebalance_probability": 1.5}, "rebalance_probability"),
        ({"rebalance_keep": (0.8, 0.2)}, "rebalance_keep"),
        ({"rebalance_regions": "voronoi"}, "rebalance_regions"),
        ({"rebalance_probability": 0.5, "condition": "image"}, "no blank value|object_column|condition"),
        ({"injection": "nope"}, "unknown mode"),
        ({"injection": "mi", "injection_options": {"reduce": "pixel"}}, "reduce"),
        ({"injection": "controlnet"}, "CFG half"),
        ({"conservativity_weight": -1.0}, "conservativity_weight"),
        ({"conservativity_probes": 0}, "conservativity_probes"),
    ]:
        with pytest.raises(ControlstackError, match=match):
            cfg(**kw)
