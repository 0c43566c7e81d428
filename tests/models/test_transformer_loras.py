"""LoRAs on transformer bases (``lora.py`` through ``BaseFamily.load_lora``): a diffusers-format file
adapting the transformer and the CLIP encoder(s) gives the image of diffusers' ``load_lora_weights`` +
``set_adapters`` on ``StableDiffusion3Pipeline`` / ``FluxPipeline``, unfused and fused."""

from __future__ import annotations

import pytest
import torch

from tests.parity import assert_same_image

SIZE = 32
KW = {"steps": 3, "seed": 1, "width": SIZE, "height": SIZE, "progress": False, "output_type": "np", "cfg": 4.0}


def lora_file(tmp_path, components, family: str):
    """Random PEFT LoRA layers on the transformer's attention and the CLIP encoders, saved as diffusers does."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    text_cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    models = {"transformer": inject_adapter_in_model(cfg, components.unet),
              "text_encoder": inject_adapter_in_model(text_cfg, components.text_encoder)}
    if family == "sd3":
        models["text_encoder_2"] = inject_adapter_in_model(text_cfg, components.text_encoder_2)
    with torch.no_grad():
        for m in models.values():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    layers = {f"{k}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(m)) for k, m in models.items()}
    (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).save_lora_weights(tmp_path / "lora", **layers)
    return tmp_path / "lora" / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_lora_is_diffusers_load_lora_weights(tmp_path, family):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from controlstack import Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux, tiny_sd3

    make = tiny_sd3 if family == "sd3" else tiny_flux
    path = lora_file(tmp_path, make(seed=0), family)
    c = make(seed=0)
    parts = dict(transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                 text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                 scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    if family == "sd3":
        ref = StableDiffusion3Pipeline(**parts, text_encoder_3=c.text_encoder_3, tokenizer_3=c.tokenizer_3)
    else:
        ref = FluxPipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=3, guidance_scale=4.0, height=SIZE, width=SIZE, output_type="np")
    plain = ref("a red cube", generator=torch.Generator().manual_seed(1), **call).images
    ref.load_lora_weights(str(path), adapter_name="ink")
    ref.set_adapters(["ink"], [0.7])
    theirs = ref("a red cube", generator=torch.Generator().manual_seed(1), **call).images
    ref.unload_lora_weights()

    pipe = Pipeline(make(seed=0))
    pipe.load_lora(path, 0.7, name="ink")
    ours = pipe("a red cube", **KW)
    assert_same_image(ours, theirs)
    assert abs(ours - plain).max() > 1e-3  # the LoRA changed the image
    pipe.fuse_loras()
    assert_same_image(pipe("a red cube", **KW), theirs)
    pipe.unload_lora()
    assert_same_image(pipe("a red cube", **KW), plain)


def control_lora_file(tmp_path, transformer):
    """A Flux Control LoRA as Canny-dev-lora is laid out: ``x_embedder``'s LoRA reads twice the
    channels (image + condition latents), LoRAs on the attention, and replaced RMS norms."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    out_features, in_features = transformer.x_embedder.weight.shape
    state = {"transformer.x_embedder.lora_A.weight": torch.randn(4, 2 * in_features, generator=g) * 0.3,
             "transformer.x_embedder.lora_B.weight": torch.randn(out_features, 4, generator=g) * 0.3}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_v")):
            o, i = module.weight.shape
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, i, generator=g) * 0.3
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(o, 4, generator=g) * 0.3
        if name.endswith("attn.norm_k"):
            state[f"transformer.{name}.weight"] = 1 + torch.randn(module.weight.shape, generator=g) * 0.2
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "canny-lora.safetensors")
    return tmp_path / "canny-lora.safetensors"


def test_a_flux_control_lora_widens_the_input_as_diffusers_and_unloads_back(tmp_path):
    """diffusers' ``FluxControlPipeline`` + ``load_lora_weights`` of a Control LoRA on a plain base;
    unloading it gives the plain base back (its narrow input layer, its norms)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlPipeline
    from PIL import Image

    from controlstack import Control, ControlstackError, Pipeline
    from controlstack.models.tiny_mmdit import tiny_flux

    hint = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = control_lora_file(tmp_path, tiny_flux(seed=0).unet)
    c = tiny_flux(seed=0)
    ref = FluxControlPipeline(transformer=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                              text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
                              scheduler=FlowMatchEulerDiscreteScheduler.from_config(c.scheduler_config))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path), adapter_name="canny")
    theirs = ref("a red cube", control_image=Image.fromarray(hint), num_inference_steps=3, guidance_scale=4.0,
                 height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(1), output_type="np").images

    pipe = Pipeline(tiny_flux(seed=0))
    plain = pipe("a red cube", **KW)
    pipe.load_lora(path, name="canny")
    assert pipe.unet.config.in_channels == 2 * pipe.unet.out_channels
    ours = pipe("a red cube", [Control("base", hint)], **KW)
    assert_same_image(ours, theirs)
    pipe.unload_lora("canny")
    assert pipe.unet.config.in_channels == pipe.unet.out_channels
    assert_same_image(pipe("a red cube", **KW), plain)
    with pytest.raises(ControlstackError, match="is for a Flux Control base"):
        pipe("a red cube", [Control("base", hint)], **KW)
