"""Training recipes: VAE, base text-to-image model, ControlNet (one readable file each).

Each recipe (``vae.py``, ``base.py``, ``controlnet.py``) is a whole training run that reads top to
bottom (torchtune's recipe style), built from shared parts: typed configs (``config.py``), data
(``data.py``), the DDPM pieces (``diffusion.py``), checkpoint / exact resume / metrics
(``session.py``), validation grids and the condition-fidelity curve (``validation.py``), the
world's tokenizer (``tokenizer.py``) and the bf16 speed probe (``precision.py``). Everything runs
under ``accelerate`` (single CPU, one GPU, or ``accelerate launch`` multi-GPU unchanged).
"""

from __future__ import annotations

import logging
from importlib import import_module

from controlstack.errors import ControlstackError


class _TorchvisionFallbackNote(logging.Filter):
    """Drops transformers' note that ``CLIPImageProcessor`` / ``SiglipImageProcessor`` fall back to their
    PIL backend without torchvision. transformers >= 5 logs it when a module merely imports those names,
    and diffusers' pipeline modules do (``pipeline_controlnet.py``, ``loaders/ip_adapter.py``) when the
    recipes' validation and export import ``StableDiffusion*Pipeline``; no recipe processes an image
    with them, so the note is noise in every training log. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNote())

#: recipe name -> (module, config class name[, train function name; default ``train``])
RECIPES = {
    "vae": ("controlstack.training.vae", "VAEConfig"),
    "base": ("controlstack.training.base", "BaseConfig"),
    "base_sd3": ("controlstack.training.base_sd3", "SD3BaseConfig"),
    "controlnet": ("controlstack.training.controlnet", "ControlNetConfig"),
    "omni": ("controlstack.training.omni", "OmniConfig"),
    "predictor": ("controlstack.training.predictor", "PredictorTrainConfig"),
    "ip_adapter": ("controlstack.training.ip_adapter", "IPAdapterConfig"),
    "lcm": ("controlstack.training.lcm", "LCMConfig"),
    # the evaluation networks (FID / KID features, CLIP score): two recipes of one file
    "features": ("controlstack.training.evaluators", "FeatureNetTrainConfig", "train_features"),
    "clip": ("controlstack.training.evaluators", "ClipTrainConfig", "train_clip"),
}


def recipe(name: str):
    """(config class, train function) of a recipe; unknown names list the known ones."""
    if name not in RECIPES:
        raise ControlstackError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)}")
    module_name, config_name, *function = RECIPES[name]
    module = import_module(module_name)
    return getattr(module, config_name), getattr(module, function[0] if function else "train")


__all__ = ["RECIPES", "recipe"]
