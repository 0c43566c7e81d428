"""Controls to branches, as a mixin of :class:`controlstack.pipeline.Pipeline`: each condition
image prepared as its ControlNet reads it (annotated, resized, ControlNet 1.1's inpaint hint), its
hint features encoded once per run, and one :class:`~controlstack.control.Branch` per control --
one fused :class:`~controlstack.control.UnionBranch` for the controls of a ControlNet-Union model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from controlstack import annotators
from controlstack.control import AdapterBranch, Branch, Control, UnionBranch, group_unions
from controlstack.errors import ControlstackError
from controlstack.io.images import (
    image_to_tensor,
    load_image,
    mask_to_array,
    pixel_perfect_resolution,
    resize_image,
    to_rgb,
)
from controlstack.mmdit import (
    FluxBranch,
    MMDiTBranch,
    attach,
    control_latents,
    flux_control_input,
    flux_mode,
    inpaint_latents,
    input_condition,
    is_flux_controlnet,
    is_mmdit_controlnet,
    reads_mask,
)
from controlstack.models.adapter import adapter_features, is_adapter
from controlstack.models.union import control_id
from controlstack.tasks import BASE_CONDITION


class Hints:
    """The control-preparation step of a call (a :class:`~controlstack.pipeline.Pipeline`'s
    ``controlnet()``, ``runners``, ``task_text()``, ``unet``, ``vae_scale_factor`` and ``source``)."""

    def prepare_hint(self, control: Control, width: int, height: int, inpaint_mask: Any = None) -> torch.Tensor:
        """Condition image -> (1, 3, H, W) tensor in [0, 1] at the output size. The ``inpaint``
        annotator gives ControlNet 1.1's inpaint hint instead: the image with the masked pixels at
        -1 (its own ``mask`` parameter, else the generation's ``inpaint_mask``)."""
        image = to_rgb(control.image)
        if control.preprocess:
            name = self.module_name(control)
            params = dict(control.annotator_params)
            if name == "inpaint":
                mask = params.pop("mask", None) or inpaint_mask
                if mask is None:
                    raise ControlstackError("the inpaint control needs a mask: pass inpaint_mask (or mask= to the annotator)")
                if isinstance(mask, (str, os.PathLike)):
                    mask = load_image(mask)
                m = Image.fromarray((mask_to_array(mask, "inpaint mask") * 255).round().astype(np.uint8))
                small = resize_image(image, width, height, control.resize_mode)
                hint = annotators.get("inpaint", **{**params, "resolution": None}).hint(
                    small, resize_image(m, width, height, control.resize_mode))
                return torch.from_numpy(hint).permute(2, 0, 1)[None]
            params.setdefault("resolution", pixel_perfect_resolution(image.size, width, height, control.resize_mode))
            image = to_rgb(annotators.get(name, **params)(image))
        image = resize_image(image, width, height, control.resize_mode)
        return image_to_tensor(image)

    def make_branch(self, control: Control, width: int, height: int, prompts: tuple[str, str] = ("", ""),
                    batch: int = 1, do_cfg: bool = False, inpaint_mask: Any = None, hint_batch: int = 1) -> Branch:
        """``hint_batch``: the batch the branch runs at (2 x batch with CFG unless the injection is
        cond-only). The hint is encoded at that batch, as diffusers does: oneDNN convolves a batch
        of 1 and of 2 with different kernels (~2e-7 apart), and the images would differ in the last bit."""
        controlnet = self.controlnet(control.model)
        text = self.task_text(controlnet, control, prompts, batch, do_cfg)  # before the image: cheap checks first
        runner = self.runners.controlnet(controlnet)
        with torch.no_grad():
            features = self.hint_features(runner, control, width, height, inpaint_mask, hint_batch)
        return Branch(runner, features, control.weight, control.start, control.end, control.mask, text)

    def make_branches(self, controls: Sequence[Control], width: int, height: int, prompts: tuple[str, str], batch: int,
                      do_cfg: bool, inpaint_mask: Any, hint_batch: int, generator=None) -> list:
        """One branch per control, except that the controls of one ControlNet-Union model make one
        fused branch (``models/union.py``), at the place of the first of them; a T2I-Adapter makes
        an :class:`~controlstack.control.AdapterBranch` (``models/adapter.py``)."""
        branches = []
        for item in group_unions(controls, lambda m: None if m == BASE_CONDITION else self.controlnet(m)):
            if isinstance(item, Control) and item.model == BASE_CONDITION:  # a base that reads it (Flux Control)
                hint = self.prepare_hint(item, width, height, inpaint_mask)
                branches.append(input_condition(self, item, hint, batch, generator))
                continue
            cn = self.controlnet(item.model if isinstance(item, Control) else item[0].model)  # resolved once
            if isinstance(item, Control) and is_flux_controlnet(cn):
                hint = self.prepare_hint(item, width, height, inpaint_mask)
                cond = flux_control_input(self, cn, hint, batch, generator)
                size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
                branches.append(FluxBranch(cn, cond, item.weight, item.start, item.end, flux_mode(cn, item), item.mask,
                                           size, self.runners.transformer_controlnet(cn)))
                continue
            if isinstance(item, Control) and is_mmdit_controlnet(cn):
                cn = attach(cn, self.unet)  # it reads the condition's latents
                hint = self.prepare_hint(item, width, height, inpaint_mask)
                if reads_mask(cn):  # an inpainting ControlNet: the call's inpaint_mask goes into its input
                    if inpaint_mask is None:
                        raise ControlstackError("this is an inpainting ControlNet: pass inpaint_mask (white = repaint)")
                    latents = inpaint_latents(self.vae, hint, self.mask_tensor(inpaint_mask, width, height))
                else:
                    latents = control_latents(self.vae, cn, hint)
                latents = latents.repeat(batch * (2 if do_cfg else 1), 1, 1, 1)
                branches.append(MMDiTBranch(cn, latents, item.weight, item.start, item.end, item.mask,
                                            self.runners.transformer_controlnet(cn)))
                continue
            if isinstance(item, Control) and is_adapter(cn):
                hint = self.prepare_hint(item, width, height, inpaint_mask).to(self.unet.device)
                # computed once at batch 1, then copied to the U-Net's batch (both CFG halves), as diffusers does
                features = [f.repeat(batch * (2 if do_cfg else 1), 1, 1, 1) for f in adapter_features(cn, hint)]
                branches.append(AdapterBranch(features, item.weight, item.start, item.end))
                continue
            if isinstance(item, Control):
                branches.append(self.make_branch(item, width, height, prompts, batch, do_cfg, inpaint_mask, hint_batch))
                continue
            name = item[0].model if isinstance(item[0].model, (str, os.PathLike)) else type(cn).__name__
            ids = [control_id(cn, c.task, str(name)) for c in item]
            runner = self.runners.controlnet(cn)
            with torch.no_grad():
                conditions = [self.hint_features(runner, c, width, height, inpaint_mask, hint_batch) for c in item]
            branches.append(UnionBranch(runner, item, conditions, ids))
        return branches

    def hint_features(self, runner, control: Control, width: int, height: int, inpaint_mask: Any, hint_batch: int):
        """The hint encoder's features of ``control``'s condition, at the latent size."""
        hint = self.prepare_hint(control, width, height, inpaint_mask).to(self.unet.device, runner.dtype)
        features = runner.embed_hint(hint.repeat(hint_batch, 1, 1, 1))  # once per run, not per step
        expected = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if tuple(features.shape[-2:]) != expected:
            raise ControlstackError(
                f"ControlNet hint encoder downsamples to {tuple(features.shape[-2:])} but the base's latents "
                f"are {expected}; the ControlNet was trained for a VAE with another downsampling"
            )
        return features

    def mask_tensor(self, mask: Any, width: int, height: int) -> torch.Tensor:
        """An inpainting mask -> (1, 1, H, W) in {0, 1} at the output size (diffusers' mask processor:
        grey, resized, binarised at 0.5)."""
        from diffusers.image_processor import VaeImageProcessor  # local: heavy, only this path needs it

        m = Image.fromarray((mask_to_array(mask, "inpaint mask") * 255).round().astype(np.uint8))
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
                                      do_convert_grayscale=True)
        return processor.preprocess(m, height=height, width=width)

    def module_name(self, control: Control) -> str:
        """The annotator a control's image goes through ('none' without preprocessing)."""
        if not control.preprocess:
            return "none"
        if isinstance(control.preprocess, str):
            return control.preprocess

        return annotators.for_control(control.model, control.task, self.source)
