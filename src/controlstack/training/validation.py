"""Validation during training: image grids, the condition-fidelity metric and its curve.

The ControlNet paper (Sec. 4, Fig. 4) reports *sudden convergence*: the model ignores the
condition for a while and then, within a few hundred steps, starts to follow it. We make it
visible by re-extracting the condition from generated validation images and plotting the
agreement over steps (``fidelity.png``), as the paper's evaluation re-detects edges / poses.

Fidelity is an edge F1 with a 2-pixel tolerance (the usual boundary-F tolerance of BSDS-style
edge benchmarks): for ``canny`` the input is already an edge map; for every other condition the
proxy compares ``cv2.Canny`` of the condition image (its depth / segment / pose boundaries) with
``cv2.Canny`` of the generated image, thresholds 100/200 as in the ControlNet canny annotator.

Samples are drawn through the project's own ``Pipeline`` -- the one sampling loop, as users
sample the model -- with DDIM on the base's schedule and seed ``seed + i`` for row ``i``: the images
diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionControlNetPipeline`` give with one
generator per image (the parity suite holds the pipeline to theirs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from controlstack.control import Control
from controlstack.evaluation.metrics import edge_f1, edges
from controlstack.models.components import SDComponents
from controlstack.pipeline import Pipeline
from controlstack.prompting import project_prompts


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
    import matplotlib  # local: heavy, only this path needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # local: heavy, only this path needs it

    from controlstack.training.session import read_metric  # local: heavy, only this path needs it

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


def validation_pipeline(vae, text_encoder, tokenizer, unet, scheduler_config):
    """The project's pipeline over the models being trained (nothing copied; its ``eval()`` calls are
    undone by the recipes, which switch their trainable parts back to ``train()``)."""
    return Pipeline(SDComponents(unet, vae, text_encoder, tokenizer, scheduler_config))


@torch.no_grad()
def sample_text_to_image(vae, text_encoder, tokenizer, unet, scheduler_config, prompts: list[str],
                         size: int, steps: int, guidance_scale: float, seed: int) -> list[Image.Image]:
    """Prompt -> image (DDIM, seed ``seed + i`` for prompt ``i``)."""
    pipe = validation_pipeline(vae, text_encoder, tokenizer, unet, scheduler_config)
    with project_prompts():  # world captions: their length is the training's, not news
        return [pipe(p, [], steps=steps, cfg=guidance_scale, seed=seed + i, width=size, height=size,
                     scheduler="ddim", progress=False)[0] for i, p in enumerate(prompts)]


@torch.no_grad()
def sample_controlnet(vae, text_encoder, tokenizer, unet, controlnet, scheduler_config, prompts: list[str],
                      hints: list[Image.Image], size: int, steps: int, guidance_scale: float,
                      conditioning_scale: float, seed: int, mode: str = "sum",
                      mode_options: dict | None = None) -> list[Image.Image]:
    """Prompt + hint -> image with the injection the model is trained with (``sum``: diffusers'
    ControlNet; a model trained with ``mi`` is validated with ``mi``, as it will be used)."""
    pipe = validation_pipeline(vae, text_encoder, tokenizer, unet, scheduler_config)
    with project_prompts():
        return [pipe(p, [Control(controlnet, h, weight=conditioning_scale)], steps=steps, cfg=guidance_scale,
                     seed=seed + i, width=size, height=size, scheduler="ddim", mode=mode,
                     mode_options=mode_options, progress=False)[0]
                for i, (p, h) in enumerate(zip(prompts, hints))]
