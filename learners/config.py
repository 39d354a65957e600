"""Loading ``runtime.yaml`` with the learning methods' settings checked too (file, line and key for each problem).

Every layer above the learners loads its configuration here: the runtime's own loader
(:func:`runtime.config.load_config`) knows the sections of the runtime, the learners add their methods'.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from learners.registry import settings_schema, validate_learning
from runtime.config import RuntimeConfig, config_schema
from runtime.config import load_config as load_runtime_config

__all__ = ["full_config_schema", "load_config"]


def load_config(path: str | Path | None = None, *, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
    """:func:`runtime.config.load_config` with every learning method's section checked (``ConfigError``)."""
    return load_runtime_config(path, environ=environ, checks=[lambda config: validate_learning(config.learning)])


def full_config_schema() -> dict[str, Any]:
    """The JSON schema of ``runtime.yaml``, with each learning method's settings section under ``learning``."""
    schema = config_schema()
    learning = schema.get("$defs", {}).get("LearningConfig")
    if learning is not None:
        learning.setdefault("properties", {}).update(settings_schema())
    return schema
