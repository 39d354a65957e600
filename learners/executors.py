"""The executor of ``learning.executor``: where a learning cycle's training jobs run."""

from __future__ import annotations

from learners.worker import JobExecutor, LocalProcessExecutor
from runtime.config import LearningConfig


def executor_from_config(learning: LearningConfig) -> JobExecutor:
    """``local``: a :class:`~learners.worker.LocalProcessExecutor`; ``ray``: a
    :class:`~learners.ray_executor.RayExecutor` from ``learning.ray`` (a ``ConfigError`` naming the extra when
    Ray is not installed)."""
    if learning.executor == "ray":
        from learners.ray_executor import RayExecutor

        return RayExecutor.from_config(learning.ray)
    return LocalProcessExecutor()
