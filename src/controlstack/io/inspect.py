"""What a checkpoint is, without building the model: format, kind, architecture, size, dtype.

Safetensors files are read header-only (``safe_open(...).get_slice``), so inspecting a 2 GB file
costs milliseconds. The architecture comes from the config (diffusers folders), the config we
embed when we write a single file, or shape inference (:mod:`controlstack.io.original`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open

from controlstack.errors import ControlstackError
from controlstack.io import original as orig
from controlstack.io.lora_format import describe as describe_lora
from controlstack.io.tensors import CONFIG_METADATA_KEY, SAFETENSORS_SUFFIXES, existing_path, read_tensors
from controlstack.models.families import family_of, family_of_state

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ARCH_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                "cross_attention_dim", "attention_head_dim", "use_linear_projection", "transformer_layers_per_block",
                "conditioning_channels", "conditioning_embedding_out_channels")


def read_header(path: Path, allow_pickle: bool) -> tuple[dict, dict, dict]:
    """(name -> shape, name -> dtype name, metadata) of a weights file."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
                shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
                dtypes = {k: _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype().lower()) for k, s in slices.items()}
                return shapes, dtypes, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise ControlstackError(f"cannot read '{path}' as safetensors ({exc}); the file is corrupt or "
                                    "truncated, download it again") from None
    state, metadata = read_tensors(path, allow_pickle=allow_pickle)
    return ({k: tuple(v.shape) for k, v in state.items()},
            {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}, metadata)


def _summary(shapes: dict, dtypes: dict) -> dict:
    n = 0
    for shape in shapes.values():
        size = 1
        for d in shape:
            size *= d
        n += size
    counts = Counter(dtypes.values())
    dtype = (next(iter(counts)) if len(counts) == 1 else
             "mixed (" + ", ".join(f"{d}: {c}" for d, c in counts.most_common()) + ")") if counts else "none"
    return {"params": n, "tensors": len(shapes), "dtype": dtype}


def _arch(config: dict, source: str) -> dict:
    arch = {k: (list(config[k]) if isinstance(config[k], tuple) else config[k]) for k in _ARCH_FIELDS if k in config}
    family = family_of(config)  # models/families/: SDXL by its added embedding, whatever its text width
    arch["family"], arch["family_name"] = family.display(config), family.name
    if config.get("in_channels") == 9:
        arch["variant"] = "inpainting (9 input channels)"
    arch["config_source"] = source
    return arch


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _folder_weights(folder: Path, allow_pickle: bool) -> tuple[dict, dict]:
    shapes, dtypes = {}, {}
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in files:
        s, d, _ = read_header(f, allow_pickle)
        shapes.update(s)
        dtypes.update(d)
    return shapes, dtypes


def _inspect_folder(path: Path, allow_pickle: bool) -> dict:
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        shapes, dtypes = {}, {}
        denoiser = "transformer" if (path / "transformer").is_dir() else "unet"  # SD3 / Flux: an MMDiT
        for part in (denoiser, "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if (path / part).is_dir():
                s, d = _folder_weights(path / part, allow_pickle)
                shapes.update({f"{part}.{k}": v for k, v in s.items()})
                dtypes.update({f"{part}.{k}": v for k, v in d.items()})
        cfg_file = path / denoiser / "config.json"
        unet_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        return {"format": "diffusers", "container": "folder", "kind": "base",
                "pipeline": index.get("_class_name"), "arch": _arch(unet_cfg, "config.json"), **_summary(shapes, dtypes)}
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        name = cfg.get("_class_name", "unknown")
        kind = {"ControlNetModel": "controlnet", "ControlNetUnionModel": "controlnet", "UNet2DConditionModel": "unet",
                "AutoencoderKL": "vae", "T2IAdapter": "t2i-adapter", "SD3ControlNetModel": "controlnet",
                "FluxControlNetModel": "controlnet", "SD3Transformer2DModel": "transformer",
                "FluxTransformer2DModel": "transformer"}.get(name, name)
        shapes, dtypes = _folder_weights(path, allow_pickle)
        return {"format": "diffusers", "container": "folder", "kind": kind, "arch": _arch(cfg, "config.json"),
                **_summary(shapes, dtypes)}
    raise ControlstackError(f"folder '{path}' has neither config.json nor model_index.json; pass a diffusers model "
                            "folder or a checkpoint file")


def _inspect_file(path: Path, allow_pickle: bool) -> dict:
    shapes, dtypes, metadata = read_header(path, allow_pickle)
    container = "safetensors" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "pickle"
    summary = _summary(shapes, dtypes)
    p = orig.CONTROLNET_PREFIX
    if any(k.startswith(p) for k in shapes) or "input_hint_block.0.weight" in shapes:
        ldm = {k.removeprefix(p): v for k, v in shapes.items() if k.startswith(p)} or shapes
        if CONFIG_METADATA_KEY in metadata:
            arch = _arch(json.loads(metadata[CONFIG_METADATA_KEY]), "embedded config")
        else:
            arch = _arch(orig.infer_controlnet_config(ldm), "inferred from tensors")
        return {"format": "original", "container": container, "kind": "controlnet", "arch": arch, **summary}
    if "task_embedding" in shapes:  # ControlNet-Union (diffusers names only; xinsir's files, or ours)
        if CONFIG_METADATA_KEY in metadata:
            arch = _arch(json.loads(metadata[CONFIG_METADATA_KEY]), "embedded config")
        else:
            arch = _arch(orig.infer_union_config(shapes), "inferred from tensors")
        arch["variant"] = f"ControlNet-Union ({shapes['task_embedding'][0]} control types)"
        return {"format": "diffusers (single file)", "container": container, "kind": "controlnet", "arch": arch,
                **summary}
    if "controlnet_cond_embedding.conv_in.weight" in shapes:
        table = orig.unet_table(shapes, orig.layers_per_block_from_diffusers_keys(shapes))
        arch = _arch(orig.infer_controlnet_config({table[k]: v for k, v in shapes.items()}), "inferred from tensors")
        return {"format": "diffusers (single file)", "container": container, "kind": "controlnet", "arch": arch,
                **summary}
    family = family_of_state(shapes)
    if family.network != "unet":  # an SD3 / Flux single file (io/transformer_single_file.py)
        from controlstack.io import transformer_single_file as tsf  # local: heavy, only this path needs it

        embedded = tsf.metadata_config(metadata, "unet")
        arch = _arch(embedded, "embedded config") if embedded else _arch(
            tsf.infer_config(tsf.transformer_state(shapes), family.name, {}), "inferred from tensors")
        arch["vae"] = any(k.startswith(orig.VAE_PREFIX) for k in shapes)
        arch["text_encoder"] = any(k.startswith("text_encoders.") for k in shapes)
        return {"format": "original", "container": container, "kind": "base", "arch": arch, **summary}
    if any(k.startswith(orig.UNET_PREFIX) for k in shapes):
        unet = {k.removeprefix(orig.UNET_PREFIX): v for k, v in shapes.items() if k.startswith(orig.UNET_PREFIX)}
        if "controlstack.unet_config" in metadata:
            arch = _arch(json.loads(metadata["controlstack.unet_config"]), "embedded config")
        else:
            arch = _arch(orig.infer_unet_config(unet), "inferred from tensors")
        arch["vae"] = any(k.startswith(orig.VAE_PREFIX) for k in shapes)
        arch["text_encoder"] = any(k.startswith(("cond_stage_model.", "conditioner.embedders.")) for k in shapes)
        arch["ema_weights"] = sum(k.startswith("model_ema.") for k in shapes) > 100
        return {"format": "original", "container": container, "kind": "base", "arch": arch, **summary}
    if shapes and any("lora" in k or k.endswith(".alpha") for k in shapes):
        lora = describe_lora(shapes)
        if lora["format"] != "unknown":
            width = lora.pop("text_width")
            family = ("unknown (no cross-attention layer adapted)" if width is None else
                      {768: "SD-1.x", 1024: "SD-2.x", 2048: "SDXL"}.get(width, f"custom (text width {width})"))
            arch = {"family": family,
                    "config_source": "its keys", "text_width": width, **lora}
            return {"format": lora["format"], "container": container, "kind": "lora", "arch": arch, **summary}
    raise ControlstackError(f"'{path}' is not a recognised checkpoint (neither a ControlNet, a Stable Diffusion "
                            "base nor a LoRA); pass an SD, ControlNet or LoRA checkpoint")


def inspect_checkpoint(source: str | os.PathLike, *, allow_pickle: bool = False) -> dict:
    """``{"path", "format", "container", "kind", "arch", "params", "tensors", "dtype", "size_bytes"}``."""
    path = existing_path(source)
    info = _inspect_folder(path, allow_pickle) if path.is_dir() else _inspect_file(path, allow_pickle)
    return {"path": str(path), **info, "size_bytes": _size(path)}
