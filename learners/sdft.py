"""SDFT (Shenfeld et al., 2026): on-policy self-distillation from demonstrations, on TRL's ``SDFTTrainer``.

The teacher is the model itself with the demonstration in its prompt; the student is the model with the
query alone. The student samples its own answers and is trained, token by token over the full vocabulary,
towards the teacher's distribution on those answers. Only a LoRA adapter is trained.

Two things are added on top of TRL (see ``_LearnerSDFTTrainer``):

* ``teacher_kind="base"`` with a parent adapter: TRL's base teacher disables every adapter, which would
  make the *original* base model the teacher. Here the teacher is the initial student (base + parent),
  kept as a frozen copy of the parent adapter, which is what "the model as its own teacher" means when
  learning continues from an adapter.
* ``teacher_kind="ema"``: TRL's LoRA EMA teacher starts from an all-zero adapter (the base model) and
  averages A and B towards the student from zero. Here it starts as a copy of the student's initial
  adapter, as in the official implementation where the EMA teacher starts as the initial model.
  ``ema_init="zeros"`` keeps TRL's behaviour.
* ``teacher_rollout_fraction``: each batch of rollouts is sampled from the teacher prompt with this probability
  and from the student prompt otherwise (a mix of TRL's two ``generate_from_teacher`` modes).

``variant="rewrite"`` is the older method of the same name (Yang et al., ACL 2024, "Self-Distillation Bridges
Distribution Gap in Language Model Fine-Tuning"): the model (base + parent adapter) rewrites each demonstration
in its own words, prompted with the question and the demonstration; a rewrite is kept only if it still holds
the demonstration's answer (see :func:`rewrite_keeps_answer`), else the demonstration is used; then plain SFT
(``learners.sft``) on the result. It is off-policy and costs one generation pass more than SFT.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback
from trl.trainer.utils import use_adapter

with warnings.catch_warnings():  # "APIs here are unstable": known, and TRL is pinned in pyproject.toml
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback

from runtime.textmatch import new_words, normalise

from .anchor_loss import AnchorLoss, AnchorTraining
from .callbacks import ProgressCallback, ProgressFn
from .common import BaseTrainSettings, TrainResult, cycle_to_multiple
from .examples import DemoExample
from .generation import generate
from .lora import LoraSettings, build_peft_model, load_base_model, load_frozen_adapter, load_tokenizer, save_adapter
from .sft import SFTSettings, train_sft

__all__ = [
    "DIRECT_TEACHER_PROMPT_TEMPLATE",
    "OFFICIAL_TEACHER_PROMPT_TEMPLATE",
    "REWRITE_PROMPT_TEMPLATE",
    "TRL_TEACHER_PROMPT_TEMPLATE",
    "DemoLogprobs",
    "Rewrite",
    "SDFTSettings",
    "build_sdft_trainer",
    "build_teacher_prompt",
    "rewrite_demonstrations",
    "rewrite_keeps_answer",
    "teacher_student_logprobs",
    "train_sdft",
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

#: The rewrite prompt of ``variant="rewrite"``, after Yang et al. (2024)'s self-distillation template, as the
#: last user turn (earlier messages are kept).
REWRITE_PROMPT_TEMPLATE = (
    "Below is a question along with a reference answer. Using the reference answer as a guide, write your own "
    "answer to the question, in your own words.\n\n"
    "Question: {prompt}\n\nReference answer: {privileged_context}"
)

_TEACHER_ADAPTER = "teacher"
_TRL_LOGGER = "trl.experimental.sdft.sdft_trainer"


@dataclass
class SDFTSettings(BaseTrainSettings):
    """Every SDFT knob the learner exposes, and how it maps onto TRL's ``SDFTConfig``.

    **Defaults come from measurement at the default model's scale** (SmolLM2-135M, LoRA r16): in the
    screening of every variant (``benchmarks/results/sdft_front_screen.md``, 8 facts) the official on-policy
    setup (student rollouts, EMA teacher, first 3 tokens skipped, official template) learned 0 of 8 facts,
    while the 2024 method of the same name (``variant="rewrite"``: the model restates the demonstration in its
    own words, then SFT on that) learned 8/8. At the full protocol (``benchmarks/results/sdft_front.md``, 48
    facts, 300 retention questions, 2 seeds) rewrite at lr 1e-3 answers 100% of direct questions and 80% of
    paraphrases while retention rises 4.8 points (SFT: 83%, retention -4.8) with KL to base 0.85 (SFT 1.50).
    So ``variant="rewrite"`` at lr 1e-3 is the default. For
    ``variant="on_policy"`` the defaults are the on-policy configuration that learned best there: rollouts
    sampled from the teacher prompt, a short-answer teacher template, no skipped tokens and a frozen
    ``base`` teacher (EMA 0.01 moved only 18% of the way in 20 steps and learned no more); it wants a
    higher learning rate (2e-3 measured). :meth:`official` gives the paper's setup.

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
            student) (TRL ``teacher_model_kind``; see the module docstring for the parent-adapter case).
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
        variant: ``"on_policy"`` is SDFT as above (Shenfeld et al.); ``"rewrite"`` is Yang et al. (2024): the
            model rewrites each demonstration, then SFT on the rewrites (see the module docstring). With
            ``"rewrite"`` the rollout, teacher and distillation knobs are unused; the optimisation knobs
            (learning rate, epochs, schedule, seed...) and ``prompts_per_step`` (as the SFT batch size) apply.
        rewrite_prompt_template: Last user turn of the rewrite prompt; ``{prompt}`` is the question's text and
            ``{privileged_context}`` the demonstration.
        rewrite_max_new_tokens: Length cap of a rewrite.
        rewrite_temperature: Sampling temperature of the rewrites; 0 is greedy.
        rewrite_check: ``"answer"`` keeps a rewrite only if it holds the demonstration's answer
            (:func:`rewrite_keeps_answer`), else falls back to the demonstration; ``"none"`` keeps every
            non-empty rewrite.
        kl_anchor: ``variant="rewrite"``: weight of a KL(adapter || base) penalty in the SFT loss on the rewrites
            (``SFTSettings.kl_anchor``; 0: off). Not available on-policy, whose loss is TRL's distillation loss.
        sft_warmup_epochs: ``variant="on_policy"``: epochs of SFT on the demonstrations before SDFT continues
            from that adapter (0: off), so that the student's rollouts already carry the new facts.
    """

    learning_rate: float = 1e-3
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
    variant: Literal["on_policy", "rewrite"] = "rewrite"
    rewrite_prompt_template: str = REWRITE_PROMPT_TEMPLATE
    rewrite_max_new_tokens: int = 64
    rewrite_temperature: float = 0.0
    rewrite_check: Literal["answer", "none"] = "answer"
    kl_anchor: float = 0.0
    sft_warmup_epochs: float = 0.0

    def __post_init__(self) -> None:
        if self.kl_anchor < 0 or self.sft_warmup_epochs < 0:
            raise ValueError("kl_anchor and sft_warmup_epochs must be >= 0")
        if self.kl_anchor > 0 and self.variant != "rewrite":
            raise ValueError("kl_anchor applies to variant='rewrite' (an SFT loss); on-policy SDFT has TRL's loss")
        if self.sft_warmup_epochs > 0 and self.variant != "on_policy":
            raise ValueError("sft_warmup_epochs applies to variant='on_policy'; 'rewrite' is SFT already")

    @classmethod
    def official(cls, **overrides: Any) -> SDFTSettings:
        """The official runs' on-policy setup (Shenfeld et al.): student rollouts, EMA teacher at 0.01, the
        first 3 completion tokens skipped, the official teacher template, lr 5e-4 here for LoRA."""
        base = {
            "variant": "on_policy",
            "learning_rate": 5e-4,
            "teacher_kind": "ema",
            "num_loss_tokens_to_skip": 3,
            "teacher_prompt_template": OFFICIAL_TEACHER_PROMPT_TEMPLATE,
            "generate_from_teacher": False,
        }
        return cls(**{**base, **overrides})

    def to_sft_settings(self) -> SFTSettings:
        """The SFT settings of ``variant="rewrite"``: the shared optimisation knobs, ``prompts_per_step`` as batch."""
        common = {f.name: getattr(self, f.name) for f in fields(BaseTrainSettings)}
        return SFTSettings(
            **common, batch_size=self.prompts_per_step, shuffle=self.shuffle, kl_anchor=self.kl_anchor
        )

    def to_sdft_config(self, output_dir: str | Path, num_examples: int) -> SDFTConfig:
        """Build TRL's ``SDFTConfig`` for ``num_examples`` examples."""
        rows_per_step = self.effective_prompts_per_step(num_examples) * self.num_rollouts
        micro = self.micro_batch_size or rows_per_step
        if rows_per_step % micro != 0:
            raise ValueError(
                f"micro_batch_size ({micro}) must divide prompts_per_step x num_rollouts ({rows_per_step})"
            )
        return SDFTConfig(
            **self.training_args_kwargs(output_dir),
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


class _StudentInitEMACallback(PEFTAdapterEMACallback):
    """TRL's LoRA EMA teacher, but starting from a copy of the student adapter instead of zeros."""

    def _initialize_teacher_adapter(self) -> None:
        if self._initialized:
            return
        model = self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model
        adapter_name = model.active_adapter or "default"
        self.teacher_adapter_config = model.peft_config[adapter_name]
        student_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
        model.add_adapter(self.teacher_adapter_name, self.teacher_adapter_config)
        model.set_adapter(self.teacher_adapter_name)
        set_peft_model_state_dict(model, student_state, adapter_name=self.teacher_adapter_name)
        model.set_adapter(adapter_name)
        self.shadow_weights = {k: v.clone() for k, v in student_state.items()}
        self._initialized = True


class _LearnerSDFTTrainer(SDFTTrainer):
    """``SDFTTrainer`` with the teacher fixes described in the module docstring."""

    def __init__(
        self,
        *args: Any,
        frozen_teacher_adapter: str | None = None,
        ema_init: str = "student",
        teacher_rollout_fraction: float | None = None,
        anchor_loss: AnchorLoss | None = None,
        **kwargs: Any,
    ) -> None:
        self._frozen_teacher_adapter = frozen_teacher_adapter
        self._anchor_loss = anchor_loss
        self._ema_init = ema_init
        self._teacher_rollout_fraction = teacher_rollout_fraction
        super().__init__(*args, **kwargs)
        self._rollout_rng = random.Random(self.args.seed)
        #: Where each batch of rollouts was sampled from ("teacher" / "student"), in order.
        self.rollout_sources: list[str] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._anchor_loss is None or not model.training:
            return loss
        term = self._anchor_loss(self.accelerator.unwrap_model(model))
        self._metrics["train"]["anchor_loss"].append(self._anchor_loss.history[-1])
        if return_outputs:
            return (loss[0] + term, *loss[1:])
        return loss + term

    def sample_rollouts(self, inputs: list[dict[str, Any]]) -> Any:
        if self._teacher_rollout_fraction is not None:
            self.generate_from_teacher = self._rollout_rng.random() < self._teacher_rollout_fraction
        self.rollout_sources.append("teacher" if self.generate_from_teacher else "student")
        return super().sample_rollouts(inputs)

    def _setup_teacher_model(self) -> None:
        super()._setup_teacher_model()
        if self._ema_init == "student" and self._use_peft_ema_teacher_adapter():
            self.callback_handler.remove_callback(PEFTAdapterEMACallback)
            self.add_callback(
                _StudentInitEMACallback(
                    model=self.model,
                    teacher_adapter_name=_TEACHER_ADAPTER,
                    update_rate=self.args.teacher_update_rate,
                    sync_steps=self.args.teacher_sync_steps,
                    accelerator=self.accelerator,
                )
            )

    def _get_teacher_context_for_self_distillation(self) -> AbstractContextManager[Any]:
        if self._frozen_teacher_adapter is not None and self.args.teacher_model_kind == "base":
            return use_adapter(self.accelerator.unwrap_model(self.teacher_model), self._frozen_teacher_adapter)
        return super()._get_teacher_context_for_self_distillation()

    def teacher_context(self) -> AbstractContextManager[Any]:
        """Context manager that routes a forward pass of ``self.model`` to the teacher's weights."""
        return self._get_teacher_context_for_self_distillation()


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextmanager
def _quiet_adapter_warning() -> Iterator[None]:
    """Hide TRL's warning about a pre-wrapped PEFT student: this module handles the teacher itself."""
    log = logging.getLogger(_TRL_LOGGER)
    filt = _DropMessage("already contains a PEFT adapter")
    log.addFilter(filt)
    try:
        yield
    finally:
        log.removeFilter(filt)


def _to_dataset(examples: Sequence[DemoExample]) -> Dataset:
    return Dataset.from_list([{"prompt": list(ex.prompt), "privileged_context": ex.demonstration} for ex in examples])


def build_sdft_trainer(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    output_dir: str | Path,
    settings: SDFTSettings | None = None,
    lora: LoraSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    anchors: AnchorTraining | None = None,
) -> SDFTTrainer:
    """Build (but do not run) the TRL ``SDFTTrainer`` that ``train_sdft`` runs.

    The dataset has TRL's two columns: ``prompt`` (the chat messages) and ``privileged_context`` (the
    demonstration, inserted into the teacher's last user turn with ``settings.teacher_prompt_template``).
    """
    settings = settings or SDFTSettings()
    settings.apply_process_settings()
    if not examples:
        raise ValueError("train_sdft needs at least one example")
    prompts = settings.effective_prompts_per_step(len(examples))
    rows = cycle_to_multiple(list(examples), prompts, settings.seed)
    config = settings.to_sdft_config(output_dir, len(examples))

    set_seed(settings.seed)  # LoRA initialisation
    tokenizer = load_tokenizer(base_model_dir)
    model = build_peft_model(load_base_model(base_model_dir), lora, parent_adapter_dir)
    frozen_teacher = None
    if parent_adapter_dir is not None and settings.teacher_kind == "base":
        load_frozen_adapter(model, parent_adapter_dir, _TEACHER_ADAPTER)
        frozen_teacher = _TEACHER_ADAPTER
    anchor_loss = anchors.build(model, tokenizer, parent_adapter_dir, settings.seed) if anchors else None
    with _quiet_adapter_warning():
        trainer = _LearnerSDFTTrainer(
            model=model,
            args=config,
            train_dataset=_to_dataset(rows),
            processing_class=tokenizer,
            callbacks=list(callbacks),
            frozen_teacher_adapter=frozen_teacher,
            ema_init=settings.ema_init,
            teacher_rollout_fraction=settings.teacher_rollout_fraction,
            anchor_loss=anchor_loss,
        )
    trainer.remove_callback(PrinterCallback)  # logs go to the progress callback, not stdout
    return trainer


def train_sdft(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    output_dir: str | Path,
    settings: SDFTSettings | None = None,
    lora: LoraSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    progress_callback: ProgressFn | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    anchors: AnchorTraining | None = None,
) -> TrainResult:
    """Train a LoRA adapter with SDFT and save it to ``output_dir``.

    Args:
        base_model_dir: Local directory of the base model (safetensors + tokenizer with a chat template).
        examples: Prompts with their demonstrations.
        output_dir: Where the adapter is written (nothing else is saved).
        settings: SDFT knobs (``SDFTSettings()`` by default).
        lora: Shape of a fresh adapter; ignored with ``parent_adapter_dir``.
        parent_adapter_dir: Continue from this adapter (its weights are the starting point).
        progress_callback: ``fn(step, total_steps, logs)``, see ``learners.callbacks.ProgressFn``.
        callbacks: Extra ``transformers.TrainerCallback`` objects (e.g. to stop early).
        anchors: Anchors answered by the active model; every step adds the anchor term (``learners.anchor_loss``).

    Returns:
        The adapter directory, per-step metrics (``loss`` is the distillation loss; the SFT loss with
        ``variant="rewrite"``), timings and counts. With ``variant="rewrite"``, ``train_seconds`` includes the
        rewriting and ``summary`` has ``rewrites_kept`` and ``rewrite_seconds``.
    """
    settings = settings or SDFTSettings()
    if settings.variant == "rewrite":
        return _train_rewrite(
            base_model_dir, examples, output_dir, settings, lora, parent_adapter_dir, progress_callback, callbacks,
            anchors,
        )
    warmup = None
    if settings.sft_warmup_epochs > 0:
        warmup = _sft_warmup(base_model_dir, examples, output_dir, settings, lora, parent_adapter_dir)
        parent_adapter_dir = warmup.adapter_dir
    progress = ProgressCallback(progress_callback)
    trainer = build_sdft_trainer(
        base_model_dir, examples, output_dir, settings, lora, parent_adapter_dir, [progress, *callbacks], anchors
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    summary = dict(progress.summary)
    if warmup is not None:
        seconds += warmup.train_seconds
        summary.update(sft_warmup_seconds=warmup.train_seconds, sft_warmup_steps=warmup.num_steps)
        shutil.rmtree(warmup.adapter_dir, ignore_errors=True)
    adapter_dir = save_adapter(trainer.accelerator.unwrap_model(trainer.model), output_dir)
    return TrainResult(
        adapter_dir=adapter_dir,
        metrics=progress.history,
        train_seconds=seconds,
        num_examples=len(examples),
        num_steps=int(trainer.state.global_step),
        summary=summary,
        method="sdft",
    )


def _sft_warmup(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    output_dir: str | Path,
    settings: SDFTSettings,
    lora: LoraSettings | None,
    parent_adapter_dir: str | Path | None,
) -> TrainResult:
    """``sft_warmup_epochs`` of SFT on the demonstrations (the shared optimisation knobs), into a scratch dir."""
    sft = settings.to_sft_settings()
    sft.num_epochs = settings.sft_warmup_epochs
    sft.max_steps = None
    scratch = Path(output_dir).parent / f"{Path(output_dir).name}.sft-warmup"
    return train_sft(base_model_dir, examples, scratch, sft, lora, parent_adapter_dir)


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


class DemoLogprobs(NamedTuple):
    """Mean per-token log-probability of a demonstration's tokens under each prompt."""

    teacher: float
    student: float


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


@torch.no_grad()
def _mean_logprob(model: PreTrainedModel, prompt_ids: list[int], target_ids: list[int]) -> float:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + target_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logps = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(target_ids, device=device)
    return float(logps.gather(-1, target[:, None]).mean())


def teacher_student_logprobs(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    example: DemoExample,
    template: str = OFFICIAL_TEACHER_PROMPT_TEMPLATE,
) -> DemoLogprobs:
    """Score the demonstration as the answer to the teacher prompt and to the student prompt.

    This is the signal SDFT distils: if the teacher (demonstration in context) does not give the
    demonstrated answer a clearly higher log-probability than the student, there is little to learn.
    Tokens are joined as the trainer joins prompt and completion (prompt ids, then the answer's ids).
    """
    target = tokenizer(example.demonstration, add_special_tokens=False)["input_ids"]
    if not target:
        raise ValueError("the demonstration has no tokens")
    teacher_ids = _chat_ids(tokenizer, build_teacher_prompt(example.prompt, example.demonstration, template))
    student_ids = _chat_ids(tokenizer, example.prompt)
    was_training = model.training
    model.eval()
    try:
        return DemoLogprobs(
            teacher=_mean_logprob(model, teacher_ids, target),
            student=_mean_logprob(model, student_ids, target),
        )
    finally:
        model.train(was_training)


# --- variant="rewrite" (Yang et al., 2024) -------------------------------------------------------------------

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


class Rewrite(NamedTuple):
    """One demonstration's rewrite: the model's text, whether it was kept, and what is trained on."""

    rewrite: str
    kept: bool
    text: str


def rewrite_demonstrations(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    settings: SDFTSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
    batch_size: int = 8,
) -> list[Rewrite]:
    """Have the model (base + parent adapter) rewrite each demonstration in its own words.

    The rewrite prompt is the example's messages with the last user turn replaced by
    ``settings.rewrite_prompt_template``; the answer is cut at ``settings.rewrite_max_new_tokens`` tokens.
    """
    settings = settings or SDFTSettings()
    settings.apply_process_settings()
    set_seed(settings.seed)
    tokenizer = load_tokenizer(base_model_dir)
    model: Any = load_base_model(base_model_dir)
    if parent_adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(parent_adapter_dir))
    convs = [build_teacher_prompt(ex.prompt, ex.demonstration, settings.rewrite_prompt_template) for ex in examples]
    outputs = generate(
        model, tokenizer, convs, max_new_tokens=settings.rewrite_max_new_tokens, batch_size=batch_size,
        temperature=settings.rewrite_temperature,
    )
    rewrites = []
    for ex, output in zip(examples, outputs, strict=True):
        text = output.text
        keep = bool(text) and (settings.rewrite_check == "none" or rewrite_keeps_answer(text, ex))
        rewrites.append(Rewrite(rewrite=text, kept=keep, text=text if keep else ex.demonstration))
    return rewrites


def _train_rewrite(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    output_dir: str | Path,
    settings: SDFTSettings,
    lora: LoraSettings | None,
    parent_adapter_dir: str | Path | None,
    progress_callback: ProgressFn | None,
    callbacks: Sequence[TrainerCallback],
    anchors: AnchorTraining | None = None,
) -> TrainResult:
    if not examples:
        raise ValueError("train_sdft needs at least one example")
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
    result.method = "sdft"
    return result
