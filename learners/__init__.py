"""Learners: turn demonstrations into LoRA adapters (SDFT, the SFT baseline; SEAL and the worker to come).

Names are imported lazily, so ``import learners`` (or ``learners.examples``) does not pay for TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .callbacks import ProgressCallback, ProgressFn
    from .common import BaseTrainSettings, TrainResult
    from .examples import DemoExample
    from .lora import LoraSettings, build_peft_model, load_base_model, load_tokenizer, save_adapter
    from .sdft import (
        OFFICIAL_TEACHER_PROMPT_TEMPLATE,
        TRL_TEACHER_PROMPT_TEMPLATE,
        DemoLogprobs,
        SDFTSettings,
        build_sdft_trainer,
        build_teacher_prompt,
        teacher_student_logprobs,
        train_sdft,
    )
    from .sft import SFTSettings, build_sft_trainer, train_sft

_EXPORTS: dict[str, str] = {
    "ProgressCallback": "callbacks",
    "ProgressFn": "callbacks",
    "BaseTrainSettings": "common",
    "TrainResult": "common",
    "DemoExample": "examples",
    "LoraSettings": "lora",
    "build_peft_model": "lora",
    "load_base_model": "lora",
    "load_tokenizer": "lora",
    "save_adapter": "lora",
    "OFFICIAL_TEACHER_PROMPT_TEMPLATE": "sdft",
    "TRL_TEACHER_PROMPT_TEMPLATE": "sdft",
    "DemoLogprobs": "sdft",
    "SDFTSettings": "sdft",
    "build_sdft_trainer": "sdft",
    "build_teacher_prompt": "sdft",
    "teacher_student_logprobs": "sdft",
    "train_sdft": "sdft",
    "SFTSettings": "sft",
    "build_sft_trainer": "sft",
    "train_sft": "sft",
}

__all__ = [
    "BaseTrainSettings",
    "DemoExample",
    "DemoLogprobs",
    "LoraSettings",
    "OFFICIAL_TEACHER_PROMPT_TEMPLATE",
    "ProgressCallback",
    "ProgressFn",
    "SDFTSettings",
    "SFTSettings",
    "TRL_TEACHER_PROMPT_TEMPLATE",
    "TrainResult",
    "build_peft_model",
    "build_sdft_trainer",
    "build_sft_trainer",
    "build_teacher_prompt",
    "load_base_model",
    "load_tokenizer",
    "save_adapter",
    "teacher_student_logprobs",
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
