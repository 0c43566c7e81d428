"""The one place user images become trusted values: modes, sizes, resize modes, pixel perfect."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlstack.errors import ControlstackError
from controlstack.io.images import (
    array_to_pil,
    load_image,
    mask_to_array,
    pixel_perfect_resolution,
    resize_image,
    to_rgb,
    validate_image,
)


def test_rgba_composited_over_black_and_palette():
    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    rgba.putpixel((0, 0), (200, 100, 50, 255))
    out = np.asarray(to_rgb(rgba))
    assert out[0, 0].tolist() == [200, 100, 50] and out[1, 1].tolist() == [0, 0, 0]
    p = rgba.convert("RGB").convert("P")
    assert np.array_equal(np.asarray(to_rgb(p)), np.asarray(p.convert("RGB")))


def test_16_bit_rescaled_not_clipped():
    a = np.array([[0, 65535], [32768, 257]], np.uint16)
    out = np.asarray(to_rgb(Image.fromarray(a)))[..., 0]
    assert out.tolist() == [[0, 255], [128, 1]]


def test_cmyk_and_la():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    la = Image.new("LA", (2, 2), (180, 255))
    assert np.asarray(to_rgb(la))[0, 0].tolist() == [180, 180, 180]


@pytest.mark.parametrize("mode,expected", [("just_resize", (64, 32)), ("crop_and_resize", (64, 32)),
                                           ("resize_and_fill", (64, 32))])
def test_resize_modes_sizes(mode, expected):
    im = Image.new("RGB", (100, 100), (255, 255, 255))
    out = resize_image(im, 64, 32, mode)
    assert out.size == expected
    a = np.asarray(out)
    if mode == "resize_and_fill":  # a square fits as 32x32 in the middle, black bars either side
        assert a[:, :16].max() == 0 and a[:, 48:].max() == 0 and a[:, 16:48].min() == 255
    else:
        assert a.min() == 255


def test_crop_and_resize_keeps_centre():
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, 50:150] = 255  # the centre square is white
    out = np.asarray(resize_image(Image.fromarray(a), 50, 50, "crop_and_resize"))
    assert out.min() == 255


def test_pixel_perfect_rule():
    # 1024x512 image -> 512x512 output: cover scale max(512/512, 512/1024) = 1 -> short side 512
    assert pixel_perfect_resolution((1024, 512), 512, 512, "crop_and_resize") == 512
    # fit scale min(1, 0.5) = 0.5 -> 256
    assert pixel_perfect_resolution((1024, 512), 512, 512, "resize_and_fill") == 256
    assert pixel_perfect_resolution((300, 300), 600, 600, "just_resize") == 600


def test_bad_images(tmp_path):
    with pytest.raises(ControlstackError, match="zero size"):
        validate_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ControlstackError, match="larger than 4096"):
        validate_image(Image.new("L", (5000, 10)))
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ControlstackError):
        load_image(bad)
    with pytest.raises(ControlstackError, match="NaN"):
        array_to_pil(np.full((4, 4), np.nan))


def test_masks():
    assert mask_to_array(np.array([[True, False]])).tolist() == [[1.0, 0.0]]
    assert mask_to_array(Image.new("L", (2, 1), 51))[0, 0] == pytest.approx(0.2)
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    assert mask_to_array(rgba).tolist() == [[1.0, 0.0]]  # transparency = outside the region
    with pytest.raises(ControlstackError):
        mask_to_array(np.ones((3, 3)) * 1.5)


def test_labelled_grid_places_tiles_and_text():
    from controlstack.io.png import make_labelled_grid

    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    grid = np.asarray(make_labelled_grid([("first", [red, blue]), ("second row", [blue, red])], ["a", "b"]))
    h, w, _ = grid.shape
    label_w, title_h = w - 2 * (32 + 2), h - 2 * (32 + 2)
    assert label_w > 20 and title_h > 5
    assert (grid[title_h + 5, label_w + 5] == (255, 0, 0)).all()        # row 1, tile 1
    assert (grid[title_h + 34 + 5, label_w + 5] == (0, 0, 255)).all()   # row 2, tile 1
    assert (grid[title_h + 34 + 16, :label_w] < 128).any()              # the row label is drawn
    assert (grid[:title_h, label_w:] < 128).any()                       # the column titles are drawn


def test_saved_pngs_get_the_users_umask_not_0600(tmp_path):
    """Issue 22 §3.1: the temp file of the atomic save is renamed with the usual permissions."""
    import os

    from controlstack.io.png import atomic_save

    old = os.umask(0o022)
    try:
        path = atomic_save(Image.new("RGB", (4, 4)), tmp_path / "a.png", {"prompt": "x"})
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_save(Image.new("RGB", (4, 4)), tmp_path / "b.png").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_infotext_spells_as_sd_webui_and_travels_with_returned_images(pipe, tiny_controlnets, hint_images):
    from controlstack import Control

    images = pipe("a red box", [Control(tiny_controlnets[0], hint_images[0], preprocess="canny",
                                        resize_mode="crop_and_resize")],
                  steps=1, width=64, height=64, seed=3, scheduler="dpmpp_2m", mode="prompt", batch=2, progress=False)
    text = images[1].info["parameters"]
    assert "Sampler: DPM++ 2M" in text and "Batch pos: 1" in text
    assert 'Module: canny, Model: ControlNetModel' in text
    assert "Resize Mode: Crop and Resize, Control Mode: My prompt is more important" in text
