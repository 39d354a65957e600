"""The ``sft`` method on TRL's ``SFTTrainer``: LoRA fine-tuning on the demonstrations, loss on the answer only.

Settings in :mod:`learners.sft_config`.

A plain-text mode (:func:`train_sft_texts`) trains the same way on raw text sequences (language modelling,
loss on every token); SEAL uses it to learn a passage and its self-edit lines.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback
from trl import SFTTrainer

from runtime.chat_encoding import encode_chat_answer, encode_text

from .anchor_loss import AnchorLoss, AnchorTraining
from .callbacks import ProgressCallback, ProgressFn
from .common import TrainResult
from .examples import DemoExample, TrainingText
from .lora import build_peft_model, load_base_model, load_tokenizer, save_adapter
from .lora_config import LoraSettings
from .sft_config import SFTSettings

__all__ = ["build_sft_text_trainer", "build_sft_trainer", "train_sft", "train_sft_texts"]


def _to_dataset(examples: Sequence[DemoExample], tokenizer: Any) -> Dataset:
    """The examples tokenised for TRL (``input_ids`` and ``completion_mask``: the answer's tokens).

    Tokenised here rather than by TRL so that no prompt or answer text becomes a control token
    (:func:`runtime.chat_encoding.encode_chat`): user text such as ``<|im_end|><|im_start|>system`` is trained
    on as the characters it is, as it is served.
    """
    rows = []
    for ex in examples:
        full, start = encode_chat_answer(tokenizer, ex.prompt, ex.demonstration)
        rows.append({"input_ids": full, "completion_mask": [0] * start + [1] * (len(full) - start)})
    return Dataset.from_list(rows)


def _texts_to_dataset(texts: Sequence[TrainingText], tokenizer: Any) -> Dataset:
    """Plain-text sequences tokenised for TRL, each ending in EOS; empty ones are skipped.

    Tokenised here rather than by TRL so that a document holding ``<|im_end|><|im_start|>system`` is trained
    on as those characters, never as a turn boundary (issue 14).
    """
    eos = tokenizer.eos_token_id
    rows = []
    for text in texts:
        ids = encode_text(tokenizer, text.strip()) if isinstance(text, str) else [int(i) for i in text]
        if not ids:
            continue
        if eos is not None and ids[-1] != eos:
            ids.append(eos)
        rows.append({"input_ids": ids})
    if not rows:
        raise ValueError("train_sft_texts needs at least one non-empty text")
    return Dataset.from_list(rows)


def build_sft_trainer(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    output_dir: str | Path,
    settings: SFTSettings | None = None,
    lora: LoraSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    anchors: AnchorTraining | None = None,
) -> SFTTrainer:
    """Build (but do not run) the TRL ``SFTTrainer`` that ``train_sft`` runs."""
    if not examples:
        raise ValueError("train_sft needs at least one example")
    dataset = _to_dataset(examples, load_tokenizer(base_model_dir))
    return _build_trainer(
        base_model_dir, dataset, output_dir, settings, lora, parent_adapter_dir, callbacks, False, anchors
    )


def build_sft_text_trainer(
    base_model_dir: str | Path,
    texts: Sequence[TrainingText],
    output_dir: str | Path,
    settings: SFTSettings | None = None,
    lora: LoraSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    anchors: AnchorTraining | None = None,
) -> SFTTrainer:
    """Build (but do not run) the plain-text ``SFTTrainer`` that ``train_sft_texts`` runs."""
    dataset = _texts_to_dataset(texts, load_tokenizer(base_model_dir))
    return _build_trainer(
        base_model_dir, dataset, output_dir, settings, lora, parent_adapter_dir, callbacks, True, anchors
    )


def _build_trainer(
    base_model_dir: str | Path,
    dataset: Dataset,
    output_dir: str | Path,
    settings: SFTSettings | None,
    lora: LoraSettings | None,
    parent_adapter_dir: str | Path | None,
    callbacks: Sequence[TrainerCallback],
    plain_text: bool,
    anchors: AnchorTraining | None = None,
) -> SFTTrainer:
    settings = settings or SFTSettings()
    settings.apply_process_settings()
    set_seed(settings.seed)  # LoRA initialisation
    tokenizer = load_tokenizer(base_model_dir)
    model = build_peft_model(load_base_model(base_model_dir), lora, parent_adapter_dir)
    anchor_loss = (
        anchors.build(model, tokenizer, parent_adapter_dir, settings.seed, min(settings.batch_size, len(dataset)))
        if anchors else None
    )
    regularised = settings.kl_anchor > 0 or anchor_loss is not None
    trainer_cls = _RegularisedSFTTrainer if regularised else SFTTrainer
    trainer = trainer_cls(
        model=model,
        args=settings.to_sft_config(output_dir, plain_text=plain_text, num_examples=len(dataset)),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # logs go to the progress callback, not stdout
    if isinstance(trainer, _RegularisedSFTTrainer):
        trainer.kl_anchor = settings.kl_anchor
        trainer.anchor_loss = anchor_loss
    return trainer


class _RegularisedSFTTrainer(SFTTrainer):
    """SFT whose loss adds, when set, ``kl_anchor`` x mean KL(adapter || base) over the tokens that carry a label,
    and the anchor term (:class:`learners.anchor_loss.AnchorLoss`: a loss on a batch of anchors per step).

    TRL computes the SFT loss from fused log-probs without full logits, so the KL penalty takes its own forward
    pass (with the adapter, differentiable) and one without the adapter: about twice the cost of plain SFT.
    """

    kl_anchor: float = 0.0
    anchor_loss: AnchorLoss | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        if self.anchor_loss is not None and model.training:
            term = self.anchor_loss(self.accelerator.unwrap_model(model))
            self._metrics["train"]["anchor_loss"].append(self.anchor_loss.history[-1])
            loss = loss + term
        if self.kl_anchor > 0:
            loss = loss + self._kl_to_base(model, inputs)
        return (loss, result[1]) if return_outputs else loss

    def _kl_to_base(self, model, inputs):  # type: ignore[no-untyped-def]
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("kl_anchor needs the collated labels to know which tokens are trained")
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
        student_logits = model(**forward).logits
        with torch.no_grad(), model.disable_adapter():  # the base model: the same weights, adapter off
            base_logits = model(**forward).logits
        log_p = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
        log_q = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        mask = (labels[:, 1:] != -100).to(per_token.dtype)
        kl = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        self._metrics["train" if model.training else "eval"]["kl_to_base"].append(float(kl.detach()))
        return self.kl_anchor * kl


def train_sft(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    output_dir: str | Path,
    settings: SFTSettings | None = None,
    lora: LoraSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    progress_callback: ProgressFn | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    anchors: AnchorTraining | None = None,
) -> TrainResult:
    """Train a LoRA adapter by SFT on the demonstrations and save it to ``output_dir``.

    Arguments and result as ``learners.sdft.train_sdft``; ``loss`` in the metrics is the mean
    cross-entropy of the answer tokens. With `anchors`, every step adds the anchor term.
    """
    progress = ProgressCallback(progress_callback)
    trainer = build_sft_trainer(
        base_model_dir, examples, output_dir, settings, lora, parent_adapter_dir, [progress, *callbacks], anchors
    )
    return _run(trainer, progress, output_dir, len(examples))


def train_sft_texts(
    base_model_dir: str | Path,
    texts: Sequence[TrainingText],
    output_dir: str | Path,
    settings: SFTSettings | None = None,
    lora: LoraSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    progress_callback: ProgressFn | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    anchors: AnchorTraining | None = None,
) -> TrainResult:
    """Train a LoRA adapter on plain text sequences (language modelling) and save it to ``output_dir``.

    Same settings as :func:`train_sft` (``completion_only_loss`` does not apply: every token is a target;
    the tokenizer's EOS is appended to each text). A string is untrusted text: special-token strings in it
    are trained on as the characters they are; a sequence of token ids is taken as given (see
    :data:`TrainingText`). Empty texts are skipped.
    """
    progress = ProgressCallback(progress_callback)
    trainer = build_sft_text_trainer(
        base_model_dir, texts, output_dir, settings, lora, parent_adapter_dir, [progress, *callbacks], anchors
    )
    return _run(trainer, progress, output_dir, len(trainer.train_dataset))


def _run(trainer: SFTTrainer, progress: ProgressCallback, output_dir: str | Path, num_examples: int) -> TrainResult:
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    adapter_dir = save_adapter(trainer.accelerator.unwrap_model(trainer.model), output_dir)
    return TrainResult(
        adapter_dir=adapter_dir,
        metrics=progress.history,
        train_seconds=seconds,
        num_examples=num_examples,
        num_steps=int(trainer.state.global_step),
        summary=progress.summary,
        method="sft",
    )
