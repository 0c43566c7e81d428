"""Recipe: OmniControlNet's stage 2 -- one ControlNet for every condition type, told apart by task tokens.

OmniControlNet (Wang et al. 2024, Sec. 3.2; docs/method.md §3): each condition type is a learned
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

from controlstack.errors import require
from controlstack.training.config import list_field
from controlstack.training.controlnet import ControlNetConfig, train
from controlstack.training.omni_tasks import TASK_COLUMNS, pick_hints, task_column, validation_samples

# train: the ControlNet recipe's own; the per-task pieces it calls live in omni_tasks.py
__all__ = ["TASK_COLUMNS", "OmniConfig", "pick_hints", "task_column", "train", "validation_samples"]


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


def is_omni(config) -> bool:
    return isinstance(config, OmniConfig)
