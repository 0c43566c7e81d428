"""Stable Diffusion 3 / 3.5 (Esser et al., 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"): an MMDiT transformer -- text and image tokens in joint
attention blocks -- trained with rectified flow, and three text encoders (Sec. 5.2):

* CLIP-L and CLIP-G, each ``CLIPTextModelWithProjection``: their penultimate hidden states are
  concatenated along the width and zero-padded to T5's width, and their pooled (projected)
  embeddings concatenated into the *pooled projection* the transformer adds to the time embedding;
* T5-XXL (optional: without it, zeros of 256 tokens at the joint attention width, as diffusers'
  ``StableDiffusion3Pipeline`` feeds), appended after the CLIP tokens.

The negative prompt is encoded like the prompt (the empty string for none; no zeros rule). Flow
matching (Sec. 2-3): ``x_t = (1 - t) x_0 + t ε``, the network predicts ``v = ε - x_0``, sampled
by diffusers' ``FlowMatchEulerDiscreteScheduler`` with the model's shift. Its latents have 16
channels with a *shift* and a scale (``models/vae.py``). This module is what those facts change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from controlstack.errors import ControlstackError
from controlstack.models.families.base import Family

T5_TOKENS = 256  # diffusers' max_sequence_length default for SD3


def join_text(clip_states: list, clip_pooled: list, t5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's text conditioning from its encoders' outputs: the CLIP states side by side, zero-padded to
    T5's width, then T5's tokens; the pooled embeddings side by side (the base recipe trains through it)."""
    clip = torch.cat(clip_states, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip).expand(clip.shape[0], -1, -1)], dim=-2), torch.cat(clip_pooled, dim=-1)


class SD3(Family):
    name = "sd3"
    label = "Stable Diffusion 3"
    network = "mmdit"           # the denoiser kind (the pipeline's table): an MMDiT transformer
    default_scheduler = "euler"  # flow matching: FlowMatchEulerDiscreteScheduler
    flow = True

    def detect(self, config: dict) -> bool:
        return "pos_embed_max_size" in config and "caption_projection_dim" in config

    def detect_state(self, keys) -> bool:
        return any(k.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for k in keys)

    def display(self, config: dict) -> str:
        layers = config.get("num_layers")
        return "SD3.5" if config.get("qk_norm") else f"SD3 ({layers} joint blocks)"

    def check_components(self, components) -> None:
        if components.text_encoder_2 is None or components.tokenizer_2 is None:
            raise ControlstackError("an SD3 transformer needs both CLIP text encoders and tokenizers (text_encoder_2, "
                                    "tokenizer_2); T5 (text_encoder_3) is optional")

    @torch.no_grad()
    def encode_text(self, pipe, prompt: str, batch: int):
        """``(hidden, pooled)`` as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (no clip skip)."""
        states, pooled = [], []
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        hidden, pooled_all = join_text(states, pooled, self.t5_states(pipe, prompt))
        return hidden.repeat(batch, 1, 1), pooled_all.repeat(batch, 1)

    def t5_states(self, pipe, prompt: str) -> torch.Tensor:
        width = pipe.unet.config.joint_attention_dim
        if pipe.text_encoder_3 is None:
            return torch.zeros(1, T5_TOKENS, width, dtype=pipe.unet.dtype, device=pipe.unet.device)
        ids = pipe.tokenizer_3([prompt], padding="max_length", max_length=T5_TOKENS, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        return pipe.text_encoder_3(ids.to(pipe.text_encoder_3.device))[0]

    def text_conditions(self, pipe, prompt, negative_prompt, batch, do_cfg, size, micro):
        given = {k: v for k, v in micro.items() if v is not None}
        if given:
            raise ControlstackError(f"{', '.join(given)}: SDXL micro-conditioning, but this base is {self.label}")
        cond, pooled = self.encode_text(pipe, prompt, batch)
        uncond = neg_pooled = None
        if do_cfg:
            uncond, neg_pooled = self.encode_text(pipe, negative_prompt or "", batch)
        return cond, uncond, ({"pooled": neg_pooled} if do_cfg else None, {"pooled": pooled})

    def text_encoders(self, pipe):
        return [("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)]

    def lora_loader(self):
        from diffusers.loaders import SD3LoraLoaderMixin  # local: heavy, only this path needs it

        return SD3LoraLoaderMixin

    def load_lora(self, pipe, state: dict, name: str) -> None:
        loader = self.lora_loader()  # SD3's files carry no alphas
        converted = loader.lora_state_dict(dict(state))
        loader.load_lora_into_transformer(converted, transformer=pipe.unet, adapter_name=name)
        for prefix, encoder in self.text_encoders(pipe):
            loader.load_lora_into_text_encoder(converted, None, encoder, prefix=prefix, adapter_name=name)

    def __repr__(self) -> str:
        return "<family sd3>"


FAMILY = SD3()
