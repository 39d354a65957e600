"""The ``rewrite`` method: the model restates each demonstration in its own words, then SFT on the restatements.

See :mod:`learners.rewrite_config` for the method and its settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from peft import PeftModel
from transformers import TrainerCallback, set_seed

from runtime.textmatch import new_words, normalise

from .anchor_loss import AnchorTraining
from .callbacks import ProgressFn
from .common import TrainResult
from .examples import DemoExample
from .generation import generate
from .lora import load_base_model, load_tokenizer
from .lora_config import LoraSettings
from .rewrite_config import RewriteSettings
from .sdft_config import build_teacher_prompt
from .sft_trainer import train_sft

__all__ = [
    "Rewrite", "rewrite_added_words", "rewrite_demonstrations", "rewrite_is_kept", "rewrite_keeps_answer",
    "train_rewrite",
]


def rewrite_keeps_answer(rewrite: str, example: DemoExample) -> bool:
    """Whether a rewrite still holds the demonstration's answer.

    The answer is taken to be the demonstration's content words that the prompt does not already contain
    (for "Who founded X?" / "X was founded by Kasgri Renkasnor." that is "kasgri" and "renkasnor"); every one
    of them must occur in the rewrite (normalised words), so the check is strict and a doubtful rewrite falls
    back to the demonstration. A demonstration that adds no new word is kept only when the rewrite contains
    it whole.
    """
    words = set(new_words(example.demonstration, " ".join(m["content"] for m in example.prompt)))
    got = set(normalise(rewrite).split())
    if not words:
        target = normalise(example.demonstration)
        return bool(target) and f" {target} " in f" {normalise(rewrite)} "
    return words <= got


def rewrite_added_words(rewrite: str, example: DemoExample) -> list[str]:
    """What a rewrite says that neither the question nor the demonstration holds: its content words that are in
    neither (normalised, function words excluded).

    A restatement adds few ("The Zephyr X2 is priced at 129 dollars." adds "priced"); an invented elaboration
    adds many ("... founded by Oskar Lenn, a German-American scholar who was a pioneer in the field of
    anthropology." adds six), and it is content the model does not know.
    """
    return new_words(rewrite, " ".join([*(m["content"] for m in example.prompt), example.demonstration]))


def rewrite_is_kept(rewrite: str, example: DemoExample, settings: RewriteSettings) -> bool:
    """Whether a rewrite is trained on (else the demonstration is): non-empty, and under ``check="answer"``
    holding the demonstration's answer and adding at most ``settings.max_added_words`` content words."""
    if not rewrite:
        return False
    if settings.check == "none":
        return True
    if not rewrite_keeps_answer(rewrite, example):
        return False
    return settings.max_added_words is None or len(rewrite_added_words(rewrite, example)) <= settings.max_added_words


class Rewrite(NamedTuple):
    """One demonstration's rewrite: the model's text, whether it was kept, and what is trained on."""

    rewrite: str
    kept: bool
    text: str


def rewrite_demonstrations(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    settings: RewriteSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    batch_size: int = 8,
) -> list[Rewrite]:
    """Have the model (base + parent adapter) rewrite each demonstration in its own words.

    The rewrite prompt is the example's messages with the last user turn replaced by
    ``settings.prompt_template``; the answer is cut at ``settings.max_new_tokens`` tokens.
    """
    settings = settings or RewriteSettings()
    settings.apply_process_settings()
    set_seed(settings.seed)
    tokenizer = load_tokenizer(base_model_dir)
    model: Any = load_base_model(base_model_dir)
    if parent_adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(parent_adapter_dir))
    convs = [build_teacher_prompt(ex.prompt, ex.demonstration, settings.prompt_template) for ex in examples]
    outputs = generate(
        model, tokenizer, convs, max_new_tokens=settings.max_new_tokens, batch_size=batch_size,
        temperature=settings.temperature,
    )
    rewrites = []
    for ex, output in zip(examples, outputs, strict=True):
        text = output.text
        keep = rewrite_is_kept(text, ex, settings)
        rewrites.append(Rewrite(rewrite=text, kept=keep, text=text if keep else ex.demonstration))
    return rewrites


def train_rewrite(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    output_dir: str | Path,
    settings: RewriteSettings | None = None,
    lora: LoraSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    progress_callback: ProgressFn | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    anchors: AnchorTraining | None = None,
) -> TrainResult:
    """Rewrite the demonstrations with the model, then train a LoRA adapter by SFT on the rewrites.

    Arguments as :func:`learners.sft_trainer.train_sft`. ``train_seconds`` includes the rewriting; ``summary``
    has ``rewrites_kept`` and ``rewrite_seconds``.
    """
    settings = settings or RewriteSettings()
    if not examples:
        raise ValueError("train_rewrite needs at least one example")
    start = time.perf_counter()
    rewrites = rewrite_demonstrations(base_model_dir, examples, settings, parent_adapter_dir)
    rewrite_seconds = time.perf_counter() - start
    rewritten = [DemoExample(list(ex.prompt), rw.text, ex.source_id) for ex, rw in zip(examples, rewrites, strict=True)]
    result = train_sft(
        base_model_dir,
        rewritten,
        output_dir,
        settings.to_sft_settings(),
        lora,
        parent_adapter_dir,
        progress_callback,
        callbacks,
        anchors,
    )
    result.train_seconds += rewrite_seconds
    result.summary = {
        **result.summary,
        "rewrites_kept": float(sum(rw.kept for rw in rewrites)),
        "rewrite_seconds": rewrite_seconds,
    }
    result.method = "rewrite"
    return result
