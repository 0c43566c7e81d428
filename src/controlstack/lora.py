"""LoRA (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models") on the base:
``W' = W + weight * (alpha / r) * B A`` on the U-Net's and text encoders' attention (and, in
LoCon files, convolution) layers, as a mixin of :class:`controlstack.pipeline.Pipeline`.

The field's code does the work: diffusers' LoRA loaders read the formats users have -- kohya /
sd-webui ``.safetensors`` (``lora_unet_...``, ``lora_te_...``, ``lora_te1_`` / ``lora_te2_`` for
SDXL, with ``alpha``), diffusers / PEFT files, LyCORIS LoCon where diffusers' converter reads it
-- and put PEFT layers into the models; several LoRAs are PEFT adapters with their own weights,
fused into the weights for speed or kept apart to switch. What is written here: reading the file
under the project's pickle policy (never a download), telling its format, rank, targets and
family before anything loads (a LoRA for the other family, a truncated file, an unknown layout
or a shape mismatch is one line naming the file), the weights per LoRA, sd-webui's prompt syntax
``<lora:NAME:WEIGHT>`` resolved from a folder, and sd-webui's ``Lora hashes`` for the infotext.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from controlstack.errors import ControlstackError
from controlstack.io.lora_format import describe

PROMPT_LORA = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?>")
SUFFIXES = (".safetensors",)


@dataclass
class Lora:
    """One loaded LoRA: its adapter name, file, weight, sd-webui short hash and what it adapts."""

    name: str
    path: Path
    weight: float
    hash: str
    targets: tuple[str, ...]


def short_hash(path: Path) -> str:
    """sd-webui's LoRA hash (its "AutoV2"): the first 12 hex digits of the file's sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def read(path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """The file's tensors and :func:`describe` of them; every failure one line naming the file."""
    from controlstack.io.tensors import read_tensors  # local: heavy, only this path needs it

    path = Path(path)
    if not path.is_file():
        raise ControlstackError(f"LoRA '{path}' does not exist; check the path")
    try:
        state, _ = read_tensors(path, allow_pickle=allow_pickle)
    except ControlstackError as exc:  # it names the file already
        raise ControlstackError(f"LoRA: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (a truncated or foreign file: safetensors' own errors vary)
        raise ControlstackError(f"LoRA '{path}' cannot be read ({type(exc).__name__}: {str(exc)[:120]}); "
                                "is the file complete?") from None
    info = describe(state)
    if info["format"] in ("unknown", "lycoris-loha/lokr") or not info["targets"]:
        raise ControlstackError(f"LoRA '{path}': {info['format']} key layout "
                                f"({', '.join(list(state)[:2])}, ...); kohya / sd-webui, diffusers, PEFT and "
                                "LyCORIS LoCon files are read")
    return state, info


def split_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """sd-webui's prompt syntax: ``"a cat <lora:ink:0.7>"`` -> ``("a cat", [("ink", 0.7)])``."""
    found = []
    for name, weight in PROMPT_LORA.findall(prompt):
        try:
            found.append((name.strip(), 1.0 if not weight else float(weight)))
        except ValueError:
            raise ControlstackError(f"<lora:{name}:{weight}>: the weight must be a number") from None
    return re.sub(r"\s{2,}", " ", PROMPT_LORA.sub("", prompt)).strip(" ,"), found


def available(folder) -> dict[str, Path]:
    """The LoRA files of a folder (and its subfolders) by stem, as sd-webui lists them."""
    if folder is None:
        return {}
    out: dict[str, Path] = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.suffix in SUFFIXES and p.is_file():
            out.setdefault(p.stem, p)
    return out


class Loras:
    """LoRA on a :class:`~controlstack.pipeline.Pipeline` (its ``unet``, text encoders, ``family``
    and ``tier``). ``lora_dir``: the folder ``<lora:NAME:W>`` in a prompt resolves from."""

    def lora_state(self) -> dict:
        if "_loras" not in self.__dict__:
            self._loras: dict[str, Lora] = {}
            self._fused = False
        return self._loras

    @property
    def loras(self) -> dict[str, Lora]:
        """The loaded LoRAs by adapter name, in load order."""
        return dict(self.lora_state())

    def load_lora(self, path: str | os.PathLike, weight: float = 1.0, name: str | None = None, *,
                  allow_pickle: bool = False) -> str:
        """Load a LoRA file onto the base's U-Net and text encoder(s) at ``weight``; its adapter name
        (``name``, else the file's stem). Several stay loaded, each with its weight."""
        loras = self.lora_state()
        state, info = read(path, allow_pickle)
        name = re.sub(r"[^\w\-]", "_", name or Path(path).stem)
        if name in loras:
            raise ControlstackError(f"a LoRA named '{name}' is loaded already; unload_lora('{name}') or give a name")
        width = self.unet.config.get("cross_attention_dim")  # a U-Net's text width (a transformer: none)
        if info["text_width"] is not None and info["text_width"] != width:
            raise ControlstackError(f"LoRA '{path}' is for a base with {info['text_width']}-wide text "
                                    f"(SD-1.x: 768, SD-2.x: 1024, SDXL: 2048), this base's is {width} "
                                    f"({self.family.label}); use a LoRA trained for the base's family")
        if "text_encoder_2" in info["targets"] and getattr(self, "text_encoder_2", None) is None:
            raise ControlstackError(f"LoRA '{path}' adapts a second text encoder (SDXL); this base has one")
        was_fused = self._fused
        if was_fused:
            self.unfuse_loras()
        try:
            self.family.load_lora(self, state, name)  # diffusers' loader for the family, PEFT's layers
        except (ValueError, RuntimeError, KeyError) as exc:  # a shape mismatch, keys diffusers cannot place
            self._drop(name)
            raise ControlstackError(f"LoRA '{path}' does not fit this base: {str(exc).splitlines()[0][:200]}") from None
        loras[name] = Lora(name, Path(path), float(weight), short_hash(Path(path)), info["targets"])
        self._apply_weights()
        if was_fused or self.tier.compiled:  # compiled graphs are built from fused weights
            self.fuse_loras()
        return name

    def set_lora_weights(self, weights: dict[str, float]) -> None:
        """New weights for loaded LoRAs (by name); unfused first when they are fused."""
        loras = self.lora_state()
        unknown = sorted(set(weights) - set(loras))
        if unknown:
            raise ControlstackError(f"no LoRA named {', '.join(unknown)}; loaded: {', '.join(loras) or 'none'}")
        fused = self._fused
        if fused:
            self.unfuse_loras()
        for name, w in weights.items():
            loras[name].weight = float(w)
        self._apply_weights()
        if fused:
            self.fuse_loras()

    def fuse_loras(self) -> None:
        """Merge the loaded LoRAs at their weights into the base's weights (as fast as no LoRA)."""
        from diffusers.loaders.lora_base import (  # local: heavy, only this path needs it
            fuse_text_encoder_lora,
        )

        if not self.lora_state() or self._fused:
            return
        self.unet.fuse_lora(lora_scale=1.0)
        for _, encoder in self.family.text_encoders(self):
            if getattr(encoder, "peft_config", None):
                fuse_text_encoder_lora(encoder, lora_scale=1.0)
        self._fused = True
        self.tier = self.tier  # compiled graphs are keyed by the weights: new runners read the fused ones

    def unfuse_loras(self) -> None:
        from diffusers.loaders.lora_base import (  # local: heavy, only this path needs it
            unfuse_text_encoder_lora,
        )

        if not self.lora_state() or not self._fused:
            return
        self.unet.unfuse_lora()
        for _, encoder in self.family.text_encoders(self):
            if getattr(encoder, "peft_config", None):
                unfuse_text_encoder_lora(encoder)
        self._fused = False
        self.tier = self.tier

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (``name``) or all; the base's weights are as before."""
        loras = self.lora_state()
        names = list(loras) if name is None else [name]
        for n in names:
            if n not in loras:
                raise ControlstackError(f"no LoRA named '{n}'; loaded: {', '.join(loras) or 'none'}")
        fused = self._fused
        if fused:
            self.unfuse_loras()
        for n in names:
            self._drop(n)
            del loras[n]
        self._apply_weights()
        if fused and loras:
            self.fuse_loras()
        self.tier = self.tier

    def prompt_loras(self, prompt: str, lora_dir=None) -> tuple[str, list[tuple[str, float]]]:
        """``prompt`` without its ``<lora:NAME:W>`` tags, and those tags' (file stem, weight), each
        found in ``lora_dir`` (a one-line error names the ones that are not)."""
        text, wanted = split_prompt(prompt)
        if wanted:
            files = available(lora_dir)
            missing = [n for n, _ in wanted if n not in files]
            if missing:
                where = f"in '{lora_dir}'" if lora_dir is not None else "(no LoRA folder is set: --lora-dir)"
                raise ControlstackError(f"<lora:{missing[0]}> is not a LoRA file {where}; known: "
                                        f"{', '.join(files) or 'none'}")
        return text, wanted

    def _apply_weights(self) -> None:
        from diffusers.loaders.lora_base import (  # local: heavy, only this path needs it
            set_adapters_for_text_encoder,
        )

        loras = self.lora_state()
        if not loras:
            return
        names, weights = list(loras), [loras[n].weight for n in loras]
        self.unet.set_adapters(names, weights)
        for _, encoder in self.family.text_encoders(self):
            present = [n for n in names if n in (getattr(encoder, "peft_config", None) or {})]
            if present:
                set_adapters_for_text_encoder(present, encoder, [loras[n].weight for n in present])

    def _drop(self, name: str) -> None:
        from diffusers.loaders.lora_base import delete_adapter_layers  # local: heavy, only this path needs it

        if name in (getattr(self.unet, "peft_config", None) or {}):
            self.unet.delete_adapters(name)
        for _, encoder in self.family.text_encoders(self):
            if name in (getattr(encoder, "peft_config", None) or {}):
                delete_adapter_layers(encoder, name)
        self.family.drop_lora(self, name)
