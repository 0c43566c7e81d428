"""Recipe: OmniControlNet's stage 2 -- one ControlNet for every condition type, told apart by task tokens.

OmniControlNet (Wang et al. 2024, Sec. 3.2; METHOD_NOTES §3): each condition type is a learned
word (textual inversion), prefixed to the prompt, and one ControlNet is trained on a mix of
condition types. It is the ControlNet recipe (``controlnet.py``) with these options, not a copy:

* ``tasks`` -- the condition types; each sample of a batch draws one uniformly (its own random
  stream, so the denoising draws are those of a plain run) and its hint is that task's column;
* the ControlNet branch sees ``<task> + caption`` (after caption dropout: ``<task>`` alone), the
  locked U-Net the plain caption, as at sampling time (``models/task_tokens.py``);
* the optimiser holds the ControlNet's weights and the task tokens' embeddings
  (``token_learning_rate``, no weight decay); the rest of the text encoder stays locked.

Output: the ControlNetModel folder plus ``task_tokens.safetensors`` and ``controlstack.json``
(``omni.tasks``), loaded by ``Control(model="omni", task="depth", ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from controlstack.errors import require
from controlstack.training.config import list_field
from controlstack.training.controlnet import ControlNetConfig, train

__all__ = ["TASK_COLUMNS", "OmniConfig", "pick_hints", "train"]  # train: the ControlNet recipe's own

#: task name -> the world export's column holding its condition (``hed`` is the soft edge)
TASK_COLUMNS = {"canny": "canny", "depth": "depth", "seg": "seg", "pose": "pose", "hed": "softedge",
                "scribble": "scribble", "normal": "normal"}


def task_column(task: str) -> str:
    return TASK_COLUMNS.get(task, task)


@dataclass
class OmniConfig(ControlNetConfig):
    tasks: tuple[str, ...] = list_field(*TASK_COLUMNS)  # condition types, one token each
    token_learning_rate: float = 1e-3       # the task tokens' AdamW lr (textual inversion's range)
    condition: str = "omni"                 # not a column: each sample's hint is its task's column
    output_dir: str = "outputs/train/omni"

    def __post_init__(self) -> None:
        require(not self.rebalance_probability and not self.conservativity_weight,
                "the omni recipe does not combine with data rebalancing or the conservativity term; "
                "set rebalance_probability and conservativity_weight to 0")
        super().__post_init__()
        require(len(self.tasks) >= 1, "config key 'tasks' is empty; name the condition types (e.g. [canny, depth])")
        require(len(set(self.tasks)) == len(self.tasks), "config key 'tasks' lists a task twice")
        require(all(t.replace("_", "").isalnum() for t in self.tasks),
                "config key 'tasks': task names are letters, digits and '_' (they become tokens <name>)")
        require(self.token_learning_rate > 0, "config key 'token_learning_rate' must be > 0")

    def hint_columns(self) -> dict[str, str]:
        """dataset column -> the batch's name (``hint_<task>``)."""
        return {task_column(t): f"hint_{t}" for t in self.tasks}


def pick_hints(batch: dict, tasks, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One task per sample, uniformly: ``(hint (B, 3, H, W), task index (B,))``."""
    stacked = torch.stack([batch[f"hint_{t}"] for t in tasks])        # (K, B, 3, H, W)
    b = stacked.shape[1]
    k = torch.randint(0, len(tasks), (b,), generator=generator)
    return stacked[k.to(stacked.device), torch.arange(b, device=stacked.device)], k


def is_omni(config) -> bool:
    return isinstance(config, OmniConfig)


@torch.no_grad()
def validation_samples(net, base, vae, text_encoder, val: dict, cfg: OmniConfig):
    """Validation rows for the Omni ControlNet: row ``i`` uses task ``i mod K`` through the
    project's pipeline (``Control(..., task=...)``), as users sample it. Returns (hints, generated,
    mean edge fidelity over the rows)."""
    from controlstack.control import Control
    from controlstack.models.tiny import SDComponents
    from controlstack.pipeline import Pipeline
    from controlstack.training.validation import condition_fidelity, tensor_to_pil

    net.controlnet.task_tokens = net.task_tokens.rows()  # what a loaded Omni model carries
    pipe = Pipeline(SDComponents(net.unet, vae, text_encoder, base.tokenizer, base.scheduler_config))
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
