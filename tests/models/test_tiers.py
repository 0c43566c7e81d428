"""The speed tiers (models/tiers.py, models/compiled.py, models.tiers.Reuse) on the tiny seeded models.

Compiling is slow (~15-25 s per graph here), so one module-wide cache folder holds the four
packages (U-Net encoder and decoder for the CFG batch, one ControlNet, the VAE decoder) that the
compiled and fast-fp32 tests share; the second-process test loads them without compiling.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from controlstack import Control, ControlstackError, Pipeline
from controlstack.models import compiled
from controlstack.models.tiers import CompiledUNetRunner, Reuse, Tier, make_tier
from controlstack.sampling import Step
from tests.parity import assert_same_image

#: AOTInductor needs a C++ compiler at run time; without one the tier runs eagerly (tested below)
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="no C++ compiler for AOTInductor")
KW = {"steps": 6, "seed": 0, "width": 64, "height": 64, "output_type": "np", "progress": False}


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@pytest.fixture(scope="module")
def runs(cache, tiny_components, tiny_controlnets, hint_images):
    """One control, 6 UniPC steps, CFG: parity, compiled, and fast with fp32 graphs (machine-independent)."""
    controls = [Control(tiny_controlnets[0], hint_images[0])]
    out = {"parity": Pipeline(tiny_components, name="tiny")("a red box", controls, **KW)}
    for tier, precision in (("compiled", None), ("fast", "fp32")):
        pipe = Pipeline(tiny_components, name="tiny").optimize(tier, precision=precision)
        out[tier] = pipe("a red box", controls, **KW)
        out[f"{tier}-params"] = pipe("a red box", controls, **{**KW, "output_type": "pil"}, return_result=True).parameters
    return out


@needs_compiler
def test_compiled_tier_is_parity_up_to_rounding(runs, cache):
    diff = float(np.abs(runs["compiled"] - runs["parity"]).max())
    assert diff > 0  # 0 would mean the graph never ran
    assert_same_image(runs["compiled"], runs["parity"])
    assert len(list((cache / "compiled").glob("*.pt2"))) == 4
    assert runs["compiled-params"]["optimize"] == "compiled"


@needs_compiler
def test_fast_tier_fp32_reuse_stays_close(runs):
    # measured 38.6 dB on this tiny random model (its images are noise-like, the worst case for reuse)
    assert 30.0 < psnr(runs["fast"], runs["parity"]) < 80.0


@needs_compiler
def test_cache_is_reused_by_a_second_process(runs, cache):
    script = (
        "import numpy as np, torch\n"
        "from controlstack import Control, Pipeline\n"
        "from controlstack.models.tiny import tiny_sd, tiny_controlnet\n"
        "from PIL import Image\n"
        "torch.set_num_threads(1)\n"
        "c = tiny_sd(seed=0, max_length=16); cn = tiny_controlnet(c.unet, seed=1)\n"
        "a = np.zeros((64, 64, 3), np.uint8)\n"  # conftest's hint_images[0]
        "a[16:48, 16] = a[16:48, 47] = a[16, 16:48] = a[47, 16:48] = 255\n"
        "hint = Image.fromarray(a)\n"
        f"out = Pipeline(c).optimize('compiled')('a red box', [Control(cn, hint)], **{KW!r})\n"
        "np.save('out.npy', out)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=cache, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiling" not in done.stderr
    np.testing.assert_array_equal(np.load(cache / "out.npy"), runs["compiled"])


@needs_compiler
def test_compiled_tier_composes_with_modes_masks_schedules_windows_and_img2img(
        tiny_components, tiny_controlnets, hint_images, runs):
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1.0
    control = Control(tiny_controlnets[0], hint_images[0], weight=[(0.0, 1.0), (1.0, 0.3)], mask=mask, end=0.7)
    init = hint_images[1]
    calls = [{"mode": "mi"}, {"init_image": init, "strength": 0.6}, {"init_image": init, "inpaint_mask": mask}]
    parity, compiled_ = Pipeline(tiny_components, name="tiny"), Pipeline(tiny_components, name="tiny").optimize("compiled")
    for kw in calls:  # the graphs of `runs` serve them all (same shapes): nothing new is compiled
        want = parity("a red box", [control], **{**KW, **kw})
        got = compiled_("a red box", [control], **{**KW, **kw})
        assert_same_image(got, want)


def test_cache_key_changes_with_weights_shapes_precision_and_versions(tiny_components, monkeypatch):
    unet = tiny_components.unet
    x = (torch.zeros(2, 4, 8, 8), torch.tensor(999), torch.zeros(2, 16, 32))
    digest = compiled.weights_digest(unet)
    key = compiled.cache_key("unet-encode", digest, x, "fp32")
    assert key == compiled.cache_key("unet-encode", compiled.weights_digest(unet), x, "fp32")
    with torch.no_grad():
        unet.conv_in.bias[0] += 1e-3
    try:
        assert compiled.weights_digest(unet) != digest
    finally:
        with torch.no_grad():
            unet.conv_in.bias[0] -= 1e-3
    assert compiled.cache_key("unet-encode", digest, (torch.zeros(2, 4, 16, 16),) + x[1:], "fp32") != key
    assert compiled.cache_key("unet-encode", digest, (x[0], torch.tensor(999.0), x[2]), "fp32") != key  # dtype
    assert compiled.cache_key("unet-encode", digest, x, "bf16") != key
    for name, value in ((torch, "__version__"), (compiled, "FORMAT")):  # the library version, the format
        with monkeypatch.context() as m:
            m.setattr(name, value, getattr(name, value) + "1" if value == "__version__" else 2)
            compiled._environment.cache_clear()  # computed once per process
            assert compiled.cache_key("unet-encode", digest, x, "fp32") != key
        compiled._environment.cache_clear()
    assert compiled.cache_key("unet-encode", digest, x, "fp32") == key


def test_a_graph_that_cannot_compile_runs_eagerly_and_says_so_once(
        tiny_components, tiny_controlnets, hint_images, runs, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CONTROLSTACK_CACHE", str(tmp_path))

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    pipe = Pipeline(tiny_components, name="tiny").optimize("compiled")
    with caplog.at_level(logging.WARNING, "controlstack"):
        out = pipe("a red box", [Control(tiny_controlnets[0], hint_images[0])], **KW)
    np.testing.assert_array_equal(out, runs["parity"])  # eager fallback is the parity math, bit for bit
    failed = [r.message for r in caplog.records if "could not be compiled" in r.message]
    assert len(failed) == 4 and all("no C++ compiler" in m for m in failed)  # once per graph, not per step


def test_calls_the_graph_cannot_serve_run_parity(tiny_components, caplog):
    from controlstack.models.runner import UNetRunner

    runner = CompiledUNetRunner(tiny_components.unet)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor(500), torch.randn(1, 16, 32)
    mask = torch.ones(1, 16)
    with caplog.at_level(logging.WARNING, "controlstack"):
        for _ in range(2):
            h, mid, _ = runner.encode(x, t, emb, encoder_attention_mask=mask)
    ref_h, ref_mid, _ = UNetRunner(tiny_components.unet).encode(x, t, emb, encoder_attention_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(h, ref_h)) and torch.equal(mid, ref_mid)
    said = [r.message for r in caplog.records if "runs in parity" in r.message]
    assert said == ["this call runs in parity: encoder_attention_mask are not compiled"]


def test_parity_after_another_tier_is_unchanged(tiny_components, tiny_controlnets, hint_images, runs):
    pipe = Pipeline(tiny_components, name="tiny").optimize("fast", precision="fp32").optimize("parity")
    out = pipe("a red box", [Control(tiny_controlnets[0], hint_images[0])], **KW)
    np.testing.assert_array_equal(out, runs["parity"])


def test_reuse_key_steps():
    reuse = Reuse(every=2, after=0.25)
    assert [reuse.fresh(Step(i, 8, torch.tensor(0))) for i in range(8)] == [1, 1, 1, 0, 1, 0, 1, 0]
    assert all(Reuse().fresh(Step(i, 8, torch.tensor(0))) for i in range(8))


def test_reuse_skips_encoder_and_controlnet_between_key_steps(tiny_components, tiny_controlnets, hint_images,
                                                              monkeypatch):
    from controlstack import denoiser as dmod

    seen = []
    original = dmod.ControlledDenoiser.__call__

    def spy(self, x, t, step):
        out = original(self, x, t, step)
        seen.append((self.calls, self.encoder_calls))
        return out

    monkeypatch.setattr(dmod.ControlledDenoiser, "__call__", spy)
    pipe = Pipeline(tiny_components, name="tiny")
    controls = [Control(tiny_controlnets[0], hint_images[0])]
    exact = pipe("a red box", controls, **{**KW, "steps": 8})
    pipe.tier = Tier("fast", reuse=Reuse(every=2, after=0.25))  # reuse alone, eager: no compiling in this test
    approx = pipe("a red box", controls, **{**KW, "steps": 8})
    assert seen[7] == (8, 8) and seen[-1] == (5, 5)  # key steps 0, 1, 2, 4, 6
    assert 25.0 < psnr(approx, exact) < 80.0
    pipe.tier = Tier("fast", reuse=Reuse(every=1))
    np.testing.assert_array_equal(pipe("a red box", controls, **{**KW, "steps": 8}), exact)


def test_make_tier():
    assert make_tier("parity") == Tier()
    assert make_tier("compiled") == Tier("compiled", compiled=True)
    fast = make_tier("fast", precision="bf16")
    assert fast.compiled and fast.precision == "bf16" and fast.reuse == Reuse(2, 0.25)
    assert make_tier("fast").precision in ("fp32", "bf16")  # measured here
    with pytest.raises(ControlstackError, match="unknown optimisation tier 'turbo'"):
        make_tier("turbo")


@pytest.mark.slow
@needs_compiler
def test_fast_tier_bf16(tiny_components, tiny_controlnets, hint_images, runs, cache):
    pipe = Pipeline(tiny_components, name="tiny").optimize("fast", precision="bf16")
    out = pipe("a red box", [Control(tiny_controlnets[0], hint_images[0])], **KW)
    assert 20.0 < psnr(out, runs["parity"]) < 60.0


def test_a_model_can_recommend_the_fast_tiers_precision():
    # the bundled model's controlstack.json says fp32: in bf16 its pose PCK fell 0.223 -> 0.178 (docs/speed.md)
    pipe = Pipeline.from_pretrained()
    assert pipe.optimize("fast").tier.precision == "fp32"
    assert pipe.optimize("fast", precision="bf16").tier.precision == "bf16"


@pytest.mark.slow  # compiles four more graphs (~2 min on 2 cores): make test-all runs it
@needs_compiler
def test_sdxl_added_conditions_are_graph_inputs(cache, hint_images, caplog, xl, xl_controlnets, xl_union):
    # SDXL's pooled text and size ids enter the U-Net and ControlNet graphs as two more inputs: no
    # fallback to parity, the same image up to rounding, and the fast tier with a union model beside
    # it runs the union eagerly and says so once
    controls = [Control(xl_controlnets[0], hint_images[0])]
    micro = {"original_size": (96, 80)}
    parity = Pipeline(xl)("a red box", controls, **KW, **micro)
    with caplog.at_level(logging.WARNING, "controlstack"):
        got = Pipeline(xl).optimize("compiled")("a red box", controls, **KW, **micro)
    assert float(np.abs(got - parity).max()) > 0
    assert_same_image(got, parity)
    assert not [r for r in caplog.records if "runs in parity" in r.message]
    caplog.clear()
    with caplog.at_level(logging.WARNING, "controlstack"):
        pipe = Pipeline(xl).optimize("compiled")
        both = [*controls, Control(xl_union, hint_images[1], task="depth")]
        for _ in range(2):
            out = pipe("a red box", both, **KW)
    assert [r.message for r in caplog.records if "runs in parity" in r.message] == \
        ["this call runs in parity: ControlNet-Union models are not compiled"]
    assert_same_image(out, Pipeline(xl)("a red box", both, **KW))


@needs_compiler
def test_an_lcm_students_guidance_embedding_is_a_graph_input(cache, tiny_components, tiny_controlnets, hint_images,
                                                              caplog):
    # a guidance-embedded U-Net (an LCM student) takes its w embedding as one more encoder input: no
    # fallback to parity, the same image up to rounding
    import dataclasses

    from controlstack.models.tiny import tiny_unet

    student = tiny_unet(0, time_cond_proj_dim=8)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 0.5)
    c = dataclasses.replace(tiny_components, unet=student)
    controls = [Control(tiny_controlnets[0], hint_images[0])]
    kw = {**KW, "steps": 4, "scheduler": "lcm", "cfg": 3.0}
    parity = Pipeline(c, name="student")("a red box", controls, **kw)
    with caplog.at_level(logging.WARNING, "controlstack"):
        got = Pipeline(c, name="student").optimize("compiled")("a red box", controls, **kw)
    assert float(np.abs(got - parity).max()) > 0
    assert_same_image(got, parity)
    assert not [r for r in caplog.records if "runs in parity" in r.message]
