"""Minimal Impact ControlNet's evaluation protocol and measures (MIControlNet Sec. 5, Appendix G).

* **Two-condition protocol** (Sec. 5.3): two conditions from two different scenes, centre-cropped,
  randomly resized, one placed in the left half and one in the right; everything else is *silent*
  (the condition type's blank value, ``training/rebalance.BLANK``). :func:`composite` builds it
  with exact boxes, so every measure can be restricted to a condition's box or to the silence.
* **Single-condition protocol** (Fig. 4a, Table 5): one scene's condition kept in its left half
  only, the right half silent, with the scene's full caption, a brief one (:func:`brief_caption`)
  or none; the real render's right half is the texture reference.
* **Total variation** (:func:`total_variation`): the mean absolute difference of neighbouring
  pixels (horizontal and vertical, RGB in [0, 1]) over the pairs that lie inside a region. Texture
  alone is not realism: multicoloured speckle scores high too, so every TV is reported with
* **realism**: FID on the project's own features (the bundled VAE encoder's posterior mean,
  average-pooled to 4x4, as ``benchmarks/fidelity.py``; the FID of a half uses that half's
  features) and :func:`denoising_loss`, the base model's own denoising loss on the images -- on
  real renders it is the model's typical loss; images the model finds far easier (flattened) or far
  harder (speckle) than real ones are off its data manifold in either direction.
* **Condition fidelity** inside a box: edge F1 (2 px) of the canny map of the generated box against
  the input edges (canny) or against the canny map of the source scene's real render, cropped and
  resized the same way (depth, seg, pose: structure F1, as ``benchmarks/fidelity.py`` does while
  the project has no learned depth / seg predictor of its own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from controlstack.models.vae import encode
from controlstack.training.diffusion import sd_noise_scheduler, tokenize

CROP = 0.75                 # centre crop kept of each source condition (side fraction)
SIDE_RANGE = (0.3, 0.5)     # the pasted square's side, as a fraction of the canvas, drawn uniformly
RELATIONS = re.compile(r" (left of|right of|in front of|behind) ")


def brief_caption(caption: str) -> str:
    """The first noun phrase and the ground: ``a gray striped cone right of ..., ... on dirt`` ->
    ``a gray striped cone on dirt`` (the paper's "brief prompt")."""
    ground = caption.rsplit(" on ", 1)[-1] if " on " in caption else ""
    first = RELATIONS.split(caption.split(", ")[0])[0]
    first = first.rsplit(" on ", 1)[0]
    return f"{first} on {ground}" if ground else first


@dataclass
class Placement:
    """Where a source condition went: its box (x0, y0, side) on the canvas and its source crop."""

    box: tuple[int, int, int]
    crop: tuple[int, int, int]  # (x0, y0, side) in the source image


def _paste(src: np.ndarray, p: Placement, canvas: np.ndarray) -> None:
    x, y, s = p.crop
    patch = Image.fromarray(src[y:y + s, x:x + s]).resize((p.box[2], p.box[2]), Image.BILINEAR)
    bx, by, bs = p.box
    canvas[by:by + bs, bx:bx + bs] = np.asarray(patch).reshape(bs, bs, -1)[..., : canvas.shape[-1]]


def place(size: int, half: int, rng: np.random.Generator) -> Placement:
    """A random square in the left (``half=0``) or right (1) half of a ``size`` canvas, holding the
    centre crop of a ``size`` source."""
    side = round(rng.uniform(*SIDE_RANGE) * size)
    x0 = half * size // 2 + int(rng.integers(0, size // 2 - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    cs = round(CROP * size)
    return Placement((x0, y0, side), ((size - cs) // 2, (size - cs) // 2, cs))


def composite(conditions: list[np.ndarray], placements: list[Placement], blanks: list, size: int) -> list[np.ndarray]:
    """One canvas per condition: its blank colour everywhere, the condition's crop in its box."""
    out = []
    for cond, p, blank in zip(conditions, placements, blanks):
        cond = cond if cond.ndim == 3 else np.repeat(cond[..., None], 3, -1)
        canvas = np.empty((size, size, 3), np.uint8)
        canvas[:] = np.round(np.asarray(blank) * 255).astype(np.uint8)
        _paste(cond, p, canvas)
        out.append(canvas)
    return out


def box_mask(size: int, box: tuple[int, int, int]) -> np.ndarray:
    m = np.zeros((size, size), bool)
    x, y, s = box
    m[y:y + s, x:x + s] = True
    return m


def total_variation(image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean |difference| of horizontally and vertically neighbouring pixels (RGB in [0, 1], mean
    over channels) over the pairs whose two pixels are both in ``mask`` (None: everywhere)."""
    a = np.asarray(image, np.float64) / (255.0 if np.asarray(image).dtype == np.uint8 else 1.0)
    dx = np.abs(a[:, 1:] - a[:, :-1]).mean(-1)
    dy = np.abs(a[1:] - a[:-1]).mean(-1)
    if mask is None:
        return float(np.concatenate([dx.ravel(), dy.ravel()]).mean())
    mx, my = mask[:, 1:] & mask[:, :-1], mask[1:] & mask[:-1]
    vals = np.concatenate([dx[mx], dy[my]])
    return float(vals.mean()) if vals.size else float("nan")


def to_vae_input(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB arrays (B of H, W, 3) -> the VAE's input batch in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def denoising_loss(pipe, images: list[np.ndarray], prompts: list[str] | None = None,
                   timesteps=(100, 300, 500, 700, 900), seed: int = 0) -> float:
    """The base model's mean denoising loss on ``images`` (its own parameterisation: ε or v), at
    fixed timesteps with fixed noise, prompted with ``prompts`` (None: the empty prompt)."""
    sched = sd_noise_scheduler((pipe.scheduler_config or {}).get("prediction_type", "epsilon"))
    z0 = encode(pipe.vae, to_vae_input(images), sample=False).float()
    emb = pipe.text_encoder(tokenize(pipe.tokenizer, prompts or [""] * len(images), "cpu"))[0]
    g = torch.Generator().manual_seed(seed)
    losses = []
    for t in timesteps:
        noise = torch.randn(z0.shape, generator=g)
        tt = torch.full((z0.shape[0],), int(t), dtype=torch.long)
        noisy = sched.add_noise(z0, noise, tt)
        target = sched.get_velocity(z0, noise, tt) if sched.config.prediction_type == "v_prediction" else noise
        pred = pipe.unet(noisy.to(pipe.unet.dtype), tt, emb.to(pipe.unet.dtype)).sample.float()
        losses.append(float((pred - target).pow(2).mean()))
    return float(np.mean(losses))


def vae_features(pipe, images: list[np.ndarray]) -> np.ndarray:
    """The bundled VAE encoder's posterior mean, average-pooled to 4x4 (``benchmarks/fidelity.py``)."""
    with torch.no_grad():
        z = pipe.vae.encode(to_vae_input(images).to(pipe.vae.dtype)).latent_dist.mean.float()
    return torch.nn.functional.adaptive_avg_pool2d(z, 4).flatten(1).numpy()


def half(image: np.ndarray, side: int) -> np.ndarray:
    """The left (0) or right (1) half of an image, resized back to a square (VAE features need
    a multiple of 8 and the pooled features a comparable shape)."""
    w = image.shape[1] // 2
    part = image[:, side * w:(side + 1) * w]
    return np.asarray(Image.fromarray(part).resize((image.shape[0], image.shape[0]), Image.BILINEAR))


def box_f1(generated: np.ndarray, reference_edges: np.ndarray, box: tuple[int, int, int]) -> float:
    """Edge F1 (2 px) inside ``box`` between canny of ``generated`` and ``reference_edges``."""
    from controlstack.evaluation.metrics import edge_f1, edges  # local: heavy, only this path needs it

    x, y, s = box
    pred = edges(Image.fromarray(generated))[y:y + s, x:x + s]
    return edge_f1(reference_edges[y:y + s, x:x + s], pred)
