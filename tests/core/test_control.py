"""Acceptance 5 and the branch rules: masks, schedules, windows, hint computed once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlstack import Control, ControlstackError
from controlstack.control import in_window, validate_weight, weight_at
from controlstack.sampling import Step

KW = dict(steps=5, cfg=7.5, seed=7, width=64, height=64, output_type="np", progress=False)


def run(pipe, controls, **kw):
    return pipe("a blue sphere", controls=controls, **{**KW, **kw})


def test_mask_of_ones_and_constant_schedule_are_exact(pipe, tiny_controlnets, hint_images):
    cn, im = tiny_controlnets[0], hint_images[0]
    plain = run(pipe, [Control(cn, im, weight=0.8)])
    ones = run(pipe, [Control(cn, im, weight=0.8, mask=np.ones((64, 64), np.float32))])
    sched = run(pipe, [Control(cn, im, weight=[(0.0, 0.8), (1.0, 0.8)])])
    assert np.array_equal(plain, ones)
    assert np.array_equal(plain, sched)


@pytest.mark.parametrize("mode", ["balanced", "prompt", "controlnet", "guess", "mi"])
def test_mask_of_zeros_is_no_control(pipe, tiny_controlnets, hint_images, mode):
    none = run(pipe, [], mode=mode)
    zeros = run(pipe, [Control(tiny_controlnets[0], hint_images[0], mask=np.zeros((64, 64)))], mode=mode)
    assert np.array_equal(none, zeros)


def test_left_half_mask_concentrates_change(pipe, tiny_controlnets, hint_images):
    """The residuals are exactly zero outside the mask; end to end the change is concentrated on
    the left. (GroupNorm statistics and self-attention spread any local change over the whole
    image: an untrained random U-Net gives a left/right ratio of ~1.3-2, a trained one more.)"""
    from controlstack.control import Branch
    from controlstack.models.runner import ControlNetRunner

    mask = np.zeros((128, 128), np.float32)
    mask[:, :64] = 1.0
    runner = ControlNetRunner(tiny_controlnets[0])
    with torch.no_grad():
        feats = runner.embed_hint(torch.rand(1, 3, 128, 128))
        branch = Branch(runner, feats, 1.0, 0.0, 1.0, mask)
        res = branch(torch.randn(1, 4, 16, 16), torch.tensor(10), torch.randn(1, 16, 32), Step(0, 1, None))
    for r in res.downs + [res.mid]:
        w = r.shape[-1]
        assert torch.count_nonzero(r[..., w // 2:]) == 0 and torch.count_nonzero(r[..., : w // 2]) > 0

    kw = dict(width=128, height=128, steps=1)
    none = run(pipe, [], **kw)
    image = hint_images[0].resize((128, 128))
    masked = run(pipe, [Control(tiny_controlnets[0], image, weight=2.0, mask=mask)], **kw)
    unmasked = run(pipe, [Control(tiny_controlnets[0], image, weight=2.0)], **kw)

    def left_right(out):
        diff = np.abs(out - none)[0].mean(-1)
        return diff[:, :64].mean(), diff[:, 64:].mean()

    (left, right), (uleft, uright) = left_right(masked), left_right(unmasked)
    assert left > 0.01
    assert left / right > 1.25 and left / right > 1.2 * (uleft / uright), (left, right, uleft, uright)


def test_schedule_differs_from_constant_and_interpolates(pipe, tiny_controlnets, hint_images):
    cn, im = tiny_controlnets[0], hint_images[0]
    ramp = run(pipe, [Control(cn, im, weight=[(0.0, 0.0), (1.0, 2.0)])])
    const = run(pipe, [Control(cn, im, weight=1.0)])
    assert np.abs(ramp - const).max() > 1e-3
    frames = validate_weight([(0.0, 0.0), (0.5, 1.0), (1.0, 0.0)])
    assert weight_at(frames, 0.25) == pytest.approx(0.5)
    assert weight_at(frames, 0.5) == 1.0 and weight_at(frames, 1.0) == 0.0


def test_window_rule_is_diffusers():
    steps = [Step(i, 10, torch.tensor(0)) for i in range(10)]
    assert [in_window(0.2, 0.6, s) for s in steps] == [False, False, True, True, True, True] + [False] * 4


def test_control_outside_window_is_not_computed(pipe, tiny_controlnets, hint_images, monkeypatch):
    from controlstack import denoiser as dmod

    calls = []
    original = dmod.ControlledDenoiser.__call__

    def spy(self, x, t, step):
        out = original(self, x, t, step)
        calls.append(self.calls)
        return out

    monkeypatch.setattr(dmod.ControlledDenoiser, "__call__", spy)
    run(pipe, [Control(tiny_controlnets[0], hint_images[0], start=0.0, end=0.4)], steps=10)
    assert calls[-1] == 4  # steps 0..3 only


def test_hint_encoder_runs_once_per_run(pipe, tiny_controlnets, hint_images):
    cn = tiny_controlnets[0]
    count = []
    handle = cn.controlnet_cond_embedding.register_forward_hook(lambda *a: count.append(1))
    try:
        run(pipe, [Control(cn, hint_images[0])], steps=6)
    finally:
        handle.remove()
    assert len(count) == 1


@pytest.mark.parametrize("bad", [dict(start=0.7, end=0.2), dict(weight=[(0.5, 1.0), (0.1, 1.0)]),
                                 dict(weight="strong"), dict(weight=float("nan")), dict(mask=np.ones((4, 4)) * 2)])
def test_bad_control_values(hint_images, bad):
    with pytest.raises(ControlstackError):
        Control("canny", hint_images[0], **bad)


def test_odd_pil_modes_as_condition(pipe, tiny_controlnets, hint_images):
    from PIL import Image

    base = hint_images[1]
    ref = run(pipe, [Control(tiny_controlnets[0], base)])
    for mode in ("L", "P", "RGBA", "CMYK"):
        im = base.convert(mode)
        out = run(pipe, [Control(tiny_controlnets[0], im)])
        assert np.abs(out - ref).max() < 0.05, mode
    i16 = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16))
    assert np.abs(run(pipe, [Control(tiny_controlnets[0], i16)]) - ref).max() < 0.05


def test_mi_mode_through_the_one_loop(pipe, tiny_controlnets, hint_images):
    """MI runs through the same loop; with two controls it differs from the plain sum, and the
    per-position variant differs from the per-layer one."""
    controls = [Control(tiny_controlnets[0], hint_images[0]), Control(tiny_controlnets[1], hint_images[1])]
    summed = run(pipe, controls, mode="balanced")
    mi = run(pipe, controls, mode="mi")
    mi_pos = run(pipe, controls, mode="mi", mode_options={"reduce": "position"})
    assert np.isfinite(mi).all() and np.isfinite(mi_pos).all()
    assert np.abs(mi - summed).max() > 1e-3
    assert np.abs(mi - mi_pos).max() > 1e-4
