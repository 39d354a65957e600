"""LoRA helpers: build a trainable PEFT model, optionally continuing from a parent adapter (settings in
:mod:`learners.lora_config`)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .lora_config import LoraSettings

__all__ = [
    "build_peft_model",
    "load_base_model",
    "load_frozen_adapter",
    "load_tokenizer",
    "save_adapter",
]

#: Name PEFT gives the adapter that is trained.
TRAINED_ADAPTER = "default"


def load_tokenizer(base_model_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local model directory (never downloads)."""
    return AutoTokenizer.from_pretrained(str(base_model_dir), local_files_only=True)


def load_base_model(
    base_model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> PreTrainedModel:
    """Load a local causal LM for training (float32 by default, which is what CPU training wants)."""
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=dtype, local_files_only=True)
    if device is not None:
        model = model.to(device)
    return model


def build_peft_model(
    base: PreTrainedModel | str | Path,
    lora: LoraSettings | None = None,
    parent_adapter_dir: str | Path | None = None,
) -> PeftModel:
    """Wrap a base model with one trainable LoRA adapter named ``"default"``.

    Args:
        base: A loaded base model, or the directory to load it from.
        lora: Shape of a fresh adapter (defaults to ``LoraSettings()``); ignored with a parent.
        parent_adapter_dir: Continue from this saved adapter: its weights are loaded as the trainable
            adapter, so training starts exactly where the parent left off (continual learning).

    Returns:
        The PEFT model; only the LoRA parameters require gradients.
    """
    model = load_base_model(base) if isinstance(base, str | Path) else base
    if parent_adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(parent_adapter_dir), is_trainable=True)
    return get_peft_model(model, (lora or LoraSettings()).to_peft_config(model))


def load_frozen_adapter(model: PeftModel, adapter_dir: str | Path, adapter_name: str) -> None:
    """Load a saved adapter beside the trained one, frozen, without making it active."""
    active = model.active_adapter
    model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    model.set_adapter(active)
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
            param.requires_grad_(False)


def save_adapter(model: PeftModel, output_dir: str | Path) -> Path:
    """Save the trained adapter (``"default"``) to ``output_dir``, leaving out helper adapters.

    Helper adapters (an EMA or frozen teacher) would otherwise be written into subfolders.
    Writes ``adapter_config.json`` and ``adapter_model.safetensors``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), selected_adapters=[TRAINED_ADAPTER])
    return output_dir
