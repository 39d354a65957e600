"""Shape of a LoRA adapter (the YAML ``learning.lora`` section); PEFT is imported only to build its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict

__all__ = ["LoraSettings"]


@dataclass
class LoraSettings:
    """Shape of a fresh LoRA adapter.

    Ignored when training continues from a parent adapter: the parent's own configuration is kept so
    that the child stays a drop-in replacement for it.

    Attributes:
        r: Rank of the update matrices.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout on the LoRA input. Note that the trainers disable dropout by default (TRL's
            ``disable_dropout``) only for SDFT; SFT keeps it.
        target_modules: Module names to adapt, or ``"all-linear"`` for every linear layer but the output head.
        bias: Which biases to train (``"none"``, ``"all"``, ``"lora_only"``).
        use_rslora: Rank-stabilised scaling.
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g. ``["lm_head"]``).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = field(default=None)

    def to_peft_config(self) -> Any:
        """Return the equivalent ``peft.LoraConfig`` for a causal LM."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            use_rslora=self.use_rslora,
            modules_to_save=self.modules_to_save,
            task_type="CAUSAL_LM",
        )
