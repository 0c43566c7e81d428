"""canny, softedge, scribble, lineart on skimage photographs and a synthetic step."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.morphology import skeletonize

from controlstack import annotators
from controlstack.annotators.edges import soft_edge_map


@pytest.mark.parametrize("low, high, l2", [(100, 200, False), (50, 120, True), (10, 10, False)])
def test_canny_is_opencv_canny(astronaut, low, high, l2):
    out = annotators.get("canny", low_threshold=low, high_threshold=high, l2_gradient=l2)(astronaut)
    ref = cv2.Canny(np.asarray(astronaut), low, high, L2gradient=l2)
    a = np.asarray(out)
    assert out.mode == "RGB" and out.size == astronaut.size
    assert np.array_equal(a[..., 0], ref) and np.array_equal(a[..., 1], ref) and np.array_equal(a[..., 2], ref)


def test_canny_on_camera_greyscale_equals_opencv_on_the_rgb_copy():
    from PIL import Image
    from skimage import data

    cam = Image.fromarray(data.camera())  # mode L: goes through to_rgb like every user image
    out = np.asarray(annotators.get("canny")(cam))[..., 0]
    assert np.array_equal(out, cv2.Canny(np.asarray(cam.convert("RGB")), 100, 200))


def test_softedge_in_unit_range_and_peaks_on_step(step_image):
    soft = soft_edge_map(np.asarray(step_image))
    assert soft.dtype == np.float32 and soft.min() >= 0.0 and soft.max() <= 1.0
    profile = soft[32]
    assert int(np.argmax(profile)) in (31, 32)
    assert profile.max() > 0.95                           # a full-contrast step reads ~1
    assert profile[:24].max() == 0.0 and profile[40:].max() == 0.0  # flat areas read 0
    p = int(np.argmax(profile))
    assert profile[p - 2] < profile[p - 1] < profile[p] > profile[p + 1] > profile[p + 2]  # graded
    assert np.array_equal(soft, soft[32:33].repeat(64, 0))  # the same on every row


def test_softedge_on_photo_is_graded_and_deterministic(coffee_small):
    a = annotators.get("softedge", resolution=None)
    x = np.asarray(a(coffee_small))[..., 0]
    assert np.array_equal(x, np.asarray(a(coffee_small))[..., 0])
    assert len(np.unique(x)) > 100            # graded
    assert 0.02 < (x > 128).mean() < 0.25     # boundaries, not a filled image
    safe = np.asarray(annotators.get("softedge", resolution=None, safe=True)(coffee_small))[..., 0]
    assert set(np.unique(safe)) <= {0, 128, 255}


@pytest.mark.parametrize("width", [1, 3, 5])
def test_scribble_is_thin_and_covers_strong_boundaries(coffee_small, width):
    rgb = np.asarray(coffee_small)
    sc = np.asarray(annotators.get("scribble", resolution=None, width=width)(coffee_small))[..., 0] > 0
    # local stroke width: twice the distance from a skeleton pixel to the background, minus one;
    # 90th percentile, because where two strokes run 1-2 px apart the dilation merges them
    dist = cv2.distanceTransform(sc.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    skel = skeletonize(sc)
    assert np.percentile(2 * dist[skel] - 1, 90) <= width
    assert sc.sum() / skel.sum() <= width + 0.5  # mean width = area / length
    strong = skeletonize(soft_edge_map(rgb) > 0.5)
    assert sc[strong].mean() >= 0.8


def test_scribble_jitter_and_drop_are_seeded(coffee_small):
    base = np.asarray(annotators.get("scribble", resolution=None)(coffee_small))
    j0 = np.asarray(annotators.get("scribble", resolution=None, jitter=3, drop=0.3, seed=0)(coffee_small))
    j0b = np.asarray(annotators.get("scribble", resolution=None, jitter=3, drop=0.3, seed=0)(coffee_small))
    j1 = np.asarray(annotators.get("scribble", resolution=None, jitter=3, drop=0.3, seed=1)(coffee_small))
    assert np.array_equal(j0, j0b)
    assert not np.array_equal(j0, j1) and not np.array_equal(j0, base)
    assert (j0 > 0).mean() < (base > 0).mean()  # 30% of strokes dropped


def test_lineart_standard_matches_sd_webui_formula(coffee_small):
    rgb = np.asarray(coffee_small)
    x = rgb.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    ref = (intensity * 127).clip(0, 255).astype(np.uint8)
    out = np.asarray(annotators.get("lineart", resolution=None)(coffee_small))[..., 0]
    assert np.array_equal(out, ref)


def test_lineart_xdog_draws_a_dark_line_only():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[:, 30:32] = 0  # a 2-px black line on white paper
    out = np.asarray(annotators.get("lineart", method="xdog", resolution=None)(img))[..., 0]
    assert out[:, 30:32].min() > 200
    assert out[:, :20].max() == 0 and out[:, 44:].max() == 0
