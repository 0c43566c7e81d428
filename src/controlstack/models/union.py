"""ControlNet-Union / ProMax (xinsir, 2024; diffusers' ``ControlNetUnionModel``): one ControlNet for
every condition type, told the type the way an Omni ControlNet is told its task.

A union model adds a *control-type* embedding to the time embedding (the multi-hot vector of the
types in use, Fourier-embedded) and fuses its conditions before the trainable copy: each
condition's hint features are mean-pooled to a token, its type's learned ``task_embedding`` is
added, a small transformer attends over these tokens plus one of the latent, and a per-condition
channel offset ``alpha`` is added to each condition's features before all are summed into the
latent. So several conditions of one union model are *one* forward pass with one set of residuals
-- they share the weights and interact --, and in controlstack they are one branch
(``control.UnionBranch``) however many ``Control``s name the model.

Weights follow diffusers' ``StableDiffusionXLControlNetUnionPipeline``: one condition -> its
residuals scaled by its weight; several -> each condition's features and ``alpha`` scaled inside
the fusion, residuals unscaled (so the fast tier's reuse replays several conditions' residuals only
while their weights stay the same). A condition outside its window gets weight 0 (it stays in the
fusion, as in diffusers); when no condition is in its window the model is not run at all --
diffusers still runs it with every condition at 0 and adds what the bare latent gives.

Type names (``Control(model, image, task="depth")``, ``--control PATH/depth:IMAGE``) map to the
models' control ids (the model card's order; ProMax adds tile and repaint).
"""

from __future__ import annotations

import torch

from controlstack.errors import ControlstackError
from controlstack.models.runner import ControlNetRunner
from controlstack.residuals import Residuals
from controlstack.tasks import UNION_TASKS  # the task table's view: condition type -> control id


def is_union(model) -> bool:
    return type(model).__name__ == "ControlNetUnionModel"


def control_id(model, task: str | None, name: str = "ControlNet-Union") -> int:
    """The control id of ``task`` in ``model``, or a one-line error naming the choices."""
    n = int(model.config.num_control_type)
    known = [t for t, i in UNION_TASKS.items() if i < n]  # by id, the common name first
    if task is None:
        raise ControlstackError(f"'{name}' is a ControlNet-Union model and needs a task: "
                                f"Control(model, image, task=...) or --control MODEL/TASK:IMAGE; one of {', '.join(known)}")
    if task not in UNION_TASKS:
        raise ControlstackError(f"ControlNet-Union '{name}' has no task '{task}'; choose one of {', '.join(known)}")
    if UNION_TASKS[task] >= n:
        raise ControlstackError(f"task '{task}' is control id {UNION_TASKS[task]}, but '{name}' has {n} control types "
                                f"(tile and repaint need ProMax); choose one of {', '.join(known)}")
    return UNION_TASKS[task]


class UnionRunner(ControlNetRunner):
    """``ControlNetUnionModel.forward`` with the hint encoder split out (once per run per condition;
    ``conditions`` are those features, at the batch the branch runs at)."""

    def __call__(self, sample, timestep, encoder_hidden_states, conditions: list[torch.Tensor], ids: list[int],
                 scales: list[float], *, added_cond_kwargs: dict | None = None) -> Residuals:
        cn = self.controlnet
        batch = sample.shape[0]
        control_type = torch.zeros(cn.config.num_control_type).scatter_(0, torch.tensor(ids), 1)
        control_type = control_type.reshape(1, -1).to(sample.dtype).repeat(batch, 1)
        control = cn.control_type_proj(control_type.flatten()).reshape((batch, -1))
        t_dtype = cn.time_embedding.linear_1.weight.dtype
        emb = self.embedding(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                             extra=cn.control_add_embedding(control.to(t_dtype)))
        sample = cn.conv_in(sample)
        single = len(ids) == 1  # diffusers scales one condition's residuals, several inside the fusion
        tokens, feats = [], []
        for cond, idx, scale in zip(conditions, ids, scales):
            seq = torch.mean(cond, dim=(2, 3)) + cn.task_embedding[idx]
            tokens.append(seq.unsqueeze(1) if single else seq.unsqueeze(1) * scale)
            feats.append(cond if single else cond * scale)
        tokens.append(torch.mean(sample, dim=(2, 3)).unsqueeze(1))
        x = torch.cat(tokens, dim=1)
        for layer in cn.transformer_layes:
            x = layer(x)
        fused = sample * 0.0
        for i, (cond, scale) in enumerate(zip(feats, scales)):
            alpha = cn.spatial_ch_projs(x[:, i]).unsqueeze(-1).unsqueeze(-1)
            fused += cond + alpha if single else cond + alpha * scale
        # one condition: diffusers scales the residuals; that is left to the branch (UnionBranch), which
        # scales the same residuals by the same number, so a reuse step can apply its own weight
        return self.encoder(sample + fused, emb, encoder_hidden_states)
