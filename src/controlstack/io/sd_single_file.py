"""Stable Diffusion base models: diffusers folders and SD-1.x single-file (LDM) checkpoints, offline.

Reading a single file uses diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` in
``diffusers.loaders.single_file_utils``) with *local* configs, so nothing is fetched from the Hub:

* ``config=DIR`` -- a diffusers SD folder (model_index.json, unet/, vae/, text_encoder/,
  tokenizer/, scheduler/) gives the configs and the tokenizer;
* otherwise the SD-1.5 configs stored in ``controlstack/configs/sd15`` (written from the public
  ``runwayml/stable-diffusion-v1-5`` configs), with every field that the tensors *can* tell
  (channels, block count, layers, text width, vocabulary, ...) taken from the tensors, or the
  configs we embedded in the file's metadata when we wrote it. A single file carries no tokenizer:
  without ``config`` a cached ``openai/clip-vit-large-patch14`` tokenizer is used when its
  vocabulary fits, else loading fails with a one-line error asking for ``--config``.

Writing a single file is the inverse mapping (:mod:`controlstack.io.original`; the reference is
diffusers' ``scripts/convert_diffusers_to_original_stable_diffusion.py``), so that
``load_base(save_base(x, "f.safetensors"))`` gives ``x``'s tensors back exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from controlstack.errors import ControlstackError
from controlstack.io import original as orig
from controlstack.io import sdxl_single_file as xl
from controlstack.io import transformer_single_file as tsf
from controlstack.io.sdxl_single_file import SDXL_CONFIGS
from controlstack.io.single_file_common import (
    SD15_CONFIGS,
    base_to_original,
    read_json,
    require_base_folder,
    scheduler_config,
    single_file_tokenizer,
    strip_prefix,
    tokenizer_from,
    unet_from_state,
    vae_from_state,
    vae_to_original,
)
from controlstack.io.tensors import (
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
from controlstack.models.components import SDComponents
from controlstack.models.families import family_of, family_of_state

METADATA_KEYS = {"unet": "controlstack.unet_config", "vae": "controlstack.vae_config",
                 "text_encoder": "controlstack.text_encoder_config"}


# ----------------------------------------------------------------------------------- folders
def _load_folder_model(cls, folder: Path, allow_pickle: bool, dtype):
    if not (folder / "config.json").is_file():
        raise ControlstackError(f"'{folder}' has no config.json; the Stable Diffusion folder is incomplete")
    use_safetensors = folder_uses_safetensors(folder, allow_pickle)
    # transformers 5 draws a "Loading weights" bar on stderr for every model, which would bury a
    # CLI's one-line error under progress lines; loading a local folder takes well under a second
    from transformers.utils import logging as hf_logging  # local: heavy, only this path needs it

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(folder, use_safetensors=use_safetensors, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ControlstackError(f"cannot load '{folder}' ({str(exc).splitlines()[0]}); check that its "
                                "config.json matches its weights") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if dtype is None:  # keep what is stored (diffusers would load float32, transformers "auto")
        dtype = stored_dtype(folder)
    return cast_model(model, dtype)


def _load_base_folder(path: Path, allow_pickle: bool, dtype) -> SDComponents:
    """SD-1.x / 2.x, or SDXL when model_index.json names a second text encoder (text_encoder_2/,
    tokenizer_2/: StableDiffusionXLPipeline's layout)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # local: heavy, only this path needs it
    from transformers import (  # local: heavy, only this path needs it
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    require_base_folder(path)
    index = read_json(path / "model_index.json")
    if (index.get("transformer") or [None])[0] is not None:
        return _load_transformer_folder(path, index, allow_pickle, dtype)
    xl = (index.get("text_encoder_2") or [None])[0] is not None
    if xl and not (path / "text_encoder_2").is_dir():
        raise ControlstackError(f"'{path}' is an SDXL folder without text_encoder_2/; the folder is incomplete")
    return SDComponents(
        unet=_load_folder_model(UNet2DConditionModel, path / "unet", allow_pickle, dtype),
        vae=_load_folder_model(AutoencoderKL, path / "vae", allow_pickle, dtype),
        text_encoder=_load_folder_model(CLIPTextModel, path / "text_encoder", allow_pickle, dtype),
        tokenizer=tokenizer_from(path),
        scheduler_config=scheduler_config(path),
        text_encoder_2=_load_folder_model(CLIPTextModelWithProjection, path / "text_encoder_2", allow_pickle, dtype)
        if xl else None,
        tokenizer_2=tokenizer_from(path, "tokenizer_2") if xl else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )


#: a transformer base folder's layout by its pipeline class: the parts, their classes, T5's slot
TRANSFORMER_LAYOUTS = {
    "StableDiffusion3": {"transformer": "SD3Transformer2DModel", "text_encoder": "CLIPTextModelWithProjection",
                         "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel"},
    "Flux": {"transformer": "FluxTransformer2DModel", "text_encoder": "CLIPTextModel",
             "text_encoder_2": "T5EncoderModel"},
}


def _load_transformer_folder(path: Path, index: dict, allow_pickle: bool, dtype, transformer=None,
                             vae=None) -> SDComponents:
    """An SD3 / SD3.5 folder (``StableDiffusion3Pipeline``'s layout: two CLIP encoders with projection,
    T5 in text_encoder_3/ when the index names it) or a Flux.1 one (``FluxPipeline``'s: CLIP, T5)."""
    import diffusers  # local: heavy, only this path needs it
    import transformers  # local: heavy, only this path needs it

    kind = next((k for k in TRANSFORMER_LAYOUTS if index.get("_class_name", "").startswith(k)), None)
    if kind is None:
        raise ControlstackError(f"'{path}' holds a {index.get('_class_name')} (a transformer base); this project "
                                f"reads the transformer folders of {', '.join(TRANSFORMER_LAYOUTS)}")
    layout = TRANSFORMER_LAYOUTS[kind]
    parts = {k: c for k, c in layout.items() if (index.get(k) or [None])[0] is not None
             and not (k == "transformer" and transformer is not None)}  # a single file's transformer is given
    for part in parts:
        if not (path / part).is_dir():
            raise ControlstackError(f"'{path}' is a {kind} folder without {part}/; the folder is incomplete")
    models = {k: _load_folder_model(getattr(diffusers if k == "transformer" else transformers, c), path / k,
                                    allow_pickle, dtype) for k, c in parts.items()}

    def tokenizer(sub: str):  # CLIP's own class for CLIP, T5's from its folder
        if sub not in ("tokenizer_2", "tokenizer_3") or "T5" not in layout.get(sub.replace("tokenizer", "text_encoder")):
            return tokenizer_from(path, sub)
        return transformers.AutoTokenizer.from_pretrained(path / sub, local_files_only=True)

    return SDComponents(
        unet=models["transformer"] if transformer is None else transformer,
        vae=vae if vae is not None else _load_folder_model(diffusers.AutoencoderKL, path / "vae", allow_pickle, dtype),
        text_encoder=models["text_encoder"], tokenizer=tokenizer("tokenizer"),
        scheduler_config=read_json(path / "scheduler" / "scheduler_config.json"),
        text_encoder_2=models.get("text_encoder_2"), tokenizer_2=tokenizer("tokenizer_2") if "text_encoder_2" in models
        else None,
        text_encoder_3=models.get("text_encoder_3"), tokenizer_3=tokenizer("tokenizer_3") if "text_encoder_3" in models
        else None,
    )


# ----------------------------------------------------------------------------------- single files
def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _require_base_state(state: dict) -> None:
    if any(k.startswith(orig.UNET_PREFIX) for k in state):
        return
    if any(k.startswith((orig.CONTROLNET_PREFIX, "input_hint_block.")) for k in state):
        raise ControlstackError("this is a ControlNet checkpoint, not a Stable Diffusion base; pass it as a "
                                "control (--control) and a base model as --model")
    raise ControlstackError("tensors do not look like a Stable Diffusion single-file checkpoint (no "
                            "model.diffusion_model.* keys); pass an SD-1.x .safetensors or a diffusers folder")


def _base_configs(state: dict, metadata: dict, config) -> tuple[dict, dict, dict, Path | None]:
    """(unet, vae, text encoder) configs: ``config`` folder > our metadata > SD-1.5 + tensor shapes."""
    if config is not None:
        folder = existing_path(config, "config")
        require_base_folder(folder)
        return (config_file(folder / "unet"), config_file(folder / "vae"),
                config_file(folder / "text_encoder"), folder)
    configs = []
    for part, prefix, infer in [("unet", orig.UNET_PREFIX, orig.infer_unet_config),
                                ("vae", orig.VAE_PREFIX, orig.infer_vae_config),
                                ("text_encoder", orig.CLIP_PREFIX, orig.infer_clip_config)]:
        if METADATA_KEYS[part] in metadata:
            configs.append(json.loads(metadata[METADATA_KEYS[part]]))
        else:
            configs.append({**read_json(SD15_CONFIGS / part / "config.json"), **infer(_shapes(strip_prefix(state, prefix)))})
    return (*configs, None)


def load_unet(source, *, allow_pickle: bool = False, config=None, torch_dtype=torch.float32):
    """Only the U-Net of a base (folder or single file): what ``transfer`` needs, no tokenizer."""
    from diffusers import UNet2DConditionModel  # local: heavy, only this path needs it

    path = existing_path(source, "base model")
    if path.is_dir():
        require_base_folder(path)
        return _load_folder_model(UNet2DConditionModel, path / "unet", allow_pickle, torch_dtype)
    state, metadata = read_tensors(path, allow_pickle=allow_pickle)
    _require_base_state(state)
    if config is not None:
        cfg = _base_configs(state, metadata, config)[0]
    elif METADATA_KEYS["unet"] in metadata:
        cfg = json.loads(metadata[METADATA_KEYS["unet"]])
    else:
        inferred = orig.infer_unet_config(_shapes(strip_prefix(state, orig.UNET_PREFIX)))
        # the family's default configs (SDXL is told by its added embedding, with or without encoders)
        configs = {"sdxl": SDXL_CONFIGS}.get(family_of(inferred).name, SD15_CONFIGS)
        cfg = {**read_json(configs / "unet" / "config.json"), **inferred}
    return unet_from_state(state, cfg, torch_dtype)


def _load_base_file(path: Path, allow_pickle: bool, config, dtype) -> SDComponents:
    from diffusers.loaders.single_file_utils import (  # local: heavy, only this path needs it
        convert_ldm_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel  # local: heavy, only this path needs it

    state, metadata = read_tensors(path, allow_pickle=allow_pickle)
    family = next((f for f in (family_of_state(state),) if f.network != "unet"), None)
    if family is not None:  # SD3 / Flux: the transformer (and VAE) from the file, the text encoders from a folder
        return _load_transformer_file(path, state, metadata, family, config, dtype)
    _require_base_state(state)
    family = family_of_state(state)
    own = {"sdxl": xl.load_sdxl_state}.get(family.name)  # a family with its own layout
    if own is not None:
        return own(state, metadata, config, dtype)
    unet_cfg, vae_cfg, text_cfg, folder = _base_configs(state, metadata, config)
    unet = unet_from_state(state, unet_cfg, dtype)
    vae = vae_from_state(state, vae_cfg, dtype)
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); position_ids is a buffer
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()
            if not k.endswith("position_ids")}
    if not clip:
        orig.infer_clip_config({})  # raises the "no CLIP text encoder" error
    from accelerate import init_empty_weights  # local: heavy, only this path needs it

    with init_empty_weights():
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(text_cfg))
    text_encoder = cast_model(assign_exact(text_encoder, clip, "text encoder"), dtype)
    tokenizer = single_file_tokenizer(folder, text_encoder.config.vocab_size)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        scheduler_config=scheduler_config(folder))


def _load_transformer_file(path: Path, state: dict, metadata: dict, family, config, dtype) -> SDComponents:
    """An SD3 / Flux single file (:mod:`controlstack.io.transformer_single_file`): its transformer,
    its VAE where it holds one, and the rest from ``config``, a diffusers folder of the family."""
    import diffusers  # local: heavy, only this path needs it

    if config is None:
        raise ControlstackError(f"'{path.name}' is a {family.label} single file: it carries no text encoders or "
                                f"tokenizers; pass --config DIR (config=DIR), a diffusers {family.label} folder")
    folder = existing_path(config, "config")
    require_base_folder(folder)
    index = read_json(folder / "model_index.json")
    folder_config = config_file(folder / "transformer")
    if family_of(folder_config).name != family.name:
        raise ControlstackError(f"--config '{folder}' is a {family_of(folder_config).label} folder; '{path.name}' is "
                                f"{family.label}: give a folder of the same family")
    inner = tsf.transformer_state(state)
    cfg = tsf.metadata_config(metadata, "unet") or tsf.infer_config(inner, family.name, folder_config)
    cls = getattr(diffusers, index["transformer"][1])
    transformer = build_empty(cls, {k: v for k, v in cfg.items() if not k.startswith("_")}, "transformer")
    transformer = cast_model(assign_exact(transformer, tsf.to_diffusers(inner, family.name), "transformer"), dtype)
    vae = None
    if any(k.startswith(orig.VAE_PREFIX) for k in state):  # SD3's files carry their VAE
        vae = vae_from_state(state, tsf.metadata_config(metadata, "vae") or config_file(folder / "vae"), dtype)
    # the folder's encoders, tokenizers and scheduler; its own transformer (and VAE) are not loaded
    return _load_transformer_folder(folder, index, False, dtype, transformer=transformer, vae=vae)


def load_base(source: str | os.PathLike, *, allow_pickle: bool = False, config: str | os.PathLike | None = None,
              torch_dtype=torch.float32) -> SDComponents:
    """A Stable Diffusion base from a diffusers folder or an SD-1.x / SDXL single file (offline)."""
    path = existing_path(source, "base model")
    if path.is_dir():
        return _load_base_folder(path, allow_pickle, torch_dtype)
    return _load_base_file(path, allow_pickle, config, torch_dtype)


# ----------------------------------------------------------------------------------- writing
def _model_json(model) -> str:
    if hasattr(model, "to_json_string"):
        cfg = json.loads(model.to_json_string())
    else:  # a transformers config
        cfg = model.config.to_dict()
    return json.dumps({k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version")})


def _save_folder(components: SDComponents, folder: Path) -> None:
    """What ``StableDiffusionPipeline.save_pretrained`` writes, without importing the pipeline
    (whose import pulls in transformers' image processors and costs seconds)."""
    import diffusers  # local: heavy, only this path needs it

    sched_cfg = dict(components.scheduler_config or scheduler_config(None))
    sched_name = str(sched_cfg.get("_class_name", "PNDMScheduler"))
    sched_cls = getattr(diffusers, sched_name, None) or diffusers.PNDMScheduler
    family = components.family
    if family.network != "unet":  # SD3 / Flux: their pipeline's own layout (transformer/, T5 in its slot)
        pipeline = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family.name]
        parts = {k: getattr(components, k) for k in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
        if family.name == "sd3":
            parts.update(text_encoder_3=components.text_encoder_3, tokenizer_3=components.tokenizer_3)
        getattr(diffusers, pipeline)(transformer=components.unet, scheduler=sched_cls.from_config(sched_cfg),
                                     **parts).save_pretrained(folder, safe_serialization=True)
        return
    folder.mkdir(parents=True)
    components.unet.save_pretrained(folder / "unet", safe_serialization=True)
    components.vae.save_pretrained(folder / "vae", safe_serialization=True)
    components.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    components.tokenizer.save_pretrained(folder / "tokenizer")
    xl = components.text_encoder_2 is not None
    if xl:
        components.text_encoder_2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
        components.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    sched_cls.from_config(sched_cfg).save_config(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", sched_cls.__name__],
        "text_encoder": ["transformers", type(components.text_encoder).__name__],
        "tokenizer": ["transformers", type(components.tokenizer).__name__],
        "unet": ["diffusers", type(components.unet).__name__],
        "vae": ["diffusers", type(components.vae).__name__],
    }
    if xl:  # StableDiffusionXLPipeline's fields: no safety checker, a second encoder and tokenizer
        for key in ("feature_extractor", "requires_safety_checker", "safety_checker"):
            index.pop(key)
        index.update({"text_encoder_2": ["transformers", type(components.text_encoder_2).__name__],
                      "tokenizer_2": ["transformers", type(components.tokenizer_2).__name__],
                      "force_zeros_for_empty_prompt": components.force_zeros_for_empty_prompt,
                      "image_encoder": [None, None], "feature_extractor": [None, None]})
        index = dict(sorted(index.items()))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _transformer_to_original(components: SDComponents) -> dict:
    """An SD3 / Flux base as a single file: the transformer in its original layout under
    ``model.diffusion_model.`` and the VAE in LDM's under ``first_stage_model.`` (the text encoders
    are not written: they load from a folder, as ComfyUI's do)."""
    out = {tsf.PREFIX + k: v for k, v in tsf.to_original(components.unet.state_dict(), components.family.name).items()}
    out.update(vae_to_original(components.vae))
    return {k: v.detach().contiguous() for k, v in out.items()}


def save_base(components: SDComponents, dest: str | os.PathLike, *, format: str = "auto") -> Path:
    """Write a base model: a diffusers folder with model_index.json, or (``*.safetensors`` /
    ``format="original"``) an SD-1.x single file. The write is atomic."""
    dest = Path(dest)
    if format == "auto":
        format = "original" if dest.suffix.lower() == ".safetensors" else "diffusers"
    if format not in ("diffusers", "original"):
        raise ControlstackError(f"unknown checkpoint format '{format}'; use one of: diffusers, original")
    with atomic_output(dest) as tmp:
        if format == "original" and components.family.network != "unet":
            save_file(_transformer_to_original(components), str(tmp), metadata={
                "format": "pt", **{key: _model_json(getattr(components, part)) for part, key in tsf.METADATA_KEYS.items()}})
        elif format == "original":
            xl_base = components.text_encoder_2 is not None
            metadata = {"format": "pt"}
            for part, key in (xl.METADATA_KEYS if xl_base else METADATA_KEYS).items():
                metadata[key] = _model_json(getattr(components, part))
            state = xl.sdxl_to_original(components) if xl_base else base_to_original(components)
            save_file(state, str(tmp), metadata=metadata)
        else:
            _save_folder(components, tmp)
    return dest
