"""The bundled default model (embedded in the package, offline).

``bundle/`` holds a diffusers Stable Diffusion folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) and ``bundle/controlnets/<name>/`` one diffusers ControlNet
folder per condition type, all trained by the project's own recipes on its procedural world
(see the model card ``bundle/README.md``).

Until that bundle is trained and committed, the default is a *tiny seeded random* model of the
same layout with randomly initialised ControlNets under the bundled names: everything runs end to
end and shows the plumbing, but the images are noise-like. ``is_placeholder()`` tells which.
"""

from __future__ import annotations

import logging
from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent / "bundle"
BUNDLED_NAMES = ("canny", "depth", "seg", "pose", "scribble", "softedge")


def is_placeholder() -> bool:
    return not (BUNDLE_DIR / "model_index.json").is_file()


def bundled_controlnets() -> dict:
    """name -> zero-argument loader of the bundled ControlNet of that condition type."""
    if is_placeholder():
        return {name: (lambda name=name: _placeholder_controlnet(name)) for name in BUNDLED_NAMES}
    from controlstack.io.checkpoints import load_controlnet

    root = BUNDLE_DIR / "controlnets"
    return {p.name: (lambda p=p: load_controlnet(p)) for p in sorted(root.iterdir()) if p.is_dir()}


def default_pipeline(cls):
    """``cls`` (Pipeline) over the bundled model, or the tiny placeholder while none is bundled."""
    if is_placeholder():
        from controlstack.models.tiny import tiny_sd

        logging.getLogger("controlstack").warning(
            "no trained bundle in this checkout: using a tiny random placeholder model"
        )
        return cls(tiny_sd(seed=0, max_length=32), controlnets=bundled_controlnets(), name="placeholder-tiny")
    from controlstack.io.checkpoints import load_base

    return cls(load_base(BUNDLE_DIR), controlnets=bundled_controlnets(), name="controlstack-bundle")


_PLACEHOLDER_CN: dict = {}


def _placeholder_controlnet(name: str):
    from controlstack.models.tiny import tiny_controlnet, tiny_unet

    if name not in _PLACEHOLDER_CN:
        seed = sum(map(ord, name))  # a different, fixed ControlNet per name
        # tiny_unet(0) is the placeholder base's U-Net (tiny_sd(seed=0) builds it with seed 0);
        # building only it avoids a whole VAE + text encoder per ControlNet
        _PLACEHOLDER_CN[name] = tiny_controlnet(tiny_unet(0), seed=seed)
    return _PLACEHOLDER_CN[name]
