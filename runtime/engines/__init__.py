"""Engines: one interface to generate, chat, stream and score with hot-swappable LoRA adapters.

``TransformersEngine`` is the embedded default (in-process, PEFT multi-adapter, CPU or GPU).
``VLLMEngine`` and ``SGLangEngine`` drive a running vLLM or SGLang server over HTTP; ``RuntimeReplicaEngine`` a
``runtime serve --role replica`` server. ``ReplicaSet`` spreads requests over several of them and promotes adapters
on all of them in two phases.
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
    EngineBusyError,
    EngineError,
    UnknownAdapterError,
)
from runtime.engines.http_errors import (
    ServerConnectionError,
    ServerContextLengthError,
    ServerError,
    ServerTimeoutError,
    UnsupportedOperationError,
)
from runtime.engines.replica_set import NoReplicaAvailableError, ReplicaEndpoint, ReplicaSet, ReplicaStatus
from runtime.engines.runtime_replica import FollowerError, ReplicaNotInStepError, RuntimeReplicaEngine, follower_refusal
from runtime.engines.sglang_engine import SGLangEngine
from runtime.engines.transformers_engine import TransformersEngine
from runtime.engines.vllm_engine import VLLMEngine
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
    "EngineBusyError",
    "EngineError",
    "FollowerError",
    "Generation",
    "ModelNotFoundError",
    "NoReplicaAvailableError",
    "ReplicaEndpoint",
    "ReplicaNotInStepError",
    "ReplicaSet",
    "ReplicaStatus",
    "RuntimeReplicaEngine",
    "SGLangEngine",
    "SamplingParams",
    "ServerConnectionError",
    "ServerContextLengthError",
    "ServerError",
    "ServerTimeoutError",
    "StreamResult",
    "TransformersEngine",
    "UnknownAdapterError",
    "UnsupportedOperationError",
    "VLLMEngine",
    "follower_refusal",
]
