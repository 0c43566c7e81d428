"""Omni ControlNet in the pipeline: task tokens in the branch's own prompt, errors, the integrated
photo -> conditions -> image path (``Pipeline.from_image``), on tiny seeded models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack import Control, Pipeline
from controlstack.errors import ControlstackError

TASKS = ("canny", "depth", "seg")


@pytest.fixture()
def omni_pipe(tmp_path):
    """A fresh tiny pipeline (its text encoder gets the tokens) and a tiny Omni ControlNet folder."""
    from controlstack.models.task_tokens import save_task_tokens
    from controlstack.models.tiny import tiny_controlnet, tiny_sd

    sd = tiny_sd(seed=0, max_length=16)
    folder = tmp_path / "omni"
    tiny_controlnet(sd.unet, seed=7).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    save_task_tokens({t: torch.randn(sd.text_encoder.config.hidden_size, generator=g) for t in TASKS}, folder)
    return Pipeline(sd, name="tiny"), str(folder)


def _hint():
    a = np.zeros((64, 64, 3), np.uint8)
    a[16:48, 16:48] = 255
    return Image.fromarray(a)


RUN = dict(steps=2, width=64, height=64, seed=3, progress=False, output_type="np")


def test_the_task_changes_the_image_and_the_unet_keeps_the_plain_prompt(omni_pipe):
    pipe, omni = omni_pipe
    depth = pipe("a red box", [Control(omni, _hint(), task="depth")], **RUN)
    canny = pipe("a red box", [Control(omni, _hint(), task="canny")], **RUN)
    assert np.abs(depth - canny).max() > 1e-3  # only the token differs
    # the branch's text is "<depth> prompt" (uncond "<depth>"), the U-Net's the plain prompt
    branch = pipe.make_branch(Control(omni, _hint(), task="depth"), 64, 64, ("a red box", ""), 1, True)
    uncond, cond = branch.encoder_hidden_states
    token = pipe.tokenizer.convert_tokens_to_ids("<depth>")
    ids = pipe.tokenizer(["<depth> a red box"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert ids[0, 1] == token
    with torch.no_grad():
        assert torch.equal(cond, pipe.text_encoder(ids)[0])
    assert not torch.equal(cond, pipe.encode_prompt("a red box", 1))


def test_several_omni_controls_share_one_set_of_weights_and_work_with_every_mode(omni_pipe):
    pipe, omni = omni_pipe
    controls = [Control(omni, _hint(), task="depth", weight=0.7), Control(omni, _hint(), task="seg", end=0.5)]
    for mode in ("balanced", "prompt", "controlnet", "mi", "guess"):
        out = pipe("a red box", controls, mode=mode, **RUN)
        assert np.isfinite(out).all()
    assert pipe.controlnet(omni) is pipe.controlnet(omni)  # loaded once, cached by path
    masked = pipe("a red box", [Control(omni, _hint(), task="depth", mask=np.zeros((64, 64)))], **RUN)
    plain = pipe("a red box", [], **RUN)
    assert np.array_equal(masked, plain)  # a zero mask: the Omni branch adds nothing


def test_omni_errors_are_one_line(omni_pipe, tiny_controlnets):
    pipe, omni = omni_pipe
    with pytest.raises(ControlstackError) as err:
        pipe("x", [Control(omni, _hint(), task="lineart")], **RUN)
    assert str(err.value) == f"Omni ControlNet '{omni}' has no task 'lineart'; choose one of canny, depth, seg"
    with pytest.raises(ControlstackError, match="needs a task; choose one of canny, depth, seg"):
        pipe("x", [Control(omni, _hint())], **RUN)
    with pytest.raises(ControlstackError, match="has no task tokens; task='depth' is for an Omni ControlNet"):
        pipe("x", [Control(tiny_controlnets[0], _hint(), task="depth")], **RUN)
    with pytest.raises(ControlstackError, match="control task must be a non-empty name"):
        Control(omni, _hint(), task="")


def test_from_image_makes_the_conditions_and_generates(omni_pipe, monkeypatch, tmp_path):
    from controlstack import assets
    from controlstack.models.predictor import MultiTaskPredictor, PredictorConfig, save_predictor

    pipe, omni = omni_pipe
    torch.manual_seed(0)
    save_predictor(MultiTaskPredictor(PredictorConfig(image_size=32, embed_dim=8, num_heads=[1, 1, 2, 2],
                                                      fpn_width=8, head_width=8, stem_width=4)), tmp_path / "pred")
    monkeypatch.setattr(assets, "predictor_folder", lambda bundle=None: tmp_path / "pred")
    photo = Image.fromarray((np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8))
    result = pipe.from_image(photo, ["canny", "depth"], "a red box", model=omni, return_result=True, **RUN)
    assert len(result.conditions) == 2 and all(c.size == (64, 64) for c in result.conditions)
    assert result.parameters["from_image"] == {"tasks": ["canny", "depth"]}
    assert [c["task"] for c in result.parameters["controls"]] == ["canny", "depth"]
    direct = pipe("a red box", [Control(omni, c, task=t) for t, c in zip(("canny", "depth"), result.conditions)],
                  **RUN)
    assert np.array_equal(result.images, direct)  # the same as making the conditions by hand
    with pytest.raises(ControlstackError, match=r"unknown task\(s\) normal; the Omni ControlNet has canny"):
        pipe.from_image(photo, ["normal"], "x", model=omni, **RUN)
    with pytest.raises(ControlstackError, match="tasks must be a non-empty list"):
        pipe.from_image(photo, "depth", "x", model=omni, **RUN)


def test_preprocess_runs_the_tasks_annotator(omni_pipe):
    from controlstack import annotators

    pipe, omni = omni_pipe
    photo = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    made = annotators.get("canny", resolution=64)(photo)
    a = pipe("x", [Control(omni, photo, task="canny", preprocess=True)], **RUN)
    b = pipe("x", [Control(omni, made, task="canny")], **RUN)
    assert np.array_equal(a, b)
    assert annotators.for_task("seg") == "seg_estimate" and annotators.for_task("lineart") == "lineart"
    with pytest.raises(ControlstackError, match="no annotator makes the condition of task 'mystery'"):
        annotators.for_task("mystery")
