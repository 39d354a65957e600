"""LoRA shapes: the default ``all-mlp`` target resolved against real transformers architectures (tiny, random)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from learners.lora import build_peft_model, load_base_model
from learners.lora_config import ALL_MLP, LoraSettings, mlp_target_modules


def test_default_adapts_only_the_mlp_layers_of_a_llama(tiny_model_dir: Path) -> None:
    assert LoraSettings().target_modules == ALL_MLP
    model = load_base_model(tiny_model_dir)
    assert mlp_target_modules(model) == ["down_proj", "gate_proj", "up_proj"]
    peft_model = build_peft_model(model, LoraSettings(r=4, alpha=8))
    adapted = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    assert adapted and all(".mlp." in name for name in adapted)
    assert any(name.endswith("gate_proj") for name in adapted)
    assert sorted(peft_model.peft_config["default"].target_modules) == ["down_proj", "gate_proj", "up_proj"]


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")
def test_shared_short_names_become_a_pattern_of_the_mlp_layers() -> None:
    # GPT-2 names a projection c_proj both in attention and in the MLP: only the MLP's may be adapted.
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    pattern = mlp_target_modules(model)
    assert isinstance(pattern, str)
    names = [n for n, _ in model.named_modules()]
    matched = [n for n in names if re.fullmatch(pattern, n)]
    assert sorted(matched) == sorted(f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj"))
    peft_model = build_peft_model(model, LoraSettings(r=2, alpha=4))
    assert not any(".attn." in n and "lora_A" in n for n, _ in peft_model.named_parameters())


def test_a_model_without_mlp_blocks_gets_a_clear_error() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no linear layer inside a block named mlp.*target_modules"):
        mlp_target_modules(model)
    with pytest.raises(ValueError, match="pass it to to_peft_config"):
        LoraSettings().to_peft_config()
    assert LoraSettings(target_modules="all-linear").to_peft_config().target_modules == "all-linear"
