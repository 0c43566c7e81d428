"""Validation during training: image grids, the condition-fidelity metric and its curve.

The ControlNet paper (Sec. 4, Fig. 4) reports *sudden convergence*: the model ignores the
condition for a while and then, within a few hundred steps, starts to follow it. We make it
visible by re-extracting the condition from generated validation images and plotting the
agreement over steps (``fidelity.png``), as the paper's evaluation re-detects edges / poses.

Fidelity is an edge F1 with a 2-pixel tolerance (the usual boundary-F tolerance of BSDS-style
edge benchmarks): for ``canny`` the input is already an edge map; for every other condition the
proxy compares ``cv2.Canny`` of the condition image (its depth / segment / pose boundaries) with
``cv2.Canny`` of the generated image, thresholds 100/200 as in the ControlNet canny annotator.

Sampling goes through diffusers' pipelines behind :func:`sample_text_to_image` and
:func:`sample_controlnet` (one function each) until the project's own ``Pipeline`` replaces them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from controlstack.evaluation.metrics import edge_f1, edges


def tensor_to_pil(x: torch.Tensor, signed: bool) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] (signed) or [0, 1] -> PIL RGB images."""
    x = x.detach().float().cpu()
    if signed:
        x = (x + 1.0) / 2.0
    a = (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(im) for im in a]


def condition_fidelity(condition: str, hints: list[Image.Image], generated: list[Image.Image]) -> float:
    """Mean edge F1 (2 px) between each hint's edges and the generated image's canny edges."""
    scores = [
        edge_f1(edges(h, is_edge_map=condition == "canny"), edges(g.resize(h.size)))
        for h, g in zip(hints, generated)
    ]
    return float(np.mean(scores)) if scores else float("nan")


def plot_metric(csv_path: Path, metric: str, png_path: Path, title: str) -> None:
    """Line plot of one metric over steps (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from controlstack.training.session import read_metric

    steps, values = read_metric(csv_path, metric)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(steps, values, marker="o", ms=3)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def _scheduler(scheduler_config):
    from controlstack.sampling import make_scheduler

    return make_scheduler("ddim", scheduler_config)  # with make_scheduler's latent-space defaults


@torch.no_grad()
def sample_text_to_image(vae, text_encoder, tokenizer, unet, scheduler_config, prompts: list[str],
                         size: int, steps: int, guidance_scale: float, seed: int) -> list[Image.Image]:
    """Prompt -> image with diffusers' ``StableDiffusionPipeline`` (DDIM, fixed seeds)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=gens).images


@torch.no_grad()
def sample_controlnet(vae, text_encoder, tokenizer, unet, controlnet, scheduler_config, prompts: list[str],
                      hints: list[Image.Image], size: int, steps: int, guidance_scale: float,
                      conditioning_scale: float, seed: int, mode: str = "sum",
                      mode_options: dict | None = None) -> list[Image.Image]:
    """Prompt + hint -> image with diffusers' ``StableDiffusionControlNetPipeline`` (``mode="sum"``),
    or through the project's own pipeline for another injection (a model trained with ``mi``
    is validated with ``mi``, as it will be used)."""
    from diffusers import ControlNetModel

    if mode != "sum" or not isinstance(controlnet, ControlNetModel):  # MI, or ControlNet-lite
        from controlstack.control import Control
        from controlstack.models.tiny import SDComponents
        from controlstack.pipeline import Pipeline

        pipe = Pipeline(SDComponents(unet, vae, text_encoder, tokenizer, scheduler_config))
        return [pipe(p, [Control(controlnet, h, weight=conditioning_scale)], steps=steps, cfg=guidance_scale,
                     seed=seed + i, width=size, height=size, scheduler="ddim", mode=mode,
                     mode_options=mode_options, progress=False)[0]
                for i, (p, h) in enumerate(zip(prompts, hints))]
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=_scheduler(scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, image=hints, height=size, width=size, num_inference_steps=steps,
                guidance_scale=guidance_scale, controlnet_conditioning_scale=conditioning_scale,
                generator=gens).images
