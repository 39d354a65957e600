"""Shape of a LoRA adapter (the YAML ``learning.lora`` section); PEFT is imported only to build its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict

__all__ = ["ALL_MLP", "LoraSettings", "mlp_target_modules"]

#: ``target_modules`` value: every linear layer of the feed-forward (MLP) blocks, found in the model
#: (:func:`mlp_target_modules`).
ALL_MLP = "all-mlp"

#: Names of the feed-forward block in the architectures transformers ships (``mlp``: Llama, Qwen, Mistral,
#: Gemma, Phi, GPT-2; ``feed_forward``: Mixtral-style; ``ffn``: others).
_MLP_BLOCKS = ("mlp", "feed_forward", "ffn")


@dataclass
class LoraSettings:
    """Shape of a fresh LoRA adapter.

    Ignored when training continues from a parent adapter: the parent's own configuration is kept so
    that the child stays a drop-in replacement for it.

    Attributes:
        r: Rank of the update matrices.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout on the LoRA input. Note that the trainers disable dropout by default (TRL's
            ``disable_dropout``) only for SDFT; SFT keeps it.
        target_modules: Module names to adapt, ``"all-linear"`` for every linear layer but the output head, or
            ``"all-mlp"`` (the default) for every linear layer of the feed-forward blocks. By measurement on the
            default model (``benchmarks/results/gate_suite.md``): an update of one or two corrections made on
            the MLP layers alone learns them as well (every benign gate-suite case served) and breaks fewer
            unrelated facts than one on every linear layer (9 probe failures against 13 on the three benign
            cases, in the same run), in line with the feed-forward layers being where such a model keeps
            facts (Geva et al., EMNLP 2021; Meng et al., NeurIPS 2022).
        bias: Which biases to train (``"none"``, ``"all"``, ``"lora_only"``).
        use_rslora: Rank-stabilised scaling.
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g. ``["lm_head"]``).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = ALL_MLP
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = field(default=None)

    def to_peft_config(self, model: Any = None) -> Any:
        """Return the equivalent ``peft.LoraConfig`` for a causal LM; ``"all-mlp"`` needs the `model` (whose MLP
        layers it names)."""
        from peft import LoraConfig

        target_modules = self.target_modules
        if target_modules == ALL_MLP:
            if model is None:
                raise ValueError('target_modules "all-mlp" is resolved against a model: pass it to to_peft_config')
            target_modules = mlp_target_modules(model)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target_modules,
            bias=self.bias,
            use_rslora=self.use_rslora,
            modules_to_save=self.modules_to_save,
            task_type="CAUSAL_LM",
        )


def mlp_target_modules(model: Any) -> list[str] | str:
    """The linear layers of `model`'s feed-forward blocks, as PEFT ``target_modules``.

    Their short names (``["down_proj", "gate_proj", "up_proj"]`` for Llama) when no other linear layer shares
    one, else a regular expression of their full names (GPT-2's attention and MLP both have a ``c_proj``).

    Raises:
        ValueError: the model has no linear layer inside a block named ``mlp``, ``feed_forward`` or ``ffn``.
    """
    import re

    import torch
    from transformers.pytorch_utils import Conv1D

    mlp, other = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D):
            parts = name.split(".")
            (mlp if any(p in _MLP_BLOCKS for p in parts[:-1]) else other).append(name)
    if not mlp:
        raise ValueError(
            f"target_modules \"all-mlp\": {type(model).__name__} has no linear layer inside a block named "
            f"{', '.join(_MLP_BLOCKS)}; set learning.lora.target_modules to the module names to adapt, or "
            '"all-linear"'
        )
    short = {n.rsplit(".", 1)[-1] for n in mlp}
    if short.isdisjoint(n.rsplit(".", 1)[-1] for n in other):
        return sorted(short)
    return "|".join(re.escape(n) for n in mlp)
