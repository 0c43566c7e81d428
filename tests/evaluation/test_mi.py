"""The MI evaluation protocol's pieces on small hand-checked arrays."""

from __future__ import annotations

import numpy as np
import pytest

from controlstack.errors import ControlstackError
from controlstack.evaluation.asym import condition_of
from controlstack.evaluation.mi import box_mask, brief_caption, composite, place, total_variation


def test_total_variation_by_hand():
    img = np.zeros((4, 4, 3), np.uint8)
    img[:, 2:] = 255  # one vertical step between columns 1 and 2
    # 12 horizontal pairs (3 per row), one per row crosses the step: 4 of 12 at 1.0; 12 vertical pairs at 0
    assert total_variation(img) == pytest.approx(4 / 24)
    left = np.zeros((4, 4), bool)
    left[:, :2] = True
    assert total_variation(img, left) == 0.0  # the step lies between the region and the rest
    assert np.isnan(total_variation(img, np.zeros((4, 4), bool)))
    assert total_variation(img.astype(np.float32) / 255) == pytest.approx(4 / 24)


def test_brief_caption():
    full = "a gray striped cone right of a gray cube, a white horse behind a running person in purple on dirt"
    assert brief_caption(full) == "a gray striped cone on dirt"
    assert brief_caption("a cyan checkered sphere on grass") == "a cyan checkered sphere on grass"
    assert brief_caption("an empty scene on sand") == "an empty scene on sand"


def test_composite_places_each_condition_in_its_half_and_blanks_the_rest():
    rng = np.random.default_rng(0)
    size = 64
    places = [place(size, 0, rng), place(size, 1, rng)]
    for p, side in zip(places, (0, 1)):
        x, y, s = p.box
        assert side * size // 2 <= x and x + s <= (side + 1) * size // 2 and 0 <= y and y + s <= size
    conds = [np.full((size, size), 200, np.uint8), np.full((size, size, 3), 90, np.uint8)]
    a, b = composite(conds, places, [(0, 0, 0), (0.5, 0.5, 1.0)], size)
    assert (a[box_mask(size, places[0].box)] == 200).all() and (a[~box_mask(size, places[0].box)] == 0).all()
    assert (b[box_mask(size, places[1].box)] == 90).all()
    assert (b[~box_mask(size, places[1].box)] == (128, 128, 255)).all()


def test_condition_of_a_controlnet():
    assert condition_of("canny") == "canny" and condition_of("mi-seg") == "seg"
    with pytest.raises(ControlstackError, match="--condition"):
        condition_of("/some/folder")
