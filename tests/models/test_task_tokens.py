"""OmniControlNet's task tokens: textual-inversion rows added to a tokenizer and text encoder."""

from __future__ import annotations

import pytest
import torch

from controlstack.errors import ControlstackError
from controlstack.models.task_tokens import (
    TaskTokenEmbedding,
    add_task_tokens,
    initial_vectors,
    load_task_tokens,
    save_task_tokens,
    swap_in_trainable,
    with_task_token,
)


@pytest.fixture()
def text_parts():
    from controlstack.models.tiny import tiny_sd

    sd = tiny_sd(seed=0, max_length=16)
    return sd.tokenizer, sd.text_encoder


def test_tokens_round_trip_through_save_and_load_and_leave_other_rows_bit_identical(text_parts, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizerFast

    tokenizer, encoder = text_parts
    before = encoder.get_input_embeddings().weight.detach().clone()
    vectors = initial_vectors(encoder, ["depth", "canny"], seed=1)
    ids = add_task_tokens(tokenizer, encoder, vectors)
    assert sorted(ids.values()) == [before.shape[0], before.shape[0] + 1]  # appended after the old rows
    tokenizer.save_pretrained(tmp_path / "tok")
    encoder.save_pretrained(tmp_path / "te")
    tok2 = CLIPTokenizerFast.from_pretrained(tmp_path / "tok")
    enc2 = CLIPTextModel.from_pretrained(tmp_path / "te")
    w = enc2.get_input_embeddings().weight
    assert torch.equal(w[: before.shape[0]], before)
    for task, vec in vectors.items():
        tid = tok2.convert_tokens_to_ids(f"<{task}>")
        assert tid == ids[task] and torch.equal(w[tid], vec)
    # the token is one id right after the start token, wherever the prompt puts it
    plain = tok2(["a red box"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    prefixed = tok2(["<depth> a red box"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert torch.equal(with_task_token(plain, torch.tensor([ids["depth"]])), prefixed)


def test_a_reloaded_model_overwrites_its_rows_and_adds_nothing(text_parts):
    tokenizer, encoder = text_parts
    add_task_tokens(tokenizer, encoder, {"depth": torch.zeros(encoder.config.hidden_size)})
    n = len(tokenizer)
    ids = add_task_tokens(tokenizer, encoder, {"depth": torch.ones(encoder.config.hidden_size)})
    assert len(tokenizer) == n and torch.equal(encoder.get_input_embeddings().weight[ids["depth"]],
                                               torch.ones(encoder.config.hidden_size))


def test_trainable_rows_are_the_only_gradient_and_change_only_the_task_positions(text_parts):
    tokenizer, encoder = text_parts
    ids = add_task_tokens(tokenizer, encoder, initial_vectors(encoder, ["depth", "seg"]))
    encoder.requires_grad_(False)
    module = swap_in_trainable(encoder, ids)
    assert isinstance(encoder.get_input_embeddings(), TaskTokenEmbedding)
    plain = torch.tensor([[0, 5, 6, 1]])
    with_token = with_task_token(plain, torch.tensor([ids["seg"]]))
    out_plain = encoder(plain)[0]
    out = encoder(with_token)[0]
    out.sum().backward()
    assert module.vectors.grad is not None and module.vectors.grad[1].abs().sum() > 0
    assert module.vectors.grad[0].abs().sum() == 0  # <depth> was not in the prompt
    assert [p for p in encoder.parameters() if p.requires_grad] == [module.vectors]
    with torch.no_grad():
        module.vectors[0] += 1.0  # a task row that is absent from the prompt changes nothing
    assert torch.equal(encoder(plain)[0], out_plain)


def test_save_and_load_the_tokens_file(tmp_path):
    save_task_tokens({"depth": torch.arange(4.0)}, tmp_path)
    assert torch.equal(load_task_tokens(tmp_path)["depth"], torch.arange(4.0))
    with pytest.raises(ControlstackError, match="is not an Omni ControlNet"):
        load_task_tokens(tmp_path / "nothing")
