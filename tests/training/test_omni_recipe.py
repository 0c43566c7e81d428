"""OmniControlNet's recipes on tiny configs: the Omni ControlNet (task tokens + mixed conditions)
and the multi-task dense predictor, each with exact resume."""

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

OMNI = {"tasks": ("canny", "depth", "seg"), "condition": "omni", "num_validation_images": 0}


def _metric(out: Path, name: str) -> dict[int, float]:
    with (Path(out) / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["metric"] == name}


def _omni_config(world_dir, base_dir, out, **kw):
    from controlstack.training.omni import OmniConfig

    return OmniConfig(**(tiny_controlnet_config(world_dir, base_dir, out).to_dict() | OMNI | kw))


def test_omni_trains_the_controlnet_and_only_the_task_tokens(world_dir, tiny_base_dir, tmp_path):
    from controlstack.models.task_tokens import initial_vectors, load_task_tokens
    from controlstack.training.controlnet import load_base
    from controlstack.training.omni import train

    model = Path(train(_omni_config(world_dir, tiny_base_dir, tmp_path / "omni", num_validation_images=3)))
    assert json.loads((model / "controlstack.json").read_text()) == {"omni": {"tasks": ["canny", "depth", "seg"]}}
    tokens = load_task_tokens(model)
    base = load_base(tiny_base_dir)
    start = initial_vectors(base.text_encoder, OMNI["tasks"], seed=3)
    assert list(tokens) == list(OMNI["tasks"])
    # tokens of tasks that were drawn moved; an undrawn one had no gradient and stays exactly where it started
    moved = [t for t in tokens if not torch.equal(tokens[t], start[t])]
    assert moved and all(torch.allclose(tokens[t], start[t]) or t in moved for t in tokens)
    assert (tmp_path / "omni" / "samples" / "step-0000002.png").is_file()  # rows: canny, depth, seg
    assert all(math.isfinite(v) for v in _metric(tmp_path / "omni", "loss").values())
    # the base's own text encoder was not touched on disk
    assert load_base(tiny_base_dir).text_encoder.get_input_embeddings().weight.shape[0] == \
        base.text_encoder.get_input_embeddings().weight.shape[0]


def test_omni_resumes_exactly_tokens_included(world_dir, tiny_base_dir, tmp_path):
    from controlstack.models.task_tokens import load_task_tokens
    from controlstack.training.omni import OmniConfig, train

    kw = {"checkpoint_every": 2}
    ref = Path(train(_omni_config(world_dir, tiny_base_dir, tmp_path / "ref", max_steps=4, **kw)))
    first = _omni_config(world_dir, tiny_base_dir, tmp_path / "cut", max_steps=2, **kw)
    train(first)
    resumed = Path(train(OmniConfig(**(first.to_dict() | {"max_steps": 4})), resume=True))
    a, b = (load_file(str(p / "diffusion_pytorch_model.safetensors")) for p in (ref, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = load_task_tokens(ref), load_task_tokens(resumed)
    assert all(torch.equal(ta[t], tb[t]) for t in ta)


def test_omni_config_checks(world_dir, tiny_base_dir, tmp_path):
    for kw, message in [({"tasks": ()}, "'tasks' is empty"), ({"tasks": ("depth", "depth")}, "lists a task twice"),
                        ({"tasks": ("a b",)}, "task names are letters"),
                        ({"rebalance_probability": 0.5}, "does not combine with data rebalancing")]:
        with pytest.raises(ControlstackError, match=message):
            _omni_config(world_dir, tiny_base_dir, tmp_path / "x", **kw)


PREDICTOR = dict(resolution=32, batch_size=2, max_steps=2, embed_dim=8, num_heads=(1, 1, 2, 2), fpn_width=8,
                 head_width=8, stem_width=4, checkpoint_every=1, validate_every=2, log_every=1,
                 num_validation_images=2, seed=1)


def test_predictor_two_steps_logs_every_task_and_resumes_exactly(world_dir, tmp_path):
    from controlstack.models.predictor import TASKS, load_predictor
    from controlstack.training.predictor import PredictorTrainConfig, train

    cfg = PredictorTrainConfig(data=world_dir, output_dir=str(tmp_path / "p"), **PREDICTOR)
    model = load_predictor(train(cfg))
    assert set(model.config.tasks) == set(TASKS)
    for task in TASKS:
        assert sorted(_metric(tmp_path / "p", f"loss_{task}")) == [1, 2]
    assert (tmp_path / "p" / "samples" / "step-0000002.png").is_file()

    ref = load_predictor(train(PredictorTrainConfig(**(cfg.to_dict() | {"output_dir": str(tmp_path / "r"),
                                                                        "max_steps": 4, "checkpoint_every": 2}))))
    cut = PredictorTrainConfig(**(cfg.to_dict() | {"output_dir": str(tmp_path / "c"), "checkpoint_every": 2}))
    train(cut)
    resumed = load_predictor(train(PredictorTrainConfig(**(cut.to_dict() | {"max_steps": 4})), resume=True))
    sa, sb = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_single_task_predictor_is_the_specialist(world_dir, tmp_path):
    from controlstack.models.predictor import load_predictor
    from controlstack.training.predictor import PredictorTrainConfig, train

    cfg = PredictorTrainConfig(data=world_dir, output_dir=str(tmp_path / "s"), **(PREDICTOR | {"tasks": ("depth",)}))
    model = load_predictor(train(cfg))
    assert model.config.tasks == ["depth"] and model.refine[-1].out_channels == 1
    assert sorted(_metric(tmp_path / "s", "loss_depth")) == [1, 2] and not _metric(tmp_path / "s", "loss_seg")
    with pytest.raises(ControlstackError, match="unknown"):
        PredictorTrainConfig(data=world_dir, tasks=("edges",))
