"""ControlNet checkpoints: diffusers folders and original single files, transfer, compatibility.

Formats (safetensors first, pickle only on explicit opt-in, then ``torch.load(weights_only=True)``):

* **diffusers** -- a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (``ControlNetModel.save_pretrained``).
* **original** -- one file with lllyasviel's key names (``control_model.input_blocks.*``,
  ``zero_convs.*``, ``input_hint_block.*``, ``middle_block_out.*``; ``cldm/cldm.py`` of
  github.com/lllyasviel/ControlNet). Files without the ``control_model.`` prefix and single files
  with diffusers key names are read too. The architecture comes from, in order: ``config`` (a
  folder or config.json), the config we embed in the safetensors metadata when *we* write a file,
  or inference from tensor shapes (:mod:`controlstack.io.original`; SD-1.x defaults for what
  shapes cannot tell). Files we write are read back exactly by diffusers'
  ``ControlNetModel.from_single_file(path, config=folder, local_files_only=True)`` (``config`` a
  local folder with config.json: with it diffusers needs no network, also with HF_HUB_OFFLINE=1).

Transfer (ControlNet paper, Zhang et al. 2023, "transfer to community models"; the
``tool_transfer_control.py`` of the reference repo): ``cn' = cn + (base' - base)`` on the encoder
weights the ControlNet copies from the U-Net.

Base models (SD single files and folders) live in :mod:`controlstack.io.sd_single_file`;
``inspect_checkpoint`` in :mod:`controlstack.io.inspect`; both are re-exported here, as the one
entry point callers (and tests) patch. The file helpers every checkpoint module shares (reading
tensors, the pickle policy, atomic writes) are :mod:`controlstack.io.tensors`, below all of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch

from controlstack.errors import ControlstackError
from controlstack.io import original as orig
from controlstack.io.inspect import inspect_checkpoint as _inspect
from controlstack.io.original import infer_union_config
from controlstack.io.sd_single_file import load_base as _load_base
from controlstack.io.sd_single_file import save_base as _save_base
from controlstack.io.tensors import (
    CONFIG_METADATA_KEY,
    assign_exact,
    atomic_output,
    build_empty,
    cast_model,
    config_file,
    existing_path,
    folder_uses_safetensors,
    read_tensors,
    stored_dtype,
)
from controlstack.models.adapter import is_adapter
from controlstack.models.families import family_of
from controlstack.models.task_tokens import TOKENS_FILE, load_task_tokens

# parameter-name prefixes the ControlNet copies from the U-Net (trainable copy of the encoder)
SHARED_PREFIXES = ("conv_in.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.", "mid_block.")


# ----------------------------------------------------------------------------------- ControlNet
def _original_names(state: dict) -> dict:
    """Prefix-free LDM-named tensors of a ControlNet state dict in any supported key style."""
    p = orig.CONTROLNET_PREFIX
    if any(k.startswith(p) for k in state):
        return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}  # ignore bundled base weights
    if "input_hint_block.0.weight" in state:
        return state
    if "controlnet_cond_embedding.conv_in.weight" in state:  # a diffusers-named single file
        table = orig.unet_table(state, orig.layers_per_block_from_diffusers_keys(state))
        return {table[k]: v for k, v in state.items()}
    if any(k.startswith(orig.UNET_PREFIX) for k in state):
        raise ControlstackError("this is a Stable Diffusion base checkpoint, not a ControlNet; pass it as the "
                                "base model (--model) and a ControlNet file as the control")
    raise ControlstackError("tensors do not look like a ControlNet (no input_hint_block / zero_convs / "
                            "controlnet_cond_embedding keys); pass a ControlNet checkpoint")


def resolve_controlnet_config(shapes: dict, metadata: dict | None = None, config=None) -> dict:
    """Explicit ``config`` > config we embedded in the file > inference from tensor shapes."""
    if config is not None:
        return config_file(config, "controlnet")
    if metadata and CONFIG_METADATA_KEY in metadata:
        return json.loads(metadata[CONFIG_METADATA_KEY])
    return orig.infer_controlnet_config(shapes)


def union_from_state_dict(state: dict, config=None, metadata: dict | None = None):
    """A ``ControlNetUnionModel`` from a diffusers-named single file (how xinsir's are shared): the
    config from ``config`` / our metadata, else the shapes (:func:`infer_union_config`)."""
    from diffusers import ControlNetUnionModel  # local: heavy, only this path needs it

    if config is not None or (metadata and CONFIG_METADATA_KEY in metadata):
        cfg = resolve_controlnet_config({}, metadata, config)
    else:
        cfg = infer_union_config({k: tuple(v.shape) for k, v in state.items()})
    cfg.pop("_class_name", None)
    model = build_empty(ControlNetUnionModel, cfg, "ControlNet-Union")
    return assign_exact(model, state, "ControlNet-Union")


def controlnet_from_state_dict(state: dict, *, config=None, metadata: dict | None = None,
                               torch_dtype=torch.float32):
    from diffusers import ControlNetModel  # local: heavy, only this path needs it

    if "task_embedding" in state:
        return cast_model(union_from_state_dict(state, config, metadata), torch_dtype)
    ldm = _original_names(state)
    cfg = resolve_controlnet_config({k: tuple(v.shape) for k, v in ldm.items()}, metadata, config)
    model = build_empty(ControlNetModel, cfg, "ControlNet")
    back = {v: k for k, v in orig.unet_table(model.state_dict(), model.config.layers_per_block).items()}
    return cast_model(assign_exact(model, {back.get(k, k): v for k, v in ldm.items()}, "ControlNet"), torch_dtype)


#: the control models a folder may hold (its config's ``_class_name``): ControlNets, xinsir's ControlNet-Union
#: (models/union.py), T2I-Adapters (models/adapter.py, added inside the encoder), SD3 / Flux ControlNets (mmdit.py)
CONTROL_CLASSES = ("ControlNetModel", "ControlNetUnionModel", "T2IAdapter", "SD3ControlNetModel", "FluxControlNetModel")


def load_controlnet(source: str | os.PathLike, *, allow_pickle: bool = False,
                    config: str | os.PathLike | None = None, torch_dtype=torch.float32):
    """A ``diffusers.ControlNetModel`` from a diffusers folder or an original/diffusers single file.

    ``config`` (a folder or config.json) applies to single files; a folder brings its own config.
    ``torch_dtype=None`` keeps the checkpoint's dtype."""
    path = existing_path(source, "ControlNet")
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
            path = path / "controlnet"  # a pipeline folder holding one ControlNet
        if not (path / "config.json").is_file():
            raise ControlstackError(f"folder '{source}' has no config.json; pass a diffusers ControlNet folder "
                                    "(config.json + diffusion_pytorch_model.safetensors) or a single file")
        cfg = config_file(path)
        if cfg.get("_class_name") == "LiteControlNetModel":  # the architecture ablation (models/lite.py)
            from controlstack.models.lite import LiteControlNetModel  # local: heavy, only this path needs it

            return LiteControlNetModel.from_pretrained(path, torch_dtype=torch_dtype or torch.float32).eval()
        cls_name = cfg.get("_class_name", "ControlNetModel")
        if cls_name not in CONTROL_CLASSES:
            raise ControlstackError(f"'{source}' holds a {cfg['_class_name']}, not a control model; pass a folder of "
                                    f"one of {', '.join(CONTROL_CLASSES)}")
        import diffusers  # local: heavy, only this path needs it

        model_cls = getattr(diffusers, cls_name)
        use_safetensors = folder_uses_safetensors(path, allow_pickle)
        if torch_dtype is None:  # keep the stored dtype (from_pretrained would load float32)
            torch_dtype = stored_dtype(path)
        try:
            model = model_cls.from_pretrained(path, use_safetensors=use_safetensors, local_files_only=True,
                                              torch_dtype=torch_dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ControlstackError(f"cannot load the ControlNet in '{path}' ({str(exc).splitlines()[0]}); "
                                    "check that its config.json matches its weights") from None
        if (path / TOKENS_FILE).is_file():  # an Omni ControlNet carries its task tokens
            model.task_tokens = load_task_tokens(path)
        return model.eval()
    state, metadata = read_tensors(path, allow_pickle=allow_pickle)
    return controlnet_from_state_dict(state, config=config, metadata=metadata, torch_dtype=torch_dtype)


def controlnet_to_original(model, prefix: str = orig.CONTROLNET_PREFIX) -> dict:
    """The state dict of ``model`` under lllyasviel's key names."""
    state = model.state_dict()
    table = orig.unet_table(state, model.config.layers_per_block)
    return {prefix + table[k]: v.detach().contiguous() for k, v in state.items()}


def _config_json(model) -> str:
    return json.dumps({k: v for k, v in json.loads(model.to_json_string()).items() if k != "_name_or_path"})


def save_controlnet(model, dest: str | os.PathLike, *, format: str = "auto") -> Path:
    """Write ``model``: ``format="auto"`` -> a ``*.safetensors`` path gets the original single-file
    format, anything else a diffusers folder. The write is atomic."""
    dest = Path(dest)
    if format == "auto":
        format = "original" if dest.suffix.lower() == ".safetensors" else "diffusers"
    if format not in ("diffusers", "original"):
        raise ControlstackError(f"unknown checkpoint format '{format}'; use one of: diffusers, original")
    if format == "original" and dest.suffix.lower() != ".safetensors":
        raise ControlstackError(f"the original format is written as one .safetensors file; name '{dest}' *.safetensors")
    union = type(model).__name__ == "ControlNetUnionModel"  # it has no original (LDM) form: diffusers names
    with atomic_output(dest) as tmp:
        if format == "diffusers":
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()} if union \
                else controlnet_to_original(model)
            safetensors.torch.save_file(state, str(tmp),
                                        metadata={"format": "pt", CONFIG_METADATA_KEY: _config_json(model)})
    return dest


# ----------------------------------------------------------------------------------- compatibility
def check_compatible(controlnet, unet) -> None:
    """Raise unless ``controlnet``'s residuals fit ``unet`` (family, channels, layout, text width);
    a T2I-Adapter's feature maps must have the U-Net's block channels, one per block at most."""
    if is_adapter(controlnet):
        channels, blocks = list(controlnet.config.channels), list(unet.config.block_out_channels)
        if channels != blocks[:len(channels)]:
            raise ControlstackError(f"T2I-Adapter feature channels {channels} do not fit the base's blocks {blocks}; "
                                    "use an adapter trained for this base family")
        return
    if family_of(controlnet) is not family_of(unet):
        raise ControlstackError(f"this ControlNet is for {family_of(controlnet).label} but the base model is "
                                f"{family_of(unet).label}; use a ControlNet trained for the base's family")
    c, u = controlnet.config, unet.config
    problems = []
    # the latents' channels are the U-Net's *output* channels: an SD inpainting U-Net takes 9 (latents,
    # mask, masked-image latents) while the ControlNet beside it reads the 4 latent channels
    fields = [("in_channels", "latent channels", "out_channels"),
              ("block_out_channels", "block channels", "block_out_channels"),
              ("layers_per_block", "layers per block", "layers_per_block"),
              ("cross_attention_dim", "cross-attention dim", "cross_attention_dim"),
              ("addition_time_embed_dim", "size-id embedding", "addition_time_embed_dim"),
              ("projection_class_embeddings_input_dim", "added-embedding width",
               "projection_class_embeddings_input_dim")]
    if family_of(unet).network != "unet":  # a transformer's ControlNet: its token width and inputs
        fields = [(f, f.replace("_", " "), f) for f in ("in_channels", "patch_size", "num_attention_heads",
                                                        "attention_head_dim", "pooled_projection_dim")]
    for field, label, ufield in fields:
        cv, uv = c.get(field), u.get(ufield)
        cv, uv = (list(cv), list(uv)) if isinstance(cv, (list, tuple)) else (cv, uv)
        if cv != uv:
            problems.append(f"{label} {cv} vs base {uv}")
    if problems:
        raise ControlstackError("ControlNet does not match the base model (" + "; ".join(problems) + "); use a "
                                "ControlNet trained for this base family (e.g. an SD-1.x ControlNet with an SD-1.x base)")


def transfer_controlnet(controlnet, base_old_unet, base_new_unet):
    """``cn' = cn + (base' - base)`` on the parameters the ControlNet shares (by name) with the U-Net;
    the hint encoder and zero convolutions are unchanged. Returns a new model."""
    check_compatible(controlnet, base_old_unet)
    check_compatible(controlnet, base_new_unet)
    old, new = base_old_unet.state_dict(), base_new_unet.state_dict()
    out = copy.deepcopy(controlnet)
    state = out.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if not name.startswith(SHARED_PREFIXES):
                continue
            if name not in old or name not in new or old[name].shape != tensor.shape or new[name].shape != tensor.shape:
                raise ControlstackError(f"base models do not share ControlNet parameter '{name}' with the same shape; "
                                        "both bases must have the ControlNet's architecture")
            delta = new[name].to(torch.float32) - old[name].to(torch.float32)
            tensor.copy_((tensor.to(torch.float32) + delta).to(tensor.dtype))
    return out


# ----------------------------------------------------------------------------------- re-exports
def load_base(source, *, allow_pickle: bool = False, config=None, torch_dtype=torch.float32):
    return _load_base(source, allow_pickle=allow_pickle, config=config, torch_dtype=torch_dtype)


def save_base(components, dest, *, format: str = "auto"):
    return _save_base(components, dest, format=format)


def inspect_checkpoint(source, *, allow_pickle: bool = False) -> dict:
    return _inspect(source, allow_pickle=allow_pickle)


def model_hash(path: Path) -> str | None:
    """sd-webui's model hash (the first 10 hex digits of the checkpoint's sha256): of the single
    file, or of a diffusers folder's U-Net weights."""
    file = path if path.is_file() else next((p for p in sorted((path / "unet").glob("diffusion_pytorch_model*"))
                                             if p.suffix in (".safetensors", ".bin")), None)
    if file is None:
        return None
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]
