"""controlstack: spatial control for text-to-image diffusion (ControlNet, Minimal Impact
ControlNet, OmniControlNet).

Public API::

    from controlstack import Pipeline, Control
    pipe = Pipeline.from_pretrained()           # the bundled default model, offline
    images = pipe("a red sphere", controls=[Control("canny", edge_image)], steps=20, seed=0)
"""

from controlstack.control import Control
from controlstack.errors import ControlstackError
from controlstack.pipeline import Pipeline

__all__ = ["Control", "ControlstackError", "Pipeline"]
__version__ = "0.1.0"
