"""SDXL single-file checkpoints (sd-webui / ComfyUI's ``sd_xl_base_1.0.safetensors``), read and
written offline.

The layout is Stability's ``generative-models`` one:

* ``model.diffusion_model.*``                      -- the U-Net, LDM names (``label_emb`` = the added embedding);
* ``first_stage_model.*``                          -- the VAE, LDM names;
* ``conditioner.embedders.0.transformer.text_model.*`` -- CLIP ViT-L, transformers' own names;
* ``conditioner.embedders.1.model.*``              -- OpenCLIP ViT-bigG: ``transformer.resblocks.N``
  with fused ``attn.in_proj_{weight,bias}`` (q, k, v stacked), ``text_projection`` stored as the
  (width, projection) matrix OpenCLIP multiplies by (a transposed ``nn.Linear`` weight).

Reading uses diffusers' converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) with local configs: ``config=DIR``
(a diffusers SDXL folder, which also gives both tokenizers) > the configs we embed when we write a
file > SDXL base 1.0's configs (``configs/sdxl``) with every field the tensors can tell taken from
the tensors. Writing is the inverse mapping, so ``load_base(save_base(x, "f.safetensors"))`` gives
``x``'s tensors back exactly. Tokenizers: without ``config`` a cached ``openai/clip-vit-large-patch14``
tokenizer serves both encoders (SDXL's second tokenizer is the same vocabulary padded with "!").
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from controlstack.errors import ControlstackError
from controlstack.io import original as orig
from controlstack.io.single_file_common import (
    base_to_original,
    read_json,
    require_base_folder,
    scheduler_config,
    single_file_tokenizer,
    strip_prefix,
    tokenizer_from,
    unet_from_state,
    vae_from_state,
)
from controlstack.io.tensors import assign_exact, cast_model, config_file, existing_path
from controlstack.models.components import SDComponents

SDXL_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "sdxl"
TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
TE2_PREFIX = "conditioner.embedders.1.model."
METADATA_KEYS = {"unet": "controlstack.unet_config", "vae": "controlstack.vae_config",
                 "text_encoder": "controlstack.text_encoder_config",
                 "text_encoder_2": "controlstack.text_encoder_2_config"}
#: OpenCLIP resblock part -> transformers CLIP encoder-layer part
_OPENCLIP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}


def infer_open_clip_config(shapes: dict[str, tuple]) -> dict:
    """``CLIPTextConfig`` fields of an OpenCLIP text tower from its (prefix-free) shapes."""
    if "token_embedding.weight" not in shapes or "text_projection" not in shapes:
        raise ControlstackError("the SDXL checkpoint has no second text encoder (conditioner.embedders.1.model.*); "
                                "pass --config with a diffusers SDXL folder")
    vocab, hidden = shapes["token_embedding.weight"]
    return {
        "vocab_size": int(vocab), "hidden_size": int(hidden), "projection_dim": int(shapes["text_projection"][1]),
        "max_position_embeddings": int(shapes["positional_embedding"][0]),
        "num_hidden_layers": len({k.split(".")[2] for k in shapes if k.startswith("transformer.resblocks.")}),
        "intermediate_size": int(shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]),
        "num_attention_heads": max(1, int(hidden) // 64),  # invisible in the weights: 64-dim heads (bigG: 20)
    }


def _configs(state: dict, metadata: dict, config) -> tuple[dict, Path | None]:
    """part -> config: ``config`` folder > our metadata > SDXL 1.0's + what the shapes tell."""
    if config is not None:
        folder = existing_path(config, "config")
        require_base_folder(folder)
        if not (folder / "text_encoder_2").is_dir():
            raise ControlstackError(f"--config '{folder}' is not an SDXL folder (no text_encoder_2/)")
        return {part: config_file(folder / part) for part in METADATA_KEYS}, folder
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    infer = {"unet": lambda: orig.infer_unet_config(strip_prefix(shapes, orig.UNET_PREFIX)),
             "vae": lambda: orig.infer_vae_config(strip_prefix(shapes, orig.VAE_PREFIX)),
             "text_encoder": lambda: orig.infer_clip_config(strip_prefix(shapes, TE1_PREFIX)),
             "text_encoder_2": lambda: infer_open_clip_config(strip_prefix(shapes, TE2_PREFIX))}
    out = {}
    for part, key in METADATA_KEYS.items():
        out[part] = json.loads(metadata[key]) if key in metadata else \
            {**read_json(SDXL_CONFIGS / part / "config.json"), **infer[part]()}
    return out, None


def _tokenizers(folder: Path | None, vocab_size: int):
    if folder is not None:
        return tokenizer_from(folder), tokenizer_from(folder, "tokenizer_2")
    first = single_file_tokenizer(None, vocab_size)
    second = type(first).from_pretrained(first.name_or_path, local_files_only=True, pad_token="!")
    return first, second


def _text_model(cls, cfg: dict, state: dict, what: str, dtype):
    from accelerate import init_empty_weights  # local: heavy, only this path needs it
    from transformers import CLIPTextConfig  # local: heavy, only this path needs it

    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "architectures")}
    with init_empty_weights():
        model = cls(CLIPTextConfig.from_dict(cfg))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    return cast_model(assign_exact(model, state, what), dtype)


def load_sdxl_state(state: dict, metadata: dict, config, dtype) -> SDComponents:
    from diffusers.loaders.single_file_utils import (  # local: heavy, only this path needs it
        convert_open_clip_checkpoint,
    )
    from transformers import (  # local: heavy, only this path needs it
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    cfgs, folder = _configs(state, metadata, config)
    unet = unet_from_state(state, cfgs["unet"], dtype)
    vae = vae_from_state(state, cfgs["vae"], dtype)
    te1 = _text_model(CLIPTextModel, cfgs["text_encoder"], strip_prefix(state, TE1_PREFIX), "first text encoder", dtype)
    width = SimpleNamespace(config=SimpleNamespace(hidden_size=cfgs["text_encoder_2"]["hidden_size"]))
    te2_state = convert_open_clip_checkpoint(width, state, prefix=TE2_PREFIX)
    te2 = _text_model(CLIPTextModelWithProjection, cfgs["text_encoder_2"], te2_state, "second text encoder", dtype)
    tokenizer, tokenizer_2 = _tokenizers(folder, te1.config.vocab_size)
    scheduler = scheduler_config(folder) if folder else read_json(SDXL_CONFIGS / "scheduler" / "scheduler_config.json")
    return SDComponents(unet=unet, vae=vae, text_encoder=te1, tokenizer=tokenizer, scheduler_config=scheduler,
                        text_encoder_2=te2, tokenizer_2=tokenizer_2)


def open_clip_to_original(model) -> dict:
    """A ``CLIPTextModelWithProjection``'s tensors under OpenCLIP's names (prefix-free)."""
    state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T}
    for i in range(model.config.num_hidden_layers):
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[q + f"attn.in_proj_{kind}"] = torch.cat([state.pop(p + f"self_attn.{x}_proj.{kind}") for x in "qkv"])
            for theirs, ours in _OPENCLIP.items():
                out[q + f"{theirs}.{kind}"] = state.pop(p + f"{ours}.{kind}")
    if state:
        raise ControlstackError(f"the second text encoder has tensors OpenCLIP's layout has no place for: {sorted(state)[:3]}")
    return out


def sdxl_to_original(components: SDComponents) -> dict:
    """The single-file state dict of an SDXL base (U-Net, VAE, both text encoders)."""
    out = base_to_original(components, clip_prefix=None)
    for k, t in components.text_encoder.state_dict().items():
        if not k.endswith("position_ids"):
            out[TE1_PREFIX + k.removeprefix("text_model.")] = t
    for k, t in open_clip_to_original(components.text_encoder_2).items():
        out[TE2_PREFIX + k] = t
    return {k: v.detach().contiguous() for k, v in out.items()}
