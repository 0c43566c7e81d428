"""Latent cache: the frozen VAE's posterior of every training row, computed once per (VAE, dataset).

The diffusion recipes (base, ControlNet) lock the VAE, so ``vae.encode(x)`` of a row is the same
diagonal Gaussian ``q(z|x) = N(μ, σ²)`` at every epoch (LDM, Rombach et al. 2022, Sec. 3). At
128 px the encoder costs about as much as a training step of a small U-Net on 16x16 latents, so
the recipes encode the dataset once, keep ``(μ, σ)`` (fp32, ~160 MB for 20k rows of 8x16x16) and
draw ``z = (μ + σ ε) · scaling_factor`` per step with the step's generator -- the same sample
``encode_latents`` draws (one fresh posterior sample per step, as SD's training does), only without
re-running the encoder or decoding the PNG.

The file is keyed by the dataset's fingerprint, its length, the resolution and a hash of the VAE's
weights; a mismatch rebuilds it, so a stale cache can never feed the wrong latents.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

from controlstack.models.vae import encode, scale
from controlstack.training.data import RowTransform

ROW = "row"  # the column the recipes add so a batch knows which cached rows it holds


def vae_digest(vae) -> str:
    """sha256 over the VAE's encoder weights (what the posterior depends on) and its config."""
    h = hashlib.sha256(repr(sorted((k, v) for k, v in vae.config.items() if not k.startswith("_"))).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    """``(μ, σ)`` per row; :meth:`sample` draws scaled latents for the rows of a batch."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float):
        self.mean, self.std, self.scaling_factor = mean, std, scaling_factor

    def sample(self, rows: torch.Tensor, generator: torch.Generator, device) -> torch.Tensor:
        mean, std = self.mean[rows].to(device), self.std[rows].to(device)
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        return scale(mean + std * noise, {"scaling_factor": self.scaling_factor})  # models/vae.py's rule

    @classmethod
    @torch.no_grad()
    def build(cls, vae, dataset, resolution: int, batch_size: int = 64, desc: str = "encode latents") -> LatentCache:
        transform = RowTransform(resolution, targets=("image",))
        means, stds = [], []
        device = next(vae.parameters()).device
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
            rows = transform(dataset[start:start + batch_size])
            x = torch.stack(rows["image"]).to(device)
            with torch.autocast(device.type, enabled=False):
                dist = vae.encode(x.to(vae.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return cls(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))

    @classmethod
    def load_or_build(cls, path: str | Path, vae, dataset, resolution: int) -> LatentCache:
        """Read ``path`` when its key matches this VAE and dataset, else encode and write it."""
        path = Path(path)
        rows_id = getattr(dataset, "source_fingerprint", getattr(dataset, "_fingerprint", ""))  # data.py sets it
        key = {"dataset": str(rows_id), "rows": str(len(dataset)), "resolution": str(resolution),
               "vae": vae_digest(vae)}
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                stored = f.metadata() or {}
            if all(stored.get(k) == v for k, v in key.items()):
                t = load_file(str(path))
                return cls(t["mean"], t["std"], float(stored["scaling_factor"]))
            print(f"latent cache '{path}' was made for another VAE or dataset; rebuilding it", flush=True)
        cache = cls.build(vae, dataset, resolution)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        save_file({"mean": cache.mean.contiguous(), "std": cache.std.contiguous()}, str(tmp),
                  metadata={**key, "scaling_factor": repr(cache.scaling_factor)})
        tmp.replace(path)  # atomic: an interrupted build never leaves a half file under the real name
        return cache


def batch_latents(vae, batch: dict, generator: torch.Generator, device, cache: LatentCache | None = None):
    """A batch's scaled latents: drawn from the cache's posteriors (rows ``batch["row"]``), else one
    posterior sample of the encoder; the same draws from ``generator`` either way."""
    if cache is not None:
        return cache.sample(batch["row"].cpu(), generator, device)
    return encode(vae, batch["image"], generator)


def with_rows(dataset):
    """The dataset plus a ``row`` column (its index), taken before any shuffling."""
    return dataset.add_column(ROW, list(range(len(dataset))))


def training_rows(path: str, accelerator, vae, dataset, resolution: int, hints: tuple[str, ...] = (),
                  regions: tuple[str, str] | None = None):
    """(cache or None, dataset, RowTransform) for a diffusion recipe: with a cache ``path`` the rows
    carry their index and the image is never decoded; without, the transform decodes it.
    ``regions``: (source, column) of the rebalancing's region labels (``RowTransform``)."""
    if not path:
        return None, dataset, RowTransform(resolution, targets=("image",), hints=hints, caption="text",
                                           regions=regions)
    with accelerator.main_process_first():  # the main process builds the file, the others read it
        cache = LatentCache.load_or_build(path, vae, dataset, resolution)
    return cache, with_rows(dataset), RowTransform(resolution, targets=(), hints=hints, caption="text",
                                                   passthrough=(ROW,), regions=regions)
