"""Adapter to ``controlnet_aux`` detectors for users who bring their own local weights folder.

controlnet_aux needs torchvision and timm, which cannot live in this project's environment, so it
is never a dependency: it is imported here, lazily, only when a learned annotator is given
``weights=DIR``. Hub access is switched off first (``HF_HUB_OFFLINE=1``) and ``from_pretrained``
gets the local folder, which controlnet_aux resolves with ``os.path.join`` instead of downloading;
a missing file therefore fails instead of fetching anything.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import numpy as np

from controlstack.errors import ControlstackError


def load_detector(detector: str, weights: str, name: str) -> Callable[[np.ndarray], object]:
    """``controlnet_aux.<detector>.from_pretrained(weights)`` as ``predict(rgb) -> image``."""
    if not detector:
        raise ControlstackError(f"{name}: controlnet_aux has no default detector for this task; pass "
                                "detector=CLASS_NAME or a loader")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never download, whatever the detector tries
    try:
        module = importlib.import_module("controlnet_aux")
    except ImportError as exc:
        raise ControlstackError(
            f"{name}: weights= needs the controlnet_aux package, which is not importable here ({exc}); it "
            "needs torchvision and timm, so run controlstack from an environment that has them") from None
    cls = getattr(module, detector, None)
    if cls is None:
        raise ControlstackError(f"{name}: controlnet_aux has no detector '{detector}'; check the class name")
    try:
        det = cls.from_pretrained(weights)
    except Exception as exc:  # noqa: BLE001 -- controlnet_aux raises many types for a missing/partial folder
        raise ControlstackError(f"{name}: could not load {detector} from '{weights}' ({type(exc).__name__}: "
                                f"{exc}); check the folder holds that detector's checkpoint") from None

    def predict(rgb: np.ndarray):
        h, w = rgb.shape[:2]
        out = det(rgb, detect_resolution=min(h, w), image_resolution=min(h, w))
        return out[0] if isinstance(out, tuple) else out

    return predict
