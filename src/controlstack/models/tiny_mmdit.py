"""Tiny seeded transformer (MMDiT) bases and their ControlNets, built the way diffusers' own fast
tests build them (``tests/pipelines/controlnet_sd3``): the parity suite and the examples run on
them; real SD3 / SD3.5 checkpoints load through the same code."""

from __future__ import annotations

import torch

from controlstack.models.components import SDComponents
from controlstack.models.tiny import byte_level_tokenizer, tiny_text_encoder

#: the tiny SD3 layout: two 32-wide CLIP encoders (pooled 64 = the transformer's pooled projection),
#: a 64-wide T5 (= its joint attention width, so the CLIP states are padded by nothing), 8 latent
#: channels through a 1-level VAE (no downsampling, as diffusers' fast tests), patch size 1
TINY_SD3 = {"sample_size": 32, "patch_size": 1, "in_channels": 8, "out_channels": 8, "attention_head_dim": 8,
            "num_attention_heads": 4, "joint_attention_dim": 64, "caption_projection_dim": 32,
            "pooled_projection_dim": 64}


def tiny_t5(seed: int = 0, d_model: int = 64, vocab_size: int = 514):
    """A 2-layer T5 encoder (``T5EncoderModel``), the third SD3 text encoder."""
    from transformers import T5Config, T5EncoderModel  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def tiny_sd3_vae(seed: int = 0, latent_channels: int = 8):
    """SD3's VAE layout (no quant convs, a shift factor) at one level; its posterior is sharp
    (log-variance -30): the ControlNet pipelines encode the control image with a *sample* drawn
    from torch's global generator, so a sharp posterior makes their images comparable run to run."""
    from diffusers import AutoencoderKL  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    with torch.no_grad():
        vae.encoder.conv_out.weight[latent_channels:] = 0.0
        vae.encoder.conv_out.bias[latent_channels:] = -30.0
    return vae.eval()


def tiny_sd3(seed: int = 0, max_length: int = 16, with_t5: bool = True, **config) -> SDComponents:
    """A complete tiny SD3-layout model (transformer with 4 joint blocks, CLIP-L/G, T5, VAE, flow schedule)."""
    from diffusers import SD3Transformer2DModel  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(num_layers=4, **{**TINY_SD3, **config}).eval()
    tokenizer = byte_level_tokenizer(max_length=max_length)
    return SDComponents(
        unet=transformer,
        vae=tiny_sd3_vae(seed + 1, transformer.config.in_channels),
        text_encoder=tiny_text_encoder(seed + 2, 32, len(tokenizer), max_length, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(seed + 3, 32, len(tokenizer), max_length, with_projection=True),
        tokenizer_2=byte_level_tokenizer(max_length=max_length),
        text_encoder_3=tiny_t5(seed + 4, transformer.config.joint_attention_dim, len(tokenizer)) if with_t5 else None,
        tokenizer_3=byte_level_tokenizer(max_length=max_length) if with_t5 else None,
        scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                          "shift": 3.0},
    )


def tiny_sd3_controlnet(transformer, seed: int = 0, num_layers: int = 2, **config):
    """An ``SD3ControlNetModel`` for ``transformer``'s layout; its zero-initialised output layers get
    small random weights so the control changes the image in tests (a fresh one adds nothing)."""
    from diffusers import SD3ControlNetModel  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    keys = ("sample_size", "patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim")
    cn = SD3ControlNetModel(num_layers=num_layers, **{**{k: transformer.config[k] for k in keys}, **config})
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in cn.controlnet_blocks:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
        cn.pos_embed_input.proj.weight.copy_(torch.randn(cn.pos_embed_input.proj.weight.shape, generator=g) * 0.3)
    return cn.eval()


#: the tiny Flux layout (diffusers' fast tests): one double and one single block, 4 latent channels
#: packed to 16, rotary axes 4 + 4 + 8 = the head width
TINY_FLUX = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
             "axes_dims_rope": [4, 4, 8]}


def tiny_flux(seed: int = 0, max_length: int = 16, guidance_embeds: bool = True, **config) -> SDComponents:
    """A complete tiny Flux-layout model: transformer, CLIP (pooled), T5, 1-level VAE with 4 latent
    channels and a shift, and Flux's flow schedule (dynamic shifting)."""
    from diffusers import FluxTransformer2DModel  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(guidance_embeds=guidance_embeds, **{**TINY_FLUX, **config}).eval()
    tokenizer = byte_level_tokenizer(max_length=max_length)
    return SDComponents(
        unet=transformer,
        vae=tiny_sd3_vae(seed + 1, (transformer.config.out_channels or transformer.config.in_channels) // 4),
        text_encoder=tiny_text_encoder(seed + 2, 32, len(tokenizer), max_length),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5(seed + 3, transformer.config.joint_attention_dim, len(tokenizer)),
        tokenizer_2=byte_level_tokenizer(max_length=max_length),
        scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                          "shift": 3.0, "use_dynamic_shifting": True, "base_image_seq_len": 256,
                          "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15},
    )


def tiny_flux_controlnet(transformer, seed: int = 0, num_mode: int | None = None, **config):
    """A ``FluxControlNetModel`` for ``transformer``'s layout (``num_mode``: a ControlNet-Union); its
    zero-initialised output layers get small random weights so the control changes the image."""
    from diffusers import FluxControlNetModel  # local: heavy, only this path needs it

    torch.manual_seed(seed)
    keys = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim", "axes_dims_rope", "guidance_embeds")
    cn = FluxControlNetModel(num_layers=1, num_single_layers=1, num_mode=num_mode,
                             **{**{k: transformer.config[k] for k in keys}, **config})
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in [*cn.controlnet_blocks, *cn.controlnet_single_blocks, cn.controlnet_x_embedder]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.3)
    return cn.eval()
