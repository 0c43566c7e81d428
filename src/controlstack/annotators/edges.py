"""Edge-family annotators: canny, soft edge, scribble, lineart (all classical, no weights).

* ``canny``    -- ``cv2.Canny`` on the RGB image exactly as ControlNet's annotator calls it
  (lllyasviel/ControlNet ``annotator/canny``; sd-webui-controlnet defaults low=100, high=200).
* ``softedge`` -- a multi-scale colour-gradient boundary map that looks like HED/PiDiNet output
  (thin, graded, in [0, 1]): scale-normalised Gaussian derivatives (Lindeberg 1998) summed as a
  colour structure tensor (Di Zenzo 1986) over several sigmas, non-maximum suppression along the
  dominant gradient direction (Canny 1986), then a small Gaussian spread and a tanh tone curve.
  ``safe=True`` quantises like sd-webui's "softedge_*safe" (``safe_step``).
* ``scribble`` -- how the ControlNet paper (Zhang et al. 2023, sec. 4 "user scribble") synthesises
  scribbles from a boundary map: threshold, thin to a skeleton, optionally jitter/drop strokes at
  random (seeded), dilate to a stroke width.
* ``lineart``  -- sd-webui-controlnet's "lineart_standard" (a one-sided difference of Gaussians:
  how much darker a pixel is than its blurred neighbourhood) or an XDoG variant (Winnemöller et al.
  2012, soft tanh threshold on a difference of Gaussians), both white lines on black.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from controlstack.annotators.base import Annotator, gray, param
from controlstack.errors import ControlstackError

# Peak of a unit step's scale-normalised Gaussian derivative: 1/sqrt(2*pi); dividing by it makes a
# full-contrast step read 1.0 at every scale.
_STEP_PEAK = 1.0 / np.sqrt(2.0 * np.pi)


@dataclass(kw_only=True)
class Canny(Annotator):
    NAME = "canny"
    low_threshold: int = param(100, "hysteresis low threshold (OpenCV units)", lo=1, hi=255)
    high_threshold: int = param(200, "hysteresis high threshold (OpenCV units)", lo=1, hi=255)
    l2_gradient: bool = param(False, "use the exact L2 gradient norm instead of L1")

    def check(self) -> None:
        if self.low_threshold > self.high_threshold:
            raise ControlstackError(
                f"canny: low_threshold ({self.low_threshold}) is above high_threshold "
                f"({self.high_threshold}); choose low <= high, both in [1, 255]")

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        # On a 3-channel image OpenCV takes, per pixel, the channel with the largest gradient:
        # the same call ControlNet's annotator makes, so results are bit-identical to it.
        return cv2.Canny(rgb, self.low_threshold, self.high_threshold, L2gradient=self.l2_gradient)


def _nms(mag: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Keep pixels not smaller than both neighbours along the gradient direction (4 bins)."""
    h, w = mag.shape
    p = np.pad(mag, 1, mode="edge")
    # neighbour offsets (dy, dx) for directions 0, 45, 90, 135 degrees
    offsets = ((0, 1), (1, 1), (1, 0), (1, -1))
    b = (np.round(theta / (np.pi / 4.0)).astype(np.int64)) % 4
    keep = np.zeros((h, w), dtype=bool)
    for i, (dy, dx) in enumerate(offsets):
        a = p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        c = p[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        keep |= (b == i) & (mag >= a) & (mag >= c)
    return keep & (mag > 0)


def soft_edge_map(rgb: np.ndarray, sigmas=(1.0, 2.0, 4.0), spread: float = 1.0, gain: float = 2.5,
                  safe: bool = False) -> np.ndarray:
    """RGB uint8 -> float32 soft boundary map in [0, 1] (see the module docstring)."""
    img = rgb.astype(np.float32) / 255.0
    sxx = np.zeros(img.shape[:2], np.float32)
    syy = np.zeros_like(sxx)
    sxy = np.zeros_like(sxx)
    for s in sigmas:
        b = cv2.GaussianBlur(img, (0, 0), s) if s > 0 else img
        # Sobel(ksize=3)/8 is the central derivative smoothed across; x s normalises the scale
        gx = cv2.Sobel(b, cv2.CV_32F, 1, 0, ksize=3) * (s / 8.0)
        gy = cv2.Sobel(b, cv2.CV_32F, 0, 1, ksize=3) * (s / 8.0)
        # explicit channel sums: numpy's strided reduce over a last axis of 3 is ~10x slower
        for c in range(3):
            x, y = gx[..., c], gy[..., c]
            sxx += x * x
            syy += y * y
            sxy += x * y
    n = float(len(sigmas)) * 3.0  # scales x channels: a grey unit step reads 1.0
    mag = np.sqrt((sxx + syy) / n) / _STEP_PEAK
    theta = 0.5 * np.arctan2(2.0 * sxy, sxx - syy)  # dominant gradient direction (structure tensor)
    # image rows grow downwards: direction (cos, sin) in (x, y) maps to the NMS bins directly
    ridge = np.where(_nms(mag, theta), mag, 0.0).astype(np.float32)
    if spread > 0:
        # a 1-px ridge blurred across keeps its height after dividing by the 1-D Gaussian's peak
        ridge = cv2.GaussianBlur(ridge, (0, 0), spread) * (np.sqrt(2.0 * np.pi) * spread)
    out = np.tanh(gain * ridge)
    if safe:  # sd-webui's safe_step(x, 2): few levels, so the model cannot read fine shading
        out = np.floor(out * 3.0) / 2.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(kw_only=True)
class SoftEdge(Annotator):
    NAME = "softedge"
    sigmas: tuple = param((1.0, 2.0, 4.0), "Gaussian scales (px) combined; larger = ignore finer texture",
                          lo=0.3, hi=32)
    spread: float = param(1.0, "Gaussian sigma (px) the thin ridges are spread by; 0 = 1-2 px lines",
                          lo=0, hi=8)
    gain: float = param(2.5, "tone curve tanh(gain * contrast): higher = weak edges brighter", lo=0.1, hi=50)
    safe: bool = param(False, "quantise to a few levels like sd-webui's softedge_*safe")

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        return soft_edge_map(rgb, self.sigmas, self.spread, self.gain, self.safe)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: uniform values on a coarse grid, bicubic upsampled."""
    gh, gw = h // cell + 2, w // cell + 2
    coarse = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    fine = cv2.resize(coarse, (gw * cell, gh * cell), interpolation=cv2.INTER_CUBIC)
    return np.clip(fine[cell // 2:cell // 2 + h, cell // 2:cell // 2 + w], -1.0, 1.0)


@dataclass(kw_only=True)
class Scribble(Annotator):
    NAME = "scribble"
    threshold: float = param(0.5, "soft-edge level that counts as a boundary", lo=0.01, hi=0.99)
    width: int = param(3, "stroke width (px)", lo=1, hi=32)
    min_length: int = param(8, "drop strokes with fewer skeleton pixels than this", lo=0, hi=10000)
    jitter: float = param(0.0, "amplitude (px) of a smooth random displacement of the strokes", lo=0, hi=32)
    drop: float = param(0.0, "fraction of strokes removed at random", lo=0, hi=0.95)
    seed: int = param(0, "random seed for jitter and drop", lo=0, hi=2**31 - 1)

    def strokes(self, rgb: np.ndarray) -> np.ndarray:
        """The 1-px skeleton of the strong boundaries, after min_length/drop/jitter (bool HxW)."""
        from skimage.morphology import skeletonize  # local: heavy, only this path needs it

        soft = soft_edge_map(rgb)
        skel = skeletonize(soft > self.threshold)
        return self.edit_strokes(skel)

    def edit_strokes(self, skel: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        if self.min_length > 0 or self.drop > 0:
            n, labels, stats, _ = cv2.connectedComponentsWithStats(skel.astype(np.uint8), connectivity=8)
            keep = stats[:, cv2.CC_STAT_AREA] >= max(1, self.min_length)
            keep[0] = False
            if self.drop > 0:
                keep &= rng.random(n) >= self.drop
            skel = keep[labels]
        if self.jitter > 0:
            h, w = skel.shape
            cell = max(8, int(min(h, w) // 8))
            dx = _smooth_noise(rng, h, w, cell) * self.jitter
            dy = _smooth_noise(rng, h, w, cell) * self.jitter
            ys, xs = np.nonzero(skel)
            ny = np.clip(np.round(ys + dy[ys, xs]).astype(np.int64), 0, h - 1)
            nx = np.clip(np.round(xs + dx[ys, xs]).astype(np.int64), 0, w - 1)
            skel = np.zeros_like(skel)
            skel[ny, nx] = True
        return skel

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        return dilate_strokes(self.strokes(rgb), self.width)


def dilate_strokes(skel: np.ndarray, width: int) -> np.ndarray:
    """A bool skeleton -> uint8 strokes ``width`` px wide."""
    skel = skel.astype(np.uint8) * 255
    if width <= 1:
        return skel
    return cv2.dilate(skel, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))


def strokes_from_soft_edge(soft: np.ndarray, threshold: float = 0.5, width: int = 3) -> np.ndarray:
    """The ControlNet paper's synthesised user scribble from a soft edge map in [0, 1]: threshold,
    thin to a skeleton, dilate (uint8 HxW)."""
    from skimage.morphology import skeletonize  # local: heavy, only this path needs it

    return dilate_strokes(skeletonize(soft > threshold), width)


@dataclass(kw_only=True)
class Lineart(Annotator):
    NAME = "lineart"
    method: str = param("standard", "standard = sd-webui lineart_standard; xdog = soft-thresholded DoG",
                        choices=("standard", "xdog"))
    sigma: float = param(6.0, "standard: neighbourhood blur (px); xdog: inner blur is sigma/8",
                         lo=0.1, hi=64)
    intensity_threshold: float = param(8.0, "standard: darkness (0-255) ignored as noise", lo=0, hi=255)
    phi: float = param(40.0, "xdog: steepness of the tanh threshold", lo=0.1, hi=1000)
    epsilon: float = param(0.02, "xdog: DoG darkness (0-1) below which nothing is drawn", lo=0, hi=1)

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        if self.method == "standard":
            # sd-webui-controlnet lineart_standard: how much darker than the blurred surroundings,
            # taking the least-dark channel so coloured flat areas do not read as lines
            x = rgb.astype(np.float32)
            d = cv2.GaussianBlur(x, (0, 0), self.sigma) - x
            # channel minimum spelled out: numpy's reduce over a last axis of 3 is several times slower
            intensity = np.minimum(np.minimum(d[..., 0], d[..., 1]), d[..., 2])
            np.clip(intensity, 0, 255, out=intensity)
            strong = intensity[intensity > self.intensity_threshold]
            norm = max(16.0, float(np.median(strong))) if strong.size else 16.0
            intensity /= np.float32(norm)  # divide then multiply, as the reference (bit-identical)
            intensity *= np.float32(127.0)
            return np.clip(intensity, 0, 255, out=intensity).astype(np.uint8)
        y = gray(rgb)
        inner = max(0.3, self.sigma / 8.0)
        d = cv2.GaussianBlur(y, (0, 0), inner) - cv2.GaussianBlur(y, (0, 0), self.sigma)
        dark = -d - self.epsilon  # > 0 where a pixel is darker than its surroundings
        return np.where(dark > 0, np.tanh(self.phi * dark), 0.0).astype(np.float32)
