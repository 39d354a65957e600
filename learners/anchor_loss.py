"""The anchor term of a training step: ``weight`` x a loss on a batch of anchors (see :mod:`learners.anchors`).

Every optimizer micro-step adds it to the learner's own loss (SFT's cross-entropy, or SDFT's distillation
loss), taking the next ``batch_size`` anchors in a shuffled cycle. Two losses:

- ``sft``: cross-entropy on the active model's greedy answers (the answer tokens only);
- ``kl``: KL(active || candidate) over the full vocabulary at every answer token, the active model being the
  update's starting point (the base model with the parent adapter, kept frozen beside the trained one). The
  active model's distributions are fixed, so the first call computes them for every anchor at once and keeps
  them (answer tokens only) when they fit in ``REFERENCE_CACHE_BYTES``; otherwise each step computes
  its batch's.

Only the positions that predict answer tokens go through the output layer, which gives the same loss and
gradients for less compute.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from learners.anchors import Anchor
from runtime.chat_encoding import encode_chat
from runtime.config import AnchorBalance, AnchorLossKind

REFERENCE_ADAPTER = "anchor_reference"
"""Name of the frozen copy of the parent adapter that ``kl`` compares against."""

REFERENCE_CACHE_BYTES = 256 * 1024**2
"""The most memory the ``kl`` loss keeps the active model's answer-token distributions in (else it recomputes
them each step, one more forward pass)."""


class AnchorLoss:
    """``weight`` x the anchor loss on the next batch of anchors; call it with the model being trained.

    Args:
        anchors: answered anchors (``answer_ids`` set).
        tokenizer: the model's tokenizer (chat template).
        kind: ``sft`` or ``kl``.
        weight: multiplies the loss.
        batch_size: anchors per call.
        reference: for ``kl``, a function of the model returning a context manager in which the model computes
            the active model's distribution (see :func:`reference_context`).
        max_length: prompts are cut from the left so that prompt + answer fit.
        seed: order of the anchors.
    """

    def __init__(
        self,
        anchors: Sequence[Anchor],
        tokenizer: Any,
        *,
        kind: AnchorLossKind = "sft",
        weight: float = 1.0,
        batch_size: int = 4,
        reference: Callable[[Any], AbstractContextManager[Any]] | None = None,
        max_length: int = 1024,
        seed: int = 0,
    ) -> None:
        if kind not in ("sft", "kl"):
            raise ValueError(f"anchor loss must be 'sft' or 'kl', got {kind!r}")
        if kind == "kl" and reference is None:
            raise ValueError("the kl anchor loss needs a reference (the active model)")
        self.kind = kind
        self.weight = weight
        self.batch_size = max(1, batch_size)
        self.reference = reference
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows = [_tokenise(a, tokenizer, max_length) for a in anchors if a.answer_ids]
        if not self.rows:
            raise ValueError("no answered anchor to train on")
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._reference_log_probs: list[torch.Tensor] | None = None
        self._logits_to_keep = True
        self.history: list[float] = []

    def __len__(self) -> int:
        return len(self.rows)

    def _next_batch(self) -> list[int]:
        """The indices of the next `batch_size` anchors, in a shuffled cycle."""
        batch = []
        for _ in range(min(self.batch_size, len(self.rows))):
            if not self._order:
                self._order = list(range(len(self.rows)))
                self._rng.shuffle(self._order)
            batch.append(self._order.pop())
        return batch

    def __call__(self, model: Any) -> torch.Tensor:
        if self.kind == "kl" and self._reference_log_probs is None and self._reference_fits(model):
            self._reference_log_probs = self._active_log_probs(model)
        indices = self._next_batch()
        batch = [self.rows[i] for i in indices]
        input_ids, attention, answer = self._collate(batch, next(model.parameters()).device)
        logits, targets, mask = self._predictions(model, batch, input_ids, attention, answer)
        if self.kind == "sft":
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            value = (nll * mask).sum() / mask.sum().clamp(min=1)
        else:
            log_q = torch.log_softmax(logits[mask], dim=-1)  # answer tokens only, row by row
            if self._reference_log_probs is not None:
                log_p = torch.cat([self._reference_log_probs[i] for i in indices]).to(log_q)
            else:
                assert self.reference is not None
                with torch.no_grad(), self.reference(model):
                    ref_logits, _, ref_mask = self._predictions(model, batch, input_ids, attention, answer)
                log_p = torch.log_softmax(ref_logits[ref_mask], dim=-1)
            value = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        self.history.append(float(value.detach()))
        return self.weight * value

    def _predictions(
        self, model: Any, batch: Sequence[tuple[list[int], int]], input_ids: torch.Tensor, attention: torch.Tensor,
        answer: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(float logits, the tokens they predict, which of those are answer tokens) of the batch, from the first
        position that predicts an answer token on.

        The output layer (hidden size x vocabulary) only sees those positions (``logits_to_keep``): the prompts,
        about two thirds of an anchor's tokens, need no logits. On SmolLM2 on a CPU that saves about 3% of an anchor
        step; the vocabulary-wide logits it does not hold matter more for memory on a large vocabulary.
        """
        start = min(prompt_len for _, prompt_len in batch) - 1  # predicts the earliest answer token
        keep = input_ids.shape[1] - start
        if self._logits_to_keep:
            try:
                out = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep)
            except TypeError:  # a model without logits_to_keep: all its positions go through the output layer
                self._logits_to_keep = False
        if not self._logits_to_keep:
            out = model(input_ids=input_ids, attention_mask=attention)
        logits = out.logits[:, -keep:-1].float()  # position t predicts token t + 1
        return logits, input_ids[:, start + 1 :], answer[:, start + 1 :]

    def _collate(
        self, batch: Sequence[tuple[list[int], int]], device: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, attention mask, answer-token mask) of `batch`, right-padded."""
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        answer = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            answer[row, prompt_len : len(ids)] = True
        return input_ids.to(device), attention.to(device), answer.to(device)

    def _reference_fits(self, model: Any) -> bool:
        embeddings = model.get_output_embeddings()
        vocab = embeddings.weight.shape[0] if embeddings is not None else model.config.vocab_size
        tokens = sum(len(ids) - prompt_len for ids, prompt_len in self.rows)
        return tokens * vocab * 4 <= REFERENCE_CACHE_BYTES  # float32

    def _active_log_probs(self, model: Any) -> list[torch.Tensor]:
        """The active model's log-probabilities at each anchor's answer tokens (one ``[answer, vocab]`` tensor per
        anchor), computed once: the reference does not move while the candidate trains."""
        assert self.reference is not None
        device = next(model.parameters()).device
        kept: list[torch.Tensor] = []
        with torch.no_grad(), self.reference(model):
            for start in range(0, len(self.rows), 8):
                chunk = self.rows[start : start + 8]
                input_ids, attention, answer = self._collate(chunk, device)
                logits, _, mask = self._predictions(model, chunk, input_ids, attention, answer)
                log_p = torch.log_softmax(logits, dim=-1)
                kept.extend(log_p[row][mask[row]].cpu() for row in range(len(chunk)))
        return kept


def _tokenise(anchor: Anchor, tokenizer: Any, max_length: int) -> tuple[list[int], int]:
    """(prompt ids + answer ids, prompt length), the prompt as generation saw it, cut from the left to fit."""
    prompt = encode_chat(tokenizer, anchor.messages)
    answer = list(anchor.answer_ids or [])[:max_length]
    prompt = prompt[-max(1, max_length - len(answer)) :]
    return prompt + answer, len(prompt)


def reference_context(
    model: Any, parent_adapter_dir: str | Path | None
) -> Callable[[Any], AbstractContextManager[Any]]:
    """How to compute the active model's distribution with `model` (a PEFT model being trained).

    With a parent adapter, a frozen copy of it is loaded beside the trained adapter and switched in; without
    one, the active model is the base model (the adapter disabled).
    """
    if parent_adapter_dir is None:
        return lambda m: m.disable_adapter()
    from trl.trainer.utils import use_adapter

    from learners.lora import load_frozen_adapter

    if REFERENCE_ADAPTER not in model.peft_config:
        load_frozen_adapter(model, parent_adapter_dir, REFERENCE_ADAPTER)
    return lambda m: use_adapter(m, REFERENCE_ADAPTER)


class AnchorTraining:
    """What a learner needs to add the anchor term: the answered anchors and ``learning.anchors``' loss knobs.

    :meth:`build` makes the :class:`AnchorLoss` once the learner has its model and tokenizer.

    Args:
        anchors: answered anchors (those without ``answer_ids`` are left out).
        loss: ``sft`` or ``kl``.
        weight: weight of the anchor term.
        batch_size: anchors per training step.
        balance: ``examples``: when a step holds more new examples than ``batch_size``, the term is multiplied by
            ``batch_size / new examples`` (:meth:`step_weight`), so that an anchor weighs as much as a new
            example; ``none``: ``weight`` as is.
    """

    def __init__(
        self, anchors: Sequence[Anchor], *, loss: AnchorLossKind = "sft", weight: float = 1.0, batch_size: int = 4,
        balance: AnchorBalance = "examples",
    ) -> None:
        if balance not in ("examples", "none"):
            raise ValueError(f"anchor balance must be 'examples' or 'none', got {balance!r}")
        self.anchors = [a for a in anchors if a.answer_ids]
        self.loss = loss
        self.weight = weight
        self.batch_size = batch_size
        self.balance = balance

    def __bool__(self) -> bool:
        return bool(self.anchors)

    def step_weight(self, examples_per_step: int | None) -> float:
        """The anchor term's weight beside `examples_per_step` new examples (``None``: unknown, ``weight``)."""
        anchors_per_step = min(self.batch_size, len(self.anchors))
        if self.balance == "none" or not examples_per_step or examples_per_step <= anchors_per_step:
            return self.weight
        return self.weight * anchors_per_step / examples_per_step

    def build(
        self, model: Any, tokenizer: Any, parent_adapter_dir: str | Path | None, seed: int = 0,
        examples_per_step: int | None = None,
    ) -> AnchorLoss:
        """The anchor term for `model`; `examples_per_step` is how many new examples (rows) each training step
        holds beside the anchor batch, for ``balance: examples``."""
        reference = reference_context(model, parent_adapter_dir) if self.loss == "kl" else None
        return AnchorLoss(
            self.anchors, tokenizer, kind=self.loss, weight=self.step_weight(examples_per_step),
            batch_size=self.batch_size, reference=reference, seed=seed,
        )
