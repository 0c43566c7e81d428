"""IP-Adapter image prompts (``controlstack/ip_adapter.py``): diffusers' ``StableDiffusionControlNetPipeline``
image with the same adapter loaded, with a ControlNet, two adapters and per-layer scales;
unloading restores the base; bad files are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack.errors import ControlstackError
from tests.parity import assert_same_image

KW = {"steps": 3, "seed": 1, "width": 64, "height": 64, "progress": False, "output_type": "np", "cfg": 7.5}


def image_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, projection_dim=32, image_size=32, patch_size=8, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37, num_channels=3)
    return CLIPVisionModelWithProjection(config).eval()


def ip_adapter_file(tmp_path, unet, seed: int, name: str):
    """A random IP-Adapter for ``unet`` in diffusers' file layout (``image_proj.*``, ``ip_adapter.*``)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    out, key_id = {}, 1
    for proc in unet.attn_processors:
        if proc.endswith("attn1.processor"):
            continue
        if proc.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif proc.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(proc[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(proc[len("down_blocks.")])]
        sd = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=unet.config.cross_attention_dim).state_dict()
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn_like(sd["to_k_ip.0.weight"]) * 0.5
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn_like(sd["to_v_ip.0.weight"]) * 0.5
        key_id += 2
    proj = ImageProjection(cross_attention_dim=unet.config.cross_attention_dim, image_embed_dim=32, num_image_text_embeds=4)
    # the original file's names: proj.* (diffusers calls it image_embeds.*), norm.*
    out |= {f"image_proj.{k.replace('image_embeds.', 'proj.')}": torch.randn_like(v) * 0.5
            for k, v in proj.state_dict().items()}
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


def reference(components, controlnet, hint, files, images, scales, **extra):
    from diffusers import StableDiffusionControlNetPipeline
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor

    from controlstack.sampling import make_scheduler

    c = components
    pipe = StableDiffusionControlNetPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, controlnet=controlnet,
        scheduler=make_scheduler("unipc", None), safety_checker=None, requires_safety_checker=False,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=image_encoder())
    pipe.set_progress_bar_config(disable=True)
    states = []
    for f in files:
        flat = load_file(str(f))
        states.append({head: {k.partition(".")[2]: v for k, v in flat.items() if k.startswith(head + ".")}
                       for head in ("image_proj", "ip_adapter")})
    pipe.unet._load_ip_adapter_weights(states)
    pipe.set_ip_adapter_scale(scales)
    return pipe("a cube", image=hint, ip_adapter_image=images, num_inference_steps=3, height=64, width=64,
                guidance_scale=7.5, generator=torch.Generator().manual_seed(1), output_type="np", **extra).images


@pytest.fixture()
def fresh():
    from controlstack.models.tiny import tiny_sd

    return lambda: tiny_sd(seed=0, max_length=16)


def test_an_image_prompt_with_a_controlnet_gives_diffusers_image(tmp_path, fresh, tiny_controlnets, hint_images):
    from controlstack import Control, Pipeline
    from controlstack.ip_adapter import ImagePrompt

    pipe = Pipeline(fresh())
    before = pipe("a cube", [Control(tiny_controlnets[0], hint_images[1])], mode="sum", **KW)
    path = ip_adapter_file(tmp_path, pipe.unet, 1, "ip")
    pipe.load_ip_adapter(path, image_encoder=image_encoder())
    ours = pipe("a cube", [Control(tiny_controlnets[0], hint_images[1])], mode="sum",
                image_prompts=[ImagePrompt(hint_images[0], 0.7)], **KW)
    assert_same_image(ours, reference(fresh(), tiny_controlnets[0], hint_images[1], [path], [hint_images[0]], 0.7))
    assert np.abs(ours - before).max() > 1e-2
    # no image prompt: the adapter adds nothing; unloaded: the base as before
    assert_same_image(pipe("a cube", [Control(tiny_controlnets[0], hint_images[1])], mode="sum", **KW), before)
    pipe.unload_ip_adapter()
    assert_same_image(pipe("a cube", [Control(tiny_controlnets[0], hint_images[1])], mode="sum", **KW), before)


def test_two_adapters_with_per_layer_scales(tmp_path, fresh, tiny_controlnets, hint_images):
    from controlstack import Control, Pipeline
    from controlstack.ip_adapter import ImagePrompt

    pipe = Pipeline(fresh())
    a, b = ip_adapter_file(tmp_path, pipe.unet, 1, "a"), ip_adapter_file(tmp_path, pipe.unet, 2, "b")
    pipe.load_ip_adapter(a, image_encoder=image_encoder())
    pipe.load_ip_adapter(b)
    style = {"up": {"block_1": [0.0, 1.0]}}  # InstantStyle: one layer group only
    ours = pipe("a cube", [Control(tiny_controlnets[0], hint_images[1])], mode="sum",
                image_prompts=[ImagePrompt(hint_images[0], 0.5), ImagePrompt(hint_images[1], style)], **KW)
    theirs = reference(fresh(), tiny_controlnets[0], hint_images[1], [a, b], [hint_images[0], hint_images[1]],
                       [0.5, style])
    assert_same_image(ours, theirs)
    with pytest.raises(ControlstackError, match="1 image prompts for 2 IP-Adapters"):
        pipe("a cube", image_prompts=[ImagePrompt(hint_images[0])], **KW)


def test_bad_ip_adapter_files_are_one_line(tmp_path, fresh):
    from safetensors.torch import save_file

    from controlstack import Pipeline
    from controlstack.ip_adapter import ImagePrompt

    pipe = Pipeline(fresh())
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ControlstackError, match="neither image_proj"):
        pipe.load_ip_adapter(tmp_path / "odd.safetensors", image_encoder=image_encoder())
    with pytest.raises(ControlstackError, match="needs its image encoder"):
        pipe.load_ip_adapter(ip_adapter_file(tmp_path, pipe.unet, 1, "ip"))
    with pytest.raises(ControlstackError, match="need an IP-Adapter"):
        pipe("a cube", image_prompts=[ImagePrompt(np.zeros((8, 8, 3), np.uint8))], **KW)


def test_cli_ip_adapter_flags(tmp_path, fresh, hint_images):
    from PIL import Image

    from controlstack.cli.main import main
    from controlstack.training.base import export_pipeline

    sd = fresh()
    export_pipeline(tmp_path / "base", sd.vae, sd.text_encoder, sd.tokenizer, sd.unet)
    path = ip_adapter_file(tmp_path, sd.unet, 1, "ip")
    image_encoder().save_pretrained(tmp_path / "encoder")
    Image.fromarray(np.asarray(hint_images[0])).save(tmp_path / "ref.png")
    common = ["generate", "--model", str(tmp_path / "base"), "--prompt", "a cube", "--steps", "2", "--width", "64",
              "--height", "64", "--no-progress", "--seed", "3", "--out", str(tmp_path / "out")]
    assert main([*common, "--ip-adapter", str(path), "--image-encoder", str(tmp_path / "encoder"),
                 "--image-prompt", f"{tmp_path / 'ref.png'}:0.6"]) == 0
    assert main(common) == 0
    a, b = (np.asarray(Image.open(tmp_path / "out" / f"0000{i}-3.png"), np.int16) for i in (0, 1))
    assert np.abs(a - b).max() > 2  # the image prompt changed the image
    assert main([*common, "--ip-adapter", str(path)]) == 2  # no image prompt, no encoder: one line


def test_a_region_mask_keeps_the_image_prompt_to_its_region(tmp_path, fresh, tiny_controlnets, hint_images):
    from diffusers.image_processor import IPAdapterMaskProcessor

    from controlstack import Control, Pipeline
    from controlstack.ip_adapter import ImagePrompt

    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    pipe = Pipeline(fresh())
    path = ip_adapter_file(tmp_path, pipe.unet, 1, "ip")
    pipe.load_ip_adapter(path, image_encoder=image_encoder())
    control = [Control(tiny_controlnets[0], hint_images[1])]
    ours = pipe("a cube", control, mode="sum", image_prompts=[ImagePrompt(hint_images[0], 0.9, mask)], **KW)
    masks = IPAdapterMaskProcessor().preprocess(Image.fromarray(mask, "L"), height=64, width=64)
    theirs = reference(fresh(), tiny_controlnets[0], hint_images[1], [path], [hint_images[0]], 0.9,
                       cross_attention_kwargs={"ip_adapter_masks": [masks]})
    assert_same_image(ours, theirs)
    unmasked = pipe("a cube", control, mode="sum", image_prompts=[ImagePrompt(hint_images[0], 0.9)], **KW)
    assert np.abs(ours - unmasked).max() > 1e-3


def test_cli_image_prompt_on_the_bundled_base_takes_the_bundled_adapter(tmp_path, monkeypatch, hint_images):
    """``--image-prompt`` without ``--ip-adapter``: the bundled base's own IP-Adapter and encoder; with
    another ``--model`` there is none to take, so the count mismatch is the one line."""
    import argparse

    from controlstack import assets
    from controlstack.cli import generate

    Image.fromarray(np.asarray(hint_images[0])).save(tmp_path / "ref.png")
    monkeypatch.setattr(assets, "ip_adapter_files", lambda *a: (tmp_path / "ip.safetensors", tmp_path / "enc"))
    args = argparse.Namespace(model=None, ip_adapter=[], image_encoder=None, image_prompt=[f"{tmp_path / 'ref.png'}:0.5"])
    (prompt,) = generate.image_prompts(args)
    assert args.ip_adapter == [str(tmp_path / "ip.safetensors")] and args.image_encoder == str(tmp_path / "enc")
    assert prompt.scale == 0.5 and prompt.image.size == (64, 64)
    args = argparse.Namespace(model="mine/", ip_adapter=[], image_encoder=None, image_prompt=[str(tmp_path / "ref.png")])
    with pytest.raises(ControlstackError, match="1 --image-prompt for 0 --ip-adapter"):
        generate.image_prompts(args)
