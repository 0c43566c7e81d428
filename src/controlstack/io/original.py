"""Key names of the original (CompVis LDM / lllyasviel ControlNet) checkpoints <-> diffusers, and
architecture inference from tensor shapes.

One table per model, built from the *diffusers* parameter names of a concrete model, serves both
directions (``table`` maps diffusers -> original; its inverse maps back), so a round trip is exact by
construction. The rules are generic in the number of down blocks and ``layers_per_block``:

* U-Net encoder (shared by the SD U-Net and the ControlNet), as in the LDM ``UNetModel``
  (``ldm/modules/diffusionmodules/openaimodel.py``): ``input_blocks.0.0`` is ``conv_in``; down block
  ``b`` layer ``l`` is ``input_blocks.{1 + b(L+1) + l}`` with ``.0`` the ResBlock and ``.1`` the
  SpatialTransformer; its downsampler is ``input_blocks.{(b+1)(L+1)}.0.op``; the middle block is
  ``middle_block.{0,1,2}`` (ResBlock, transformer, ResBlock); ``time_embed.{0,2}`` the time MLP.
* U-Net decoder: up block ``b`` layer ``l`` is ``output_blocks.{b(L+1) + l}``, its upsampler the last
  sub-module of the block's last layer (``.1.conv`` or ``.2.conv`` after a transformer); ``out.{0,2}``.
* ControlNet (lllyasviel ``cldm/cldm.py``): ``zero_convs.{i}.0`` are diffusers'
  ``controlnet_down_blocks.{i}``, ``middle_block_out.0`` is ``controlnet_mid_block``, and the hint
  encoder ``input_hint_block`` is a Sequential of convs with SiLUs between them (even indices).
* VAE (``ldm/modules/diffusionmodules/model.py``): ``encoder.down.{i}.block.{j}``, decoder up blocks
  numbered in reverse, ``mid.block_{1,2}`` / ``mid.attn_1`` with 1x1-conv q/k/v/proj_out.
* CLIP text encoder: the transformers module under ``cond_stage_model.transformer.``.
* ControlNet-Union (:func:`infer_union_config`): diffusers names only, its ControlNet part read
  through the same U-Net encoder table.

The reading direction is cross-checked in the tests against diffusers' own converters
(``diffusers.loaders.single_file_utils``) and ``ControlNetModel.from_single_file``.
"""

from __future__ import annotations

import re

from controlstack.errors import ControlstackError

CONTROLNET_PREFIX = "control_model."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers ResnetBlock2D sub-module -> LDM ResBlock sub-module
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_EMBED = {"linear_1": "0.0", "linear_2": "0.2"}  # class/add embedding -> label_emb.0.{0,2}

# ----------------------------------------------------------------------------------- U-Net / ControlNet
def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[head]}.{tail}"


def _unet_key(key: str, layers: int, up_has_attn: set[int], n_hint_blocks: int) -> str:
    """One diffusers U-Net/ControlNet parameter name -> its LDM name (``layers`` = layers_per_block)."""
    p = layers + 1
    simple = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
              "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
              "controlnet_mid_block.": "middle_block_out.0.",
              "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
              "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * n_hint_blocks + 2}."}
    for old, new in simple.items():
        if key.startswith(old):
            return new + key[len(old):]
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda b, l, r: f"input_blocks.{1 + int(b) * p + int(l)}.0.{_resnet(r)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda b, l, r: f"input_blocks.{1 + int(b) * p + int(l)}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda b, r: f"input_blocks.{(int(b) + 1) * p}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda i, r: f"middle_block.{2 * int(i)}.{_resnet(r)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, l, r: f"output_blocks.{int(b) * p + int(l)}.0.{_resnet(r)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, l, r: f"output_blocks.{int(b) * p + int(l)}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda b, r: f"output_blocks.{int(b) * p + layers}.{2 if int(b) in up_has_attn else 1}.conv.{r}"),
        (r"controlnet_down_blocks\.(\d+)\.(.+)", lambda i, r: f"zero_convs.{i}.0.{r}"),
        (r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", lambda j, r: f"input_hint_block.{2 * int(j) + 2}.{r}"),
        (r"(?:class|add)_embedding\.(linear_\d)\.(.+)", lambda lin, r: f"label_emb.{_EMBED[lin]}.{r}"),
    ]
    for pattern, fn in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return fn(*m.groups())
    raise KeyError(f"no original-format name for parameter {key!r}")


def unet_table(keys, layers_per_block: int) -> dict[str, str]:
    """diffusers name -> LDM name for every key of a U-Net or ControlNet state dict (a bijection)."""
    keys = list(keys)
    up_has_attn = {int(k.split(".")[1]) for k in keys if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    n_hint = len({k.split(".")[2] for k in keys if k.startswith("controlnet_cond_embedding.blocks.")})
    table = {k: _unet_key(k, layers_per_block, up_has_attn, n_hint) for k in keys}
    assert len(set(table.values())) == len(table), "original-format key table is not one-to-one"
    return table


def layers_per_block_from_diffusers_keys(keys) -> int:
    ids = [int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))]
    if not ids:
        raise ControlstackError("checkpoint has no down_blocks.0.resnets.* tensors: not a diffusers U-Net or "
                                "ControlNet; pass a complete checkpoint")
    return 1 + max(ids)


# ----------------------------------------------------------------------------------- VAE / CLIP
def _vae_key(key: str, n_blocks: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda i, j, r: f"encoder.down.{i}.block.{j}.{r}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda i, r: f"encoder.down.{i}.downsample.conv.{r}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"decoder.up.{n_blocks - 1 - int(i)}.block.{j}.{r}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, r: f"decoder.up.{n_blocks - 1 - int(i)}.upsample.conv.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", lambda c, i, r: f"{c}.mid.block_{int(i) + 1}.{r}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)",
         lambda c, m, r: f"{c}.mid.attn_1.{_VAE_ATTN[m]}.{r}"),
    ]
    for pattern, fn in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return fn(*m.groups()).replace(".conv_shortcut.", ".nin_shortcut.")
    return key  # conv_in / conv_out / norm_out / quant_conv / post_quant_conv keep their names


def vae_table(keys, n_blocks: int) -> dict[str, str]:
    table = {k: _vae_key(k, n_blocks) for k in keys}
    assert len(set(table.values())) == len(table), "VAE key table is not one-to-one"
    return table


def is_vae_attention_matrix(original_key: str) -> bool:
    """LDM stores the VAE mid attention's q/k/v/proj_out as 1x1 convs; diffusers as Linear."""
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key))


# ----------------------------------------------------------------------------------- inference
def _layer_ids(shapes: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def _norm_groups(channels) -> int:
    # GroupNorm's group count leaves no trace in the weights; SD uses 32. Fall back to the largest
    # power of two dividing every width so that unusual widths still build.
    for g in (32, 16, 8, 4, 2, 1):
        if all(c % g == 0 for c in channels):
            return g
    return 1


def infer_unet_encoder_config(shapes: dict[str, tuple]) -> dict:
    """diffusers config fields of a U-Net encoder (conv_in .. mid block) from LDM-named shapes.

    ``shapes`` maps prefix-free LDM names to tensor shapes. What tensors cannot tell takes SD-1.x
    values: 8 attention heads (SD-1.x) -- or, with linear transformer projections (SD-2.x / SDXL),
    64-dim heads; GroupNorm with 32 groups; no attention upcasting.
    """
    def need(key):
        if key not in shapes:
            raise ControlstackError(f"checkpoint lacks tensor '{key}': it does not look like an SD U-Net or "
                                    "ControlNet; pass --config with the model's config.json folder")
        return shapes[key]

    in_channels = need("input_blocks.0.0.weight")[1]
    blocks = _layer_ids(shapes, r"input_blocks\.(\d+)\.")
    n_input = blocks[-1] + 1
    downs = _layer_ids(shapes, r"input_blocks\.(\d+)\.0\.op\.weight")
    layers = downs[0] - 1 if downs else n_input - 1
    if layers < 1 or n_input % (layers + 1):
        raise ControlstackError(f"cannot infer the U-Net layout from {n_input} input blocks; pass --config")
    n_blocks = n_input // (layers + 1)
    channels, types, depth = [], [], []
    for b in range(n_blocks):
        first = 1 + b * (layers + 1)
        channels.append(need(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        tf = _layer_ids(shapes, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        types.append("CrossAttnDownBlock2D" if tf else "DownBlock2D")
        depth.append(len(tf) or 1)
    attn = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    cross = shapes[attn[0]][1] if attn else None
    proj = [s for k, s in shapes.items() if k.endswith(".proj_in.weight")]
    linear = bool(proj) and len(proj[0]) == 2
    config = {
        "in_channels": int(in_channels),
        "block_out_channels": [int(c) for c in channels],
        "layers_per_block": layers,
        "down_block_types": types,
        "cross_attention_dim": int(cross) if cross else int(channels[-1]),
        "transformer_layers_per_block": depth if len(set(depth)) > 1 else depth[0],
        "use_linear_projection": linear,
        "attention_head_dim": [max(1, c // 64) for c in channels] if linear else 8,
        "norm_num_groups": _norm_groups(channels),
        "mid_block_type": "UNetMidBlock2DCrossAttn" if any(k.startswith("middle_block.1.") for k in shapes)
        else "UNetMidBlock2D",
    }
    if "label_emb.0.0.weight" in shapes:  # SDXL: text_time additional embedding
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=int(shapes["label_emb.0.0.weight"][1]))
    return config


def infer_controlnet_config(shapes: dict[str, tuple]) -> dict:
    """A ``ControlNetModel`` config from the shapes of an original-format ControlNet."""
    if "input_hint_block.0.weight" not in shapes or not any(k.startswith("zero_convs.") for k in shapes):
        raise ControlstackError("tensors do not look like a ControlNet (no input_hint_block / zero_convs); "
                                "pass a ControlNet checkpoint, or a base model where a base is expected")
    config = infer_unet_encoder_config(shapes)
    hint = _layer_ids(shapes, r"input_hint_block\.(\d+)\.weight")
    inner = hint[1:-1]  # conv_in, [conv, strided conv] * n, conv_out
    if len(inner) % 2:
        raise ControlstackError("the ControlNet hint encoder has an unexpected layout; pass --config")
    out = [shapes["input_hint_block.0.weight"][0]] + [shapes[f"input_hint_block.{i}.weight"][0] for i in inner[1::2]]
    config.update(conditioning_channels=int(shapes["input_hint_block.0.weight"][1]),
                  conditioning_embedding_out_channels=[int(c) for c in out])
    return config


def infer_unet_config(shapes: dict[str, tuple]) -> dict:
    """A ``UNet2DConditionModel`` config from LDM-named shapes: the encoder plus the mirrored decoder."""
    config = infer_unet_encoder_config(shapes)
    if "out.2.weight" not in shapes:
        raise ControlstackError("checkpoint has no U-Net output layer (out.2): not an SD base model")
    config["out_channels"] = int(shapes["out.2.weight"][0])
    config["up_block_types"] = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D"
                                for t in reversed(config["down_block_types"])]
    return config


def infer_vae_config(shapes: dict[str, tuple]) -> dict:
    """``AutoencoderKL`` fields from LDM-named VAE shapes (prefix-free)."""
    n = len(_layer_ids(shapes, r"encoder\.down\.(\d+)\."))
    if not n or "quant_conv.weight" not in shapes:
        raise ControlstackError("checkpoint has no VAE (first_stage_model.*): pass --config with a diffusers SD folder")
    channels = [int(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in range(n)]
    return {
        "in_channels": int(shapes["encoder.conv_in.weight"][1]),
        "out_channels": int(shapes["decoder.conv_out.weight"][0]),
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": len(_layer_ids(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": int(shapes["quant_conv.weight"][0]) // 2,
        "norm_num_groups": _norm_groups(channels),
    }


def infer_clip_config(shapes: dict[str, tuple]) -> dict:
    """``CLIPTextConfig`` fields from transformers-named shapes (after ``text_model.``)."""
    if "embeddings.token_embedding.weight" not in shapes:
        raise ControlstackError("checkpoint has no CLIP text encoder (cond_stage_model.transformer.*): "
                                "only SD-1.x single files are supported; pass a diffusers folder instead")
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    return {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "projection_dim": int(hidden),
        "max_position_embeddings": int(shapes["embeddings.position_embedding.weight"][0]),
        "num_hidden_layers": len(_layer_ids(shapes, r"encoder\.layers\.(\d+)\.")),
        "intermediate_size": int(shapes["encoder.layers.0.mlp.fc1.weight"][0]),
        # heads are invisible in the weights: CLIP uses 64-dim heads (12 for SD-1.x's 768)
        "num_attention_heads": max(1, int(hidden) // 64),
    }


#: parameters only a ControlNet-Union has (diffusers names: it has no LDM form) (its condition fusion and control-type embedding)
UNION_KEYS = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")


def infer_union_config(shapes: dict[str, tuple]) -> dict:
    """A ``ControlNetUnionModel`` config from diffusers-named shapes: the ControlNet part as for
    any ControlNet, the fusion's widths, type count and depth from its own tensors (its head count,
    which no shape shows, is diffusers' default 8)."""
    missing = [k for k in ("task_embedding", "spatial_ch_projs.weight", "control_add_embedding.linear_1.weight")
               if k not in shapes]
    if missing:
        raise ControlstackError(f"the ControlNet-Union file lacks '{missing[0]}'; it is truncated or not a union "
                                "model: pass --config with its config.json, or the model's folder")
    plain = {k: v for k, v in shapes.items() if not k.startswith(UNION_KEYS)}
    table = unet_table(plain, layers_per_block_from_diffusers_keys(plain))
    cfg = infer_controlnet_config({table[k]: tuple(v) for k, v in plain.items()})
    n_types, width = (int(n) for n in shapes["task_embedding"])
    cfg.pop("mid_block_type", None)  # the union model's mid block is fixed
    cfg.update(addition_time_embed_dim=int(shapes["control_add_embedding.linear_1.weight"][1]) // n_types,
               num_control_type=n_types, num_trans_channel=width,
               num_proj_channel=int(shapes["spatial_ch_projs.weight"][0]),
               num_trans_layer=len({k.split(".")[1] for k in shapes if k.startswith("transformer_layes.")}))
    return cfg
