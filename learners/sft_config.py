"""Settings of the ``sft`` method (the baseline): LoRA fine-tuning on the demonstrations, loss on the answer only.

The trainer is :mod:`learners.sft_trainer` (TRL's ``SFTTrainer``). TRL is imported only to build its config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from .common import BaseTrainSettings

__all__ = ["SFTSettings"]


@dataclass
class SFTSettings(BaseTrainSettings):
    """SFT knobs (defaults: the ``5e-4 x 10`` row of DESIGN.md's measurements, and at least 12 optimizer steps
    at the full rate so that an update of a few corrections is not too short to learn; see ``RewriteSettings``).

    Attributes:
        batch_size: Examples per micro-batch (TRL ``per_device_train_batch_size``).
        gradient_accumulation_steps: Micro-batches per optimizer step.
        max_length: Sequences (prompt + answer) are cut to this many tokens.
        completion_only_loss: Loss on the answer tokens only (TRL ``completion_only_loss``); ``False`` also
            trains on the prompt.
        shuffle: Shuffle examples each epoch.
        kl_anchor: Weight of a KL(adapter || base) penalty on the trained tokens, added to the loss (0: off).
            It anchors the update to the base model's next-token distributions, to forget less.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    min_steps: int = 12
    min_steps_scheduler: str | None = "constant"
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    completion_only_loss: bool = True
    shuffle: bool = True
    kl_anchor: float = 0.0

    def to_sft_config(
        self, output_dir: str | Path, *, plain_text: bool = False, num_examples: int | None = None
    ) -> Any:
        """Build TRL's ``SFTConfig`` (``plain_text``: token sequences with no prompt part, loss on every token);
        ``num_examples`` lets ``min_steps`` apply."""
        from trl import SFTConfig

        steps_per_epoch = None
        if num_examples is not None:
            steps_per_epoch = math.ceil(num_examples / (self.batch_size * self.gradient_accumulation_steps))
        return SFTConfig(
            **self.training_args_kwargs(output_dir, steps_per_epoch),
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_length=self.max_length,
            completion_only_loss=False if plain_text else self.completion_only_loss,
            assistant_only_loss=False,
            packing=False,
            shuffle_dataset=self.shuffle,
            dataset_num_proc=None,
        )
