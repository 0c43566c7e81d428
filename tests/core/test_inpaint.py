"""sd-webui's inpainting options around the pipeline's inpainting (``controlstack/inpaint.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from controlstack.errors import ControlstackError
from controlstack.inpaint import InpaintOptions, blur, crop_control, crop_region, expand_region, fill, prepare


@pytest.fixture(scope="module")
def pipe(tiny_components, tiny_controlnets):
    from controlstack import Pipeline

    return Pipeline(tiny_components, controlnets={"canny": tiny_controlnets[0]}, name="tiny")


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    m = np.zeros((80, 96), np.uint8)
    m[20:40, 30:50] = 255
    return init, Image.fromarray(m)


def _far_from(mask: Image.Image, margin: int) -> np.ndarray:
    """Pixels more than ``margin`` px from the mask (outside what the blur reaches)."""
    from PIL import ImageFilter

    return ~np.asarray(mask.filter(ImageFilter.MaxFilter(2 * margin + 1))).astype(bool)


def generate(pipe, scene, options, **kw):
    init, mask = scene
    return pipe("a cube", steps=3, seed=1, width=64, height=64, init_image=init, inpaint_mask=mask, inpaint=options,
                progress=False, return_result=True, **kw)


def test_only_masked_keeps_the_init_size_and_every_pixel_outside_the_mask(pipe, scene):
    init, mask = scene
    result = generate(pipe, scene, InpaintOptions(full_res=True, padding=4))
    out = np.asarray(result.images[0]).astype(int)
    assert result.images[0].size == init.size == (96, 80)
    far = _far_from(mask, 11)  # blur 4: kernel 2 * int(10.5) + 1 = 21, so 10 px reach
    assert np.array_equal(out[far], np.asarray(init).astype(int)[far])
    assert np.abs(out[20:40, 30:50] - np.asarray(init)[20:40, 30:50]).mean() > 20  # the masked box is repainted
    assert result.parameters["width"] == 96 and result.parameters["img2img"]["inpaint_options"]["full_res"] is True
    text = result.images[0].info["parameters"]
    assert "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 4, Masked content: original" in text


def test_whole_picture_pastes_the_init_image_back_outside_the_mask(pipe, scene):
    init, mask = scene
    kept = generate(pipe, scene, InpaintOptions())
    raw = generate(pipe, scene, None)  # diffusers' behaviour: every pixel went through the VAE
    ref = np.asarray(init.resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
    far = _far_from(mask.resize((64, 64), Image.Resampling.NEAREST), 11)
    assert np.array_equal(np.asarray(kept.images[0]).astype(int)[far], ref[far])
    assert np.abs(np.asarray(raw.images[0]).astype(int)[far] - ref[far]).mean() > 5
    assert "inpaint_options" not in raw.parameters["img2img"]


def test_invert_repaints_what_is_not_drawn(pipe, scene):
    init, mask = scene
    out = np.asarray(generate(pipe, scene, InpaintOptions(invert=True, mask_blur=0)).images[0]).astype(int)
    ref = np.asarray(init.resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
    inside = np.asarray(mask.resize((64, 64), Image.Resampling.NEAREST)) > 0
    inner = np.zeros_like(inside)
    inner[21:28, 25:29] = True  # inside the drawn box (rows 16-32, columns 20-33 at 64 px) past the resize's reach
    assert np.array_equal(out[inner & inside], ref[inner & inside])
    assert np.abs(out[~inside] - ref[~inside]).mean() > 20


def test_latent_fills_change_the_masked_start_only(pipe, scene):
    a, b, c = (np.asarray(generate(pipe, scene, InpaintOptions(fill=f, mask_blur=0)).images[0]).astype(int)
               for f in ("original", "latent_noise", "latent_nothing"))
    small = scene[1].resize((64, 64), Image.Resampling.NEAREST)
    inside, far = np.asarray(small) > 0, _far_from(small, 5)  # 5 px: the Lanczos-resized mask's reach
    for x, y in ((a, b), (a, c), (b, c)):
        assert np.abs(x - y)[inside].max() > 10 and np.array_equal(x[far], y[far])


def test_fill_paints_the_hole_with_the_colours_around_it():
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = (200, 0, 0)
    image[:, 16:] = (0, 0, 200)
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 12:20] = 255
    out = np.asarray(fill(Image.fromarray(image), Image.fromarray(m))).astype(int)
    assert np.array_equal(out[m == 0], image[m == 0])  # outside the hole: unchanged
    assert out[16, 12, 0] > out[16, 12, 2] and out[16, 19, 2] > out[16, 19, 0]  # each side's colour flows in


def test_blur_uses_sd_webuis_kernel():
    import cv2

    m = np.zeros((41, 41), np.uint8)
    m[20, 20] = 255
    out = np.asarray(blur(Image.fromarray(m), 4))
    k = 2 * int(2.5 * 4 + 0.5) + 1
    assert np.array_equal(out, cv2.GaussianBlur(cv2.GaussianBlur(m, (k, 1), 4), (1, k), 4))
    assert out[20, 26] > 0 and out[20, 31] == 0  # the kernel reaches (k - 1) / 2 = 10 px


def test_crop_region_grows_to_the_generation_aspect_and_stays_inside():
    m = np.zeros((100, 200), np.uint8)
    m[40:50, 10:90] = 255
    box = crop_region(m, 5)
    assert box == (5, 35, 95, 55)
    x1, y1, x2, y2 = expand_region(box, 64, 64, 200, 100)
    assert (x2 - x1, y2 - y1) == (90, 90) and y1 >= 0 and y2 <= 100
    assert expand_region((0, 0, 10, 90), 64, 64, 200, 100) == (0, 0, 90, 90)  # pushed back inside at the edge


def test_controls_are_cut_to_the_same_region():
    hint = np.zeros((40, 48, 3), np.uint8)  # half the init image's size
    hint[10:20, 15:25] = 255
    out = np.asarray(crop_control(Image.fromarray(hint), (20, 10, 60, 50), (96, 80), 64, 64))
    assert out.shape == (64, 64, 3) and out[32, 32].min() > 200 and out[2, 2].max() == 0


def test_prepare_whole_picture_overlay_is_opaque_outside_the_mask():
    init = Image.new("RGB", (64, 64), (10, 20, 30))
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    p = prepare(init, Image.fromarray(m), InpaintOptions(mask_blur=0), 64, 64)
    alpha = np.asarray(p.overlay)[..., 3]
    assert alpha[0, 0] == 255 and alpha[32, 32] == 0 and p.crop is None and p.size == (64, 64)


@pytest.mark.parametrize("kw, message", [({"mask_blur": -1}, "mask_blur"), ({"padding": 1000}, "padding"),
                                         ({"fill": "blur"}, "fill"), ({"invert": 1}, "invert")])
def test_bad_options_are_one_line_errors(kw, message):
    with pytest.raises(ControlstackError, match=message):
        InpaintOptions(**kw)
