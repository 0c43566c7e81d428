"""ADE20K palette: labels -> colours -> labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlstack import annotators
from controlstack.annotators.seg import ADE20K_PALETTE, IGNORE, labels_to_palette, palette_to_labels
from controlstack.errors import ControlstackError


def test_palette_table_is_the_standard_one():
    assert ADE20K_PALETTE.shape == (150, 3)
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120]      # wall
    assert ADE20K_PALETTE[2].tolist() == [6, 230, 230]        # sky
    assert ADE20K_PALETTE[149].tolist() == [92, 0, 255]
    colours, counts = np.unique(ADE20K_PALETTE, axis=0, return_counts=True)
    assert colours[counts > 1].tolist() == [[140, 140, 140]]  # road (6) and skyscraper (48) share it


def test_labels_round_trip_exactly():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 150, size=(64, 80)).astype(np.uint8)
    labels[labels == 48] = 6          # the one colour the standard palette shares
    labels[:4] = IGNORE
    rgb = labels_to_palette(labels)
    assert np.array_equal(palette_to_labels(rgb), labels)
    every = np.array([[i for i in range(150) if i != 48] + [IGNORE]], np.uint8)
    assert np.array_equal(palette_to_labels(labels_to_palette(every)), every)


def test_seg_annotator_renders_label_images_and_passes_palette_images(tmp_path):
    labels = (np.arange(40 * 60) % 150).reshape(40, 60).astype(np.uint8)
    labels[labels == 48] = 7
    a = annotators.get("seg", resolution=None)
    for img in (Image.fromarray(labels, "L"), Image.fromarray(labels.astype(np.uint16)).convert("I")):
        out = np.asarray(a(img))
        assert np.array_equal(out, labels_to_palette(labels))
    p = Image.fromarray(labels, "L").convert("P")
    assert np.array_equal(np.asarray(a(p)), labels_to_palette(np.asarray(p)))
    back = np.asarray(a(Image.fromarray(labels_to_palette(labels))))
    assert np.array_equal(back, labels_to_palette(labels))
    # nearest-neighbour resizing invents no classes
    big = np.asarray(annotators.get("seg", resolution=80)(Image.fromarray(labels, "L")))
    assert big.shape == (80, 120, 3)
    assert set(map(tuple, big.reshape(-1, 3))) <= set(map(tuple, labels_to_palette(labels).reshape(-1, 3)))


def test_seg_rejects_photos_and_bad_labels(coffee_small):
    with pytest.raises(ControlstackError, match=r"seg: colour \(\d+, \d+, \d+\) at x=0, y=0 is not in the "
                                                r"ADE20K palette"):
        annotators.get("seg")(coffee_small)
    with pytest.raises(ControlstackError, match="seg: label 150 is outside the ADE20K classes"):
        annotators.get("seg")(Image.fromarray(np.full((4, 4), 150, np.uint8)))
