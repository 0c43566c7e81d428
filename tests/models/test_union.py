"""ControlNet-Union / ProMax: task mapping and its errors, one fused branch per union model, parity
with diffusers' ``StableDiffusionXLControlNetUnionPipeline``, and the files it comes in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack import Control
from controlstack.control import UnionBranch
from controlstack.errors import ControlstackError
from controlstack.models.union import UNION_TASKS, control_id
from controlstack.sampling import make_scheduler
from tests.parity import assert_same_image

STEPS, SIZE, SEED = 6, 64, 1234


@pytest.fixture(scope="module")
def hints():
    g = np.random.default_rng(0)
    return [Image.fromarray((g.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)) for _ in range(2)]


def reference(xl, xl_union, cfg=7.5, **kw):
    from diffusers import StableDiffusionXLControlNetUnionPipeline

    ref = StableDiffusionXLControlNetUnionPipeline(
        vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2, tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2, unet=xl.unet, controlnet=xl_union, scheduler=make_scheduler("unipc"),
        add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref("a red box", num_inference_steps=STEPS, guidance_scale=cfg, height=SIZE, width=SIZE,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="np", **kw).images


def ours(pipe, controls, cfg=7.5, **kw):
    return pipe("a red box", controls, steps=STEPS, cfg=cfg, seed=SEED, width=SIZE, height=SIZE, output_type="np",
                progress=False, **kw)


def test_task_names_map_to_the_model_cards_ids(xl_union):
    assert [control_id(xl_union, t) for t in ("pose", "depth", "softedge", "canny", "normal", "seg", "tile", "inpaint")] \
        == list(range(8))
    assert UNION_TASKS["lineart"] == UNION_TASKS["mlsd"] == 3 and UNION_TASKS["scribble"] == 2


def test_task_errors_are_one_line_and_name_the_choices(xl_union, xl):
    from controlstack.models.tiny import tiny_union_controlnet

    with pytest.raises(ControlstackError, match="needs a task.*one of pose, openpose, depth"):
        control_id(xl_union, None, "union")
    with pytest.raises(ControlstackError, match="has no task 'sketch'; choose one of"):
        control_id(xl_union, "sketch", "union")
    six = tiny_union_controlnet(xl.unet, seed=1, num_control_type=6)  # the first release: no tile / repaint
    with pytest.raises(ControlstackError, match="task 'tile' is control id 6, but 'union' has 6 control types"):
        control_id(six, "tile", "union")


def test_one_condition_matches_diffusers(xl, xl_union, xl_pipe, hints):
    expected = reference(xl, xl_union, control_image=[hints[0]], control_mode=[1], controlnet_conditioning_scale=0.7)
    got = ours(xl_pipe, [Control(xl_union, hints[0], task="depth", weight=0.7)])
    assert_same_image(got, expected)
    assert np.abs(got - ours(xl_pipe, [Control(xl_union, hints[0], task="canny", weight=0.7)])).max() > 1e-3  # type acts


def test_two_conditions_share_one_pass_and_match_diffusers(xl, xl_union, xl_pipe, hints):
    expected = reference(xl, xl_union, control_image=hints, control_mode=[1, 3], controlnet_conditioning_scale=[0.7, 1.1],
                         control_guidance_start=[0.0, 0.3], control_guidance_end=[0.6, 1.0])
    controls = [Control(xl_union, hints[0], task="depth", weight=0.7, end=0.6),
                Control(xl_union, hints[1], task="canny", weight=1.1, start=0.3)]
    assert_same_image(ours(xl_pipe, controls), expected)
    branches = xl_pipe.make_branches(controls, SIZE, SIZE, ("a", ""), 1, True, None, 2)
    assert len(branches) == 1 and isinstance(branches[0], UnionBranch) and branches[0].ids == [1, 3]


def test_guess_mode_matches_diffusers(xl, xl_union, xl_pipe, hints):
    # diffusers 0.42's union pipeline fails in guess mode with CFG (it repeats the control-type vector
    # for the CFG batch while the ControlNet runs on the conditional half), so compare without CFG
    expected = reference(xl, xl_union, cfg=1.0, control_image=hints, control_mode=[0, 6], guess_mode=True)
    got = ours(xl_pipe, [Control(xl_union, hints[0], task="pose"), Control(xl_union, hints[1], task="tile")], cfg=1.0,
               mode="guess")
    assert_same_image(got, expected)
    assert np.isfinite(ours(xl_pipe, [Control(xl_union, hints[0], task="pose")], mode="guess")).all()  # with CFG too


def test_a_union_beside_a_plain_controlnet_and_the_shared_mask(xl, xl_union, xl_pipe, hints):
    from controlstack.models.tiny import tiny_controlnet

    plain = tiny_controlnet(xl.unet, seed=5)
    left = np.zeros((SIZE, SIZE), np.float32)
    left[:, :32] = 1
    both = ours(xl_pipe, [Control(plain, hints[0]), Control(xl_union, hints[1], task="seg", mask=left)])
    alone = ours(xl_pipe, [Control(plain, hints[0])])
    assert np.abs(both - alone).max() > 1e-3
    with pytest.raises(ControlstackError, match="share one mask"):
        ours(xl_pipe, [Control(xl_union, hints[0], task="depth", mask=left), Control(xl_union, hints[1], task="canny")])


def test_union_files_round_trip(xl_union, tmp_path):
    from safetensors.torch import save_file

    from controlstack.io.checkpoints import inspect_checkpoint, load_controlnet, save_controlnet

    def same(m):
        return type(m).__name__ == "ControlNetUnionModel" and all(
            torch.equal(v, m.state_dict()[k]) for k, v in xl_union.state_dict().items())

    assert same(load_controlnet(save_controlnet(xl_union, tmp_path / "union")))
    assert same(load_controlnet(save_controlnet(xl_union, tmp_path / "union.safetensors")))
    bare = tmp_path / "diffusion_pytorch_model_promax.safetensors"  # as xinsir shares it: no config inside
    save_file({k: v.contiguous() for k, v in xl_union.state_dict().items()}, str(bare))
    back = load_controlnet(bare)
    assert back.config.num_control_type == 8 and back.config.num_trans_channel == 32
    assert inspect_checkpoint(tmp_path / "union")["arch"]["family"] == "SDXL"


def test_cli_control_names_the_task(xl, xl_union, tmp_path, hints):
    from controlstack.cli.main import main
    from controlstack.io.checkpoints import save_base, save_controlnet

    base = save_base(xl, tmp_path / "base")
    model = save_controlnet(xl_union, tmp_path / "union")
    hints[0].save(tmp_path / "d.png")
    args = ["generate", "--model", str(base), "--prompt", "a", "--steps", "2", "--width", "64", "--height", "64",
            "--seed", "1", "--no-progress", "--out", str(tmp_path / "out")]
    assert main([*args, "--control", f"{model}/depth:{tmp_path / 'd.png'}"]) == 0
    assert main([*args, "--control", f"{model}:{tmp_path / 'd.png'}"]) == 2  # no task: one line, exit 2


def test_inspect_and_serve_know_union_files(xl_union, tmp_path):
    from safetensors.torch import save_file

    from controlstack.cli.serve import controlnet_families
    from controlstack.io.checkpoints import inspect_checkpoint, save_controlnet

    bare = tmp_path / "promax.safetensors"
    save_file({k: v.contiguous() for k, v in xl_union.state_dict().items()}, str(bare))
    for path in (save_controlnet(xl_union, tmp_path / "u"), save_controlnet(xl_union, tmp_path / "u.safetensors"), bare):
        info = inspect_checkpoint(path)
        assert info["kind"] == "controlnet" and info["arch"]["family"] == "SDXL", path
    assert "8 control types" in inspect_checkpoint(bare)["arch"]["variant"]
    assert controlnet_families([str(tmp_path / "u"), str(bare)]) == {"u": (str(tmp_path / "u"), "sdxl"),
                                                                     "promax": (str(bare), "sdxl")}
    broken = tmp_path / "broken.safetensors"
    save_file({"task_embedding": torch.zeros(8, 32)}, str(broken))
    from controlstack.io.checkpoints import load_controlnet

    with pytest.raises(ControlstackError, match="lacks 'spatial_ch_projs.weight'"):
        load_controlnet(broken)


class _Counting:
    """A stand-in union runner: residuals of ones, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, text, conditions, ids, scales, **kw):
        from controlstack.residuals import Residuals

        self.calls += 1
        return Residuals([torch.ones(1, 1, 2, 2) * sum(scales)], torch.ones(1, 1, 1, 1))


def test_reuse_replays_a_union_only_at_the_same_weights(hints, xl_union):
    from controlstack.sampling.loop import Step

    def branch(*controls):
        runner = _Counting()
        return runner, UnionBranch(runner, list(controls), [torch.zeros(1)] * len(controls), [1] * len(controls))

    # one condition: residuals are scaled at each step, so a reuse step applies its own weight
    runner, one = branch(Control(xl_union, hints[0], task="depth", weight=[(0.0, 1.0), (1.0, 0.0)]))
    first = one(None, None, None, Step(0, 4, torch.tensor(0)))
    reused = one(None, None, None, Step(2, 4, torch.tensor(0)), reuse=True)
    assert runner.calls == 1 and float(reused.mid) == pytest.approx(float(first.mid) * (1 - 2 / 3))
    # several: fused with their weights inside, so a window closing forces a fresh pass
    runner, two = branch(Control(xl_union, hints[0], task="depth", end=0.5), Control(xl_union, hints[1], task="canny"))
    two(None, None, None, Step(0, 4, torch.tensor(0)))
    two(None, None, None, Step(1, 4, torch.tensor(0)), reuse=True)  # both still active: replayed
    assert runner.calls == 1
    two(None, None, None, Step(2, 4, torch.tensor(0)), reuse=True)  # depth's window closed: recomputed
    assert runner.calls == 2
