"""Condition-fidelity metrics (ControlNet paper, Sec. 4.3; METHOD_NOTES §4).

The paper evaluates control by re-extracting the condition from the generated image and comparing
it with the input. For edges this is an F-score with a small distance tolerance -- 2 px, the usual
boundary tolerance of BSDS-style edge benchmarks.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

#: The ControlNet canny annotator's default thresholds.
CANNY_LOW, CANNY_HIGH = 100, 200


def edges(image: Image.Image, is_edge_map: bool = False) -> np.ndarray:
    """Boolean edge map: a given edge map thresholded at 50%, otherwise ``cv2.Canny(100, 200)``."""
    gray = np.asarray(image.convert("L"))
    if is_edge_map:
        return gray > 127
    return cv2.Canny(gray, CANNY_LOW, CANNY_HIGH) > 0


def edge_f1(reference: np.ndarray, predicted: np.ndarray, tolerance: float = 2.0) -> float:
    """F1 of two boolean edge maps where a pixel matches if the other map has an edge within
    ``tolerance`` pixels (Euclidean). Both empty -> 1 (perfect agreement on "no edges")."""
    if not reference.any() and not predicted.any():
        return 1.0
    if not reference.any() or not predicted.any():
        return 0.0

    def dist_to(mask: np.ndarray) -> np.ndarray:  # distance of every pixel to the nearest edge of mask
        return cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)

    precision = float((dist_to(reference)[predicted] <= tolerance).mean())
    recall = float((dist_to(predicted)[reference] <= tolerance).mean())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
