"""Engines: one interface to generate, chat, stream and score with hot-swappable LoRA adapters.

``TransformersEngine`` is the embedded default (in-process, PEFT multi-adapter, CPU or GPU).
"""

from runtime.engines.base import (
    ACTIVE,
    AdapterChoice,
    AdapterChoices,
    Conversation,
    Engine,
    Generation,
    SamplingParams,
    StreamResult,
)
from runtime.engines.errors import (
    AdapterExistsError,
    AdapterLoadError,
    ContextLengthError,
    EngineError,
    UnknownAdapterError,
)
from runtime.engines.transformers_engine import TransformersEngine
from runtime.models import ModelNotFoundError

__all__ = [
    "ACTIVE",
    "AdapterChoice",
    "AdapterChoices",
    "AdapterExistsError",
    "AdapterLoadError",
    "ContextLengthError",
    "Conversation",
    "Engine",
    "EngineError",
    "Generation",
    "ModelNotFoundError",
    "SamplingParams",
    "StreamResult",
    "TransformersEngine",
    "UnknownAdapterError",
]
