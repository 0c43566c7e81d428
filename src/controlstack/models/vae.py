"""The VAE's latent space, one definition: images <-> the latents the U-Net works in.

Latent Diffusion (Rombach et al., CVPR 2022, Sec. 3) trains the U-Net on ``z * scaling_factor``,
``z`` a sample of the VAE encoder's posterior, so the latents have about unit variance. VAEs whose
config carries per-channel ``latents_mean`` / ``latents_std`` (diffusers' SDXL rule) standardise
first: ``(z - mean) * scaling_factor / std``; SD3's and Flux's shift by one ``shift_factor``
(``(z - shift) * scaling_factor``); without either the mean is 0 and the std 1, which leave every
value bit for bit as it is. Every encoder of images into latents goes through
:func:`encode` (img2img, inpainting, training batches, the MI evaluations), every decoder through
:func:`unscale`.
"""

from __future__ import annotations

import torch


def latent_stats(config, like: torch.Tensor) -> tuple:
    """The VAE config's per-channel ``(mean, std)`` as tensors like ``like``; else its ``shift_factor``
    (SD3 / Flux: ``(z - shift) * scaling_factor``) as the mean; else ``(0.0, 1.0)``."""
    config = dict(config)
    if config.get("latents_mean") is None or config.get("latents_std") is None:
        return (float(config["shift_factor"]) if config.get("shift_factor") is not None else 0.0), 1.0
    return tuple(torch.tensor(config[k]).view(1, -1, 1, 1).to(like) for k in ("latents_mean", "latents_std"))


def scale(z: torch.Tensor, config) -> torch.Tensor:
    """A posterior sample -> the U-Net's latents."""
    mean, std = latent_stats(config, z)
    return (z - mean) * dict(config)["scaling_factor"] / std


def unscale(latents: torch.Tensor, config) -> torch.Tensor:
    """The U-Net's latents -> what the VAE decoder takes (:func:`scale` undone)."""
    mean, std = latent_stats(config, latents)
    return latents * std / dict(config)["scaling_factor"] + mean


@torch.no_grad()
def encode(vae, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> scaled latents: one posterior sample drawn from
    ``generator`` (on the CPU and moved, as diffusers draws it), or the posterior mean
    (``sample=False``); in the VAE's dtype, outside any autocast."""
    with torch.autocast(images.device.type, enabled=False):
        dist = vae.encode(images.to(vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
    return scale(z, vae.config)
