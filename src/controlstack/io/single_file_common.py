"""What SD-1.x / 2.x and SDXL single files and folders share: configs, tokenizers, the U-Net.

Both base readers (:mod:`controlstack.io.sd_single_file`, :mod:`controlstack.io.sdxl_single_file`)
take their folder checks, tokenizers, scheduler config, U-Net conversion and LDM writer from here,
so neither imports the other's internals. The LDM layout of the U-Net and the VAE is the same in
both families (``model.diffusion_model.*``, ``first_stage_model.*``); only the text encoders differ.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from controlstack.errors import ControlstackError
from controlstack.io import original as orig
from controlstack.io.tensors import assign_exact, build_empty, cast_model
from controlstack.models.components import SDComponents

SD15_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "sd15"
CLIP_L_TOKENIZER = "openai/clip-vit-large-patch14"


def read_json(path: Path) -> dict:
    """A JSON file as a dict."""
    return json.loads(path.read_text())


def require_base_folder(path: Path) -> None:
    """Raise unless ``path`` is a diffusers Stable Diffusion folder (one with model_index.json)."""
    if (path / "model_index.json").is_file():
        return
    if (path / "config.json").is_file():
        raise ControlstackError(f"'{path}' is a single-model folder (config.json), not a Stable Diffusion "
                                "model; pass a diffusers SD folder with model_index.json or a single-file checkpoint")
    raise ControlstackError(f"folder '{path}' has no model_index.json; pass a diffusers Stable Diffusion folder "
                            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/) or a single-file checkpoint")


def tokenizer_from(folder: Path, sub: str = "tokenizer"):
    """The CLIP tokenizer in ``folder/sub`` (``tokenizer_2`` for SDXL's second one), offline."""
    from transformers import CLIPTokenizer  # local: heavy, only this path needs it

    if not (folder / sub).is_dir():
        raise ControlstackError(f"'{folder}' has no {sub}/ folder; pass a diffusers SD folder with its tokenizer(s) "
                                "(tokenizer/, and tokenizer_2/ for SDXL)")
    return CLIPTokenizer.from_pretrained(folder / sub, local_files_only=True)


def scheduler_config(folder: Path | None) -> dict:
    """The scheduler config of a base folder, else SD-1.5's."""
    path = (folder / "scheduler" / "scheduler_config.json") if folder else None
    return read_json(path if path and path.is_file() else SD15_CONFIGS / "scheduler" / "scheduler_config.json")


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, named without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def unet_from_state(state: dict, cfg: dict, dtype):
    """The U-Net of an LDM single file (SD-1.x / 2.x / SDXL: one layout), through diffusers' converter."""
    from diffusers import UNet2DConditionModel  # local: heavy, only this path needs it
    from diffusers.loaders.single_file_utils import (  # local: heavy, only this path needs it
        convert_ldm_unet_checkpoint,
    )

    model = build_empty(UNet2DConditionModel, cfg, "U-Net")
    return cast_model(assign_exact(model, convert_ldm_unet_checkpoint(state, dict(model.config)), "U-Net"), dtype)


def vae_from_state(state: dict, cfg: dict, dtype):
    """The VAE of a single file (LDM's layout under ``first_stage_model.``), through diffusers' converter."""
    from diffusers import AutoencoderKL  # local: heavy, only this path needs it
    from diffusers.loaders.single_file_utils import (  # local: heavy, only this path needs it
        convert_ldm_vae_checkpoint,
    )

    vae = build_empty(AutoencoderKL, cfg, "VAE")
    return cast_model(assign_exact(vae, convert_ldm_vae_checkpoint(state, dict(vae.config)), "VAE"), dtype)


def single_file_tokenizer(folder: Path | None, vocab_size: int):
    """A single file's tokenizer: ``folder``'s (``--config``), else a cached CLIP ViT-L/14 one when
    the vocabulary fits, else a one-line error asking for ``--config``."""
    if folder is not None:
        return tokenizer_from(folder)
    if vocab_size == 49408:  # CLIP ViT-L/14's vocabulary: SD-1.x's tokenizer, if the user has it cached
        from transformers import CLIPTokenizer  # local: heavy, only this path needs it

        with contextlib.suppress(OSError, ValueError):  # not in the local cache: the error below says what to do
            return CLIPTokenizer.from_pretrained(CLIP_L_TOKENIZER, local_files_only=True)
    raise ControlstackError("a single-file checkpoint carries no tokenizer; pass --config DIR (config=DIR), a "
                            "diffusers Stable Diffusion folder of the same model with a tokenizer/ folder")


def vae_to_original(vae) -> dict:
    """A diffusers ``AutoencoderKL``'s tensors in LDM's layout under ``first_stage_model.`` (its mid
    attention's linear weights as LDM's 1x1 convolutions)."""
    state, out = vae.state_dict(), {}
    for k, new in orig.vae_table(state, len(vae.config.block_out_channels)).items():
        t = state[k]
        out[orig.VAE_PREFIX + new] = t[:, :, None, None] if orig.is_vae_attention_matrix(new) else t
    return out


def base_to_original(components: SDComponents, clip_prefix: str | None = orig.CLIP_PREFIX) -> dict:
    """The LDM single-file state dict of ``components`` (U-Net, VAE, and under ``clip_prefix`` the
    CLIP text encoder; SDXL's encoders go elsewhere: :mod:`controlstack.io.sdxl_single_file`)."""
    out = {}
    unet = components.unet.state_dict()
    for k, new in orig.unet_table(unet, components.unet.config.layers_per_block).items():
        out[orig.UNET_PREFIX + new] = unet[k]
    out.update(vae_to_original(components.vae))
    for k, t in (components.text_encoder.state_dict().items() if clip_prefix else ()):
        out[clip_prefix + k.removeprefix("text_model.")] = t
    return {k: v.detach().contiguous() for k, v in out.items()}
