"""sd-webui's inpainting options around the pipeline's inpainting (``img2img.py``).

The pipeline inpaints as diffusers does: the mask is binarised, the known region is blended back
into the latents after every step, and the decoded image is returned as it is -- so the pixels
outside the mask come back through the VAE, a little changed. sd-webui's img2img adds steps
around that, which its users and API clients count on (:class:`InpaintOptions`, each named as its
API field):

1. ``inpainting_mask_invert``: repaint what is *not* drawn;
2. ``mask_blur``: a Gaussian blur of the mask, separable, kernel ``2 * int(2.5 * blur + 0.5) + 1``;
3. ``inpaint_full_res`` ("Only masked"): the mask's bounding box plus ``padding``, widened to the
   output's aspect ratio, is cut out, generated at the full output size and scaled back into place
   -- small regions get all the pixels; the output keeps the init image's size;
4. ``inpainting_fill`` ("Masked content"): ``fill`` paints the masked region with the blurred
   colours around it before encoding, ``original`` keeps it, ``latent_noise`` / ``latent_nothing``
   replace its latents by noise / zeros (``Img2Img.img2img_start``);
5. the overlay ("paste back"): the init image composited over the result with alpha
   ``1 - mask`` (the blurred mask, doubled where the whole picture is inpainted so the repainted
   core stays opaque): every pixel outside the mask equals the init image's.

The controls' images are cut to the same region as the init image under "Only masked", as
sd-webui-controlnet does, so a condition stays aligned with the pixels it describes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from controlstack.errors import ControlstackError
from controlstack.io.images import mask_to_array, to_rgb, validate_image


class Fill(NamedTuple):
    """One "Masked content" choice: our name, sd-webui's label and its API index."""

    name: str
    webui: str
    index: int


FILL_TABLE = (Fill("fill", "fill", 0), Fill("original", "original", 1),
              Fill("latent_noise", "latent noise", 2), Fill("latent_nothing", "latent nothing", 3))
FILLS = tuple(f.name for f in FILL_TABLE)
FILL_BY_INDEX = {f.index: f.name for f in FILL_TABLE}
FILL_BY_LABEL = {f.webui: f.name for f in FILL_TABLE}
MAX_BLUR, MAX_PADDING = 64, 256


@dataclass(frozen=True)
class InpaintOptions:
    """sd-webui's img2img inpainting options (module docstring). ``None`` in the pipeline instead of
    an instance: diffusers' inpainting as it is (no blur, no overlay)."""

    mask_blur: int = 4
    invert: bool = False
    full_res: bool = False
    padding: int = 32
    fill: str = "original"
    paste_back: bool = True

    def __post_init__(self):
        for key, hi in (("mask_blur", MAX_BLUR), ("padding", MAX_PADDING)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
                raise ControlstackError(f"inpaint {key} must be an integer in [0, {hi}], got {v!r}")
        if self.fill not in FILLS:
            raise ControlstackError(f"inpaint fill {self.fill!r} is unknown; choose one of {', '.join(FILLS)}")
        for key in ("invert", "full_res", "paste_back"):
            if not isinstance(getattr(self, key), bool):
                raise ControlstackError(f"inpaint {key} must be true or false, got {getattr(self, key)!r}")

    @property
    def image_steps(self) -> bool:
        """Whether any step works on the images around the pipeline (all but the latent fills)."""
        return bool(self.mask_blur or self.invert or self.full_res or self.paste_back or self.fill == "fill")

    def inner(self) -> InpaintOptions:
        """What the pipeline still applies once the images are prepared: the latent fills only."""
        return InpaintOptions(mask_blur=0, padding=0, fill=self.fill if self.fill.startswith("latent") else "original",
                              paste_back=False)

    def parameters(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Prepared:
    """The images the pipeline is given, and how its output goes back into the init image."""

    init: Image.Image
    mask: Image.Image                  # L, white = repaint, at the generation size
    overlay: Image.Image | None        # RGBA: the init image where it is kept, transparent where repainted
    crop: tuple[int, int, int, int] | None  # (x1, y1, x2, y2) in the init image ("Only masked")
    size: tuple[int, int]              # the output's size


def blur(mask: Image.Image, radius: int) -> Image.Image:
    """sd-webui's mask blur: a separable Gaussian, kernel ``2 * int(2.5 * r + 0.5) + 1``."""
    import cv2  # local: heavy, only this path needs it

    if radius <= 0:
        return mask
    k = 2 * int(2.5 * radius + 0.5) + 1
    a = np.asarray(mask)
    a = cv2.GaussianBlur(a, (k, 1), radius)
    a = cv2.GaussianBlur(a, (1, k), radius)
    return Image.fromarray(a)


def crop_region(mask: np.ndarray, pad: int) -> tuple[int, int, int, int]:
    """The box ``(x1, y1, x2, y2)`` around the mask's nonzero pixels, ``pad`` wider, inside the image."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0, 0, w, h
    return (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
            min(int(xs.max()) + 1 + pad, w), min(int(ys.max()) + 1 + pad, h))


def expand_region(box, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int, int, int]:
    """``box`` grown on its short side to the generation's aspect ratio, kept inside the image."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, extra: int, limit: int) -> tuple[int, int]:
    a, b = a - extra // 2, b + extra - extra // 2
    if b > limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, min(b - a, limit)
    return a, b


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """sd-webui's "fill": the masked region painted with the kept pixels' colours blurred into it,
    from a wide blur to a narrow one (each pass composited over the last)."""
    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def prepare(init: Image.Image, mask: Image.Image, options: InpaintOptions, width: int, height: int) -> Prepared:
    """The init image and mask as the pipeline will see them (steps 1-4 of the module docstring)."""
    init = full = init.convert("RGB")
    mask = mask.convert("L").resize(init.size, Image.Resampling.NEAREST) if mask.size != init.size else mask.convert("L")
    if options.invert:
        mask = ImageOps.invert(mask)
    mask = blur(mask, options.mask_blur)
    crop = None
    if options.full_res:
        crop = expand_region(crop_region(np.asarray(mask), options.padding), width, height, *init.size)
        overlay_mask, size = mask, init.size
        init, mask = (im.crop(crop).resize((width, height), Image.Resampling.LANCZOS) for im in (init, mask))
    else:
        init, mask = init.resize((width, height), Image.Resampling.LANCZOS), mask.resize((width, height),
                                                                                         Image.Resampling.LANCZOS)
        overlay_mask = Image.fromarray(np.clip(np.asarray(mask, np.float32) * 2, 0, 255).astype(np.uint8))
        size = (width, height)
    overlay = None
    if options.paste_back:
        overlay = (init if crop is None else full).convert("RGBA")
        overlay.putalpha(ImageOps.invert(overlay_mask))
    if options.fill == "fill":
        init = fill(init, mask)
    return Prepared(init, mask, overlay, crop, size)


def crop_control(image: Image.Image, crop, init_size: tuple[int, int], width: int, height: int) -> Image.Image:
    """A control's image cut to the init image's region (scaled to the control image's own size)."""
    sx, sy = image.size[0] / init_size[0], image.size[1] / init_size[1]
    x1, y1, x2, y2 = crop
    box = (round(x1 * sx), round(y1 * sy), max(round(x2 * sx), round(x1 * sx) + 1), max(round(y2 * sy), round(y1 * sy) + 1))
    return image.crop(box).resize((width, height), Image.Resampling.LANCZOS)


def finish(images: list[Image.Image], prepared: Prepared, init: Image.Image) -> list[Image.Image]:
    """The pipeline's outputs put back (step 5): scaled into the crop of the full init image under
    "Only masked", then the overlay composited over them."""
    out = []
    for image in images:
        info = dict(image.info)
        if prepared.crop is not None:
            x1, y1, x2, y2 = prepared.crop
            canvas = init.convert("RGB").copy()
            canvas.paste(image.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            image = canvas
        if prepared.overlay is not None:
            image = image.convert("RGBA")
            image.alpha_composite(prepared.overlay)
            image = image.convert("RGB")
        image.info.update(info)
        out.append(image)
    return out


def run_inpaint(pipe, options: InpaintOptions, prompt, controls, *, init_image, inpaint_mask, width, height,
                output_type, **kw) -> tuple[list, dict]:
    """``pipe``'s inpainting with ``options`` (module docstring): prepare, generate, put back.
    Returns ``(images, parameters)``; ``kw``: the rest of ``Pipeline.__call__``'s arguments."""
    def as_mask(m, what):
        return Image.fromarray(np.round(mask_to_array(m, what) * 255).astype(np.uint8), "L")

    init = to_rgb(validate_image(init_image, "init image"))
    prepared = prepare(init, as_mask(inpaint_mask, "inpaint mask"), options, width, height)
    if prepared.crop is not None:  # the conditions cut to the region the init image is cut to
        def cut(image):
            return None if image is None else crop_control(image, prepared.crop, init.size, width, height)

        controls = [dataclasses.replace(c, image=cut(c.image), mask=None if c.mask is None else
                                        cut(as_mask(c.mask, "control mask"))) for c in controls]
    result = pipe(prompt, controls, init_image=prepared.init, inpaint_mask=prepared.mask, width=width, height=height,
                  inpaint=options.inner(), output_type="pil", return_result=True, **kw)
    images = finish(result.images, prepared, init)
    params = {**result.parameters, "width": prepared.size[0], "height": prepared.size[1]}
    params["img2img"] = {**params["img2img"], "inpaint_options": options.parameters()}
    if output_type != "pil":
        images = np.stack([np.asarray(im, np.float32) / 255 for im in images])
    return images, params
