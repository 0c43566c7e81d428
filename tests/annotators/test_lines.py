"""lines: the 4 sides of a drawn rectangle, within 2 px."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from controlstack import annotators

X0, Y0, X1, Y1 = 40, 30, 200, 150
SIDES = [((X0, Y0), (X1, Y0)), ((X1, Y0), (X1, Y1)), ((X1, Y1), (X0, Y1)), ((X0, Y1), (X0, Y0))]


def _point_line_distance(p, a, b):
    p, a, b = (np.asarray(v, float) for v in (p, a, b))
    d = b - a
    return abs(d[0] * (p[1] - a[1]) - d[1] * (p[0] - a[0])) / np.linalg.norm(d)


@pytest.mark.parametrize("thickness, filled", [(1, False), (3, False), (5, False), (-1, True)])
def test_rectangle_gives_its_four_sides(thickness, filled):
    img = np.zeros((192, 256, 3), np.uint8)
    cv2.rectangle(img, (X0, Y0), (X1, Y1), (255, 255, 255), thickness)
    lines = annotators.get("lines", resolution=None)
    segs = lines.segments(img)
    assert len(segs) == 4
    matched = set()
    for x1, y1, x2, y2 in segs:
        for k, (a, b) in enumerate(SIDES):
            if max(_point_line_distance((x1, y1), a, b), _point_line_distance((x2, y2), a, b)) <= 2.0:
                # and it spans the side: endpoints within 2 px of the corners, in either order
                e1, e2 = np.array([x1, y1]), np.array([x2, y2])
                a, b = np.array(a, float), np.array(b, float)
                err = min(max(np.linalg.norm(e1 - a), np.linalg.norm(e2 - b)),
                          max(np.linalg.norm(e1 - b), np.linalg.norm(e2 - a)))
                if err <= 2.0 + max(thickness, 0) // 2:  # a thick stroke's outer corner lies further out
                    matched.add(k)
    assert matched == {0, 1, 2, 3}
    drawn = np.asarray(lines(img))[..., 0] > 0
    assert drawn[Y0 - 2:Y0 + 3, 60:180].any(axis=0).all()   # the top side is drawn along its length
    assert drawn[40:140, X1 - 2:X1 + 3].any(axis=1).all()    # and the right side
    assert not drawn[60:120, 80:160].any()                   # nothing inside


def test_low_contrast_segments_are_dropped():
    img = np.full((128, 128, 3), 100, np.uint8)
    cv2.line(img, (10, 64), (118, 64), (120, 120, 120), 3)  # contrast 20/255 ~ 0.08
    cv2.line(img, (64, 10), (64, 118), (255, 255, 255), 3)
    segs = annotators.get("lines", resolution=None, value_threshold=0.1).segments(img)
    assert len(segs) == 1 and abs(segs[0, 0] - 64) <= 2 and abs(segs[0, 2] - 64) <= 2
    faint = annotators.get("lines", resolution=None, value_threshold=0.0).segments(img)
    horizontal = faint[np.abs(faint[:, 1] - faint[:, 3]) < 1]
    assert len(horizontal) == 2 and np.abs(horizontal[:, [1, 3]] - 64).max() <= 2  # split at the crossing


def test_photo_gives_lines_deterministically(astronaut):
    a = annotators.get("lines")
    out = np.asarray(a(astronaut))
    assert np.array_equal(out, np.asarray(a(astronaut)))
    assert set(np.unique(out)) == {0, 255} and 0.01 < (out[..., 0] > 0).mean() < 0.2
