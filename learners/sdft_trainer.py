"""On-policy SDFT (Shenfeld et al., 2026) on TRL's ``SDFTTrainer``; settings in :mod:`learners.sdft_config`.

The teacher is the model itself with the demonstration in its prompt; the student is the model with the
query alone. The student samples its own answers and is trained, token by token over the full vocabulary,
towards the teacher's distribution on those answers. Only a LoRA adapter is trained.

Added on top of TRL (see ``_LearnerSDFTTrainer``):

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
* the anchor term of ``learning.anchors`` (:mod:`learners.anchor_loss`) added to the distillation loss.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback
from trl.trainer.utils import use_adapter

with warnings.catch_warnings():  # "APIs here are unstable": known, and TRL is pinned in pyproject.toml
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.sdft import SDFTTrainer
    from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback

from .anchor_loss import AnchorLoss, AnchorTraining
from .callbacks import ProgressCallback, ProgressFn
from .common import TrainResult, cycle_to_multiple
from .examples import DemoExample
from .lora import build_peft_model, load_base_model, load_frozen_adapter, load_tokenizer, save_adapter
from .lora_config import LoraSettings
from .sdft_config import SDFTSettings
from .sft_trainer import train_sft

__all__ = ["build_sdft_trainer", "train_sdft"]

_TEACHER_ADAPTER = "teacher"
_TRL_LOGGER = "trl.experimental.sdft.sdft_trainer"


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
    anchor_loss = (  # beside each micro-batch of completions
        anchors.build(model, tokenizer, parent_adapter_dir, settings.seed, config.per_device_train_batch_size)
        if anchors else None
    )
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
        The adapter directory, per-step metrics (``loss`` is the distillation loss), timings and counts.
    """
    settings = settings or SDFTSettings()
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
    sft.min_steps = 0
    scratch = Path(output_dir).parent / f"{Path(output_dir).name}.sft-warmup"
    return train_sft(base_model_dir, examples, scratch, sft, lora, parent_adapter_dir)
