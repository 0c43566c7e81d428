"""The transformer layouts of ``benchmarks/inference.py --family sd3|flux``: SD3's and Flux's
architectures at reduced width, seeded, with ControlNets whose zero-initialised outputs are given
small weights so the control matters, and diffusers' pipelines on the same weights.

* SD3: 8 joint blocks of 8 heads x 32 (SD3-medium: 24 of 24 x 64), patch 2 over 16 latent
  channels, two CLIP encoders of width 128 (pooled 256), no T5 (diffusers feeds zeros);
  ControlNets copy 2 blocks (InstantX's SD3 ones copy 6 of 24).
* Flux: 2 double + 4 single blocks of 8 heads x 32 (Flux.1: 19 + 38 of 24 x 128), guidance
  embedded, 16 latent channels in 2x2 patches, CLIP pooled 128 + a 2-layer T5 of width 256;
  ControlNets of 1 double + 2 single blocks.
* VAE: the U-Net bench's three downsamplings (factor 8) with 16 latent channels and SD3's shift;
  its posterior is made sharp, since diffusers' SD3 pipeline encodes the control image with a
  sample drawn from torch's global generator (ours takes the mean: the same where it is sharp).
"""

from __future__ import annotations

import torch

from controlstack.models.components import SDComponents
from controlstack.models.tiny import byte_level_tokenizer, tiny_text_encoder
from controlstack.models.tiny_mmdit import tiny_t5

FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_FLOW = {**FLOW, "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
             "base_shift": 0.5, "max_shift": 1.15}


def vae16(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    with torch.no_grad():
        vae.encoder.conv_out.weight[16:] = 0.0
        vae.encoder.conv_out.bias[16:] = -30.0
    return vae.eval()


def _grown(layers, seed: int) -> None:
    """Give zero-initialised output layers small weights (a trained ControlNet's are non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)


def build_transformer(seed: int, family: str) -> tuple[SDComponents, list]:
    from diffusers import FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel, SD3Transformer2DModel

    tok = byte_level_tokenizer(max_length=77)
    cns = []
    torch.manual_seed(seed)
    if family == "sd3":
        shape = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=32,
                     num_attention_heads=8, joint_attention_dim=256, caption_projection_dim=256,
                     pooled_projection_dim=256)
        transformer = SD3Transformer2DModel(num_layers=8, **shape).eval()
        comps = SDComponents(transformer, vae16(seed + 1),
                             tiny_text_encoder(seed + 2, 128, len(tok), 77, with_projection=True), tok,
                             text_encoder_2=tiny_text_encoder(seed + 3, 128, len(tok), 77, with_projection=True),
                             tokenizer_2=byte_level_tokenizer(max_length=77), scheduler_config=FLOW)
        for i in range(3):
            torch.manual_seed(seed + 10 + i)
            cn = SD3ControlNetModel(num_layers=2, **shape).eval()
            _grown([*cn.controlnet_blocks, cn.pos_embed_input.proj], seed + 20 + i)
            cns.append(cn)
        return comps, cns
    shape = dict(patch_size=1, in_channels=64, attention_head_dim=32, num_attention_heads=8, joint_attention_dim=256,
                 pooled_projection_dim=128, axes_dims_rope=[8, 12, 12], guidance_embeds=True)
    transformer = FluxTransformer2DModel(num_layers=2, num_single_layers=4, **shape).eval()
    comps = SDComponents(transformer, vae16(seed + 1), tiny_text_encoder(seed + 2, 128, len(tok), 77), tok,
                         text_encoder_2=tiny_t5(seed + 3, 256, len(tok)), tokenizer_2=byte_level_tokenizer(max_length=77),
                         scheduler_config=FLUX_FLOW)
    for i in range(3):
        torch.manual_seed(seed + 10 + i)
        cn = FluxControlNetModel(num_layers=1, num_single_layers=2, **shape).eval()
        _grown([*cn.controlnet_blocks, *cn.controlnet_single_blocks, cn.controlnet_x_embedder], seed + 20 + i)
        cns.append(cn)
    return comps, cns


def reference_transformer_pipeline(comps, controlnet, family: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline, StableDiffusion3ControlNetPipeline

    parts = dict(transformer=comps.unet, vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                 text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2, controlnet=controlnet,
                 scheduler=FlowMatchEulerDiscreteScheduler.from_config(comps.scheduler_config))
    if family == "sd3":
        return StableDiffusion3ControlNetPipeline(**parts, text_encoder_3=None, tokenizer_3=None)
    return FluxControlNetPipeline(**parts)


def multi_controlnet(family: str, cns: list):
    from diffusers import FluxMultiControlNetModel, SD3MultiControlNetModel

    return (SD3MultiControlNetModel if family == "sd3" else FluxMultiControlNetModel)(cns)


def measured_flops(args, pipe, cns, hints, n: int, end: float, ours) -> float:
    """FLOPs of one image, counted on our parity pipeline: the whole call at 1 and 2 steps gives the
    per-step cost (transformer + the active ControlNets) and the once-per-image rest."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(steps: int, k: int) -> int:
        one = type(args)(**{**vars(args), "steps": steps})
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ours(one, pipe, cns, hints, k)()
        return fc.get_total_flops()

    step = count(2, 0) - count(1, 0)  # the transformer's step
    c1, c2 = count(1, n), count(2, n)
    controls = (c2 - c1) - step  # the n ControlNets' step
    return c1 - (c2 - c1) + args.steps * (step + end * controls)  # text, hints' VAE, decoder once; steps
