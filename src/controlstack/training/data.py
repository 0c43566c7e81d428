"""Training data: an HF ``datasets`` folder -> seeded, resumable batches of tensors.

The layout is diffusers' ``train_controlnet.py``'s (an ``image`` column, a caption column, one
column per condition) and the one ``controlstack world export`` writes. Images go through
``io/images.py`` (the one place images are converted), targets land in [-1, 1] (the VAE's range),
hints in [0, 1] (the ControlNet paper's convention for ``c_f``).

Resumability: the dataloader is prepared by ``accelerate`` with its seedable sampler
(``use_seedable_sampler=True``, ``data_seed=config.seed``), so epoch ``e`` is always the same
permutation (seed + e) on every run and every process; :func:`batches` walks epochs from any
micro-batch position, skipping the consumed part of the current epoch with
``accelerator.skip_first_batches`` (accelerate's documented resume path).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from controlstack.errors import ControlstackError, require
from controlstack.io.images import resize_image, to_rgb
from controlstack.training.rebalance import region_labels


def load_image_dataset(path: str, columns: dict[str, str]):
    """``datasets.load_from_disk`` with user-facing checks; keeps ``columns`` (dataset name ->
    the recipe's name) and renames them, so recipes always see ``image`` / ``text`` / ``hint``."""
    import datasets  # local: heavy, only this path needs it

    p = Path(path)
    if not p.exists():
        raise ControlstackError(f"dataset folder '{path}' not found; export one with `controlstack world export`")
    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise ControlstackError(f"'{path}' is not a datasets folder; create it with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        require("train" in ds, f"dataset '{path}' has splits {list(ds)} but no 'train'; save the train split")
        ds = ds["train"]
    missing = [c for c in columns if c not in ds.column_names]
    require(not missing, f"dataset '{path}' has no column(s) {', '.join(missing)}; "
                         f"it has {', '.join(ds.column_names)} (set image_column / caption_column / condition)")
    require(len(ds) > 0, f"dataset '{path}' is empty; export some rows first")
    source = ds._fingerprint
    ds = ds.select_columns(list(columns))
    renames = {k: v for k, v in columns.items() if k != v}
    ds = ds.rename_columns(renames) if renames else ds
    # the rows' identity, independent of which columns a recipe keeps (the latent cache's key:
    # the base and every ControlNet share one cache although their column sets differ)
    ds.source_fingerprint = f"{source}:{next((k for k, v in columns.items() if v == 'image'), '')}"
    return ds


def image_to_tensor(image, resolution: int, signed: bool) -> torch.Tensor:
    """PIL (any mode) -> float32 (3, R, R): crop-and-resize to a square, [-1, 1] or [0, 1]."""
    image = resize_image(to_rgb(image), resolution, resolution, "crop_and_resize")
    a = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return a * 2.0 - 1.0 if signed else a


class RowTransform:
    """``Dataset.with_transform`` callable: image columns -> tensors, the caption stays a string.

    ``targets`` are scaled to [-1, 1], ``hints`` to [0, 1], ``passthrough`` columns (e.g. the row
    index of the latent cache) are copied as they are; ``regions`` = (source, column) adds the
    rows' region labels for data rebalancing (``rebalance.region_labels``; column "" for
    superpixels of ``image``); picklable so dataloader workers work.
    """

    def __init__(self, resolution: int, targets: tuple[str, ...], hints: tuple[str, ...] = (),
                 caption: str | None = None, passthrough: tuple[str, ...] = (),
                 regions: tuple[str, str] | None = None):
        self.resolution, self.targets, self.hints, self.caption = resolution, targets, hints, caption
        self.passthrough = passthrough
        self.regions = regions

    def __call__(self, batch: dict) -> dict:
        out: dict = {}
        for name in self.targets:
            out[name] = [image_to_tensor(im, self.resolution, True) for im in batch[name]]
        for name in self.hints:
            out[name] = [image_to_tensor(im, self.resolution, False) for im in batch[name]]
        if self.caption is not None:
            out[self.caption] = [str(t) for t in batch[self.caption]]
        for name in self.passthrough:
            out[name] = list(batch[name])
        if self.regions is not None:
            source, column = self.regions
            images, maps = batch["image"], batch[column] if column else [None] * len(batch["image"])
            out["regions"] = [region_labels(source, im, m, self.resolution) for im, m in zip(images, maps)]
        return out


def make_dataloader(dataset, transform: RowTransform, batch_size: int, num_workers: int, shuffle: bool = True):
    """A plain torch DataLoader; ``accelerator.prepare`` turns its RandomSampler seedable."""
    require(len(dataset) >= batch_size,
            f"dataset has {len(dataset)} rows, fewer than batch_size={batch_size}; lower batch_size")
    return torch.utils.data.DataLoader(
        dataset.with_transform(transform),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=True,  # every step sees a full batch: step i is the same work on every run
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # no worker restart per epoch (an epoch is seconds on a GPU)
    )


def batches(accelerator, loader, start: int) -> Iterator[dict]:
    """Endless batches from micro-batch ``start`` (epoch ``start // len``, then the rest of it)."""
    per_epoch = len(loader)
    require(per_epoch > 0, "the dataloader yields no batch per process; lower batch_size or add rows")
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader.set_epoch(epoch)  # sampler seed = data_seed + epoch, the same on every run
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        epoch, skip = epoch + 1, 0


def first_rows(dataset, n: int, transform: RowTransform) -> dict:
    """The first ``n`` rows, transformed and stacked: the fixed validation batch."""
    n = min(n, len(dataset))
    rows = transform(dataset[:n])
    return {k: torch.stack(v) if v and torch.is_tensor(v[0]) else v for k, v in rows.items()}


# -- object-weighted loss (TrainConfig.object_column / object_weight) ---------------------------

def object_columns(config) -> dict[str, str]:
    """``{object_column: "objects"}`` when the config weights objects, else ``{}`` (for
    :func:`load_image_dataset`'s ``columns``)."""
    return {config.object_column: "objects"} if config.object_column else {}


def object_hints(config) -> tuple[str, ...]:
    """``("objects",)`` when the config weights objects, else ``()`` (for :class:`RowTransform`'s
    ``hints``: the id map is scaled like a hint, to [0, 1])."""
    return ("objects",) if config.object_column else ()


def object_map(ids: torch.Tensor, min_id: int) -> torch.Tensor:
    """A grey id-map hint batch (B, C, H, W) in [0, 1] -> (B, 1, H, W) 0/1 map of ids >= ``min_id``."""
    return (ids[:, :1] * 255.0 > min_id - 0.5).float()


def batch_objects(batch: dict, config) -> torch.Tensor | None:
    """The batch's 0/1 object map (B, 1, H, W), or None when the config does not weight objects."""
    return object_map(batch["objects"], config.object_min_id) if config.object_column else None


def weighted_mean(err: torch.Tensor, objects: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Mean of ``err`` (B, C, h, w) with object pixels weighted ``1 + weight``, normalised by the
    mean weight so the loss keeps its scale. ``objects`` (B, 1, H, W) is area-pooled to ``err``'s
    size: at a latent pixel the weight grows with the fraction of its 8x8 image pixels that are
    object, so a small object raises the weight of the one latent pixel it lies in."""
    if objects is None or weight == 0:
        return err.mean()
    if objects.shape[-2:] != err.shape[-2:]:
        objects = torch.nn.functional.adaptive_avg_pool2d(objects, err.shape[-2:])
    w = 1.0 + weight * objects.to(err)
    return (err * w).mean() / w.mean()
