"""Settings of on-policy SDFT (Shenfeld et al., 2026, "Self-Distillation Enables Continual Learning").

The teacher is the model itself with the demonstration in its prompt; the student is the model with the
query alone; the student samples its own answers and is trained, token by token over the full vocabulary,
towards the teacher's distribution on those answers. The trainer is :mod:`learners.sdft_trainer` (TRL's
``SDFTTrainer`` with the fixes described there). TRL is imported only to build its config.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict

from .common import BaseTrainSettings
from .sft_config import SFTSettings

__all__ = [
    "DIRECT_TEACHER_PROMPT_TEMPLATE",
    "OFFICIAL_TEACHER_PROMPT_TEMPLATE",
    "TRL_TEACHER_PROMPT_TEMPLATE",
    "SDFTSettings",
    "build_teacher_prompt",
]

#: The teacher prompt of the official SDFT code (``main.py`` of the authors' repository, also the
#: paper's Section 3), including its leading and trailing newline, in TRL's placeholder syntax.
#: ``{prompt}`` is the text of the last user turn; earlier messages (a system prompt) are kept as they are.
OFFICIAL_TEACHER_PROMPT_TEMPLATE = (
    "\n{prompt}\n\n"
    "This is an example for a response to the question:\n"
    "{privileged_context}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)

#: TRL's default ``SDFTConfig.teacher_prompt_template``.
TRL_TEACHER_PROMPT_TEMPLATE = "{prompt}\n\n{privileged_context}"

#: A teacher prompt that asks for a short, direct answer based on the demonstration (so the teacher's style
#: stays close to the student's and what differs is the content).
DIRECT_TEACHER_PROMPT_TEMPLATE = (
    "{prompt}\n\nUse this information: {privileged_context}\n\nAnswer the question directly and briefly."
)

def build_teacher_prompt(
    prompt: list[dict[str, str]], demonstration: str, template: str = OFFICIAL_TEACHER_PROMPT_TEMPLATE
) -> list[dict[str, str]]:
    """The teacher's messages, composed exactly as TRL's ``SDFTTrainer`` composes them.

    Earlier messages are kept; the last user turn's text becomes ``template`` filled with that text and
    the demonstration.
    """
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("the prompt must end with a user turn")
    text = template.format(prompt=prompt[-1]["content"], privileged_context=demonstration)
    return [*prompt[:-1], {"role": "user", "content": text}]


@dataclass
class SDFTSettings(BaseTrainSettings):
    """The knobs of on-policy SDFT (Shenfeld et al., 2026), and how they map onto TRL's ``SDFTConfig``.

    **Defaults come from measurement at the default model's scale** (SmolLM2-135M, LoRA r16; the screening of
    ``benchmarks/results/sdft_front_screen.md``, 8 facts): the official setup (student rollouts, EMA teacher,
    first 3 tokens skipped, official template, :meth:`official`) learned 0 of 8 facts (it learned the
    teacher template's style); the configuration that learned best samples rollouts from the teacher
    prompt, uses a short-answer teacher template, skips no tokens and keeps a frozen ``base`` teacher (EMA
    0.01 moved only 18% of the way in 20 steps and learned no more), at lr 2e-3. At this scale the
    ``rewrite`` method (``learners.rewrite_config``) learns more and is the default method.

    Attributes:
        prompts_per_step: Distinct prompts per optimizer step (the official ``num_prompts_per_batch``).
            Capped at the number of examples. Maps to ``per_device_train_batch_size x
            gradient_accumulation_steps = prompts_per_step x num_rollouts``.
        num_rollouts: Student completions sampled per prompt (TRL ``num_generations``).
        micro_batch_size: Completions per forward/backward (TRL ``per_device_train_batch_size``); ``None``
            puts the whole step in one micro-batch. Must divide ``prompts_per_step x num_rollouts``.
        max_completion_length: Rollout length in tokens (TRL ``max_completion_length``).
        max_prompt_length: Prompts are cut from the left beyond this (TRL ``max_prompt_length``).
        temperature: Sampling temperature; TRL also divides both models' logits by it in the loss.
        top_p: Nucleus sampling for rollouts.
        top_k: Top-k sampling for rollouts (0 = off). Not the loss: see ``distillation_mode``.
        distillation_mode: ``"full_logits"`` (full vocabulary, as in the paper), ``"topk_logits"`` (TRL's
            default approximation) or ``"sampled_token"`` (sampled tokens only, reverse KL only).
        distillation_alpha: 0 = forward KL(teacher || student) (official), 1 = reverse KL, in between a
            generalised JSD (TRL ``distillation_alpha``).
        distillation_topk: Support size for ``"topk_logits"``.
        distillation_add_tail: Add a bucket for the mass outside the top-k (``"topk_logits"`` only).
        importance_sampling_clip: TRL ``distillation_is_clip``; only active when rollouts are reused
            off-policy (``num_iterations > 1``), ``None`` disables it.
        num_iterations: Optimizer passes over each batch of rollouts (TRL ``num_iterations``); 1 is on-policy.
        teacher_kind: ``"ema"`` (official), ``"base"`` (the initial student, frozen) or ``"live"`` (the current
            student) (TRL ``teacher_model_kind``; see ``learners.sdft_trainer`` for the parent-adapter case).
        ema_rate: EMA update rate for ``teacher_kind="ema"`` (TRL ``teacher_update_rate``; official 0.01).
        ema_init: ``"student"`` starts the EMA teacher as the initial student; ``"zeros"`` is TRL's start
            from an all-zero adapter, i.e. the base model.
        teacher_sync_steps: Optimizer steps between EMA updates (TRL ``teacher_sync_steps``).
        num_loss_tokens_to_skip: Leading completion tokens left out of the loss (official 3).
        teacher_prompt_template: How the demonstration enters the teacher's last user turn; must contain
            ``{prompt}`` and ``{privileged_context}`` (TRL ``teacher_prompt_template``).
        generate_from_teacher: Sample rollouts from the teacher prompt instead of the student's
            (off-policy; TRL ``generate_from_teacher``).
        disable_dropout: Turn dropout off in student and teacher (TRL ``disable_dropout``).
        shuffle: Shuffle prompts each epoch.
        teacher_rollout_fraction: When set, each batch of rollouts is sampled from the teacher prompt with
            this probability (seeded) and from the student prompt otherwise; overrides
            ``generate_from_teacher``. ``None`` keeps ``generate_from_teacher`` for every batch.
        sft_warmup_epochs: Epochs of SFT on the demonstrations before SDFT continues from that adapter (0:
            off), so that the student's rollouts already carry the new facts.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    learning_rate: float = 2e-3
    num_epochs: float = 10
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.1
    prompts_per_step: int = 4
    num_rollouts: int = 1
    micro_batch_size: int | None = None
    max_completion_length: int = 32
    max_prompt_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    distillation_mode: Literal["full_logits", "topk_logits", "sampled_token"] = "full_logits"
    distillation_alpha: float = 0.0
    distillation_topk: int = 100
    distillation_add_tail: bool = False
    importance_sampling_clip: float | None = 2.0
    num_iterations: int = 1
    teacher_kind: Literal["ema", "base", "live"] = "base"
    ema_rate: float = 0.01
    ema_init: Literal["student", "zeros"] = "student"
    teacher_sync_steps: int = 1
    num_loss_tokens_to_skip: int = 0
    teacher_prompt_template: str = DIRECT_TEACHER_PROMPT_TEMPLATE
    generate_from_teacher: bool = True
    disable_dropout: bool = True
    shuffle: bool = True
    teacher_rollout_fraction: float | None = None
    sft_warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sft_warmup_epochs < 0:
            raise ValueError("sft_warmup_epochs must be >= 0")

    @classmethod
    def official(cls, **overrides: Any) -> SDFTSettings:
        """The official runs' on-policy setup (Shenfeld et al.): student rollouts, EMA teacher at 0.01, the
        first 3 completion tokens skipped, the official teacher template, lr 5e-4 here for LoRA."""
        base = {
            "learning_rate": 5e-4,
            "teacher_kind": "ema",
            "num_loss_tokens_to_skip": 3,
            "teacher_prompt_template": OFFICIAL_TEACHER_PROMPT_TEMPLATE,
            "generate_from_teacher": False,
        }
        return cls(**{**base, **overrides})

    def to_sft_settings(self) -> SFTSettings:
        """SFT settings with the shared optimisation knobs and ``prompts_per_step`` as batch (``sft_warmup_epochs``)."""
        common = {f.name: getattr(self, f.name) for f in fields(BaseTrainSettings)}
        return SFTSettings(**common, batch_size=self.prompts_per_step, shuffle=self.shuffle)

    def to_sdft_config(self, output_dir: str | Path, num_examples: int) -> Any:
        """Build TRL's ``SDFTConfig`` for ``num_examples`` examples."""
        with warnings.catch_warnings():  # "APIs here are unstable": known, and TRL is pinned in pyproject.toml
            warnings.filterwarnings("ignore", message=".*trl.experimental.*")
            from trl.experimental.sdft import SDFTConfig

        rows_per_step = self.effective_prompts_per_step(num_examples) * self.num_rollouts
        micro = self.micro_batch_size or rows_per_step
        if rows_per_step % micro != 0:
            raise ValueError(
                f"micro_batch_size ({micro}) must divide prompts_per_step x num_rollouts ({rows_per_step})"
            )
        steps_per_epoch = math.ceil(num_examples / self.effective_prompts_per_step(num_examples))
        return SDFTConfig(
            **self.training_args_kwargs(output_dir, steps_per_epoch),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=rows_per_step // micro,
            num_generations=self.num_rollouts,
            max_completion_length=self.max_completion_length,
            max_prompt_length=self.max_prompt_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            distillation_mode=self.distillation_mode,
            distillation_alpha=self.distillation_alpha,
            distillation_topk=self.distillation_topk,
            distillation_add_tail=self.distillation_add_tail,
            distillation_is_clip=self.importance_sampling_clip,
            num_iterations=self.num_iterations,
            teacher_model_kind=self.teacher_kind,
            teacher_update_rate=self.ema_rate,
            teacher_sync_steps=self.teacher_sync_steps,
            num_loss_tokens_to_skip=self.num_loss_tokens_to_skip,
            teacher_prompt_template=self.teacher_prompt_template,
            generate_from_teacher=self.generate_from_teacher,
            disable_dropout=self.disable_dropout,
            shuffle_dataset=self.shuffle,
            remove_unused_columns=False,
        )

    def effective_prompts_per_step(self, num_examples: int) -> int:
        """Prompts per optimizer step once capped at the number of examples."""
        return max(1, min(self.prompts_per_step, num_examples))
