"""Weight files on disk, whatever model they hold: reading tensors, atomic writes, building a model
from its config and assigning a checkpoint's tensors exactly.

Safetensors first; pickle files (``.ckpt``, ``.pth``, ``.pt``, ``.bin``) only on explicit opt-in
(``allow_pickle``), then through ``torch.load(weights_only=True)``. Every checkpoint module of
``controlstack.io`` (ControlNets, SD / SDXL bases, ``inspect``) reads and writes through these, so
the pickle policy and the atomic-write rule live in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from controlstack.errors import ControlstackError

PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
#: the safetensors metadata key under which a ControlNet file written here carries its config
CONFIG_METADATA_KEY = "controlstack.config"
PICKLE_HINT = "pass --allow-pickle / allow_pickle=True if you trust the file"


def existing_path(source: str | os.PathLike, what: str = "checkpoint") -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise ControlstackError(f"{what} '{source}' does not exist; check the path")
    return path


def check_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise ControlstackError(f"'{path}' is a pickle file, which can run code when loaded; {PICKLE_HINT}, "
                                "or convert it to .safetensors")


def read_tensors(source: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of one weights file; pickle only with ``allow_pickle``."""
    path = existing_path(source)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise ControlstackError(f"cannot read '{path}' as safetensors ({exc}); the file is corrupt or "
                                    "truncated, download it again") from None
    if suffix in PICKLE_SUFFIXES:
        check_pickle(path, allow_pickle)
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


def config_file(config: str | os.PathLike, subfolder: str | None = None) -> dict:
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
    from accelerate import init_empty_weights  # local: heavy, only this path needs it

    try:
        with init_empty_weights():
            return cls.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ControlstackError(f"invalid {what} config ({type(exc).__name__}: {exc}); pass --config "
                                "with the model's config.json") from None


def cast_model(model, dtype):
    """``model`` in ``dtype`` (None keeps the checkpoint's), cast only when needed."""
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        from diffusers.utils import logging as dlogging  # local: heavy, only this path needs it

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


def stored_dtype(folder: Path):
    """The floating dtype of a diffusers folder's safetensors weights (None when it cannot tell)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            dtype = f.get_slice(key).get_dtype()
            if dtype in ("F16", "BF16", "F32"):
                return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    return None


def folder_uses_safetensors(folder: Path, allow_pickle: bool) -> bool:
    """``use_safetensors`` for a diffusers model folder, enforcing the pickle policy."""
    if any(folder.glob("*.safetensors")):
        return True
    if any(folder.glob("*.bin")):
        check_pickle(folder / "diffusion_pytorch_model.bin", allow_pickle)
        return False
    raise ControlstackError(f"model folder '{folder}' has no weights (*.safetensors); save the model there again")
