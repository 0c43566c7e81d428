"""The Python API: load models, prepare controls, call the one sampling loop, decode.

``Pipeline.from_pretrained(path_or_None)`` loads a Stable Diffusion base (a diffusers folder or a
single-file checkpoint; None = the bundled default model) and ``pipe(prompt, controls=[...])``
generates. Every numerical step follows ``StableDiffusionControlNetPipeline`` (text encoding,
the latent draw from the seed, the loop, VAE decoding and post-processing), so the same weights,
seed and scheduler give the same image as diffusers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from controlstack.control import Branch, Control
from controlstack.denoiser import ControlledDenoiser
from controlstack.errors import ControlstackError
from controlstack.hires import MAX_HIRES, hires_size  # noqa: F401 (re-exported: the server's and CLI's checks)
from controlstack.img2img import Img2Img
from controlstack.injection import make_injection
from controlstack.inpaint import InpaintOptions
from controlstack.io.checkpoints import check_compatible
from controlstack.io.images import image_to_tensor, resize_image, to_rgb
from controlstack.models.families import family_of
from controlstack.models.tiers import Runners, Tier, make_tier
from controlstack.models.tiny import SDComponents
from controlstack.prompting import Prompting
from controlstack.recommendations import (  # noqa: F401 (the constants are re-exported)
    INFERENCE_ONLY_LAMBDA_MAX,
    SMALL_CONTROLNET,
    Recommendations,
)
from controlstack.sampling import make_scheduler, sample
from controlstack.sampling.loop import StopSampling

MAX_SIZE = 4096
#: 4th-order linear multistep schedulers (PLMS, LMS): with a control on the conditional CFG half only
#: (modes controlnet, guess) and strong guidance they amplify the guided control term into speckle
#: (README, "Control modes": high-frequency energy 8.3 / 6.9 vs 4.8 for unipc / euler at CFG 7.5, the same
#: 3.1 for all at CFG 3, bundled canny on held-out scenes); that combination is refused.
HIGH_ORDER_MULTISTEP = ("pndm", "lms")
MAX_CFG_HIGH_ORDER = 4.0


def speckles(scheduler: str, injection, has_controls: bool, cfg: float) -> bool:
    """Whether a 4th-order multistep scheduler would amplify a conditional-half-only control into
    speckle (:data:`HIGH_ORDER_MULTISTEP` above :data:`MAX_CFG_HIGH_ORDER`; README, "Control modes")."""
    return scheduler in HIGH_ORDER_MULTISTEP and injection.cond_only and has_controls and cfg > MAX_CFG_HIGH_ORDER


@dataclass
class GenerationResult:
    """Images plus what produced them (the CLI writes ``parameters`` into the PNGs)."""

    images: list
    parameters: dict
    conditions: list = field(default_factory=list)  # from_image: the condition made for each task


class Pipeline(Prompting, Img2Img, Recommendations):
    """A base model (SD-1.x / 2.x or SDXL, told by its U-Net: ``family``) plus the ControlNets it
    has loaded (cached by name/path)."""

    def __init__(
        self,
        components: SDComponents,
        controlnets: dict[str, Any] | None = None,
        name: str = "custom",
        recommended: dict | None = None,
        vocabulary: Sequence[str] | None = None,
    ):
        self.unet = components.unet.eval()
        self.vae = components.vae.eval()
        self.text_encoder = components.text_encoder.eval()
        self.tokenizer = components.tokenizer
        self.text_encoder_2 = components.text_encoder_2.eval() if components.text_encoder_2 is not None else None
        self.tokenizer_2 = components.tokenizer_2
        self.family = family_of(self.unet)  # the base's family (models/families/): its text conditioning, ...
        self.family.check_components(components)
        self.force_zeros_for_empty_prompt = components.force_zeros_for_empty_prompt
        self.scheduler_config = components.scheduler_config
        self.name = name
        # name -> ControlNetModel or a zero-argument loader (bundled models load on first use)
        self.controlnets: dict[str, Any] = dict(controlnets or {})
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.tier = Tier()  # parity; also sets self.runners
        self.source: Path | None = None  # the folder / file the base came from (its model hash, lazily)
        self._model_hash: str | None = None
        # the base folder's recommended settings (io/settings.py): used where a call leaves a value unset
        self.recommended = dict(recommended or {})
        # the words the base was trained on (a closed-vocabulary model, like the bundled one): others warn
        self.vocabulary = {w.lower() for w in vocabulary} if vocabulary else None
        self._warned_weak = False  # warn_if_weak: once per pipeline

    def optimize(self, tier: str = "compiled", *, precision: str | None = None) -> Pipeline:
        """Switch the speed tier (``models/tiers.py``, docs/speed.md): ``"parity"`` (float32 eager,
        as diffusers; the default), ``"compiled"`` (the same math through AOTInductor, compiled
        once per shape and cached under ``~/.cache/controlstack``) or ``"fast"`` (compiled, bf16 where
        measured faster here, unless the model's ``controlstack.json`` recommends a precision, or
        ``precision="fp32"/"bf16"`` --, encoder / ControlNet reuse)."""
        if tier == "fast" and precision is None:  # a model may say bf16 costs it fidelity (the bundle does)
            precision = self.recommended.get("precision")
        self.tier = make_tier(tier, precision)
        return self

    @property
    def tier(self) -> Tier:
        return self.runners.tier

    @tier.setter
    def tier(self, tier: Tier) -> None:
        self.runners = Runners(self.unet, self.vae, tier)

    @property
    def inpainting_unet(self) -> bool:
        """An SD inpainting U-Net: its extra input channels read the mask and the masked image."""
        return self.unet.config.in_channels != self.unet.config.out_channels

    @property
    def native_size(self) -> int:
        """The image size the base was trained at (U-Net sample size times the VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, allow_pickle: bool = False,
                        config: str | os.PathLike | None = None, torch_dtype=torch.float32) -> Pipeline:
        """A diffusers SD / SDXL folder or single-file checkpoint; ``None`` = the bundled default model.
        ``torch_dtype``: the weights' dtype (``torch.bfloat16`` halves an SDXL U-Net's 10 GB; None
        keeps what is stored); ControlNets loaded by path follow the base's."""
        from controlstack import assets

        if path is None:
            return assets.default_pipeline(cls)
        from controlstack.io.checkpoints import load_base

        components = load_base(path, allow_pickle=allow_pickle, config=config, torch_dtype=torch_dtype)
        # a folder in the bundle's layout (the shipped bundle, or one being trained with some
        # ControlNets pending) brings its own ControlNets; a plain SD folder gets the bundled ones
        folder = Path(path)
        in_bundle = folder.resolve() == assets.BUNDLE_DIR.resolve()
        own = (folder / "controlnets").is_dir()
        # the bundled ControlNets are SD-1.x-layout: a base of another family gets none it could not run
        plain = assets.bundled_controlnets() if components.family.bundled_controlnets else {}
        controlnets = assets.trained_controlnets(folder) if own else plain
        return cls.from_source(components, controlnets, "controlstack-bundle" if in_bundle else str(path), folder)

    @classmethod
    def from_source(cls, components: SDComponents, controlnets: dict, name: str, source: Path) -> Pipeline:
        """A pipeline over ``components`` loaded from ``source`` (a folder or a single file), with
        what the folder's ``controlstack.json`` declares: recommended settings and vocabulary."""
        from controlstack.io.settings import read_settings, recommended

        settings = read_settings(source) if source.is_dir() else {}
        pipe = cls(components, controlnets=controlnets, name=name, recommended=recommended(source),
                   vocabulary=settings.get("vocabulary"))
        pipe.source = source
        return pipe

    @property
    def model_hash(self) -> str | None:
        """sd-webui's "Model hash" of the base's file, computed on first use (hashing a multi-GB
        checkpoint at every load would slow start-up for nothing)."""
        if self._model_hash is None and self.source is not None:
            from controlstack.io.checkpoints import model_hash

            self._model_hash = model_hash(self.source)
        return self._model_hash

    def controlnet(self, model: Any):
        """Resolve a Control's ``model``: a ControlNetModel, a bundled name, or a path."""
        if not isinstance(model, (str, os.PathLike)):
            cn = model
        elif str(model) in self.controlnets:
            cn = self.controlnets[str(model)]
            if callable(cn) and not isinstance(cn, torch.nn.Module):
                cn = self.controlnets[str(model)] = cn()
        elif os.path.exists(model):
            from controlstack.io.checkpoints import load_controlnet

            cn = self.controlnets[str(model)] = load_controlnet(model, torch_dtype=self.unet.dtype)
        else:
            known = ", ".join(sorted(self.controlnets)) or "none bundled"
            raise ControlstackError(
                f"control model '{model}' is neither a bundled ControlNet ({known}) nor an existing path"
            )
        check_compatible(cn, self.unet)  # mismatched channels would fail mid-run otherwise
        return cn.eval()

    # ----------------------------------------------------------------------------- pieces
    def prepare_hint(self, control: Control, width: int, height: int, inpaint_mask: Any = None) -> torch.Tensor:
        """Condition image -> (1, 3, H, W) tensor in [0, 1] at the output size. The ``inpaint``
        annotator gives ControlNet 1.1's inpaint hint instead: the image with the masked pixels at
        -1 (its own ``mask`` parameter, else the generation's ``inpaint_mask``)."""
        image = to_rgb(control.image)
        if control.preprocess:
            from controlstack import annotators
            from controlstack.io.images import pixel_perfect_resolution

            name = self.module_name(control)
            params = dict(control.annotator_params)
            if name == "inpaint":
                from controlstack.io.images import mask_to_array

                mask = params.pop("mask", None) or inpaint_mask
                if mask is None:
                    raise ControlstackError("the inpaint control needs a mask: pass inpaint_mask (or mask= to the annotator)")
                if isinstance(mask, (str, os.PathLike)):
                    from controlstack.io.images import load_image

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
                      do_cfg: bool, inpaint_mask: Any, hint_batch: int) -> list:
        """One branch per control, except that the controls of one ControlNet-Union model make one
        fused branch (``models/union.py``), at the place of the first of them."""
        from controlstack.control import UnionBranch, group_unions
        from controlstack.models.union import control_id

        branches = []
        for item in group_unions(controls, self.controlnet):
            if isinstance(item, Control):
                branches.append(self.make_branch(item, width, height, prompts, batch, do_cfg, inpaint_mask, hint_batch))
                continue
            cn = self.controlnet(item[0].model)
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

    def from_image(self, photo, tasks: Sequence[str], prompt: str, *, model: Any = "omni",
                   weight: float | Sequence[float] = 1.0, resize_mode: str = "just_resize",
                   return_result: bool = False, **kwargs):
        """OmniControlNet's whole pipeline in one call: the conditions of ``tasks`` are made from
        ``photo`` (learned ones by the bundled multi-task predictor, classical ones like canny by
        their annotators, ``annotators.FOR_TASK``), then generated from with the Omni ControlNet
        ``model`` (one set of weights for every task). ``kwargs`` go to ``__call__`` (steps, cfg,
        seed, width, height, mode, ...). Returns images, or a :class:`GenerationResult` whose
        ``conditions`` hold the condition of each task."""
        from controlstack import annotators
        from controlstack.io.images import pixel_perfect_resolution, validate_image

        photo = to_rgb(validate_image(photo, "photo"))
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ControlstackError(f"tasks must be a non-empty list of task names, got {tasks!r}")
        weights = [float(weight)] * len(tasks) if isinstance(weight, (int, float)) else list(weight)
        if len(weights) != len(tasks):
            raise ControlstackError(f"{len(weights)} weights for {len(tasks)} tasks; give one per task")
        known = getattr(self.controlnet(model), "task_tokens", None)
        if known is None:
            raise ControlstackError(f"'{model}' is not an Omni ControlNet (it has no task tokens)")
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ControlstackError(f"unknown task(s) {', '.join(unknown)}; the Omni ControlNet has {', '.join(known)}")
        width, height = kwargs.get("width") or self.native_size, kwargs.get("height") or self.native_size
        resolution = pixel_perfect_resolution(photo.size, width, height, resize_mode)
        conditions = [resize_image(to_rgb(annotators.get(annotators.for_task(t), resolution=resolution)(photo)),
                                   width, height, resize_mode) for t in tasks]  # as the branch will see them
        controls = [Control(model, c, weight=w, task=t, resize_mode=resize_mode)
                    for t, c, w in zip(tasks, conditions, weights)]
        result = self(prompt, controls, return_result=True, **kwargs)
        result.parameters["from_image"] = {"tasks": list(tasks)}
        result.conditions = conditions
        return result if return_result else result.images

    def _hires(self, scale, hires_strength, prompt, controls, *, hires_steps, hires_upscaler, output_type,
               return_result, **kw):
        """The hires fix (``hires.py``): the first pass, the upscale, img2img at the larger size."""
        from controlstack.hires import check, run_hires

        check(scale, hires_steps, hires_upscaler)
        w2, h2 = hires_size(kw["width"], kw["height"], scale, self.vae_scale_factor)
        _validate(prompt, hires_steps or kw["steps"], kw["cfg"], w2, h2, kw["batch"], self.vae_scale_factor)
        images, params = run_hires(self, scale, hires_strength, prompt, controls, steps_second=hires_steps,
                                   upscaler_name=hires_upscaler, output_type=output_type, **kw)
        if output_type == "pil":
            label(images, params)
        return GenerationResult(images, params) if return_result else images

    def _inpaint(self, options: InpaintOptions, prompt, controls, *, output_type, return_result, **kw):
        """sd-webui's inpainting options (``inpaint.py``) around the pipeline's own inpainting."""
        from controlstack.inpaint import run_inpaint

        images, params = run_inpaint(self, options, prompt, controls, output_type=output_type, **kw)
        if output_type == "pil":
            label(images, params)
        return GenerationResult(images, params) if return_result else images

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, generator=None) -> np.ndarray:
        """VAE decode and diffusers' post-processing -> float array (B, H, W, 3) in [0, 1]."""
        from controlstack.models.vae import unscale

        image = self.runners.decode_vae(unscale(latents, self.vae.config), generator)
        image = (image * 0.5 + 0.5).clamp(0, 1)
        return image.cpu().permute(0, 2, 3, 1).float().numpy()

    # ----------------------------------------------------------------------------- generate
    def __call__(
        self,
        prompt: str,
        controls: Sequence[Control] = (),
        steps: int | None = None,
        cfg: float | None = None,
        seed: int | None = 0,
        width: int | None = None,
        height: int | None = None,
        scheduler: str = "unipc",
        mode: str | None = None,
        negative_prompt: str = "",
        batch: int = 1,
        *,
        mode_options: dict | None = None,
        init_image: Any = None,
        strength: float = 0.75,
        inpaint_mask: Any = None,
        hires: float | None = None,
        hires_strength: float = 0.5,
        hires_steps: int | None = None,
        hires_upscaler: str = "lanczos",
        inpaint: InpaintOptions | None = None,
        step_callback: Any = None,
        eta: float = 0.0,
        output_type: str = "pil",
        progress: bool = True,
        return_result: bool = False,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
    ):
        """Generate ``batch`` images; returns PIL images (or a float array with output_type='np').

        ``width`` / ``height`` default to the model's native size (512 for SD-1.5); ``steps``,
        ``cfg`` and ``mode`` (with ``mode_options``) to what the models recommend (:meth:`settings`),
        else 20, 7.5 and ``balanced``; a control's unset ``start`` / ``end`` likewise (:meth:`with_windows`).
        ``init_image`` makes it img2img (``strength`` in [0, 1]: how much of the schedule runs; 0 runs
        no step and returns the init image's VAE round trip); with ``inpaint_mask`` (white = repaint) it inpaints -- as diffusers'
        ControlNet img2img / inpaint pipelines, with a 4-channel U-Net (latent blending) or a
        9-channel inpainting U-Net.
        ``inpaint`` (with ``inpaint_mask``): sd-webui's inpainting options -- mask blur, invert, "Only
        masked", masked content, the init image pasted back outside the mask (``inpaint.py``); None
        inpaints as diffusers does.
        ``hires`` (sd-webui's hires fix, ``hires.py``): generate, upscale each image by ``hires`` with
        ``hires_upscaler`` (a pixel or a latent upscaler), then img2img it at the larger size with the
        same controls, ``hires_strength`` and ``hires_steps`` (None: ``steps``); image ``i`` of the
        batch with seed ``seed + i``.
        ``step_callback(done, total)`` runs after every sampling step (progress; raising in it stops
        the run between steps, which is how the server cancels a job; raising
        :class:`~controlstack.sampling.loop.StopSampling` ends the loop there and decodes the latents
        reached: sd-webui's interrupt / skip).
        ``output_type``: 'pil', 'np', or 'latent' (the final latents, not decoded).
        ``original_size``, ``crops_coords_top_left``, ``target_size`` (SDXL bases only): the
        micro-conditioning, (height, width) / (top, left); None = the output size and (0, 0).
        """
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        controls = list(controls)
        for c in controls:
            if not isinstance(c, Control):
                raise ControlstackError(f"controls must be Control objects, got {type(c).__name__}")
        asked_mode = mode
        used = self.settings(controls, steps, cfg, mode, mode_options)
        steps, cfg, mode, mode_options = used["steps"], used["cfg"], used["mode"], used["mode_options"]
        _validate(prompt, steps, cfg, width, height, batch, self.vae_scale_factor)
        self.check_memory(batch, width * (hires or 1), height * (hires or 1))
        if asked_mode is None:
            self.warn_if_weak(controls)
        controls = self.with_windows(controls)  # what runs and what the PNG records
        micro = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                 "target_size": target_size}
        if hires is not None:
            return self._hires(hires, hires_strength, prompt, controls, steps=steps, cfg=cfg, seed=seed, width=width,
                               height=height, scheduler=scheduler, mode=mode, negative_prompt=negative_prompt,
                               batch=batch, mode_options=mode_options, init_image=init_image, strength=strength,
                               inpaint_mask=inpaint_mask, inpaint=inpaint, eta=eta, output_type=output_type,
                               progress=progress, return_result=return_result, step_callback=step_callback,
                               hires_steps=hires_steps, hires_upscaler=hires_upscaler, **micro)
        if inpaint is not None and not isinstance(inpaint, InpaintOptions):
            raise ControlstackError(f"inpaint must be an InpaintOptions, got {type(inpaint).__name__}")
        if inpaint is not None and inpaint.image_steps and inpaint_mask is not None and init_image is not None:
            return self._inpaint(inpaint, prompt, controls, init_image=init_image, inpaint_mask=inpaint_mask,
                                 width=width, height=height, steps=steps, cfg=cfg, seed=seed, scheduler=scheduler,
                                 mode=mode, negative_prompt=negative_prompt, batch=batch, mode_options=mode_options,
                                 strength=strength, eta=eta, progress=progress, step_callback=step_callback,
                                 output_type=output_type, return_result=return_result, **micro)
        native = self.native_size
        if not (native / 2 <= width <= native * 2 and native / 2 <= height <= native * 2):
            logging.getLogger("controlstack").warning(
                f"generating at {width}x{height}, far from the model's native {native}x{native}: expect repeated or "
                "broken composition")
        mode_options = self.mi_options(mode, mode_options, controls)
        injection = make_injection(mode, **(mode_options or {}))
        if speckles(scheduler, injection, bool(controls), cfg):
            raise ControlstackError(
                f"scheduler '{scheduler}' with mode '{mode}' at CFG {cfg:g} turns the image to speckle: the control acts "
                f"on the conditional half only, guidance multiplies it by {cfg:g}, and {scheduler}'s 4th-order "
                f"extrapolation amplifies that term; use unipc, dpmpp_2m, euler or ddim, mode balanced, or CFG <= "
                f"{MAX_CFG_HIGH_ORDER:g}")
        sched = make_scheduler(scheduler, self.scheduler_config)

        do_cfg = cfg > 1 and self.unet.config.time_cond_proj_dim is None
        cond, uncond, added = self.text_conditions(prompt, negative_prompt, batch, do_cfg, (height, width), micro)
        hint_batch = batch * (2 if do_cfg and not injection.cond_only else 1)
        branches = self.make_branches(controls, width, height, (prompt, negative_prompt or ""), batch, do_cfg,
                                      inpaint_mask, hint_batch)

        generator = torch.Generator("cpu").manual_seed(int(seed)) if seed is not None else None
        shape = (batch, self.unet.config.out_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        loop: dict = {}
        if init_image is None:
            if inpaint_mask is not None:
                raise ControlstackError("inpaint_mask needs init_image (the image to repaint)")
            if self.inpainting_unet:
                raise ControlstackError("this is an inpainting U-Net: pass init_image and inpaint_mask")
            # drawn on the CPU generator, then moved (diffusers' randn_tensor): the same image on any device
            latents = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(self.unet.device)
        else:
            latents, loop = self.img2img_start(init_image, inpaint_mask, strength, shape, sched, generator, do_cfg,
                                               fill=inpaint.fill if inpaint is not None else "original")
        denoiser = ControlledDenoiser(self.runners.unet, branches, injection, cond, uncond, cfg,
                                      unet_extra=loop.pop("unet_extra", None), reuse=self.tier.reuse, added=added)
        if step_callback is not None:
            blend = loop.get("callback")

            def after_step(step, latents):
                out = blend(step, latents) if blend is not None else None
                try:
                    step_callback(step.index + 1, step.count)
                except StopSampling as stop:  # the loop returns these latents: the blend included
                    stop.latents = latents if out is None else out
                    raise
                return out

            loop["callback"] = after_step
        latents = sample(denoiser, sched, latents, steps, generator=generator, eta=eta, progress=progress, **loop)
        images = None if output_type == "latent" else self.decode(latents, generator)
        params = {
            **({"img2img": {"strength": strength, "inpaint": inpaint_mask is not None}} if init_image is not None else {}),
            "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "cfg": cfg,
            "seed": seed, "width": width, "height": height, "scheduler": scheduler, "mode": mode,
            "model": self.name, **({"mode_options": dict(mode_options)} if mode_options else {}),
            **{k: list(v) for k, v in micro.items() if v is not None},
            **({"optimize": self.tier.name} if self.tier.name != "parity" else {}),
            "controls": [
                {"model": str(c.model) if isinstance(c.model, (str, os.PathLike)) else type(c.model).__name__,
                 "weight": c.weight, "start": c.start, "end": c.end,
                 "mask": c.mask is not None, "resize_mode": c.resize_mode,
                 "preprocess": c.preprocess, "module": self.module_name(c), **({"task": c.task} if c.task else {})}
                for c in controls
            ],
            **({"model_hash": self.model_hash} if self.model_hash else {}),
        }
        if output_type == "latent":
            images = latents
        elif output_type == "pil":
            images = label([Image.fromarray((im * 255).round().astype("uint8")) for im in images], params)
        return GenerationResult(images, params) if return_result else images

    def memory_needed(self, batch: int, width: int, height: int) -> int:
        """:func:`memory_needed` of this pipeline's U-Net and VAE."""
        return memory_needed(self.unet.config.block_out_channels[0], self.vae.config.block_out_channels[0],
                             self.vae_scale_factor, batch, width, height)

    def check_memory(self, batch: int, width: int, height: int) -> None:
        check_memory(self.memory_needed(batch, width, height), batch, width, height)

    def module_name(self, control: Control) -> str:
        """The annotator a control's image goes through ('none' without preprocessing)."""
        if not control.preprocess:
            return "none"
        if isinstance(control.preprocess, str):
            return control.preprocess
        from controlstack import annotators

        return annotators.for_control(control.model, control.task, self.source)


def label(images: list, params: dict) -> list:
    """Each image's infotext, as sd-webui's images carry it (with its batch position past one image)."""
    from controlstack.io.png import format_parameters

    for pos, im in enumerate(images):
        im.info["parameters"] = format_parameters({**params, **({"batch_pos": pos} if len(images) > 1 else {})})
    return images


def memory_needed(unet_width: int, vae_width: int, factor: int, batch: int, width: int, height: int) -> int:
    """A lower bound of the bytes a call needs beyond the loaded weights: the U-Net's first-level
    activations (``unet_width`` channels) for the CFG batch (a dozen live tensors) and the VAE
    decoder's full-resolution ones (``vae_width`` channels: input, output and a normalisation of its
    widest level). Real peaks are higher."""
    unet = 2 * batch * (height // factor) * (width // factor) * unet_width * 4 * 12
    vae = batch * height * width * vae_width * 4 * 3
    return unet + vae


def check_memory(need: int, batch: int, width: int, height: int) -> None:
    """Refuse, in one line, a call that needs more than this machine's free memory (instead of
    being killed by the kernel mid-run)."""
    from controlstack.models.speed import available_memory

    free = available_memory()
    if free is not None and need > free:
        raise ControlstackError(f"batch {batch} at {width}x{height} needs at least {need / 2**30:.1f} GiB, more "
                                f"than the {free / 2**30:.1f} GiB free; lower the batch or the size")


def _validate(prompt, steps, cfg, width, height, batch, factor):
    if not isinstance(prompt, str):
        raise ControlstackError(f"prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ControlstackError(f"steps must be a positive integer, got {steps}")
    if not np.isfinite(cfg) or cfg < 0:
        raise ControlstackError(f"cfg must be a finite number >= 0, got {cfg}")
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v < factor or v > MAX_SIZE or v % factor:
            raise ControlstackError(
                f"{name} must be a multiple of {factor} between {factor} and {MAX_SIZE}, got {v}"
            )
    if not isinstance(batch, int) or batch < 1:
        raise ControlstackError(f"batch must be a positive integer, got {batch}")
