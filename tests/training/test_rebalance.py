"""Silent-signal data rebalancing (MIControlNet Sec. 4.1): which pixels are blanked, and to what."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlstack.errors import ControlstackError
from controlstack.training.rebalance import (
    BLANK,
    blank_value,
    keep_mask,
    labels_from_colours,
    rebalance,
    region_labels,
)


def _regions(b=3, size=16):
    """Four quadrant regions per sample (ids 0, 1, 7, 9)."""
    r = torch.zeros(b, 1, size, size)
    h = size // 2
    r[..., :h, h:] = 1
    r[..., h:, :h] = 7
    r[..., h:, h:] = 9
    return r


def test_rebalance_blanks_exactly_the_unselected_regions():
    g = torch.Generator().manual_seed(0)
    hints = torch.rand(3, 3, 16, 16, generator=g)
    before = hints.clone()
    regions = _regions()
    blank = BLANK["normal"]
    new, mask = rebalance(hints, regions, blank, 1.0, (0.5, 0.5), torch.Generator().manual_seed(1))
    assert torch.equal(hints, before)  # the input (and so the target image's batch) is never touched
    fill = torch.tensor(blank).view(1, 3, 1, 1).expand_as(new)
    for i in range(3):
        kept = [rid for rid in (0, 1, 7, 9) if bool(mask[i, 0][regions[i, 0] == rid].all())]
        blanked = [rid for rid in (0, 1, 7, 9) if bool((mask[i, 0][regions[i, 0] == rid] == 0).all())]
        assert len(kept) == 2 and len(blanked) == 2  # whole regions, round(0.5 * 4) of them kept
        inside = mask[i, 0].bool()
        assert torch.equal(new[i][:, inside], hints[i][:, inside])
        assert torch.equal(new[i][:, ~inside], fill[i][:, ~inside])


def test_rebalance_probability_zero_and_one_region():
    hints = torch.rand(2, 3, 8, 8)
    new, mask = rebalance(hints, _regions(2, 8), BLANK["canny"], 0.0, (0.0, 0.2), torch.Generator().manual_seed(0))
    assert torch.equal(new, hints) and bool((mask == 1).all())
    # at least one region is always kept, even with a keep fraction of 0
    m = keep_mask(_regions(1, 8)[0], 0.0, torch.Generator().manual_seed(0))
    assert 0 < float(m.mean()) < 1


def test_rebalance_is_seeded():
    hints, regions = torch.rand(4, 3, 8, 8), _regions(4, 8)
    a = rebalance(hints, regions, BLANK["depth"], 0.5, (0.2, 0.8), torch.Generator().manual_seed(5))[0]
    b = rebalance(hints, regions, BLANK["depth"], 0.5, (0.2, 0.8), torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)


def test_blank_values_and_errors():
    assert blank_value("depth") == (0.0, 0.0, 0.0)  # far, with near = bright
    assert blank_value("normal") == (128 / 255, 128 / 255, 1.0)  # the normal facing the camera
    assert blank_value("seg") == (0.0, 0.0, 0.0)
    with pytest.raises(ControlstackError, match="no blank value"):
        blank_value("mystery")


def test_region_labels_sources_keep_ids_when_resized():
    ids = np.zeros((20, 30), np.uint8)
    ids[:, 15:] = 5
    ids[5:10, 2:6] = 3
    labels = region_labels("instances", None, Image.fromarray(ids), resolution=10)
    assert labels.shape == (1, 10, 10)
    assert set(labels.unique().tolist()) <= {0.0, 3.0, 5.0}  # nearest: no blended ids
    seg = np.zeros((8, 8, 3), np.uint8)
    seg[:4] = (6, 230, 230)
    seg[4:, 4:] = (255, 0, 0)
    assert len(np.unique(labels_from_colours(seg))) == 3
    blocks = np.zeros((32, 32, 3), np.uint8)
    blocks[:16] = 200
    blocks[:, 16:, 1] = 120
    image = Image.fromarray(blocks)
    sp = region_labels("slic", image, None, resolution=32)
    assert sp.shape == (1, 32, 32) and len(sp.unique()) > 4
    with pytest.raises(ControlstackError, match="rebalance_regions"):
        region_labels("nope", image)
