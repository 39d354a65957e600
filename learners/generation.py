"""Batched generation with a training-side model (a ``transformers`` model, optionally with a PEFT adapter).

The learners write text with the model they train from: rewrites of demonstrations (``rewrite``) and the
active model's answers to anchor prompts (``learners.anchors``). Both go through :func:`generate`, which
keeps the exact token ids (so an anchor trains on the tokens the model produced, not on a re-tokenisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from runtime.chat_encoding import encode_chat
from runtime.engines.torch_setup import eos_token_ids


@dataclass
class GeneratedText:
    """One generated answer.

    Attributes:
        text: The answer, without special tokens, stripped.
        token_ids: The generated ids up to and including the first end-of-turn token (none if cut off).
        finished: Whether the answer ended by itself (``False``: cut at ``max_new_tokens``).
    """

    text: str
    token_ids: list[int]
    finished: bool


def end_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end an answer, as the serving engine decides them (``runtime.engines.torch_setup``)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos_token_ids(configured, tokenizer)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
) -> list[GeneratedText]:
    """Answer each conversation (chat template, generation prompt), greedily at ``temperature`` 0.

    Prompts are batched only with prompts of the same token length, so no row is padded: a padded row's greedy
    answer can differ from the answer the model gives to that prompt alone (what a user is served), and an
    anchor must hold the latter.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop = end_token_ids(model, tokenizer)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    encoded = [encode_chat(tokenizer, list(c)) for c in conversations]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    out: list[GeneratedText | None] = [None] * len(conversations)
    try:
        for rows in by_length.values():
            for i in range(0, len(rows), batch_size):
                part = rows[i : i + batch_size]
                input_ids = torch.tensor([encoded[r] for r in part], device=device)
                generated = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    pad_token_id=tokenizer.pad_token_id, **kwargs,
                )
                for r, row in zip(part, generated[:, input_ids.shape[1] :].tolist(), strict=True):
                    end = next((j for j, t in enumerate(row) if t in stop), None)
                    ids = row if end is None else row[: end + 1]
                    body = row if end is None else row[:end]
                    text = tokenizer.decode(body, skip_special_tokens=True).strip()
                    out[r] = GeneratedText(text, ids, end is not None)
    finally:
        model.train(was_training)
    return [o for o in out if o is not None]
