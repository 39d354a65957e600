"""Settings and results shared by the learners."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .examples import DemoExample

__all__ = ["BaseTrainSettings", "TrainResult", "cycle_to_multiple"]


@dataclass
class BaseTrainSettings:
    """Optimisation knobs common to every learner (mapped onto ``transformers.TrainingArguments``).

    Attributes:
        learning_rate: Peak AdamW learning rate (LoRA parameters only).
        num_epochs: Passes over the examples.
        max_steps: Stop after this many optimizer steps (overrides ``num_epochs``); ``None`` for no cap.
        min_steps: Take at least this many optimizer steps: when ``num_epochs`` passes over the examples make
            fewer, the data is cycled until this many (0: off). A correction of one to three examples makes one
            optimizer step per epoch; this keeps such a small update from being too short to learn, and leaves
            a larger one (many steps per epoch) as ``num_epochs`` says.
        seed: Seeds LoRA initialisation, data order and sampling.
        lr_scheduler_type: Any ``transformers`` scheduler name (``"linear"``, ``"cosine"``, ``"constant"``...).
        warmup_steps: Warmup length; a value below 1 is a fraction of the total steps.
        min_steps_scheduler: The schedule, without warmup, of an update that ``min_steps`` lengthens (a
            correction or two cycled for a dozen steps: every step at the full rate is worth its time there, where
            a warmup step at rate 0 is not); ``None`` keeps ``lr_scheduler_type`` and ``warmup_steps``.
        min_steps_learning_rate: The peak rate of an update that ``min_steps`` lengthens; ``None`` keeps
            ``learning_rate``. A method whose rate is tuned for large updates (where a decaying schedule averages
            half the peak) can run its cycled corrections at a lower constant rate.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping norm.
        use_cpu: Train on CPU even when an accelerator is present.
        bf16: bf16 mixed precision; ``None`` picks it on a CUDA device that supports it, never on CPU.
        gradient_checkpointing: Recompute activations in the backward pass (less memory, ~20% slower).
        torch_threads: CPU threads for torch (``torch.set_num_threads``, process-wide); ``None`` leaves
            torch's default. On a shared CPU, fewer threads than cores can be many times faster: on a busy
            2-core machine one thread ran a SmolLM2-135M LoRA step ~8x faster than two.
    """

    learning_rate: float = 5e-4
    num_epochs: float = 10
    max_steps: int | None = None
    min_steps: int = 0
    seed: int = 0
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.0
    min_steps_scheduler: str | None = None
    min_steps_learning_rate: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    use_cpu: bool = False
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")
        if self.min_steps_learning_rate is not None and not self.min_steps_learning_rate > 0:
            raise ValueError("min_steps_learning_rate must be > 0 (or null for learning_rate)")

    def apply_process_settings(self) -> None:
        """Apply the settings that act on the whole process (``torch_threads``)."""
        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)

    def resolved_bf16(self) -> bool:
        """Whether to train in bf16 mixed precision on this machine."""
        if self.bf16 is not None:
            return self.bf16
        import torch

        return (not self.use_cpu) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def resolved_max_steps(self, steps_per_epoch: int | None) -> int | None:
        """The step cap to train with: ``max_steps``, else ``min_steps`` when the epochs would make fewer."""
        if self.max_steps is not None:
            return self.max_steps
        if steps_per_epoch is None or self.min_steps <= 0:
            return None
        epoch_steps = math.ceil(self.num_epochs * max(1, steps_per_epoch))
        return self.min_steps if epoch_steps < self.min_steps else None

    def training_args_kwargs(self, output_dir: str | Path, steps_per_epoch: int | None = None) -> dict[str, Any]:
        """Keyword arguments for a ``TrainingArguments`` subclass (TRL's ``SFTConfig`` / ``SDFTConfig``).

        ``steps_per_epoch`` (optimizer steps in one pass over the examples) lets ``min_steps`` apply. Logs
        every step, saves no checkpoints (the learner saves the final adapter itself), reports to no tracker
        and shows no tqdm bar (progress goes through the learner's callback).
        """
        max_steps = self.resolved_max_steps(steps_per_epoch)
        scheduler, warmup, rate = self.lr_scheduler_type, self.warmup_steps, self.learning_rate
        if self.max_steps is None and max_steps is not None:  # lengthened by min_steps
            if self.min_steps_scheduler is not None:
                scheduler, warmup = self.min_steps_scheduler, 0.0
            if self.min_steps_learning_rate is not None:
                rate = self.min_steps_learning_rate
        return {
            "output_dir": str(output_dir),
            "learning_rate": rate,
            "num_train_epochs": self.num_epochs,
            "max_steps": max_steps if max_steps is not None else -1,
            "seed": self.seed,
            "data_seed": self.seed,
            "lr_scheduler_type": scheduler,
            "warmup_steps": warmup,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "use_cpu": self.use_cpu,
            "bf16": self.resolved_bf16(),
            "fp16": False,
            # transformers 5 renamed it; setting both keeps TRL (which reads the old name) quiet and in step.
            "activation_checkpointing": self.gradient_checkpointing,
            "gradient_checkpointing": self.gradient_checkpointing,
            "logging_strategy": "steps",
            "logging_steps": 1,
            "save_strategy": "no",
            "eval_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "dataloader_pin_memory": (not self.use_cpu) and _cuda_available(),
        }


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class TrainResult:
    """What a learner returns.

    Attributes:
        adapter_dir: Directory holding the saved LoRA adapter (``adapter_config.json`` + weights).
        metrics: One dict per logged optimizer step, each with its ``step`` and the Trainer's logs.
        train_seconds: Wall-clock of the training loop (model loading and saving excluded).
        num_examples: Distinct examples trained on.
        num_steps: Optimizer steps taken.
        summary: The Trainer's end-of-training summary (``train_loss``, ``train_runtime``, ...).
        method: ``"sft"`` or ``"sdft"``.
    """

    adapter_dir: Path
    metrics: list[dict[str, float]]
    train_seconds: float
    num_examples: int
    num_steps: int = 0
    summary: dict[str, float] = field(default_factory=dict)
    method: str = ""


def cycle_to_multiple(examples: list[DemoExample], multiple: int, seed: int) -> list[DemoExample]:
    """Append randomly chosen repeats so the count is a multiple of ``multiple``.

    TRL's SDFT sampler drops an incomplete last batch each epoch; padding the list keeps every example
    in every epoch at the cost of a few examples seen twice.
    """
    remainder = (-len(examples)) % multiple
    if remainder == 0:
        return list(examples)
    extra = random.Random(seed).sample(examples, k=min(remainder, len(examples)))
    while len(extra) < remainder:
        extra += examples[: remainder - len(extra)]
    return list(examples) + extra
