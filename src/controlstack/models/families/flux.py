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


def written(transformer) -> int:
    """The channels a Flux transformer writes (its packed latents' width). A config without
    ``out_channels`` writes what it read when built -- still so after a Control LoRA widened its input."""
    c = transformer.config
    return getattr(transformer, "out_channels", None) or c.get("out_channels") or c.in_channels


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
        reads, writes = components.unet.config.in_channels, written(components.unet)
        if reads not in (writes, 2 * writes):  # Flux Fill: latents + masked image + the 8x8-packed mask
            raise ControlstackError(f"this Flux transformer reads {reads} channels and writes {writes}: a Flux Fill "
                                    "(inpainting) model, which is not supported; use a Flux base with an inpainting "
                                    "ControlNet")

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
        return batch, written(pipe.unet) // 4, 2 * (height // (f * 2)), 2 * (width // (f * 2))

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
        """diffusers' ``FluxLoraLoaderMixin.load_lora_weights``, step by step: a Flux Control LoRA
        (Canny-dev-lora, Depth-dev-lora) widens the input layer to read the condition's latents beside
        the image's (``x_embedder``'s weight zero-padded, then its LoRA on the wider input) and
        replaces the attention's RMS norms; afterwards the base reads ``Control("base", image)`` as the
        full Control model does. What it replaced is kept to put back when it is unloaded."""
        loader = self.lora_loader()
        converted, alphas = loader.lora_state_dict(dict(state), return_alphas=True)
        lora = {k: v for k, v in converted.items() if k.startswith("transformer.") and "lora" in k}
        norms = {k: converted.pop(k) for k in list(converted) if k.startswith("transformer.")
                 and any(n in k for n in loader._control_lora_supported_norm_keys)}
        before = pipe.unet.config.in_channels
        widens = lora and any(k.startswith("transformer.x_embedder.") and v.shape[1] != before
                              for k, v in lora.items() if k.endswith(("lora_A.weight", "lora_down.weight")))
        if widens and getattr(pipe.unet, "_control_lora", None) is not None:
            raise ControlstackError(f"a Flux Control LoRA ('{pipe.unet._control_lora}') is loaded already; unload it "
                                    "first (one Control LoRA widens the input layer at a time)")
        if widens or norms:  # set before anything changes: a failed load is undone by drop_lora
            pipe.unet._control_lora = name
        if lora:
            loader._maybe_expand_transformer_param_shape_or_error_(pipe.unet, lora, norms)
            converted.update(loader._maybe_expand_lora_state_dict(transformer=pipe.unet, lora_state_dict=lora))
        loader.load_lora_into_transformer(converted, alphas, pipe.unet, adapter_name=name)
        if norms:
            kept = loader._load_norm_into_transformer(norms, transformer=pipe.unet, discard_original_layers=False)
            pipe.unet._transformer_norm_layers = {**kept, **(getattr(pipe.unet, "_transformer_norm_layers", None) or {})}
        for prefix, encoder in self.text_encoders(pipe):
            loader.load_lora_into_text_encoder(converted, alphas, encoder, prefix=prefix, adapter_name=name)

    def drop_lora(self, pipe, name: str) -> None:
        """Unloading a Control LoRA puts back the norms and the narrow input layer (diffusers'
        ``unload_lora_weights(reset_to_overwritten_params=True)``)."""
        t = pipe.unet
        if getattr(t, "_control_lora", None) != name:
            return
        if getattr(t, "_transformer_norm_layers", None):
            t.load_state_dict(t._transformer_norm_layers, strict=False)
            t._transformer_norm_layers = None
        original = getattr(t, "_overwritten_params", None) or {}
        if "x_embedder.weight" in original:
            weight, bias = original["x_embedder.weight"], original.get("x_embedder.bias")
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                                    device=weight.device)
            with torch.no_grad():
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
            t.x_embedder = layer
            t.register_to_config(in_channels=int(weight.shape[1]))
            t._overwritten_params = None
        t._control_lora = None

    def __repr__(self) -> str:
        return "<family flux>"


FAMILY = Flux()
