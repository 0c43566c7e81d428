"""Base-model families: the one place that knows a base's architecture.

A family is a module implementing :class:`BaseFamily`: how to tell its models from a config or a
single file's keys, what its text conditioning is (the cross-attention states and any added
conditions the denoiser passes to the U-Net and its ControlNets), which parts it needs, and
whether the bundled ControlNets fit it. Everything below the Pipeline asks the family object it
was given (``pipe.family``, ``components.family``) instead of comparing names. Families today:

* ``sd``   -- Stable Diffusion 1.x / 2.x (``sd.py``);
* ``sdxl`` -- Stable Diffusion XL (``sdxl.py``);
* ``sd3``  -- Stable Diffusion 3 / 3.5, an MMDiT transformer with flow matching (``sd3.py``);
* ``flux`` -- Flux.1, an MMDiT with packed latents and embedded guidance (``flux.py``).

Each derives from ``base.Family`` (a U-Net on unpacked latents, DDPM sampling, CFG as a batch of
two) and overrides what differs.

A new family is one module here plus its loader (docs/design.md, "Adding a base family").
"""

from __future__ import annotations

from typing import Protocol

import torch

from controlstack.errors import ControlstackError
from controlstack.models.families import flux, sd, sd3, sdxl


class BaseFamily(Protocol):
    """What the pipeline, the loaders and the checks ask of a base family."""

    name: str                   # "sd", "sdxl": recorded, and the key of FAMILIES
    label: str                  # for messages: "Stable Diffusion XL"
    bundled_controlnets: bool   # whether the bundled (SD-1.x-layout) ControlNets run on its bases
    network: str                # the denoiser kind: "unet" (encode / decode around the skips) | "mmdit" | "flux"
    default_scheduler: str      # the sampler a call without one gets
    flow: bool                  # flow matching (velocity on a sigma schedule) rather than DDPM noise prediction
    cfg_batch: bool             # classifier-free guidance as a batch of two (Flux embeds its guidance instead)

    def noise_shape(self, pipe, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The starting noise's shape; ``pack`` / ``unpack`` turn such latents into the network's
        input and back (Flux's 2x2 patches); ``set_timesteps`` lays out the schedule (``base.py``)."""

    def detect(self, config: dict) -> bool:
        """Whether a U-Net / ControlNet config is of this family (a ControlNet copies its base's
        encoder, so it carries the same marks)."""

    def detect_state(self, keys) -> bool:
        """Whether an original (single-file) checkpoint's keys are of this family."""

    def display(self, config: dict) -> str:
        """The short name ``inspect`` shows ("SD-1.x", "SD-2.x", "SDXL")."""

    def check_components(self, components) -> None:
        """Raise unless ``components`` hold every part this family's U-Net needs."""

    def encode_text(self, pipe, prompt: str, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden, pooled)``: the cross-attention states and the pooled embedding (None if unused)."""

    def text_conditions(self, pipe, prompt: str, negative_prompt: str, batch: int, do_cfg: bool,
                        size: tuple[int, int], micro: dict):
        """``(cond, uncond, added)`` for the denoiser (``uncond`` None without CFG; ``added``:
        ``(uncond_added, cond_added)`` or None)."""

    def text_encoders(self, pipe) -> list[tuple[str, torch.nn.Module]]:
        """``(LoRA key prefix, encoder)`` of each text encoder a LoRA may adapt (``lora.py``)."""

    def lora_loader(self):
        """diffusers' LoRA loader mixin for this family (its classmethods read and place LoRAs)."""


def _families() -> tuple:
    return (flux.FAMILY, sd3.FAMILY, sdxl.FAMILY, sd.FAMILY)  # in detection order: the specific before the fallback


def family_of(model) -> BaseFamily:
    """The family of a U-Net / ControlNet (a model or its config dict)."""
    config = model if isinstance(model, dict) else dict(getattr(model, "config", {}))
    return next(f for f in _families() if f.detect(config))


def family_of_state(keys) -> BaseFamily:
    """The family of an original single-file checkpoint, by its keys."""
    return next(f for f in _families() if f.detect_state(keys))


def get(name: str) -> BaseFamily:
    """The family named ``name``; unknown names fail loudly with the known ones."""
    for f in _families():
        if f.name == name:
            return f
    raise ControlstackError(f"unknown base family '{name}'; known: {', '.join(f.name for f in _families())}")
