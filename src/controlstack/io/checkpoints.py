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
``inspect_checkpoint`` in :mod:`controlstack.io.inspect`; both are re-exported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import uuid
from pathlib import Path

import torch

from controlstack.errors import ControlstackError
from controlstack.io import original as orig

PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
CONFIG_METADATA_KEY = "controlstack.config"
# parameter-name prefixes the ControlNet copies from the U-Net (trainable copy of the encoder)
SHARED_PREFIXES = ("conv_in.", "time_embedding.", "class_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
PICKLE_HINT = "pass --allow-pickle / allow_pickle=True if you trust the file"


# ----------------------------------------------------------------------------------- files
def existing_path(source: str | os.PathLike, what: str = "checkpoint") -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise ControlstackError(f"{what} '{source}' does not exist; check the path")
    return path


def _check_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise ControlstackError(f"'{path}' is a pickle file, which can run code when loaded; {PICKLE_HINT}, "
                                "or convert it to .safetensors")


def read_tensors(source: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of one weights file; pickle only with ``allow_pickle``."""
    path = existing_path(source)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise ControlstackError(f"cannot read '{path}' as safetensors ({exc}); the file is corrupt or "
                                    "truncated, download it again") from None
    if suffix in PICKLE_SUFFIXES:
        _check_pickle(path, allow_pickle)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError) as exc:
            raise ControlstackError(f"cannot read '{path}' with torch.load(weights_only=True) "
                                    f"({type(exc).__name__}); it is corrupt or holds more than tensors") from None
        while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # Lightning-style checkpoints nest the weights
        if not isinstance(state, dict):
            raise ControlstackError(f"'{path}' holds a {type(state).__name__}, not a dict of tensors")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
    raise ControlstackError(f"unknown checkpoint format '{suffix or path.name}' for '{path}'; use .safetensors "
                            f"(or {'/'.join(PICKLE_SUFFIXES)} with --allow-pickle) or a diffusers folder")


@contextlib.contextmanager
def atomic_output(dest: str | os.PathLike):
    """Yield a temporary sibling path; on success it replaces ``dest``, on failure it is removed, so a
    failed write never leaves a partial file or folder behind."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        # safetensors (and diffusers' save_pretrained through it) creates 0600 files; give the usual ones
        for f in ([tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]):
            os.chmod(f, 0o666 & ~umask)
        if dest.exists() or dest.is_symlink():  # --overwrite: swap, then drop the old one
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            dest.rename(old)
            tmp.rename(dest)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            tmp.rename(dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _config_file(config: str | os.PathLike, subfolder: str | None = None) -> dict:
    """A diffusers config dict from a config.json or a folder holding one (or ``subfolder/config.json``)."""
    path = existing_path(config, "config")
    if path.is_dir():
        candidates = [path / "config.json"] + ([path / subfolder / "config.json"] if subfolder else [])
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ControlstackError(f"config folder '{path}' has no config.json; pass the folder of a diffusers "
                                    "model (the one holding config.json)")
        path = found[0]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ControlstackError(f"cannot read config '{path}' ({exc}); pass a valid config.json") from None


def build_empty(cls, config: dict, what: str):
    """``cls.from_config(config)`` with empty (meta) parameters: a full-size model is built without a
    random initialisation and the checkpoint's tensors are then assigned (as diffusers' single-file
    loader does). Buffers stay real (``include_buffers=False``)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return cls.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ControlstackError(f"invalid {what} config ({type(exc).__name__}: {exc}); pass --config "
                                "with the model's config.json") from None


def cast_model(model, dtype):
    """``model`` in ``dtype`` (None keeps the checkpoint's), cast only when needed."""
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # its "modules to keep in float32: []" note is noise for these models
        try:
            model = model.to(dtype)
        finally:
            dlogging.set_verbosity(level)
    return model.eval()


def assign_exact(model, state: dict, what: str):
    """Load exactly the tensors of ``state`` into ``model`` (same names, same shapes) or say which differ."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{len(names)} {label} (e.g. {names[0]})" for label, names in
                           [("missing", missing), ("unexpected", unexpected), ("with other shapes", wrong)] if names)
        raise ControlstackError(f"the {what} tensors do not match its architecture: {detail}; "
                                "pass --config with the model's own config.json")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


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
        return _config_file(config, "controlnet")
    if metadata and CONFIG_METADATA_KEY in metadata:
        return json.loads(metadata[CONFIG_METADATA_KEY])
    return orig.infer_controlnet_config(shapes)


#: parameters only a ControlNet-Union has (its condition fusion and control-type embedding)
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
    table = orig.unet_table(plain, orig.layers_per_block_from_diffusers_keys(plain))
    cfg = orig.infer_controlnet_config({table[k]: tuple(v) for k, v in plain.items()})
    n_types, width = (int(n) for n in shapes["task_embedding"])
    cfg.pop("mid_block_type", None)  # the union model's mid block is fixed
    cfg.update(addition_time_embed_dim=int(shapes["control_add_embedding.linear_1.weight"][1]) // n_types,
               num_control_type=n_types, num_trans_channel=width,
               num_proj_channel=int(shapes["spatial_ch_projs.weight"][0]),
               num_trans_layer=len({k.split(".")[1] for k in shapes if k.startswith("transformer_layes.")}))
    return cfg


def union_from_state_dict(state: dict, config=None, metadata: dict | None = None):
    """A ``ControlNetUnionModel`` from a diffusers-named single file (how xinsir's are shared): the
    config from ``config`` / our metadata, else the shapes (:func:`infer_union_config`)."""
    from diffusers import ControlNetUnionModel

    if config is not None or (metadata and CONFIG_METADATA_KEY in metadata):
        cfg = resolve_controlnet_config({}, metadata, config)
    else:
        cfg = infer_union_config({k: tuple(v.shape) for k, v in state.items()})
    cfg.pop("_class_name", None)
    model = build_empty(ControlNetUnionModel, cfg, "ControlNet-Union")
    return assign_exact(model, state, "ControlNet-Union")


def controlnet_from_state_dict(state: dict, *, config=None, metadata: dict | None = None,
                               torch_dtype=torch.float32):
    from diffusers import ControlNetModel

    if "task_embedding" in state:
        return cast_model(union_from_state_dict(state, config, metadata), torch_dtype)
    ldm = _original_names(state)
    cfg = resolve_controlnet_config({k: tuple(v.shape) for k, v in ldm.items()}, metadata, config)
    model = build_empty(ControlNetModel, cfg, "ControlNet")
    back = {v: k for k, v in orig.unet_table(model.state_dict(), model.config.layers_per_block).items()}
    return cast_model(assign_exact(model, {back.get(k, k): v for k, v in ldm.items()}, "ControlNet"), torch_dtype)


def stored_dtype(folder: Path):
    """The floating dtype of a diffusers folder's safetensors weights (None when it cannot tell)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            dtype = f.get_slice(key).get_dtype()
            if dtype in ("F16", "BF16", "F32"):
                return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    return None


def _folder_weights(folder: Path, allow_pickle: bool) -> bool:
    """``use_safetensors`` for a diffusers model folder, enforcing the pickle policy."""
    if any(folder.glob("*.safetensors")):
        return True
    if any(folder.glob("*.bin")):
        _check_pickle(folder / "diffusion_pytorch_model.bin", allow_pickle)
        return False
    raise ControlstackError(f"model folder '{folder}' has no weights (*.safetensors); save the model there again")


def load_controlnet(source: str | os.PathLike, *, allow_pickle: bool = False,
                    config: str | os.PathLike | None = None, torch_dtype=torch.float32):
    """A ``diffusers.ControlNetModel`` from a diffusers folder or an original/diffusers single file.

    ``config`` (a folder or config.json) applies to single files; a folder brings its own config.
    ``torch_dtype=None`` keeps the checkpoint's dtype."""
    from diffusers import ControlNetModel

    path = existing_path(source, "ControlNet")
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
            path = path / "controlnet"  # a pipeline folder holding one ControlNet
        if not (path / "config.json").is_file():
            raise ControlstackError(f"folder '{source}' has no config.json; pass a diffusers ControlNet folder "
                                    "(config.json + diffusion_pytorch_model.safetensors) or a single file")
        cfg = _config_file(path)
        if cfg.get("_class_name") == "LiteControlNetModel":  # the architecture ablation (models/lite.py)
            from controlstack.models.lite import LiteControlNetModel

            return LiteControlNetModel.from_pretrained(path, torch_dtype=torch_dtype or torch.float32).eval()
        cls_name = cfg.get("_class_name", "ControlNetModel")
        if cls_name not in ("ControlNetModel", "ControlNetUnionModel"):
            raise ControlstackError(f"'{source}' holds a {cfg['_class_name']}, not a ControlNetModel; "
                                    "pass a ControlNet folder")
        if cls_name == "ControlNetUnionModel":  # xinsir's ControlNet-Union / ProMax (models/union.py)
            from diffusers import ControlNetUnionModel as ControlNetModel
        use_safetensors = _folder_weights(path, allow_pickle)
        if torch_dtype is None:  # keep the stored dtype (from_pretrained would load float32)
            torch_dtype = stored_dtype(path)
        try:
            model = ControlNetModel.from_pretrained(path, use_safetensors=use_safetensors, local_files_only=True,
                                                    torch_dtype=torch_dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ControlstackError(f"cannot load the ControlNet in '{path}' ({str(exc).splitlines()[0]}); "
                                    "check that its config.json matches its weights") from None
        from controlstack.models.task_tokens import TOKENS_FILE, load_task_tokens

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
    from safetensors.torch import save_file

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
            save_file(state, str(tmp), metadata={"format": "pt", CONFIG_METADATA_KEY: _config_json(model)})
    return dest


# ----------------------------------------------------------------------------------- compatibility
def check_compatible(controlnet, unet) -> None:
    """Raise unless ``controlnet``'s residuals fit ``unet`` (family, channels, layout, text width)."""
    from controlstack.models.family import describe, family_of

    if family_of(controlnet) != family_of(unet):
        raise ControlstackError(f"this ControlNet is for {describe(family_of(controlnet))} but the base model is "
                                f"{describe(family_of(unet))}; use a ControlNet trained for the base's family")
    c, u = controlnet.config, unet.config
    problems = []
    # the latents' channels are the U-Net's *output* channels: an SD inpainting U-Net takes 9 (latents,
    # mask, masked-image latents) while the ControlNet beside it reads the 4 latent channels
    for field, label, ufield in [("in_channels", "latent channels", "out_channels"),
                                 ("block_out_channels", "block channels", "block_out_channels"),
                                 ("layers_per_block", "layers per block", "layers_per_block"),
                                 ("cross_attention_dim", "cross-attention dim", "cross_attention_dim"),
                                 ("addition_time_embed_dim", "size-id embedding", "addition_time_embed_dim"),
                                 ("projection_class_embeddings_input_dim", "added-embedding width",
                                  "projection_class_embeddings_input_dim")]:
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
    import copy

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
    from controlstack.io.sd_single_file import load_base as _load_base

    return _load_base(source, allow_pickle=allow_pickle, config=config, torch_dtype=torch_dtype)


def save_base(components, dest, *, format: str = "auto"):
    from controlstack.io.sd_single_file import save_base as _save_base

    return _save_base(components, dest, format=format)


def inspect_checkpoint(source, *, allow_pickle: bool = False) -> dict:
    from controlstack.io.inspect import inspect_checkpoint as _inspect

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
