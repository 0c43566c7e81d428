"""OmniControlNet's task tokens: one learned word per condition type, prefixed to the ControlNet's prompt.

OmniControlNet (Wang et al. 2024, Sec. 3.2) tells its single ControlNet which condition it is
looking at the way textual inversion (Gal et al. 2022) teaches a word: a new token per condition
type (``<depth>``, ``<canny>``, ...) is added to the tokenizer, its embedding is the only trained
part of the text encoder, and the prompt becomes ``"<depth> a cat on a sofa"``.

Here only the ControlNet branch sees that prompt; the locked base U-Net keeps the user's plain
prompt (it was never trained on the tokens, and its text conditioning must not change with the
control). The tokens are stored in diffusers' textual-inversion format (``{token: vector}``,
safetensors), so ``add_task_tokens`` is what ``load_textual_inversion`` does: grow the tokenizer
and the embedding table and write the new rows; every other row stays bit-identical.

The token goes right after the start token (:func:`with_task_token`), both in training and in
sampling, so ``"<depth> " + prompt`` is tokenized identically everywhere, whatever the tokenizer
does with spaces around added tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from controlstack.errors import ControlstackError

TOKENS_FILE = "task_tokens.safetensors"


def token_name(task: str) -> str:
    return f"<{task}>"


def add_task_tokens(tokenizer, text_encoder, vectors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Add ``{task: vector}`` as tokens ``<task>`` (rows of the text encoder's embedding); returns
    ``{task: token id}``. A token already present gets its row overwritten (a model reloaded)."""
    names = [token_name(t) for t in vectors]
    tokenizer.add_tokens([n for n in names if n not in tokenizer.get_vocab()], special_tokens=True)
    embedding = text_encoder.get_input_embeddings()
    if len(tokenizer) > embedding.num_embeddings:
        # mean_resizing=False: new rows are written below, and the old ones must not be touched
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding = text_encoder.get_input_embeddings()
    ids = {t: tokenizer.convert_tokens_to_ids(token_name(t)) for t in vectors}
    with torch.no_grad():
        for task, vector in vectors.items():
            embedding.weight[ids[task]] = vector.to(embedding.weight)
    return ids


def initial_vectors(text_encoder, tasks, seed: int = 0) -> dict[str, torch.Tensor]:
    """Starting embeddings: the mean of the existing rows plus a small seeded perturbation, so the
    tokens start inside the embedding's range and distinct from each other."""
    weight = text_encoder.get_input_embeddings().weight.detach().float()
    g = torch.Generator().manual_seed(seed)
    scale = weight.std(0)
    return {t: weight.mean(0) + 0.1 * scale * torch.randn(weight.shape[1], generator=g) for t in tasks}


def with_task_token(ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` token ids of padded prompts -> the same with each row's task token inserted after
    the start token (the last position drops off: padding unless the prompt filled the window)."""
    return torch.cat([ids[:, :1], token_ids.to(ids)[:, None], ids[:, 1:-1]], dim=1)


def save_task_tokens(vectors: dict[str, torch.Tensor], folder: str | Path) -> Path:
    path = Path(folder) / TOKENS_FILE
    save_file({token_name(t): v.detach().float().cpu().contiguous() for t, v in vectors.items()}, str(path))
    return path


def load_task_tokens(folder: str | Path) -> dict[str, torch.Tensor]:
    """``{task: vector}`` from a model folder's ``task_tokens.safetensors``."""
    path = Path(folder) / TOKENS_FILE
    if not path.is_file():
        raise ControlstackError(f"'{folder}' has no {TOKENS_FILE}: it is not an Omni ControlNet")
    return {k.strip("<>"): v for k, v in load_file(str(path)).items()}


class TaskTokenEmbedding(torch.nn.Module):
    """The text encoder's (frozen) token embedding with the task tokens' rows as one trainable
    parameter: training swaps it in, so the optimiser holds exactly the new rows and nothing else of
    the text encoder can change (``rows()`` gives the trained vectors back)."""

    def __init__(self, embedding: torch.nn.Embedding, ids: dict[str, int]):
        super().__init__()
        self.embedding = embedding
        self.tasks = list(ids)
        index = torch.tensor([ids[t] for t in self.tasks])
        self.register_buffer("index", index, persistent=False)
        self.vectors = torch.nn.Parameter(embedding.weight[index].detach().clone().float())
        self.lookup = {i: k for k, i in enumerate(index.tolist())}

    @property
    def weight(self) -> torch.Tensor:  # transformers reads get_input_embeddings().weight (dtype, shape)
        return self.embedding.weight

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.embedding(ids)
        hit = (ids[..., None] == self.index).to(out.dtype)        # (B, L, K): which task token, if any
        own = hit @ self.vectors.to(out.dtype)                     # that token's trainable vector
        return out * (1 - hit.sum(-1, keepdim=True)) + own

    def rows(self) -> dict[str, torch.Tensor]:
        return {t: self.vectors[k].detach().clone() for k, t in enumerate(self.tasks)}


def swap_in_trainable(text_encoder, ids: dict[str, int]) -> TaskTokenEmbedding:
    """Replace the text encoder's input embedding by a :class:`TaskTokenEmbedding` (returned)."""
    module = TaskTokenEmbedding(text_encoder.get_input_embeddings(), ids)
    text_encoder.set_input_embeddings(module)
    return module
