"""Prompts to what the U-Net reads, as a mixin of :class:`controlstack.pipeline.Pipeline`.

The CLIP text encoder's last hidden states, as diffusers' ``encode_prompt`` (padded to the
tokenizer's length, no clip skip): SD-1.x / 2.x's conditioning; what each family adds (SDXL: a
second encoder, the pooled embedding, the micro-conditioning ids) is its module's in
``models/families/``. Omni ControlNets get their own embedding: the prompt with the task token
after the start token.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from controlstack.control import Control
from controlstack.errors import ControlstackError
from controlstack.models.task_tokens import add_task_tokens, with_task_token

# A ContextVar, not a module flag: the server runs users' jobs in threads, and a demo or evaluation
# running beside one must not switch off that job's warnings (each thread has its own context).
_PROJECT_PROMPTS: ContextVar[bool] = ContextVar("controlstack_project_prompts", default=False)


@contextmanager
def project_prompts() -> Iterator[None]:
    """Inside it, prompts are the project's own (world captions: ``controlstack demo``,
    ``controlstack evaluate``) and a prompt longer than the text encoder's window does not warn.

    Why not cut the captions to the window instead: the encoder already cuts them (``truncation=True``),
    exactly where the base's training cut the same captions (``training/diffusion.py``), so their
    tail was never read in training either and the warning would tell a user nothing about their
    own input; cutting the text ourselves would need a decode / re-encode round trip that need not
    give the same tokens, and would change the captions that reports and PNG parameters record.
    The unknown-word warning stays: under a user's base that lacks the world's words it is news."""
    token = _PROJECT_PROMPTS.set(True)
    try:
        yield
    finally:
        _PROJECT_PROMPTS.reset(token)


class Prompting:
    """Text conditioning of a :class:`~controlstack.pipeline.Pipeline` (its ``tokenizer``,
    ``text_encoder`` and, for SDXL, ``tokenizer_2`` / ``text_encoder_2``)."""

    def check_prompt(self, prompt: str, what: str = "prompt") -> None:
        """One-line warnings (never errors) for a prompt the text encoder will not read whole: longer
        than its window (the rest is cut, as diffusers cuts it), or with words outside the model's
        vocabulary (a closed-vocabulary model spells them as pieces it never learned as a word).
        Inside :func:`project_prompts` the length is not checked."""
        log = logging.getLogger("controlstack")
        n = len(self.tokenizer(prompt, truncation=False, verbose=False).input_ids)
        if n > self.tokenizer.model_max_length and not _PROJECT_PROMPTS.get():
            log.warning(f"{what} is {n} tokens; the text encoder reads {self.tokenizer.model_max_length}, the rest "
                        "is ignored")
        if self.vocabulary is not None:
            unknown = sorted({w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in self.vocabulary})
            if unknown:
                log.warning(f"{what}: words the model was not trained on: {', '.join(unknown)} (its vocabulary: "
                            "controlstack.world.VOCABULARY)")

    @torch.no_grad()
    def encode_prompt(self, prompt: str, batch: int, task_token: int | None = None) -> torch.Tensor:
        """CLIP text embedding, as diffusers' ``encode_prompt`` (padding to max length, no clip skip).
        ``task_token``: an Omni task token's id, put right after the start token (as in training)."""
        tok = self.tokenizer(
            [prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )
        ids, mask = tok.input_ids, tok.attention_mask
        if task_token is not None:
            ids, mask = with_task_token(ids, torch.tensor([task_token])), with_task_token(mask, torch.tensor([1]))
        mask = mask if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        device = self.text_encoder.device
        emb = self.text_encoder(ids.to(device), attention_mask=None if mask is None else mask.to(device))[0]
        emb = emb.to(self.text_encoder.dtype)
        return emb.repeat(1, batch, 1).view(batch, emb.shape[1], -1)

    @torch.no_grad()
    def encode_text(self, prompt: str, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden, pooled)``: the cross-attention embedding and, where the family has one
        (SDXL), the pooled one, else None (``models/families/``)."""
        return self.family.encode_text(self, prompt, batch)

    def text_conditions(self, prompt: str, negative_prompt: str, batch: int, do_cfg: bool, size: tuple[int, int],
                        micro: dict) -> tuple[torch.Tensor, torch.Tensor | None, tuple[dict | None, dict] | None]:
        """``(cond, uncond, added)`` for the denoiser: the prompt's and the negative prompt's text
        embeddings (``uncond`` None without CFG) and the family's added conditions (SDXL: pooled text
        and micro-conditioning ids; ``micro`` holds ``original_size`` / ``crops_coords_top_left`` /
        ``target_size``, None = diffusers' defaults: the output ``size`` (h, w) and (0, 0)), as
        ``models/families/`` defines them for the base's family."""
        self.check_prompt(prompt)
        if negative_prompt:
            self.check_prompt(negative_prompt, "negative prompt")
        return self.family.text_conditions(self, prompt, negative_prompt, batch, do_cfg, size, micro)

    def task_text(self, controlnet, control: Control, prompts: tuple[str, str], batch: int, do_cfg: bool):
        """An Omni ControlNet's own text embedding ``(uncond, cond)``: its task token prefixed to the
        negative and the positive prompt (the U-Net keeps the plain prompt); None for a plain one."""
        tokens = getattr(controlnet, "task_tokens", None)
        name = control.model if isinstance(control.model, (str, os.PathLike)) else type(control.model).__name__
        if tokens is None:
            if control.task is not None:
                raise ControlstackError(f"control model '{name}' has no task tokens; task='{control.task}' is "
                                        "for an Omni ControlNet (e.g. model='omni')")
            return None
        if control.task not in tokens:
            what = "needs a task" if control.task is None else f"has no task '{control.task}'"
            raise ControlstackError(f"Omni ControlNet '{name}' {what}; choose one of {', '.join(tokens)}")

        token = add_task_tokens(self.tokenizer, self.text_encoder, {control.task: tokens[control.task]})[control.task]
        cond = self.encode_prompt(prompts[0], batch, token)
        return (self.encode_prompt(prompts[1], batch, token) if do_cfg else None), cond

