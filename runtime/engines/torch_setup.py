"""Where and how a model runs: the device, the dtype, and the tokens that end an answer."""

from __future__ import annotations

from typing import Any

import torch

from runtime.engines.errors import EngineError

__all__ = ["eos_token_ids", "pick_device", "pick_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    """``auto`` (CUDA when there is one), or the device named; an error if CUDA is asked for and missing."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device={device!r} was asked for but CUDA is not available; use 'cpu' or 'auto'.")
    return resolved


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a CUDA device that supports it, else float32; or the dtype named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, not {dtype!r}")
    return _DTYPES[dtype]


def eos_token_ids(configured: int | list[int] | None, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: the generation config's, the tokenizer's, and ChatML's ``<|im_end|>``."""
    ids: set[int] = set()
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)
