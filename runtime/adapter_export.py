"""Adapters that travel: a registry adapter copied out with its base model's public id and a model card.

The registry's copy names the base model by the local directory it was trained from (a cache path); an
exported copy names it by the id other tools know (``HuggingFaceTB/SmolLM2-135M-Instruct`` for the default
model, see :func:`runtime.models.public_model_id`), and its ``README.md`` is a model card: the method, the
parent chain, the data it learned from, its metrics and the gate's decisions. vLLM (``--lora-modules``) and
SGLang (``--lora-paths``) load the directory as it is.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.adapters import AdapterRegistry
from runtime.store import AdapterRecord, Store

__all__ = ["ExportedAdapter", "export_adapter"]

_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class ExportedAdapter:
    """Where an adapter was exported, and the command lines that serve it."""

    path: Path
    base_model: str
    vllm_command: str
    sglang_command: str


def export_adapter(registry: AdapterRegistry, store: Store, name: str, target: str | Path, base_model: str
                   ) -> ExportedAdapter:
    """Copy adapter `name` (its checksum verified first) into `target` (created; must be empty or absent), with
    `base_model` as ``base_model_name_or_path`` and a model card."""
    record = store.get_adapter(name)
    if record is None:
        raise KeyError(f"no adapter named {name!r}; see `runtime adapters list`")
    source = registry.local_copy(record)  # verified; fetched first from a registry on shared storage
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty; export into a new directory")
    target.mkdir(parents=True, exist_ok=True)
    for file in _FILES:
        shutil.copy2(source / file, target / file)
    config_path = target / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(adapter_config, indent=2) + "\n")
    (target / "README.md").write_text(model_card(record, store, base_model, adapter_config))
    return ExportedAdapter(
        path=target.resolve(),
        base_model=base_model,
        vllm_command=f"vllm serve {base_model} --enable-lora --max-lora-rank {adapter_config.get('r', 16)} "
                     f"--lora-modules {name}={target.resolve()}",
        sglang_command=f"python -m sglang.launch_server --model-path {base_model} "
                       f"--lora-paths {name}={target.resolve()}",
    )


def model_card(record: AdapterRecord, store: Store, base_model: str, adapter_config: dict[str, Any]) -> str:
    """The exported adapter's ``README.md``."""
    run = store.get_run(record.run_id) if record.run_id else None
    decisions = list(reversed(store.decisions(adapter=record.name)))
    metrics = {k: v for k, v in record.metrics.items() if k not in ("history", "anchors")}
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: peft",
        "tags: [lora, learning-runtime]",
        "---",
        "",
        f"# {record.name}",
        "",
        f"A LoRA adapter for `{base_model}` trained by learning-runtime with the `{record.method}` method "
        f"(role: {record.role}).",
        "",
        "| | |",
        "|---|---|",
        f"| lineage | {' -> '.join(['base', *record.lineage, record.name])} |",
        f"| status when exported | {record.status} |",
        f"| LoRA | r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
        f"targets={adapter_config.get('target_modules')} |",
        f"| data | {json.dumps(record.metrics.get('data_counts') or (run.data_counts if run else {}))} |",
        f"| checksum (registry copy) | `{record.checksum}` |",
        f"| created | {record.created_at.isoformat()} |",
        "",
        "## Training settings",
        "",
        "```json",
        json.dumps((run.config if run else {}), indent=2, default=str),
        "```",
        "",
        "## Metrics",
        "",
        "```json",
        json.dumps(metrics, indent=2, default=str),
        "```",
        "",
        "## Gate and promotion decisions",
        "",
    ]
    if not decisions:
        lines.append("None recorded.")
    for decision in decisions:
        lines.append(f"- {decision.created_at.isoformat()} **{decision.decision}**: {'; '.join(decision.reasons)}")
    return "\n".join(lines) + "\n"
