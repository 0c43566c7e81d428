"""The Omni option's per-task pieces that the ControlNet recipe calls (OmniControlNet, Wang et al.
2024, Sec. 3.2; docs/method.md §3): which world column holds each task's condition, one task per
sample, and validation rows that cycle through the tasks.

They sit below both recipes: ``controlnet.py`` calls them when its config names ``tasks`` and
``omni.py`` (the ``OmniConfig`` over the ControlNet recipe) re-exports them, so neither recipe
imports the other's module back.
"""

from __future__ import annotations

import torch

from controlstack.tasks import TASK_COLUMNS  # the task table's view: an Omni task -> its world column

#: task name -> the world export's column holding its condition (``hed`` is the soft edge)


def task_column(task: str) -> str:
    """The world column of ``task``'s condition (a task not in :data:`TASK_COLUMNS` is its own)."""
    return TASK_COLUMNS.get(task, task)


def pick_hints(batch: dict, tasks, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One task per sample, uniformly: ``(hint (B, 3, H, W), task index (B,))``."""
    stacked = torch.stack([batch[f"hint_{t}"] for t in tasks])        # (K, B, 3, H, W)
    b = stacked.shape[1]
    k = torch.randint(0, len(tasks), (b,), generator=generator)
    return stacked[k.to(stacked.device), torch.arange(b, device=stacked.device)], k


@torch.no_grad()
def validation_samples(net, base, vae, text_encoder, val: dict, cfg):
    """Validation rows for the Omni ControlNet (``cfg``: its ``OmniConfig``): row ``i`` uses task
    ``i mod K`` through the project's pipeline (``Control(..., task=...)``), as users sample it.
    Returns (hints, generated, mean edge fidelity over the rows)."""
    from controlstack.control import Control  # local: heavy, only this path needs it
    from controlstack.training.validation import (  # local: heavy, only this path needs it
        condition_fidelity,
        tensor_to_pil,
        validation_pipeline,
    )

    net.controlnet.task_tokens = net.task_tokens.rows()  # what a loaded Omni model carries
    pipe = validation_pipeline(vae, text_encoder, base.tokenizer, net.unet, base.scheduler_config)
    hints, generated, scores = [], [], []
    for i, prompt in enumerate(val["text"]):
        task = cfg.tasks[i % len(cfg.tasks)]
        hint = tensor_to_pil(val[f"hint_{task}"][i:i + 1], signed=False)[0]
        image = pipe(prompt, [Control(net.controlnet, hint, weight=cfg.conditioning_scale, task=task)],
                     steps=cfg.num_inference_steps, cfg=cfg.guidance_scale, seed=cfg.seed + i,
                     width=cfg.resolution, height=cfg.resolution, scheduler="ddim", progress=False)[0]
        hints.append(hint)
        generated.append(image)
        scores.append(condition_fidelity(task_column(task), [hint], [image]))
    return hints, generated, float(sum(scores) / max(len(scores), 1))
