"""Learners: datasets from the log, the learning methods (see :mod:`learners.registry`), anchors, the worker.

Names are imported lazily, so ``import learners`` (or ``learners.examples``) does not pay for TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .callbacks import ProgressCallback, ProgressFn
    from .common import BaseTrainSettings, TrainResult
    from .examples import DemoExample
    from .lora import build_peft_model, load_base_model, load_tokenizer, save_adapter
    from .lora_config import LoraSettings
    from .registry import DEFAULT_METHOD, LEARNING_METHODS, LearningMethod, get_method
    from .rewrite_config import RewriteSettings
    from .rewrite_trainer import train_rewrite
    from .sdft_config import (
        OFFICIAL_TEACHER_PROMPT_TEMPLATE,
        TRL_TEACHER_PROMPT_TEMPLATE,
        SDFTSettings,
        build_teacher_prompt,
    )
    from .sdft_diagnostics import DemoLogprobs, teacher_student_logprobs
    from .sdft_trainer import build_sdft_trainer, train_sdft
    from .sft_config import SFTSettings
    from .sft_trainer import build_sft_trainer, train_sft

_EXPORTS: dict[str, str] = {
    "ProgressCallback": "callbacks",
    "ProgressFn": "callbacks",
    "BaseTrainSettings": "common",
    "TrainResult": "common",
    "DemoExample": "examples",
    "LoraSettings": "lora_config",
    "build_peft_model": "lora",
    "load_base_model": "lora",
    "load_tokenizer": "lora",
    "save_adapter": "lora",
    "DEFAULT_METHOD": "registry",
    "LEARNING_METHODS": "registry",
    "LearningMethod": "registry",
    "get_method": "registry",
    "RewriteSettings": "rewrite_config",
    "train_rewrite": "rewrite_trainer",
    "OFFICIAL_TEACHER_PROMPT_TEMPLATE": "sdft_config",
    "TRL_TEACHER_PROMPT_TEMPLATE": "sdft_config",
    "SDFTSettings": "sdft_config",
    "build_teacher_prompt": "sdft_config",
    "DemoLogprobs": "sdft_diagnostics",
    "teacher_student_logprobs": "sdft_diagnostics",
    "build_sdft_trainer": "sdft_trainer",
    "train_sdft": "sdft_trainer",
    "SFTSettings": "sft_config",
    "build_sft_trainer": "sft_trainer",
    "train_sft": "sft_trainer",
}

__all__ = [
    "BaseTrainSettings",
    "DEFAULT_METHOD",
    "DemoExample",
    "DemoLogprobs",
    "LEARNING_METHODS",
    "LearningMethod",
    "LoraSettings",
    "OFFICIAL_TEACHER_PROMPT_TEMPLATE",
    "ProgressCallback",
    "ProgressFn",
    "RewriteSettings",
    "SDFTSettings",
    "SFTSettings",
    "TRL_TEACHER_PROMPT_TEMPLATE",
    "TrainResult",
    "build_peft_model",
    "build_sdft_trainer",
    "build_sft_trainer",
    "build_teacher_prompt",
    "get_method",
    "load_base_model",
    "load_tokenizer",
    "save_adapter",
    "teacher_student_logprobs",
    "train_rewrite",
    "train_sdft",
    "train_sft",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'learners' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
