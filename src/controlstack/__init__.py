"""controlstack: spatial control for text-to-image diffusion (ControlNet, Minimal Impact
ControlNet, OmniControlNet).

Public API::

    from controlstack import Pipeline, Control
    pipe = Pipeline.from_pretrained()           # the bundled default model, offline
    images = pipe("a red sphere", controls=[Control("canny", edge_image)], steps=20, seed=0)

The names are imported lazily (PEP 562) so that torch-free parts -- the world generator in a
dataloader worker, the pose renderer -- don't pull in torch and diffusers through this package.
"""

from __future__ import annotations

import importlib

__all__ = ["Control", "ControlstackError", "Pipeline"]
__version__ = "0.1.0"

_LAZY = {
    "Control": "controlstack.control",
    "Pipeline": "controlstack.pipeline",
    "ControlstackError": "controlstack.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'controlstack' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
