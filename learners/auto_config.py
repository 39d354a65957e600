"""Settings of the ``auto`` method: which candidates to train and how to choose among them (``learning.auto``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict

from runtime.textmatch import TargetMetric

__all__ = ["BUILTIN_RETENTION_PROBE", "AutoSettings"]

BUILTIN_RETENTION_PROBE = Path(__file__).parent / "data" / "retention_probe.jsonl"
"""Short original passages with two questions each; the base default model answers about two thirds."""


@dataclass
class AutoSettings:
    """The YAML ``learning.auto`` section."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    candidates: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"method": "rewrite"},
            {"method": "sft", "learning_rate": 5e-4},
            {"method": "sft", "learning_rate": 2e-4},
        ]
    )
    """Each a ``method`` (``rewrite``, ``sdft`` or ``sft``) plus overrides of that method's settings."""
    budget_s: float | None = None
    """Training seconds for all candidates together; a candidate is not started once it is spent."""
    retention_file: str | None = None
    """Passages JSONL (``context``, ``questions: [{question, answer}]``) for the retention check; ``None``
    uses the small built-in probe (24 reading-comprehension questions, :data:`BUILTIN_RETENTION_PROBE`)."""
    retention_questions: int = 60
    max_retention_drop: float = 5.0
    """Points of retention accuracy a candidate may lose against the current adapter."""
    min_target_acc: float = 0.5
    """Share of the new examples that must pass."""
    target_metric: TargetMetric = "new_content"
    """How an answer is judged against its demonstration: ``new_content``, ``f1`` or ``contains``
    (:func:`runtime.textmatch.gives_taught_answer`)."""
    target_min_score: float = 0.5
    """An example passes at or above this score (``contains`` passes at 1)."""

    def __post_init__(self) -> None:
        if self.retention_file is None:
            self.retention_file = str(BUILTIN_RETENTION_PROBE)
        if not Path(self.retention_file).is_file():
            raise ValueError(f"retention_file: {self.retention_file} not found")
