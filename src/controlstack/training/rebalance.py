"""Silent-signal data rebalancing (Minimal Impact ControlNet, Sec. 4.1 and Appendix F.1).

A ControlNet trained on whole conditions learns that where its condition says nothing (no edge,
no pose, far depth) the image is flat: edge-free regions of real photographs are mostly sky,
walls and blur. When two controls share an image, one control's silence then suppresses the
texture the other asks for. MIControlNet rebalances the data: each training image is split into
regions, the condition is kept only inside a random subset of them and *blanked* elsewhere, while
the target image stays whole -- so the model sees textured image regions under a silent signal.

Regions (``rebalance_regions`` in the ControlNet config):

* ``instances``  -- a grey id map column (the world's exact instance masks; every id is a region);
* ``seg``        -- a colour segmentation column (every distinct colour is a region);
* ``slic``       -- superpixels of the image (``skimage.segmentation.slic``), for data without either.

"Blank" is what each condition type means by *nothing* (:data:`BLANK`): black for edge, line,
scribble and pose maps; the far value (0: near is bright) for depth; the normal facing the camera
for normal maps; black (ADE20K's "unlabeled") for segmentation.

The random choices are made in the training loop with the step's generator
(``TrainingSession.step_generator``), so a resumed run rebalances exactly as the killed one did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from skimage.segmentation import slic

from controlstack.errors import ControlstackError

#: condition type -> the hint colour (RGB in [0, 1]) that means "no signal here".
BLANK: dict[str, tuple[float, float, float]] = {
    "canny": (0.0, 0.0, 0.0),
    "softedge": (0.0, 0.0, 0.0),
    "hed": (0.0, 0.0, 0.0),
    "scribble": (0.0, 0.0, 0.0),
    "lineart": (0.0, 0.0, 0.0),
    "mlsd": (0.0, 0.0, 0.0),
    "pose": (0.0, 0.0, 0.0),
    "depth": (0.0, 0.0, 0.0),               # near = bright, so far = 0
    "normal": (128 / 255, 128 / 255, 1.0),  # (n + 1) / 2 of the normal facing the camera
    "seg": (0.0, 0.0, 0.0),                 # ADE20K's "unlabeled"
}
REGION_SOURCES = ("instances", "seg", "slic")
SLIC_SEGMENTS = 24  # superpixels per image: about the world's objects + sky + ground, a few per object


def blank_value(condition: str) -> tuple[float, float, float]:
    """The blank colour of a condition column; unknown columns fail with the known ones."""
    for name, value in BLANK.items():
        if condition == name or condition.startswith(name):
            return value
    raise ControlstackError(
        f"data rebalancing: no blank value for condition '{condition}'; "
        f"known: {', '.join(BLANK)} (name the column after one of them)"
    )


def labels_from_ids(ids: np.ndarray) -> np.ndarray:
    """A grey id map (H, W) or (H, W, C) -> int32 labels: each id is one region."""
    ids = ids[..., 0] if ids.ndim == 3 else ids
    return ids.astype(np.int32)


def labels_from_colours(seg: np.ndarray) -> np.ndarray:
    """A colour segmentation (H, W, 3) uint8 -> int32 labels: each distinct colour is a region."""
    if seg.ndim == 2:
        return seg.astype(np.int32)
    flat = seg[..., 0].astype(np.int32) << 16 | seg[..., 1].astype(np.int32) << 8 | seg[..., 2].astype(np.int32)
    return np.unique(flat, return_inverse=True)[1].reshape(flat.shape).astype(np.int32)


def labels_from_slic(image: np.ndarray, segments: int = SLIC_SEGMENTS) -> np.ndarray:
    """Superpixels of an RGB image (H, W, 3) -> int32 labels (deterministic for an image)."""
    return slic(image, n_segments=segments, compactness=10.0, start_label=0).astype(np.int32)


def region_labels(source: str, row_image, row_regions=None, resolution: int | None = None) -> torch.Tensor:
    """One training row's region labels as a (1, R, R) float tensor, cropped and resized like the
    row's images (``crop_and_resize``) but with nearest-neighbour sampling so ids stay ids."""
    from controlstack.io.images import to_rgb  # local: heavy, only this path needs it

    if source not in REGION_SOURCES:
        raise ControlstackError(f"rebalance_regions '{source}' is unknown; choose one of {', '.join(REGION_SOURCES)}")
    if source == "slic":
        labels = labels_from_slic(np.asarray(to_rgb(row_image)))
    elif source == "instances":
        labels = labels_from_ids(np.asarray(row_regions))
    else:
        labels = labels_from_colours(np.asarray(to_rgb(row_regions)))
    t = torch.from_numpy(labels).float()[None, None]
    if resolution is not None:
        h, w = labels.shape
        scale = resolution / min(h, w)  # cover, then centre-crop (crop_and_resize)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        t = torch.nn.functional.interpolate(t, size=(nh, nw), mode="nearest")
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        t = t[..., top:top + resolution, left:left + resolution]
    return t[0]


def keep_mask(regions: torch.Tensor, keep_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(1, H, W) labels -> (1, H, W) 0/1 mask of a random subset of ``round(f · n)`` regions (at
    least one region is kept, so the sample still teaches the condition somewhere)."""
    ids = torch.unique(regions)
    n_keep = max(1, min(len(ids), round(keep_fraction * len(ids))))
    chosen = ids[torch.randperm(len(ids), generator=generator)[:n_keep]]
    return torch.isin(regions, chosen).to(torch.float32)


def rebalance(
    hints: torch.Tensor,                    # (B, C, H, W) conditions in [0, 1]
    regions: torch.Tensor,                  # (B, 1, H, W) region labels
    blank: Sequence[float],                 # the condition's blank colour, one value per channel
    probability: float,                     # chance that a sample is rebalanced at all
    keep_range: tuple[float, float],        # fraction of regions kept, drawn uniformly from it
    generator: torch.Generator,             # the step's generator (exact resume)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blank each selected sample's condition outside a random subset of its regions.

    Returns the new hints and the (B, 1, H, W) keep masks (all ones for samples left whole). The
    draws happen for every sample whatever the outcome, so the random stream does not depend on
    the data."""
    b = hints.shape[0]
    selected = torch.rand(b, generator=generator) < probability
    fractions = keep_range[0] + (keep_range[1] - keep_range[0]) * torch.rand(b, generator=generator)
    masks = []
    for i in range(b):
        m = keep_mask(regions[i].cpu(), float(fractions[i]), generator)
        masks.append(m if bool(selected[i]) else torch.ones_like(m))
    mask = torch.stack(masks).to(hints.device, hints.dtype)
    fill = torch.tensor(list(blank), dtype=hints.dtype, device=hints.device)[: hints.shape[1]].view(1, -1, 1, 1)
    return hints * mask + fill * (1 - mask), mask


def preview_grid(images: torch.Tensor, hints: torch.Tensor, rebalanced: torch.Tensor, masks: torch.Tensor):
    """Rows of image | condition | kept regions | rebalanced condition (the start-of-training PNG)."""
    from controlstack.io.png import make_labelled_grid  # local: heavy, only this path needs it
    from controlstack.training.validation import tensor_to_pil  # local: heavy, only this path needs it

    rows = []
    for i, (im, h, m, r) in enumerate(zip(tensor_to_pil(images, signed=True), tensor_to_pil(hints, signed=False),
                                          tensor_to_pil(masks.expand(-1, 3, -1, -1), signed=False),
                                          tensor_to_pil(rebalanced, signed=False))):
        rows.append((f"row {i}", [im, h, m, r]))
    return make_labelled_grid(rows, ["image", "condition", "kept regions", "rebalanced"])
