"""Flux.1 (Black Forest Labs, 2024; diffusers' ``FluxTransformer2DModel``): an MMDiT with double-
and single-stream blocks and rotary position ids, trained with rectified flow. What the family
changes:

* **text** -- T5's hidden states (512 tokens; ids all zero) for the joint attention, and CLIP-L's
  *pooled* output as the pooled projection; no negative prompt (the guidance is distilled);
* **guidance** -- a guidance-distilled model (Flux-dev: ``guidance_embeds``) embeds the guidance
  scale like the time; there is no CFG batch, so ``cfg`` is that embedded scale (Flux-schnell
  ignores it);
* **latents** -- 16 channels with a shift and a scale (``models/vae.py``), packed into 2x2 patches
  of tokens (``(B, C, h, w) -> (B, h/2 * w/2, 4C)``) with their (row, column) ids;
* **schedule** -- flow matching with sigmas ``linspace(1, 1/N, N)`` and a resolution-dependent
  shift ``mu`` (diffusers' ``calculate_shift`` over the packed sequence length).
"""

from __future__ import annotations

import numpy as np
import torch

from controlstack.errors import ControlstackError
from controlstack.models.families.base import Family

T5_TOKENS = 512  # diffusers' max_sequence_length default for Flux


class Flux(Family):
    name = "flux"
    label = "Flux.1"
    network = "flux"             # the denoiser kind (the pipeline's table)
    default_scheduler = "euler"  # flow matching: FlowMatchEulerDiscreteScheduler
    flow = True
    cfg_batch = False            # the guidance is embedded (or absent): one forward per step

    def detect(self, config: dict) -> bool:
        return "axes_dims_rope" in config

    def detect_state(self, keys) -> bool:
        return any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)

    def display(self, config: dict) -> str:
        return "Flux.1-dev" if config.get("guidance_embeds") else "Flux.1-schnell"

    def check_components(self, components) -> None:
        if components.text_encoder_2 is None or components.tokenizer_2 is None:
            raise ControlstackError("a Flux transformer needs its T5 encoder and tokenizer (text_encoder_2, tokenizer_2)")

    @torch.no_grad()
    def encode_text(self, pipe, prompt: str, batch: int):
        """``(T5 states, CLIP pooled)`` as diffusers' ``FluxPipeline.encode_prompt``."""
        tok = pipe.tokenizer
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        pooled = pipe.text_encoder(ids.to(pipe.text_encoder.device), output_hidden_states=False).pooler_output
        ids = pipe.tokenizer_2([prompt], padding="max_length", max_length=T5_TOKENS, truncation=True,
                               return_tensors="pt").input_ids
        hidden = pipe.text_encoder_2(ids.to(pipe.text_encoder_2.device), output_hidden_states=False)[0]
        return hidden.repeat(batch, 1, 1), pooled.to(pipe.text_encoder.dtype).repeat(batch, 1)

    def text_conditions(self, pipe, prompt, negative_prompt, batch, do_cfg, size, micro):
        given = {k: v for k, v in micro.items() if v is not None}
        if given:
            raise ControlstackError(f"{', '.join(given)}: SDXL micro-conditioning, but this base is {self.label}")
        if negative_prompt:
            raise ControlstackError("a Flux base takes no negative prompt (its guidance is distilled into the model)")
        hidden, pooled = self.encode_text(pipe, prompt, batch)
        return hidden, None, (None, {"pooled": pooled})

    def text_encoders(self, pipe):
        return [("text_encoder", pipe.text_encoder)]

    def lora_loader(self):
        from diffusers.loaders import FluxLoraLoaderMixin  # local: heavy, only this path needs it

        return FluxLoraLoaderMixin

    # -- latents ----------------------------------------------------------------------------
    def native_size(self, pipe) -> int:
        return 128 * pipe.vae_scale_factor  # diffusers' FluxPipeline default_sample_size: 1024 px

    def noise_shape(self, pipe, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = pipe.vae_scale_factor
        c = pipe.unet.config  # a Control base reads twice the channels it writes
        return batch, (c.get("out_channels") or c.in_channels) // 4, 2 * (height // (f * 2)), 2 * (width // (f * 2))

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Packed tokens -> ``(B, C, h, w)`` latents (``h``, ``w``: the latent size)."""
        b, _, channels = latents.shape
        x = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, channels // 4, h, w)

    @staticmethod
    def image_ids(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """The packed tokens' (0, row, column) ids (``h``, ``w``: the latent size)."""
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(like.device, like.dtype)

    def set_timesteps(self, scheduler, steps: int, latents: torch.Tensor, device) -> None:
        """Sigmas ``linspace(1, 1/N, N)``, shifted by ``mu`` for the packed sequence length."""
        c = scheduler.config
        base, top = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        lo, hi = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        m = (hi - lo) / (top - base)
        mu = latents.shape[1] * m + (lo - m * base)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)

    def load_lora(self, pipe, state: dict, name: str) -> None:
        loader = self.lora_loader()
        wide = [k for k, v in state.items() if "x_embedder" in k and k.endswith(("lora_A.weight", "lora_down.weight"))
                and v.shape[1] != pipe.unet.config.in_channels]
        if wide:  # a Flux Control LoRA (Canny-dev-lora): it widens the input layer to read the condition
            raise ControlstackError("Flux Control LoRAs (which widen the input layer) are not supported yet; load "
                                    "the full Control model (Canny-dev / Depth-dev) instead")
        converted, alphas = loader.lora_state_dict(dict(state), return_alphas=True)
        loader.load_lora_into_transformer(converted, alphas, pipe.unet, adapter_name=name)
        for prefix, encoder in self.text_encoders(pipe):
            loader.load_lora_into_text_encoder(converted, alphas, encoder, prefix=prefix, adapter_name=name)

    def __repr__(self) -> str:
        return "<family flux>"


FAMILY = Flux()
