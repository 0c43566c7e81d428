"""IP-Adapter (Ye et al., 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models"): an image prompt through decoupled cross-attention, as a mixin of
:class:`controlstack.pipeline.Pipeline`.

A CLIP image encoder (transformers' ``CLIPVisionModelWithProjection``) embeds the reference image;
the adapter's projection turns the embedding into a few extra tokens, and every cross-attention
layer of the U-Net attends to them with its own key / value projections, adding
``scale * Attention(q, K_ip, V_ip)`` to the text attention (Eq. 4-5). diffusers does the layers
(``_load_ip_adapter_weights``: the projection as the U-Net's ``encoder_hid_proj``, the attention
processors) and reads the plain and plus / full-face projections; what is written here: reading the
file under the project's pickle policy, the image encoder from a folder or a model, the
embeddings as diffusers' pipelines make them (the negative: zeros, or the encoder's states of a
black image for the plus variants), the scales per adapter or per layer group (InstantStyle:
``{"down": ..., "up": {"block_0": [...]}}``), and feeding them to the one loop. The ControlNets
keep reading the text alone, as in diffusers' ControlNet pipelines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from controlstack.errors import ControlstackError
from controlstack.io.images import mask_to_array, to_rgb, validate_image
from controlstack.io.tensors import read_tensors


@dataclass
class ImagePrompt:
    """One image prompt: the reference image, the adapter's scale (a number, or per layer group
    as diffusers' ``set_ip_adapter_scale`` takes it) and a region ``mask`` (white: where the image
    prompt acts; diffusers' ``IPAdapterMaskProcessor``; None: everywhere)."""

    image: Any
    scale: float | dict = 1.0
    mask: Any = None


def read_ip_adapter(path, allow_pickle: bool = False) -> dict:
    """An IP-Adapter file -> ``{"image_proj": {...}, "ip_adapter": {...}}`` (diffusers' layout); such a
    dict (a recipe's adapter in training) is taken as it is."""
    if isinstance(path, dict):
        if set(path) != {"image_proj", "ip_adapter"}:
            raise ControlstackError("an IP-Adapter state must be {'image_proj': {...}, 'ip_adapter': {...}}")
        return path
    path = Path(path)
    if not path.is_file():
        raise ControlstackError(f"IP-Adapter '{path}' does not exist; check the path")
    state, _ = read_tensors(path, allow_pickle=allow_pickle)
    out: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in out:
            raise ControlstackError(f"IP-Adapter '{path}': key '{key[:80]}' is neither image_proj.* nor ip_adapter.*; "
                                    "pass an IP-Adapter file (ip-adapter_sd15.safetensors, ...)")
        out[head][rest] = value
    if not out["image_proj"] or not out["ip_adapter"]:
        raise ControlstackError(f"IP-Adapter '{path}' lacks its image projection or its attention weights")
    return out


class ImagePrompts:
    """IP-Adapters on a :class:`~controlstack.pipeline.Pipeline` (its ``unet``)."""

    def ip_state(self) -> list:
        if "_ip_adapters" not in self.__dict__:
            self._ip_adapters: list = []
            self._ip_names: list[str] = []
            self.image_encoder = self.feature_extractor = None
        return self._ip_adapters

    @property
    def ip_adapter_names(self) -> list[str]:
        """The loaded IP-Adapters' names, in load order (an image prompt list follows it)."""
        self.ip_state()
        return list(self._ip_names)

    def image_prompts_by_name(self, named: dict) -> list:
        """``{adapter name: ImagePrompt}`` -> the list ``image_prompts`` takes (None for an adapter
        without a prompt: it adds nothing); an unknown name is a one-line error."""
        unknown = sorted(set(named) - set(self.ip_adapter_names))
        if unknown:
            raise ControlstackError(f"no IP-Adapter named {', '.join(unknown)}; loaded: "
                                    f"{', '.join(self.ip_adapter_names) or 'none'}")
        return [named.get(n) for n in self.ip_adapter_names]

    def load_ip_adapter(self, path: str | os.PathLike | dict, image_encoder: Any = None, *, allow_pickle: bool = False,
                        name: str | None = None) -> None:
        """Add an IP-Adapter (several stay loaded: one image prompt each, in load order): a file, or a
        state dict in diffusers' layout (then give ``name``). ``image_encoder``: a
        ``CLIPVisionModelWithProjection`` or its folder (needed with the first)."""
        # local: heavy, only this path needs it
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        adapters = self.ip_state()
        state = read_ip_adapter(path, allow_pickle)
        if image_encoder is not None:
            folder = Path(image_encoder) if isinstance(image_encoder, (str, os.PathLike)) else None
            if folder is not None:
                image_encoder = CLIPVisionModelWithProjection.from_pretrained(
                    folder, local_files_only=True, use_safetensors=not allow_pickle)
            size = image_encoder.config.image_size
            self.image_encoder = image_encoder.to(self.unet.device, self.unet.dtype).eval()
            if folder is not None and (folder / "preprocessor_config.json").is_file():  # its own normalisation
                self.feature_extractor = CLIPImageProcessor.from_pretrained(folder)
            else:
                self.feature_extractor = CLIPImageProcessor(size={"shortest_edge": size},
                                                            crop_size={"height": size, "width": size})
        if self.image_encoder is None:
            raise ControlstackError("an IP-Adapter needs its image encoder: load_ip_adapter(path, image_encoder=...)")
        try:
            self.unet._load_ip_adapter_weights([*adapters, state])
        except (KeyError, RuntimeError, ValueError) as exc:  # shapes for another base
            self.unet._load_ip_adapter_weights(adapters) if adapters else self.unload_ip_adapter()
            raise ControlstackError(f"IP-Adapter '{path}' does not fit this base: "
                                    f"{str(exc).splitlines()[0][:200]}") from None
        adapters.append(state)
        self._ip_names.append(name or ("ip-adapter" if isinstance(path, dict) else Path(path).stem))
        self.tier = self.tier  # the U-Net's processors changed: fresh runners

    def unload_ip_adapter(self) -> None:
        """Remove every IP-Adapter: the U-Net's attention as it was (diffusers' ``unload_ip_adapter``)."""
        # local: heavy, only this path needs it
        from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

        self.ip_state().clear()
        self._ip_names.clear()
        self.unet.set_attn_processor({name: AttnProcessor2_0() if isinstance(p, IPAdapterAttnProcessor2_0)
                                      else p.__class__() for name, p in self.unet.attn_processors.items()})
        self.unet.encoder_hid_proj = None
        self.unet.register_to_config(encoder_hid_dim_type=None, encoder_hid_dim=None)
        self.tier = self.tier

    @torch.no_grad()
    def image_embeds(self, prompts, batch: int, do_cfg: bool) -> list[torch.Tensor] | None:
        """The image embeddings for the U-Net's ``added_cond_kwargs["image_embeds"]``: one tensor per
        loaded adapter, batched as the U-Net's input (negative first under CFG), with each
        adapter's scale set; none given: zeros at scale 0 (the adapter adds nothing)."""
        # local: heavy, only this path needs it
        from diffusers.models.embeddings import ImageProjection

        adapters = self.ip_state()
        prompts = list(prompts or [])
        if not adapters:
            if prompts:
                raise ControlstackError("image_prompts need an IP-Adapter: pipe.load_ip_adapter(path, image_encoder=...)")
            return None
        if not any(p is not None for p in prompts):
            prompts = []
        if prompts and len(prompts) != len(adapters):
            raise ControlstackError(f"{len(prompts)} image prompts for {len(adapters)} IP-Adapters; give one each")
        layers = self.unet.encoder_hid_proj.image_projection_layers
        scales, embeds = [], []
        for i, layer in enumerate(layers):
            hidden = not isinstance(layer, ImageProjection)  # the plus / full-face projections read hidden states
            if prompts and prompts[i] is not None:
                image = to_rgb(validate_image(prompts[i].image, f"image prompt {i}"))
                pixels = self.feature_extractor(image, return_tensors="pt").pixel_values.to(
                    self.image_encoder.device, self.image_encoder.dtype)
                pos, neg = self._encode_image(pixels, hidden)
                scales.append(prompts[i].scale)
            else:
                pos = neg = self._encode_image(torch.zeros(1, 3, *self._pixels(), dtype=self.image_encoder.dtype,
                                                           device=self.image_encoder.device), hidden)[1]
                scales.append(0.0)
            pos, neg = torch.cat([pos[None]] * batch), torch.cat([neg[None]] * batch)
            embeds.append((torch.cat([neg, pos]) if do_cfg else pos).to(self.unet.device))
        self._set_scales(scales)
        return embeds

    def ip_masks(self, prompts, height: int, width: int) -> list[torch.Tensor] | None:
        """The prompts' region masks for the attention processors (``ip_adapter_masks``), one per
        adapter -- all ones for a prompt without one, which leaves its tokens as they are; None
        when no prompt has a mask."""
        # local: heavy, only this path needs it
        from diffusers.image_processor import IPAdapterMaskProcessor

        prompts = list(prompts or [])
        if not any(p is not None and p.mask is not None for p in prompts):
            return None
        processor = IPAdapterMaskProcessor()
        out = []
        for i, p in enumerate(prompts):
            m = (np.ones((height, width), np.float32) if p is None or p.mask is None else
                 mask_to_array(p.mask, f"image prompt {i} mask"))
            out.append(processor.preprocess(Image.fromarray((m * 255).round().astype(np.uint8), "L"), height=height,
                                            width=width).to(self.unet.device))
        return out

    def _pixels(self) -> tuple[int, int]:
        size = self.image_encoder.config.image_size
        return size, size

    def _encode_image(self, pixels: torch.Tensor, hidden: bool):
        """(embedding, negative) of an image as diffusers' ``encode_image``."""
        if hidden:
            pos = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
            neg = self.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
            return pos, neg
        pos = self.image_encoder(pixels).image_embeds
        return pos, torch.zeros_like(pos)

    def _set_scales(self, scales: list) -> None:
        """diffusers' ``set_ip_adapter_scale``: a number or a per-layer-group dict for each adapter."""
        # local: heavy, only this path needs it
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

        # local: heavy, only this path needs it
        from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

        configs = _maybe_expand_lora_scales(self.unet, scales, default_scale=0.0)
        for name, processor in self.unet.attn_processors.items():
            if isinstance(processor, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)):
                for i, config in enumerate(configs):
                    if isinstance(config, dict):
                        for k, s in config.items():
                            if name.startswith(k):
                                processor.scale[i] = s
                    else:
                        processor.scale[i] = config
