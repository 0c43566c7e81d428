"""LoRA on the base (``controlstack/lora.py``): the images diffusers' ``load_lora_weights`` gives,
in the formats users have, several at once with their weights, fused and unfused, from a prompt's
``<lora:NAME:W>``, and one-line errors for files that do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack.errors import ControlstackError
from tests.parity import assert_same_image

KW = {"steps": 3, "seed": 1, "width": 64, "height": 64, "progress": False, "output_type": "np"}


def _lora_layers(components, seed: int, rank: int = 4):
    """Random PEFT LoRA layers for a tiny base's U-Net and text encoder(s): their state dicts."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    unet_cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                          target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    text_cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    out = {"unet": inject_adapter_in_model(unet_cfg, components.unet)}
    for key in ("text_encoder", "text_encoder_2"):
        if getattr(components, key) is not None:
            out[key] = inject_adapter_in_model(text_cfg, getattr(components, key))
    with torch.no_grad():
        for model in out.values():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    return {k: get_peft_model_state_dict(m) for k, m in out.items()}


def save_peft(tmp_path, make, seed: int, name: str):
    """A diffusers-format LoRA file (what ``save_lora_weights`` writes) for the base ``make()`` builds."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {k: convert_state_dict_to_diffusers(v) for k, v in _lora_layers(make(), seed).items()}
    folder = tmp_path / name
    if "text_encoder_2" in layers:
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                                    text_encoder_lora_layers=layers["text_encoder"],
                                                    text_encoder_2_lora_layers=layers["text_encoder_2"])
    else:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                                  text_encoder_lora_layers=layers["text_encoder"])
    path = tmp_path / f"{name}.safetensors"
    (folder / "pytorch_lora_weights.safetensors").rename(path)
    return path


def save_kohya(tmp_path, make, seed: int, name: str, alpha: float = 2.0):
    """The same layers in kohya / sd-webui's layout: ``lora_unet_<path>.lora_down/up.weight`` and
    ``.alpha``; the text encoder under ``lora_te_text_model_...`` as CLIP's original names have it."""
    from safetensors.torch import save_file

    out = {}
    for part, state in _lora_layers(make(), seed).items():
        prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
        for key, value in state.items():
            module, _, kind = key.rpartition(".lora_")
            flat = prefix + module.replace(".", "_")
            out[f"{flat}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
            out[f"{flat}.alpha"] = torch.tensor(alpha)
    path = tmp_path / f"{name}.safetensors"
    save_file(out, str(path))
    return path


def diffusers_image(components, loras, controlnet=None, hint=None, fuse=False, scheduler="unipc", cfg=7.5):
    """diffusers' own pipeline with ``loras`` [(path, name, weight)] through ``load_lora_weights``."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    from controlstack.sampling import make_scheduler

    c = components
    parts = {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "unet": c.unet,
             "scheduler": make_scheduler(scheduler, None), "safety_checker": None, "feature_extractor": None,
             "requires_safety_checker": False}
    pipe = (StableDiffusionControlNetPipeline(controlnet=controlnet, **parts) if controlnet is not None
            else StableDiffusionPipeline(**parts))
    pipe.set_progress_bar_config(disable=True)
    for path, name, _ in loras:
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters([n for _, n, _ in loras], [w for *_, w in loras])
    if fuse:
        pipe.fuse_lora()
    extra = {"image": hint, "controlnet_conditioning_scale": 0.7} if controlnet is not None else {}
    return pipe("a cube", num_inference_steps=4 if scheduler == "lcm" else 3, generator=torch.Generator().manual_seed(1),
                height=64, width=64,
                output_type="np", guidance_scale=cfg, **extra).images


@pytest.fixture()
def fresh():
    from controlstack.models.tiny import tiny_sd

    return lambda: tiny_sd(seed=0, max_length=16)


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_two_loras_with_weights_match_diffusers_with_a_controlnet(tmp_path, fresh, tiny_controlnets, hint_images, fmt):
    from controlstack import Control, Pipeline

    save = save_peft if fmt == "peft" else save_kohya
    a, b = save(tmp_path, fresh, 1, "ink"), save(tmp_path, fresh, 2, "paper")
    pipe = Pipeline(fresh())
    pipe.load_lora(a, 0.8)
    pipe.load_lora(b, -0.5)
    control = [Control(tiny_controlnets[0], hint_images[0], weight=0.7)]
    ours = pipe("a cube", control, mode="sum", **KW)
    theirs = diffusers_image(fresh(), [(a, "ink", 0.8), (b, "paper", -0.5)], tiny_controlnets[0], hint_images[0])
    assert_same_image(ours, theirs)
    pipe.fuse_loras()
    assert_same_image(pipe("a cube", control, mode="sum", **KW), theirs)
    plain = Pipeline(fresh())("a cube", control, mode="sum", **KW)
    assert np.abs(ours - plain).max() > 0.01  # the LoRAs change the image
    pipe.unload_lora()
    assert_same_image(pipe("a cube", control, mode="sum", **KW), plain)
    assert pipe.loras == {}


def test_an_lcm_lora_with_the_lcm_sampler_and_a_controlnet_matches_diffusers(tmp_path, fresh, tiny_controlnets,
                                                                            hint_images):
    from controlstack import Control, Pipeline

    path = save_kohya(tmp_path, fresh, 5, "lcm")
    pipe = Pipeline(fresh())
    pipe.load_lora(path)
    control = [Control(tiny_controlnets[0], hint_images[0], weight=0.7)]
    ours = pipe("a cube", control, mode="sum", scheduler="lcm", cfg=1.5, **{**KW, "steps": 4})
    theirs = diffusers_image(fresh(), [(path, "lcm", 1.0)], tiny_controlnets[0], hint_images[0], scheduler="lcm",
                             cfg=1.5)
    assert_same_image(ours, theirs)


def test_a_prompts_lora_tag_loads_it_for_that_call_and_the_png_records_it(tmp_path, fresh):
    from controlstack import Pipeline

    save_peft(tmp_path, fresh, 1, "ink")
    pipe = Pipeline(fresh())
    pipe.lora_dir = tmp_path
    result = pipe("a cube <lora:ink:0.6>", return_result=True, **{**KW, "output_type": "pil"})
    assert pipe.loras == {}  # loaded for the call only
    explicit = Pipeline(fresh())
    explicit.load_lora(tmp_path / "ink.safetensors", 0.6)
    assert_same_image(np.asarray(result.images[0]), np.asarray(explicit("a cube", **{**KW, "output_type": "pil"})[0]))
    text = result.images[0].info["parameters"]
    assert text.startswith("a cube <lora:ink:0.6>\n") and 'Lora hashes: "ink: ' in text
    with pytest.raises(ControlstackError, match=r"<lora:nope> is not a LoRA file in .*known: ink"):
        pipe("a cube <lora:nope:1>", **KW)


def test_an_sdxl_lora_matches_diffusers_on_sdxl(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from controlstack import Pipeline
    from controlstack.models.tiny import tiny_sdxl
    from controlstack.sampling import make_scheduler

    path = save_peft(tmp_path, lambda: tiny_sdxl(seed=0), 3, "xl")
    pipe = Pipeline(tiny_sdxl(seed=0))
    pipe.load_lora(path, 0.9)
    ours = pipe("a cube", **KW)
    c = tiny_sdxl(seed=0)
    ref = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2,
                                    tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=c.unet,
                                    scheduler=make_scheduler("unipc", c.scheduler_config))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path), adapter_name="xl")
    ref.set_adapters(["xl"], [0.9])
    theirs = ref("a cube", num_inference_steps=3, generator=torch.Generator().manual_seed(1), height=64, width=64,
                 output_type="np", guidance_scale=7.5).images
    assert_same_image(ours, theirs)


def test_files_that_do_not_fit_are_one_line_errors(tmp_path, fresh):
    from safetensors.torch import save_file

    from controlstack import Pipeline
    from controlstack.models.tiny import tiny_sdxl

    good = save_peft(tmp_path, fresh, 1, "ink")
    pipe = Pipeline(fresh())
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:500])
    save_file({"model.weight": torch.zeros(2, 2)}, str(tmp_path / "odd.safetensors"))
    xl = save_peft(tmp_path, lambda: tiny_sdxl(seed=0), 3, "xl")
    for path, message in ((tmp_path / "none.safetensors", "does not exist"), (truncated, "corrupt or truncated"),
                          (tmp_path / "odd.safetensors", "unknown key layout"),
                          (xl, "is for a base with 64-wide text .* use a LoRA trained for the base.s family")):
        with pytest.raises(ControlstackError, match=message) as info:
            pipe.load_lora(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    pipe.load_lora(good)
    with pytest.raises(ControlstackError, match="loaded already"):
        pipe.load_lora(good)


def test_describe_tells_format_rank_and_targets(tmp_path, fresh):
    from controlstack.lora import read

    _, peft = read(save_peft(tmp_path, fresh, 1, "a"))
    _, kohya = read(save_kohya(tmp_path, fresh, 1, "b"))
    assert peft["targets"] == kohya["targets"] == ("unet", "text_encoder")
    assert peft["rank"] == kohya["rank"] == 4 and kohya["format"] == "kohya"
    assert peft["text_width"] == kohya["text_width"] == 32  # the tiny base's cross-attention width


def test_cli_lora_flags_and_the_prompt_syntax(tmp_path, fresh):
    from controlstack.cli.main import main
    from controlstack.io.checkpoints import save_base
    from controlstack.io.png import read_parameters
    from controlstack.training.base import export_pipeline

    sd = fresh()
    export_pipeline(tmp_path / "base", sd.vae, sd.text_encoder, sd.tokenizer, sd.unet)
    (tmp_path / "loras").mkdir()
    save_peft(tmp_path / "loras", fresh, 1, "ink")
    out = tmp_path / "out"
    common = ["generate", "--model", str(tmp_path / "base"), "--steps", "2", "--width", "64", "--height", "64",
              "--no-progress", "--seed", "3", "--out", str(out)]
    assert main([*common, "--prompt", "a cube", "--lora", f"{tmp_path / 'loras' / 'ink.safetensors'}:0.5"]) == 0
    assert main([*common, "--prompt", "a cube <lora:ink:0.5>", "--lora-dir", str(tmp_path / "loras")]) == 0
    a, b = (read_parameters(out / f"0000{i}-3.png")["parameters"] for i in (0, 1))
    assert 'Lora hashes: "ink: ' in a and 'Lora hashes: "ink: ' in b and b.startswith("a cube <lora:ink:0.5>")
    assert np.array_equal(np.asarray(Image.open(out / "00000-3.png")), np.asarray(Image.open(out / "00001-3.png")))
    save_base(sd, tmp_path / "unused.safetensors")  # a checkpoint is no LoRA: one line naming it
    assert main([*common, "--prompt", "x", "--lora", str(tmp_path / "unused.safetensors")]) == 2


def test_inspect_describes_a_lora_file(tmp_path, fresh, capsys):
    from controlstack.cli.main import main
    from controlstack.io.checkpoints import inspect_checkpoint

    info = inspect_checkpoint(save_kohya(tmp_path, fresh, 1, "ink"))
    assert info["kind"] == "lora" and info["format"] == "kohya"
    assert info["arch"]["rank"] == 4 and info["arch"]["targets"] == ("unet", "text_encoder")
    assert main(["inspect", str(tmp_path / "ink.safetensors")]) == 0
    assert "kind:    lora, custom (text width 32)" in capsys.readouterr().out  # the tiny base's text width
