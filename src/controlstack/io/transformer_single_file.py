"""SD3 / SD3.5 and Flux.1 single files: the original layouts (Stability's MMDiT ``joint_blocks``,
Black Forest Labs' ``double_blocks`` / ``single_blocks``, the VAE under ``first_stage_model.``) read
into diffusers' models and written back from them.

One table per family (:func:`sd3_rules`, :func:`flux_rules`) says how each original tensor is made
of diffusers tensors -- the same name, the concatenation of q, k, v (and Flux's single-block MLP
input) along the output dimension, or the two halves of an adaptive norm's modulation swapped
(the originals order them shift, scale; diffusers scale, shift) -- and both directions are read off
it, so reading and writing cannot drift apart. The tables follow diffusers' own converters
(``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_flux_transformer_checkpoint_to_diffusers``),
against which the tests check them.

A single file of these families carries the transformer (and the VAE, in SD3's files); the text
encoders and tokenizers (two CLIPs and T5) come from a diffusers folder of the family (``--config
DIR``), as ComfyUI loads them apart. The transformer's config is read from the file's shapes over
that folder's (so an SD3.5 file loads with an SD3 folder's encoders).
"""

from __future__ import annotations

import json
import re

import torch

from controlstack.errors import ControlstackError
from controlstack.io import original as orig

PREFIX = "model.diffusion_model."  # ComfyUI / Stability checkpoints; BFL's Flux files have bare keys
METADATA_KEYS = {"unet": "controlstack_transformer_config", "vae": "controlstack_vae_config"}


# -- the tables --------------------------------------------------------------------------------------
def _linear(original: str, parts: list[str], op: str = "copy") -> list[tuple]:
    """A linear layer's weight and bias: ``(original name, diffusers names, op)`` each."""
    return [(f"{original}.{p}", [f"{d}.{p}" for d in parts], op) for p in ("weight", "bias")]


def sd3_rules(layers: int) -> list[tuple]:
    """Stability's MMDiT (SD3 / SD3.5; the last block's context stream ends in a norm only)."""
    rules = [("pos_embed", ["pos_embed.pos_embed"], "copy"),
             *_linear("x_embedder.proj", ["pos_embed.proj"]),
             *_linear("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"]),
             *_linear("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"]),
             *_linear("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"]),
             *_linear("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"]),
             *_linear("context_embedder", ["context_embedder"]),
             *_linear("final_layer.linear", ["proj_out"]),
             *_linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap")]
    for i in range(layers):
        o, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == layers - 1
        rules += [*_linear(o + "x_block.attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], "chunk"),
                  *_linear(o + "context_block.attn.qkv",
                           [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"], "chunk"),
                  (o + "x_block.attn.ln_q.weight", [d + "attn.norm_q.weight"], "copy"),
                  (o + "x_block.attn.ln_k.weight", [d + "attn.norm_k.weight"], "copy"),
                  (o + "context_block.attn.ln_q.weight", [d + "attn.norm_added_q.weight"], "copy"),
                  (o + "context_block.attn.ln_k.weight", [d + "attn.norm_added_k.weight"], "copy"),
                  *_linear(o + "x_block.attn.proj", [d + "attn.to_out.0"]),
                  *_linear(o + "x_block.attn2.qkv", [d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v"], "chunk"),
                  (o + "x_block.attn2.ln_q.weight", [d + "attn2.norm_q.weight"], "copy"),
                  (o + "x_block.attn2.ln_k.weight", [d + "attn2.norm_k.weight"], "copy"),
                  *_linear(o + "x_block.attn2.proj", [d + "attn2.to_out.0"]),
                  *_linear(o + "x_block.adaLN_modulation.1", [d + "norm1.linear"]),
                  *_linear(o + "context_block.adaLN_modulation.1", [d + "norm1_context.linear"],
                           "swap" if last else "copy"),
                  *_linear(o + "x_block.mlp.fc1", [d + "ff.net.0.proj"]),
                  *_linear(o + "x_block.mlp.fc2", [d + "ff.net.2"])]
        if not last:
            rules += [*_linear(o + "context_block.attn.proj", [d + "attn.to_add_out"]),
                      *_linear(o + "context_block.mlp.fc1", [d + "ff_context.net.0.proj"]),
                      *_linear(o + "context_block.mlp.fc2", [d + "ff_context.net.2"])]
    return rules


def flux_rules(double: int, single: int) -> list[tuple]:
    """Black Forest Labs' Flux.1 (double-stream blocks, then single-stream ones)."""
    rules = [*_linear("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
             *_linear("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
             *_linear("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
             *_linear("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
             *_linear("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
             *_linear("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
             *_linear("txt_in", ["context_embedder"]),
             *_linear("img_in", ["x_embedder"]),
             *_linear("final_layer.linear", ["proj_out"]),
             *_linear("final_layer.adaLN_modulation.1", ["norm_out.linear"], "swap")]
    for i in range(double):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rules += [*_linear(o + "img_mod.lin", [d + "norm1.linear"]),
                  *_linear(o + "txt_mod.lin", [d + "norm1_context.linear"]),
                  *_linear(o + "img_attn.qkv", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v"], "chunk"),
                  *_linear(o + "txt_attn.qkv", [d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"],
                           "chunk"),
                  (o + "img_attn.norm.query_norm.scale", [d + "attn.norm_q.weight"], "copy"),
                  (o + "img_attn.norm.key_norm.scale", [d + "attn.norm_k.weight"], "copy"),
                  (o + "txt_attn.norm.query_norm.scale", [d + "attn.norm_added_q.weight"], "copy"),
                  (o + "txt_attn.norm.key_norm.scale", [d + "attn.norm_added_k.weight"], "copy"),
                  *_linear(o + "img_mlp.0", [d + "ff.net.0.proj"]),
                  *_linear(o + "img_mlp.2", [d + "ff.net.2"]),
                  *_linear(o + "txt_mlp.0", [d + "ff_context.net.0.proj"]),
                  *_linear(o + "txt_mlp.2", [d + "ff_context.net.2"]),
                  *_linear(o + "img_attn.proj", [d + "attn.to_out.0"]),
                  *_linear(o + "txt_attn.proj", [d + "attn.to_add_out"])]
    for i in range(single):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rules += [*_linear(o + "modulation.lin", [d + "norm.linear"]),
                  *_linear(o + "linear1", [d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp"], "split"),
                  (o + "norm.query_norm.scale", [d + "attn.norm_q.weight"], "copy"),
                  (o + "norm.key_norm.scale", [d + "attn.norm_k.weight"], "copy"),
                  *_linear(o + "linear2", [d + "proj_out"])]
    return rules


def _count(keys, pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def rules_for(family: str, keys, layout: str) -> list[tuple]:
    """The table of ``family`` for a state dict whose ``keys`` are in ``layout`` ("original" / "diffusers")."""
    if family == "sd3":
        return sd3_rules(_count(keys, r"joint_blocks\.(\d+)\." if layout == "original" else r"transformer_blocks\.(\d+)\."))
    if layout == "original":
        return flux_rules(_count(keys, r"double_blocks\.(\d+)\."), _count(keys, r"single_blocks\.(\d+)\."))
    return flux_rules(_count(keys, r"transformer_blocks\.(\d+)\."), _count(keys, r"single_transformer_blocks\.(\d+)\."))


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers(state: dict, family: str) -> dict:
    """An original-layout transformer state dict (prefix stripped) in diffusers' names."""
    out, left = {}, dict(state)
    width = None  # Flux's single blocks: q, k, v are the model width each, the MLP input the rest
    if family == "flux" and "img_in.weight" in state:
        width = state["img_in.weight"].shape[0]
    for src, dst, op in rules_for(family, state, "original"):
        if src not in left:
            continue  # optional parts: qk norms, SD3.5's second attention, Flux-dev's guidance embedding
        t = left.pop(src)
        if op == "copy":
            out[dst[0]] = t
        elif op == "swap":
            out[dst[0]] = _swap(t)
        elif op == "chunk":
            out.update(zip(dst, t.chunk(3, dim=0)))
        else:  # split: q, k, v, mlp
            out.update(zip(dst, t.split([width, width, width, t.shape[0] - 3 * width], dim=0)))
    if left:
        raise ControlstackError(f"{len(left)} tensors of this {family.upper()} single file have no place in the "
                                f"transformer ({', '.join(sorted(left)[:3])}, ...); is it a {family} checkpoint?")
    return out


def to_original(state: dict, family: str) -> dict:
    """A diffusers transformer state dict in the original layout (no prefix)."""
    out, left = {}, dict(state)
    for src, dst, op in rules_for(family, state, "diffusers"):
        if not all(d in left for d in dst):
            continue
        parts = [left.pop(d) for d in dst]
        out[src] = _swap(parts[0]) if op == "swap" else torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if left:
        raise ControlstackError(f"{len(left)} tensors of this transformer have no place in the {family.upper()} "
                                f"single-file layout ({', '.join(sorted(left)[:3])}, ...)")
    return {k: v.detach().contiguous() for k, v in out.items()}


# -- configs from shapes ------------------------------------------------------------------------------
def infer_config(state: dict, family: str, base: dict) -> dict:
    """The transformer config of an original-layout state dict: ``base`` (the folder's config) with
    what the shapes say -- blocks, widths, channels, patch, the optional parts."""
    s = {k: tuple(getattr(v, "shape", v)) for k, v in state.items()}  # tensors, or a header's shapes
    needed = ("x_embedder.proj.weight", "final_layer.linear.weight", "context_embedder.weight", "y_embedder.mlp.0.weight",
              "pos_embed") if family == "sd3" else ("img_in.weight", "final_layer.linear.weight", "txt_in.weight",
                                                    "vector_in.in_layer.weight")
    missing = [k for k in needed if k not in s]
    if missing:
        raise ControlstackError(f"this {family.upper()} single file lacks {', '.join(missing)}: it is not a whole "
                                "transformer (a ControlNet or a LoRA?)")
    head = int(base.get("attention_head_dim") or (64 if family == "sd3" else 128))
    if family == "sd3":
        hidden, channels, patch, _ = s["x_embedder.proj.weight"]
        layers = _count(s, r"joint_blocks\.(\d+)\.")
        return {**base, "num_layers": layers, "patch_size": patch, "in_channels": channels,
                "out_channels": s["final_layer.linear.weight"][0] // (patch * patch),
                "num_attention_heads": hidden // head, "attention_head_dim": head,
                "joint_attention_dim": s["context_embedder.weight"][1],
                "caption_projection_dim": s["context_embedder.weight"][0],
                "pooled_projection_dim": s["y_embedder.mlp.0.weight"][1],
                "pos_embed_max_size": round(s["pos_embed"][1] ** 0.5),
                "dual_attention_layers": sorted({int(k.split(".")[1]) for k in s if ".attn2." in k}),
                "qk_norm": "rms_norm" if any(".ln_q." in k for k in s) else None}
    hidden, channels = s["img_in.weight"]
    return {**base, "num_layers": _count(s, r"double_blocks\.(\d+)\."),
            "num_single_layers": _count(s, r"single_blocks\.(\d+)\."), "in_channels": channels,
            "out_channels": s["final_layer.linear.weight"][0], "num_attention_heads": hidden // head,
            "attention_head_dim": head, "joint_attention_dim": s["txt_in.weight"][1],
            "pooled_projection_dim": s["vector_in.in_layer.weight"][1],
            "guidance_embeds": "guidance_in.in_layer.weight" in s}


def transformer_state(state: dict) -> dict:
    """The transformer's tensors of a single file, prefix stripped (BFL's files have none)."""
    inner = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if inner:
        return inner
    return {k: v for k, v in state.items() if not k.startswith((orig.VAE_PREFIX, "text_encoders.", "vae."))}


def metadata_config(metadata: dict, part: str) -> dict | None:
    raw = (metadata or {}).get(METADATA_KEYS[part])
    return json.loads(raw) if raw else None
