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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from controlstack import annotators, assets
from controlstack.control import Control
from controlstack.denoiser import ControlledDenoiser
from controlstack.errors import ControlstackError
from controlstack.hints import Hints
from controlstack.hires import MAX_HIRES, check, hires_size, run_hires  # noqa: F401 (re-exported: the server's and CLI's checks)
from controlstack.img2img import Img2Img
from controlstack.injection import make_injection
from controlstack.inpaint import InpaintOptions, run_inpaint
from controlstack.io import checkpoints
from controlstack.io.checkpoints import check_compatible
from controlstack.io.images import pixel_perfect_resolution, resize_image, to_rgb, validate_image
from controlstack.io.settings import read_settings, recommended
from controlstack.ip_adapter import ImagePrompt, ImagePrompts
from controlstack.limits import MAX_SIZE, check_memory, memory_needed  # noqa: F401 (re-exported: preflight, serve)
from controlstack.limits import validate as _validate
from controlstack.lora import Loras, available
from controlstack.mmdit import TRANSFORMER_DENOISERS
from controlstack.models.components import SDComponents
from controlstack.models.families import family_of
from controlstack.models.lcm import guidance_scale_embedding
from controlstack.models.tiers import Runners, Tier, make_tier
from controlstack.models.vae import unscale
from controlstack.prompting import Prompting
from controlstack.recommendations import (  # noqa: F401 (the constants are re-exported)
    INFERENCE_ONLY_LAMBDA_MAX,
    SMALL_CONTROLNET,
    Recommendations,
)
from controlstack.sampling import make_scheduler, sample
from controlstack.sampling.img2img import Start
from controlstack.sampling.loop import StopSampling

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
class Generation:
    """One call's arguments, resolved (:meth:`Pipeline.resolve`: the models' recommendations filled
    in, checked) -- what the steps of a call read instead of two dozen loose arguments."""

    prompt: str
    controls: list[Control]
    steps: int
    cfg: float
    mode: str
    mode_options: dict | None
    width: int
    height: int
    batch: int
    seed: int | None = 0
    scheduler: str = "unipc"
    negative_prompt: str = ""
    init_image: Any = None
    strength: float = 0.75
    inpaint_mask: Any = None
    inpaint: InpaintOptions | None = None
    eta: float = 0.0
    micro: dict = field(default_factory=dict)  # SDXL's original_size / crops_coords_top_left / target_size
    image_prompts: list | None = None  # IP-Adapter image prompts (ip_adapter.py)

    def kwargs(self) -> dict:
        """``Pipeline.__call__``'s keyword arguments for these values (the hires fix and sd-webui's
        inpainting call the pipeline again with them)."""
        out = {k: getattr(self, k) for k in ("steps", "cfg", "seed", "width", "height", "scheduler", "mode",
                                             "negative_prompt", "batch", "mode_options", "init_image", "strength",
                                             "inpaint_mask", "inpaint", "eta", "image_prompts")}
        return {**out, **self.micro}


def after_each_step(blend, step_callback):
    """The loop's callback: inpainting's ``blend``, then ``step_callback(done, total)``; a
    :class:`StopSampling` it raises carries the blended latents, so the loop returns those."""
    if step_callback is None:
        return blend

    def after_step(step, latents):
        out = blend(step, latents) if blend is not None else None
        try:
            step_callback(step.index + 1, step.count)
        except StopSampling as stop:
            stop.latents = latents if out is None else out
            raise
        return out

    return after_step


@dataclass
class GenerationResult:
    """Images plus what produced them (the CLI writes ``parameters`` into the PNGs)."""

    images: list
    parameters: dict
    conditions: list = field(default_factory=list)  # from_image: the condition made for each task


class Pipeline(Prompting, Hints, Img2Img, Recommendations, Loras, ImagePrompts):
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
        self.text_encoder_3 = components.text_encoder_3.eval() if components.text_encoder_3 is not None else None
        self.tokenizer_3 = components.tokenizer_3
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
        self.lora_dir: Path | None = None  # where a prompt's <lora:NAME:WEIGHT> is found (lora.py)

    def optimize(self, tier: str = "compiled", *, precision: str | None = None) -> Pipeline:
        """Switch the speed tier (``models/tiers.py``, docs/speed.md): ``"parity"`` (float32 eager,
        as diffusers; the default), ``"compiled"`` (the same math through AOTInductor, compiled
        once per shape and cached under ``~/.cache/controlstack``) or ``"fast"`` (compiled, bf16 where
        measured faster here, unless the model's ``controlstack.json`` recommends a precision, or
        ``precision="fp32"/"bf16"`` --, encoder / ControlNet reuse)."""
        if tier == "fast" and precision is None:  # a model may say bf16 costs it fidelity (the bundle does)
            precision = self.recommended.get("precision")
        self.tier = make_tier(tier, precision)
        if self.tier.compiled and self.loras:  # graphs are compiled from the weights: the LoRAs merged in
            self.fuse_loras()
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
        c = self.unet.config  # a transformer without out_channels outputs what it reads
        return self.family.network == "unet" and c.in_channels != c.out_channels

    @property
    def native_size(self) -> int:
        """The image size the base was trained at (U-Net sample size times the VAE factor)."""
        return self.family.native_size(self)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, allow_pickle: bool = False,
                        config: str | os.PathLike | None = None, torch_dtype=torch.float32) -> Pipeline:
        """A diffusers SD / SDXL / SD3 / Flux folder or single-file checkpoint, or a bundled base by name
        (``assets.BUNDLED_BASES``: ``"lcm"``, ``"sd3"``); ``None`` = the bundled default model.
        ``torch_dtype``: the weights' dtype (``torch.bfloat16`` halves an SDXL U-Net's 10 GB; None
        keeps what is stored); ControlNets loaded by path follow the base's."""
        if path is None:
            return assets.default_pipeline(cls)
        named = assets.bundled_base(str(path)) if not Path(path).exists() else None
        if named is not None and (named / "unet").is_dir():  # a bundled student of the base (lcm)
            return cls.from_source(assets.load_student(named, torch_dtype=torch_dtype),
                                   assets.trained_controlnets(assets.BUNDLE_DIR), str(path), named)
        path = named or path  # a bundled base by name (sd3), else the folder / file given
        components = checkpoints.load_base(path, allow_pickle=allow_pickle, config=config, torch_dtype=torch_dtype)
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
            self._model_hash = checkpoints.model_hash(self.source)
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
            cn = self.controlnets[str(model)] = checkpoints.load_controlnet(model, torch_dtype=self.unet.dtype)
        else:
            known = ", ".join(sorted(self.controlnets)) or "none bundled"
            raise ControlstackError(
                f"control model '{model}' is neither a bundled ControlNet ({known}) nor an existing path"
            )
        check_compatible(cn, self.unet)  # mismatched channels would fail mid-run otherwise
        return cn.eval()

    def from_image(self, photo, tasks: Sequence[str], prompt: str, *, model: Any = "omni",
                   weight: float | Sequence[float] = 1.0, resize_mode: str = "just_resize",
                   return_result: bool = False, **kwargs):
        """OmniControlNet's whole pipeline in one call: the conditions of ``tasks`` are made from
        ``photo`` (learned ones by the bundled multi-task predictor, classical ones like canny by
        their annotators, ``annotators.FOR_TASK``), then generated from with the Omni ControlNet
        ``model`` (one set of weights for every task). ``kwargs`` go to ``__call__`` (steps, cfg,
        seed, width, height, mode, ...). Returns images, or a :class:`GenerationResult` whose
        ``conditions`` hold the condition of each task."""
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
        images, params = run_inpaint(self, options, prompt, controls, output_type=output_type, **kw)
        if output_type == "pil":
            label(images, params)
        return GenerationResult(images, params) if return_result else images

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, generator=None) -> np.ndarray:
        """VAE decode and diffusers' post-processing -> float array (B, H, W, 3) in [0, 1]."""
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
        scheduler: str | None = None,
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
        image_prompts: Sequence[ImagePrompt] | None = None,
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
        ``image_prompts`` (with IP-Adapters loaded, ``load_ip_adapter``): one
        :class:`~controlstack.ip_adapter.ImagePrompt` per adapter.
        ``output_type``: 'pil', 'np', or 'latent' (the final latents, not decoded).
        ``original_size``, ``crops_coords_top_left``, ``target_size`` (SDXL bases only): the
        micro-conditioning, (height, width) / (top, left); None = the output size and (0, 0).
        """
        if "<lora:" in str(prompt) or "<lora:" in str(negative_prompt):  # sd-webui's prompt syntax
            args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
            return self._with_prompt_loras(**args)
        g = self.resolve(prompt, controls, steps=steps, cfg=cfg, seed=seed, width=width, height=height,
                         scheduler=scheduler, mode=mode, negative_prompt=negative_prompt, batch=batch,
                         mode_options=mode_options, init_image=init_image, strength=strength,
                         inpaint_mask=inpaint_mask, inpaint=inpaint, eta=eta, hires=hires, image_prompts=image_prompts,
                         micro={"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                                "target_size": target_size})
        if hires is not None:  # two passes of this call (hires.py)
            return self._hires(hires, hires_strength, g.prompt, g.controls, hires_steps=hires_steps,
                               hires_upscaler=hires_upscaler, output_type=output_type, return_result=return_result,
                               step_callback=step_callback, progress=progress, **g.kwargs())
        if g.inpaint is not None and g.inpaint.image_steps and g.inpaint_mask is not None and g.init_image is not None:
            kw = g.kwargs()  # sd-webui's inpainting options around this call (inpaint.py)
            kw.pop("inpaint")
            return self._inpaint(g.inpaint, g.prompt, g.controls, output_type=output_type, return_result=return_result,
                                 step_callback=step_callback, progress=progress, **kw)
        generator = torch.Generator("cpu").manual_seed(int(g.seed)) if g.seed is not None else None
        latents = self.run(g, generator, step_callback, progress)
        params = self.record(g)
        if output_type == "latent":
            images = latents
        elif output_type == "pil":
            images = label([Image.fromarray((im * 255).round().astype("uint8")) for im in self.decode(latents, generator)],
                           params)
        else:
            images = self.decode(latents, generator)
        return GenerationResult(images, params) if return_result else images

    # ----------------------------------------------------------------------------- the steps of a call
    def resolve(self, prompt: str, controls: Sequence[Control], *, steps, cfg, mode, mode_options, width, height,
                batch, hires, **rest) -> Generation:
        """A call's arguments with the models' recommendations filled in and checked: steps, CFG,
        mode and its options (:meth:`settings`), the native size, each control's window
        (:meth:`with_windows`), the sizes, memory and the weak-ControlNet warning."""
        # the call's, else the base's recommendation (an LCM student: lcm), else the family's (unipc; euler on flow)
        rest["scheduler"] = rest["scheduler"] or self.recommended.get("scheduler") or self.family.default_scheduler
        width = self.native_size if width is None else width
        height = self.native_size if height is None else height
        controls = list(controls)
        for c in controls:
            if not isinstance(c, Control):
                raise ControlstackError(f"controls must be Control objects, got {type(c).__name__}")
        if rest["inpaint"] is not None and not isinstance(rest["inpaint"], InpaintOptions):
            raise ControlstackError(f"inpaint must be an InpaintOptions, got {type(rest['inpaint']).__name__}")
        used = self.settings(controls, steps, cfg, mode, mode_options)
        _validate(prompt, used["steps"], used["cfg"], width, height, batch, self.vae_scale_factor)
        self.check_memory(batch, width * (hires or 1), height * (hires or 1))
        if mode is None:
            self.warn_if_weak(controls)
        return Generation(prompt=prompt, controls=self.with_windows(controls), steps=used["steps"], cfg=used["cfg"],
                          mode=used["mode"], mode_options=used["mode_options"], width=width, height=height,
                          batch=batch, **rest)

    def run(self, g: Generation, generator, step_callback=None, progress: bool = True) -> torch.Tensor:
        """The one sampling loop for ``g``: the injection and scheduler, the text conditions, one
        branch per control, where the loop starts (noise, or img2img / inpainting), then
        :func:`~controlstack.sampling.sample` over the controlled denoiser. The final latents."""
        native = self.native_size
        if not (native / 2 <= g.width <= native * 2 and native / 2 <= g.height <= native * 2):
            logging.getLogger("controlstack").warning(
                f"generating at {g.width}x{g.height}, far from the model's native {native}x{native}: expect repeated "
                "or broken composition")
        g.mode_options = self.mi_options(g.mode, g.mode_options, g.controls)
        injection = make_injection(g.mode, **(g.mode_options or {}))
        if speckles(g.scheduler, injection, bool(g.controls), g.cfg):
            raise ControlstackError(
                f"scheduler '{g.scheduler}' with mode '{g.mode}' at CFG {g.cfg:g} turns the image to speckle: the "
                f"control acts on the conditional half only, guidance multiplies it by {g.cfg:g}, and {g.scheduler}'s "
                f"4th-order extrapolation amplifies that term; use unipc, dpmpp_2m, euler or ddim, mode balanced, or "
                f"CFG <= {MAX_CFG_HIGH_ORDER:g}")
        sched = make_scheduler(g.scheduler, self.scheduler_config, flow=self.family.flow)
        do_cfg = self.family.cfg_batch and g.cfg > 1 and self.unet.config.get("time_cond_proj_dim") is None
        cond, uncond, added = self.text_conditions(g.prompt, g.negative_prompt, g.batch, do_cfg, (g.height, g.width),
                                                   g.micro)
        hint_batch = g.batch * (2 if do_cfg and not injection.cond_only else 1)
        branches = self.make_branches(g.controls, g.width, g.height, (g.prompt, g.negative_prompt or ""), g.batch,
                                      do_cfg, g.inpaint_mask, hint_batch, generator)
        if g.init_image is None and any(getattr(b, "reads_mask", False) for b in branches):
            g = replace(g, inpaint_mask=None)  # an inpainting ControlNet took the mask: a txt2img run around it
        start = self.start(g, sched, generator, do_cfg)
        if self.family.network == "unet":
            denoiser = ControlledDenoiser(self.runners.unet, branches, injection, cond, uncond, g.cfg,
                                          unet_extra=start.unet_extra, reuse=self.tier.reuse, added=added,
                                          image_embeds=self.image_embeds(g.image_prompts, g.batch, do_cfg),
                                          ip_masks=self.ip_masks(g.image_prompts, g.height, g.width),
                                          timestep_cond=self.guidance_embedding(g.cfg, g.batch))
        else:  # a transformer base: its ControlNets add block residuals (mmdit.py)
            h, w = g.height // self.vae_scale_factor, g.width // self.vae_scale_factor
            denoiser = TRANSFORMER_DENOISERS[self.family.network](self, branches, injection, cond, uncond, g.cfg,
                                                                    added, (h, w))
        latents = sample(denoiser, sched, start.latents, g.steps, generator=generator, eta=g.eta, progress=progress,
                         start=start.start, callback=after_each_step(start.blend, step_callback),
                         schedule=lambda sc, n, x: self.family.set_timesteps(sc, n, x, x.device))
        return self.family.unpack(latents, *start.latent_size) if start.latent_size else latents

    def guidance_embedding(self, cfg: float, batch: int) -> torch.Tensor | None:
        """A guidance-embedded U-Net's (an LCM student's: ``time_cond_proj_dim``) condition: the
        sinusoidal embedding of ``w = cfg - 1`` (Luo et al., 2023, "Latent Consistency Models", Sec. 4.2;
        diffusers' ``get_guidance_scale_embedding``); None for any other U-Net."""
        dim = self.unet.config.get("time_cond_proj_dim")
        if dim is None:
            return None
        return guidance_scale_embedding(torch.full((batch,), cfg - 1.0), dim).to(self.unet.device, self.unet.dtype)

    def start(self, g: Generation, scheduler, generator, do_cfg: bool) -> Start:
        """Where the loop starts: pure noise (txt2img), or the init image's latents noised to the
        strength's timestep with inpainting's blend or extra input (:meth:`img2img_start`)."""
        shape = self.family.noise_shape(self, g.batch, g.height, g.width)
        if g.init_image is not None:
            return self.img2img_start(g.init_image, g.inpaint_mask, g.strength, shape, scheduler, generator, do_cfg,
                                      fill=g.inpaint.fill if g.inpaint is not None else "original")
        if g.inpaint_mask is not None:
            raise ControlstackError("inpaint_mask needs init_image (the image to repaint)")
        if self.inpainting_unet:
            raise ControlstackError("this is an inpainting U-Net: pass init_image and inpaint_mask")
        # drawn on the CPU generator, then moved (diffusers' randn_tensor): the same image on any device
        noise = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(self.unet.device)
        return Start(self.family.pack(noise), latent_size=tuple(shape[-2:]))

    def record(self, g: Generation) -> dict:
        """What produced the images: the PNG's parameters (``io/png.py`` writes sd-webui's infotext)."""
        return {
            **({"img2img": {"strength": g.strength, "inpaint": g.inpaint_mask is not None}}
               if g.init_image is not None else {}),
            "prompt": g.prompt, "negative_prompt": g.negative_prompt, "steps": g.steps, "cfg": g.cfg,
            "seed": g.seed, "width": g.width, "height": g.height, "scheduler": g.scheduler, "mode": g.mode,
            "model": self.name, **({"mode_options": dict(g.mode_options)} if g.mode_options else {}),
            **{k: list(v) for k, v in g.micro.items() if v is not None},
            **({"optimize": self.tier.name} if self.tier.name != "parity" else {}),
            "controls": [
                {"model": str(c.model) if isinstance(c.model, (str, os.PathLike)) else type(c.model).__name__,
                 "weight": c.weight, "start": c.start, "end": c.end,
                 "mask": c.mask is not None, "resize_mode": c.resize_mode,
                 "preprocess": c.preprocess, "module": self.module_name(c), **({"task": c.task} if c.task else {})}
                for c in g.controls
            ],
            **({"model_hash": self.model_hash} if self.model_hash else {}),
            **({"loras": [{"name": lo.name, "weight": lo.weight, "hash": lo.hash} for lo in self.loras.values()]}
               if self.loras else {}),
        }

    def _with_prompt_loras(self, prompt, negative_prompt, return_result, output_type, **kw):
        """A call whose prompt names LoRAs (``<lora:NAME:WEIGHT>``, from :attr:`lora_dir`): each is
        loaded (or re-weighted) for this call only, the tags leave the text the encoder reads, and
        the infotext keeps them, as sd-webui's does."""
        text, wanted = self.prompt_loras(prompt, self.lora_dir)
        negative, more = self.prompt_loras(negative_prompt, self.lora_dir)
        files, before, added = available(self.lora_dir), {n: lo.weight for n, lo in self.loras.items()}, []
        try:
            for name, weight in wanted + more:
                if name in before:
                    self.set_lora_weights({name: weight})
                elif name not in added:
                    added.append(self.load_lora(files[name], weight, name))
            result = self(text, negative_prompt=negative, return_result=True, output_type=output_type, **kw)
        finally:
            for name in added:
                self.unload_lora(name)
            if before:
                self.set_lora_weights(before)
        result.parameters.update(prompt=prompt, negative_prompt=negative_prompt)
        if output_type == "pil":
            label(result.images, result.parameters)
        return result if return_result else result.images

    def memory_needed(self, batch: int, width: int, height: int) -> int:
        """:func:`memory_needed` of this pipeline's U-Net and VAE."""
        c = self.unet.config  # a U-Net's first level, or a transformer's width per latent pixel
        net_width = c["block_out_channels"][0] if "block_out_channels" in c else \
            c["num_attention_heads"] * c["attention_head_dim"] // c["patch_size"] ** 2
        return memory_needed(net_width, self.vae.config.block_out_channels[0],
                             self.vae_scale_factor, batch, width, height)

    def check_memory(self, batch: int, width: int, height: int) -> None:
        check_memory(self.memory_needed(batch, width, height), batch, width, height)

def label(images: list, params: dict) -> list:
    """Each image's infotext, as sd-webui's images carry it (with its batch position past one image)."""
    from controlstack.io.png import format_parameters  # local: heavy, only this path needs it

    for pos, im in enumerate(images):
        im.info["parameters"] = format_parameters({**params, **({"batch_pos": pos} if len(images) > 1 else {})})
    return images
