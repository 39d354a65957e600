"""Trainer callbacks shared by the learners."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["PhaseFn", "ProgressCallback", "ProgressFn"]

#: ``fn(step, total_steps, logs)``: called once when training starts (step 0, empty logs) and once per
#: optimizer step with that step's logged metrics (``loss``, ``learning_rate``, ``grad_norm``, method metrics).
ProgressFn = Callable[[int, int, dict[str, float]], None]
PhaseFn = Callable[[str, int, int], None]
"""``phase(name, done, total)``: a learning cycle's phase (``dataset``, ``training`` (attempt n of N),
``verification``, ``gate`` (check n of N), ``promotion``), reported as it starts and moves on."""

# Keys of the summary Trainer logs once at the end of training (not a step's metrics).
_SUMMARY_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"})


def _as_floats(logs: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in logs.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class ProgressCallback(TrainerCallback):
    """Adapter from Trainer events to a plain ``(step, total_steps, logs)`` function.

    It also keeps every step's metrics in ``history`` (each with its ``step``) and the end-of-training
    summary in ``summary``, so a learner can return them without a second callback.

    Args:
        fn: Called on training start and after each logged step; may be ``None`` to only record.
    """

    def __init__(self, fn: ProgressFn | None = None) -> None:
        self.fn = fn
        self.history: list[dict[str, float]] = []
        self.summary: dict[str, float] = {}
        self.total_steps = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.total_steps = int(state.max_steps)
        if self.fn is not None:
            self.fn(int(state.global_step), self.total_steps, {})

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        values = _as_floats(logs or {})
        if _SUMMARY_KEYS & values.keys():
            self.summary.update(values)
            return
        step = int(state.global_step)
        self.history.append({"step": float(step), **values})
        if self.fn is not None:
            self.fn(step, self.total_steps, values)
