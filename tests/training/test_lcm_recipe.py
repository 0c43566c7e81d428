"""The consistency-distillation recipe (``training/lcm.py``): its parts against diffusers' LCM
scripts and scheduler, a full and a LoRA student trained a few steps on the tiny world and sampled by
the pipeline in 2 LCM steps, and an exact resume."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from controlstack.training.lcm import DDIMSolver, LCMConfig, boundary_scalings, x0_and_noise


def config(world_dir, base_dir, out, **kw) -> LCMConfig:
    values = dict(data=world_dir, teacher=base_dir, output_dir=str(out), resolution=32, batch_size=2, max_steps=2,
                  checkpoint_every=2, validate_every=2, log_every=1, num_validation_images=1, num_inference_steps=2,
                  learning_rate=1e-3, seed=3, time_cond_proj_dim=16, lora_rank=4, lora_alpha=4)
    return LCMConfig(**(values | kw))


def test_the_boundary_scalings_and_the_solver_are_diffusers_lcm():
    from diffusers import DDPMScheduler, LCMScheduler

    sched = LCMScheduler()
    t = torch.tensor([0, 19, 259, 999])
    ours = boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert abs(ours[0][i] - c_skip) < 1e-6 and abs(ours[1][i] - c_out) < 1e-6
    assert ours[0][0] == 1 and ours[1][0] == 0  # f(z, 0) = z

    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    solver = DDIMSolver(alphas, 50)
    assert solver.k == 20 and solver.timesteps[:3].tolist() == [19, 39, 59] and solver.timesteps[-1] == 999
    x0, eps = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    index = torch.tensor([0, 10])  # from t = 19 to 0 (alpha_0), from t = 219 to 199
    z = solver.step(x0, eps, index)
    for j, prev in enumerate([0, 199]):
        a = alphas[prev]
        torch.testing.assert_close(z[j], a.sqrt() * x0[j] + (1 - a).sqrt() * eps[j])
    # v-prediction converts back to the x0 and noise it was made of
    t = torch.tensor([259, 999])
    a, s = alphas[t].sqrt().view(-1, 1, 1, 1), (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
    zt, v = a * x0 + s * eps, a * eps - s * x0
    got_x0, got_eps = x0_and_noise(v, t, zt, "v_prediction", alphas)
    torch.testing.assert_close(got_x0, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_eps, eps, atol=1e-5, rtol=0)


@pytest.mark.parametrize("student", ["full", "lora"])
def test_a_student_trains_and_samples_in_lcm_steps(world_dir, tiny_base_dir, tmp_path, student):
    from controlstack import Pipeline
    from controlstack.io.settings import recommended
    from controlstack.training.lcm import train

    out = train(config(world_dir, tiny_base_dir, tmp_path / "run", student=student))
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()
    losses = [float(line.split(",")[-1]) for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()
              if ",loss," in line]
    assert len(losses) == 2 and all(np.isfinite(losses))
    kw = dict(steps=2, seed=0, width=32, height=32, output_type="np", progress=False)
    if student == "full":
        assert recommended(out) == {"scheduler": "lcm", "steps": 2, "cfg": 7.0}
        pipe = Pipeline.from_pretrained(out)
        assert pipe.unet.config.time_cond_proj_dim == 16
        image = pipe("a red cube", **kw)  # the folder's sampler: lcm
        teacher = Pipeline.from_pretrained(tiny_base_dir)("a red cube", scheduler="lcm", cfg=7.0, **kw)
    else:
        pipe = Pipeline.from_pretrained(tiny_base_dir)
        teacher = pipe("a red cube", scheduler="lcm", cfg=1.0, **kw)
        with warnings.catch_warnings(record=True) as seen:  # every adapted layer finds its place (PEFT warns if not)
            warnings.simplefilter("always")
            pipe.load_lora(Path(out) / "pytorch_lora_weights.safetensors", 1.0)
        assert not [w for w in seen if "inconsistency" in str(w.message)]
        assert {"unet"} <= set(pipe.loras[next(iter(pipe.loras))].targets)
        image = pipe("a red cube", scheduler="lcm", cfg=1.0, **kw)
    assert np.isfinite(image).all() and np.abs(image - teacher).max() > 1e-3  # the distillation moved it


def test_resume_continues_bit_exact(world_dir, tiny_base_dir, tmp_path):
    from controlstack.training.lcm import train

    whole = train(config(world_dir, tiny_base_dir, tmp_path / "whole", max_steps=4, num_validation_images=0))
    config_half = config(world_dir, tiny_base_dir, tmp_path / "split", max_steps=2, num_validation_images=0)
    train(config_half)
    resumed = train(config(world_dir, tiny_base_dir, tmp_path / "split", max_steps=4, num_validation_images=0),
                    resume=True)
    a = load_file(str(Path(whole) / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(Path(resumed) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teacher_controlnet(tiny_base_dir, tmp_path_factory):
    """A ControlNet of the tiny teacher whose zero convolutions are not zero, so its residuals act."""
    from controlstack.training.controlnet import build_controlnet, load_base

    base = load_base(tiny_base_dir)
    torch.manual_seed(0)
    net = build_controlnet(base.unet, base.vae, (8, 8, 8, 8), zero_init=False)
    path = tmp_path_factory.mktemp("controlnet") / "canny"
    net.save_pretrained(path, safe_serialization=True)
    return str(path)


def test_control_aware_distillation_sees_the_teachers_controlnet(world_dir, tiny_base_dir, teacher_controlnet,
                                                                 tmp_path):
    from controlstack.io.settings import read_settings
    from controlstack.training.lcm import pick_control, train

    kw = dict(controls=("canny",), controlnets=(teacher_controlnet,), num_validation_images=0)
    with_control = train(config(world_dir, tiny_base_dir, tmp_path / "on", control_probability=1.0, **kw))
    without = train(config(world_dir, tiny_base_dir, tmp_path / "off", control_probability=0.0, **kw))
    plain = train(config(world_dir, tiny_base_dir, tmp_path / "plain", num_validation_images=0))
    weights = [load_file(str(Path(d) / "unet" / "diffusion_pytorch_model.safetensors")) for d in
               (with_control, without, plain)]
    # probability 0 draws the same batches and noise as a run without controls: the same student
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[2])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[2])  # the residuals were distilled
    settings = read_settings(with_control)
    assert settings["recommended"]["control_window"] == [0.0, 1.0]
    assert settings["training"]["controls"] == ["canny"]
    g = torch.Generator().manual_seed(0)
    cfg = config(world_dir, tiny_base_dir, tmp_path, control_probability=0.5, **kw)
    picks = [pick_control(cfg, ["a", "b", "c"], g) for _ in range(400)]
    assert 0.4 < picks.count(None) / 400 < 0.6 and {p for p in picks if p is not None} == {0, 1, 2}
    assert pick_control(cfg, [], g) is None


@pytest.mark.parametrize("bad, says", [({"controls": ("canny",)}, "one ControlNet folder per condition column"),
                                       ({"control_probability": 1.5}, "'control_probability' must be in"),
                                       ({"student": "distilled"}, "choose one of full, lora"),
                                       ({"num_ddim_timesteps": 30}, "must divide"),
                                       ({"w_min": 5.0, "w_max": 2.0}, "'w_min' <= 'w_max'"),
                                       ({"teacher": ""}, "'teacher' is missing")])
def test_bad_settings_are_one_line_errors(world_dir, tiny_base_dir, tmp_path, bad, says):
    from controlstack.errors import ControlstackError

    with pytest.raises(ControlstackError, match=says):
        config(world_dir, tiny_base_dir, tmp_path, **bad)
