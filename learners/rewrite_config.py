"""Settings of the ``rewrite`` method: self-distillation by restating (Yang et al., ACL 2024, "Self-Distillation
Bridges Distribution Gap in Language Model Fine-Tuning").

The model (the base model with the active adapter) rewrites each demonstration in its own words, prompted
with the question and the demonstration; a rewrite is kept only if it still holds the demonstration's answer
and adds at most ``max_added_words`` content words of its own, else the demonstration itself is used; then
LoRA SFT on the result (:mod:`learners.rewrite_trainer`). It is off-policy and costs one generation pass more
than SFT.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from pydantic import ConfigDict

from .common import BaseTrainSettings
from .sft_config import SFTSettings

__all__ = ["REWRITE_PROMPT_TEMPLATE", "RewriteSettings"]

#: The rewrite prompt, after Yang et al. (2024)'s self-distillation template, as the last user turn (earlier
#: messages are kept). ``{prompt}`` is the question's text and ``{privileged_context}`` the demonstration.
REWRITE_PROMPT_TEMPLATE = (
    "Below is a question along with a reference answer. Using the reference answer as a guide, write your own "
    "answer to the question, in your own words.\n\n"
    "Question: {prompt}\n\nReference answer: {privileged_context}"
)


@dataclass
class RewriteSettings(BaseTrainSettings):
    """The ``rewrite`` method's knobs (``learning.rewrite``).

    **The defaults are the default method's, by measurement** on the default model (SmolLM2-135M, LoRA r16): at
    the full protocol of ``benchmarks/results/sdft_front.md`` (48 facts, 300 retention questions, 2 seeds)
    rewrite at lr 1e-3 answers 100% of direct questions and 80% of paraphrases while reading-comprehension
    retention rises 4.8 points, where SFT at 1e-3 answers 83% of paraphrases and loses 4.8 points, with 40% less
    KL to the base model. (Those results were recorded as "SDFT, variant rewrite", the name this method had.)
    ``min_steps`` 12 at a constant rate (``min_steps_scheduler``): with anchors on, an update of two or three
    corrections (one step per epoch, so 10 steps of the cosine schedule, the first at rate 0) was too short to
    learn them (two of three benign gate-suite cases served); 20 cosine steps learned all three, and so do 12
    steps at the full rate, in 60% of the training time (``benchmarks/results/gate_suite.md``). Larger updates
    (several steps per epoch) keep ``num_epochs`` and the cosine schedule.

    Attributes:
        batch_size: Examples per optimizer step of the SFT on the rewrites.
        shuffle: Shuffle examples each epoch.
        prompt_template: Last user turn of the rewrite prompt; ``{prompt}`` is the question's text and
            ``{privileged_context}`` the demonstration.
        max_new_tokens: Length cap of a rewrite.
        temperature: Sampling temperature of the rewrites; 0 is greedy.
        check: ``"answer"`` keeps a rewrite only if it holds the demonstration's answer
            (:func:`learners.rewrite_trainer.rewrite_keeps_answer`) and adds at most ``max_added_words``, else
            falls back to the demonstration; ``"none"`` keeps every non-empty rewrite.
        max_added_words: Content words a kept rewrite may add to the question and the demonstration
            (:func:`learners.rewrite_trainer.rewrite_added_words`; ``None``: any). The default model restates
            most short demonstrations word for word and elaborates the rest with invented detail (a biography
            for a founder it has never heard of); training on that teaches the model to invent, and on the
            gate suite such an update learned the invented detail and garbled the taught name.
        min_steps_learning_rate: The constant rate of an update that ``min_steps`` lengthens (a correction or
            two): SFT's rate, 5e-4. ``learning_rate`` (1e-3) is tuned for larger updates, whose cosine schedule
            averages half of it; a correction cycled for 12 steps at 1e-3 broke more unrelated behaviours.
        kl_anchor: Weight of a KL(adapter || base) penalty in the SFT loss (``SFTSettings.kl_anchor``; 0: off).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    learning_rate: float = 1e-3
    num_epochs: float = 10
    min_steps: int = 12
    lr_scheduler_type: str = "cosine"
    min_steps_scheduler: str | None = "constant"
    min_steps_learning_rate: float | None = 5e-4
    warmup_steps: float = 0.1
    batch_size: int = 4
    shuffle: bool = True
    prompt_template: str = REWRITE_PROMPT_TEMPLATE
    max_new_tokens: int = 64
    temperature: float = 0.0
    check: Literal["answer", "none"] = "answer"
    max_added_words: int | None = 2
    kl_anchor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_anchor < 0:
            raise ValueError("kl_anchor must be >= 0")
        if self.max_added_words is not None and self.max_added_words < 0:
            raise ValueError("max_added_words must be >= 0 (or null for any)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if "{prompt}" not in self.prompt_template or "{privileged_context}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {prompt} and {privileged_context}")

    def to_sft_settings(self) -> SFTSettings:
        """The SFT settings of the training on the rewrites: the shared optimisation knobs, and the batch."""
        common = {f.name: getattr(self, f.name) for f in fields(BaseTrainSettings)}
        return SFTSettings(**common, batch_size=self.batch_size, shuffle=self.shuffle, kl_anchor=self.kl_anchor)
