"""img2img and inpainting's start, as a mixin of :class:`controlstack.pipeline.Pipeline`.

SDEdit (Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations", ICLR 2022): of ``steps`` only the last ``int(steps * strength)`` run, from the init
image's latents noised to that point. Inpainting either blends the known region back after every
step (a 4-channel U-Net) or hands a 9-channel inpainting U-Net the mask and the masked image's
latents. Every draw follows diffusers' ``StableDiffusionControlNetImg2ImgPipeline`` /
``StableDiffusionControlNetInpaintPipeline``, in their order, so the same seed gives their image.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from controlstack.errors import ControlstackError
from controlstack.io.images import to_rgb, validate_image
from controlstack.models import vae
from controlstack.sampling.img2img import Img2ImgStart, InpaintBlend, Start


class Img2Img:
    """Encoding images to latents and the loop's start for img2img / inpainting (a
    :class:`~controlstack.pipeline.Pipeline`'s ``vae``, ``unet`` and ``vae_scale_factor``)."""

    @torch.no_grad()
    def img2img_start(self, init_image, inpaint_mask, strength, shape, scheduler, generator, do_cfg,
                      fill: str = "original"):
        """The loop's :class:`~controlstack.sampling.img2img.Start` for img2img and inpainting -- the
        noise, where the loop starts, the blend after each step or a 9-channel U-Net's extra input --
        drawing from ``generator`` in diffusers' order: the init image's latents, the noise, then
        (inpainting) the masked image's latents. ``init_image`` may be
        latents already (a tensor: the hires fix's latent upscale). ``fill`` (inpainting, sd-webui's
        "masked content"): ``latent_noise`` / ``latent_nothing`` replace the masked region's latents
        by noise / zeros before they are noised (``inpaint.py``)."""
        from diffusers.image_processor import VaeImageProcessor  # local: heavy, only this path needs it

        if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
            raise ControlstackError(f"strength must be a number in [0, 1], got {strength!r}")
        nine = self.inpainting_unet
        if nine and inpaint_mask is None:
            raise ControlstackError("this is an inpainting U-Net: pass inpaint_mask with init_image")
        batch, _, h, w = shape
        height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        given = isinstance(init_image, torch.Tensor)  # latents
        if given and (inpaint_mask is not None or tuple(init_image.shape[1:]) != tuple(shape[1:])):
            raise ControlstackError(f"init latents must be (1, {shape[1]}, {h}, {w}) without a mask, got "
                                    f"{tuple(init_image.shape)}")
        if not given:
            processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
            init = processor.preprocess(to_rgb(validate_image(init_image, "init image")), height=height,
                                        width=width).to(self.vae.device, self.vae.dtype)

        inpaint = inpaint_mask is not None
        image_latents = None
        if not inpaint or not nine or strength < 1.0:  # diffusers skips it only for 9 channels at strength 1
            image_latents = (init_image.to(self.unet.dtype) if given else
                             self.encode_latents(init, generator)).repeat(batch, 1, 1, 1)
        noise = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(self.unet.device)
        out = Start(noise, Img2ImgStart(noise if image_latents is None else image_latents, float(strength),
                                        pure_noise_at_full=inpaint, flow=self.family.flow), latent_size=(h, w))
        if inpaint:
            mask = self.mask_tensor(inpaint_mask, width, height).to(init.device)
            masked_latents = self.encode_latents(init * (mask < 0.5), generator).repeat(batch, 1, 1, 1)
            mask = torch.nn.functional.interpolate(mask, size=(h, w)).to(self.unet.dtype).repeat(batch, 1, 1, 1)
            if fill != "original" and image_latents is not None:  # sd-webui's "latent noise" / "latent nothing"
                filler = (torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(mask.device)
                          if fill == "latent_noise"
                          else torch.zeros_like(image_latents))
                image_latents = image_latents * (1 - mask) + filler * mask
                out.start = Img2ImgStart(image_latents, float(strength), pure_noise_at_full=inpaint,
                                         flow=self.family.flow)
            if nine:
                extra = torch.cat([mask, masked_latents], 1)
                out.unet_extra = torch.cat([extra, extra]) if do_cfg else extra
            else:
                out.blend = InpaintBlend(scheduler, image_latents, noise, mask)
        pack = self.family.pack
        if pack(noise) is not noise:  # Flux: the loop runs on 2x2 patches of tokens, the mask packed per channel
            out.latents = pack(noise)
            out.start = replace(out.start, init_latents=pack(out.start.init_latents))
            if out.blend is not None:
                out.blend = InpaintBlend(scheduler, pack(out.blend.image_latents), out.latents,
                                         pack(out.blend.mask.repeat(1, noise.shape[1], 1, 1)))
        return out

    def encode_latents(self, image: torch.Tensor, generator) -> torch.Tensor:
        """A (B, 3, H, W) image in [-1, 1] -> scaled latents: one posterior sample from ``generator``
        (``models/vae.py``, the one encoder)."""
        return vae.encode(self.vae, image, generator)
