"""The SEAL step of a learning cycle: run the self-edit search and knowledge update in the worker, and
keep the self-edit generator as its own adapter, apart from the serving one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from learners.datasets import DatasetBuild
from learners.examples import TrainingText
from learners.seal import replay_passages
from learners.seal_config import SealDocument
from learners.seal_restem import GENERATOR_ADAPTER
from learners.worker import ProgressFn, SealJob, TrainingFailed, TrainJob, run_seal_process
from runtime.adapters import AdapterRegistry, Lineage
from runtime.store import AdapterRecord


def latest_generator(registry: AdapterRegistry) -> AdapterRecord | None:
    """The newest self-edit generator adapter (role ``generator``), if any round has produced one."""
    generators = registry.store.adapters(role="generator")
    return generators[-1] if generators else None


@dataclass
class SealTraining:
    """What the SEAL step of a cycle produced."""

    adapter_dir: str
    """The serving candidate, staged."""
    metrics: dict[str, Any]
    used_document_ids: list[str]
    update_texts: list[TrainingText]
    """What the candidate was trained on (a repair trains on it again)."""
    anchors: list[dict[str, Any]] = field(default_factory=list)
    """The anchors, answered by the active model."""


def train_seal(
    registry: AdapterRegistry,
    run_id: str,
    job: TrainJob,
    documents: list[SealDocument],
    build: DatasetBuild,
    settings: dict[str, Any],
    progress: ProgressFn,
    *,
    timeout_s: float | None = None,
) -> SealTraining:
    """Run SEAL on `documents` (with the job's anchors) and publish the new generator."""
    staging = Path(job.output_dir).parent
    generator = latest_generator(registry)
    replay = replay_passages(registry.store, len(build.replay)) + [dataclasses.asdict(e) for e in build.replay]
    seal_job = SealJob(
        base_model_dir=job.base_model_dir,
        documents=[d.to_dict() for d in documents],
        output_dir=job.output_dir,
        generator_output_dir=str(staging / "generator"),
        settings=settings,
        parent_adapter_dir=job.parent_adapter_dir,
        parent_adapter_checksum=job.parent_adapter_checksum,
        generator_adapter_dir=generator.path if generator else None,
        replay_examples=replay,
        device=job.device,
        num_threads=job.num_threads,
        anchors=job.anchors,
        anchor_settings=job.anchor_settings,
    )
    result = run_seal_process(seal_job, progress, timeout_s=timeout_s)
    metrics = {
        **result["metrics"],
        "skipped_documents": result["skipped_documents"],
        "rounds": result["rounds"],
        "documents": result["documents"],
    }
    if result["generator_adapter_dir"]:
        record = registry.publish(
            result["generator_adapter_dir"],
            registry.new_name(GENERATOR_ADAPTER),
            Lineage(generator.name if generator else None, "seal", run_id, {"documents": len(documents)},
                    {"rounds": len(result["rounds"])}, role="generator"),
        )
        metrics["generator"] = record.name
    if not result["adapter_dir"]:
        raise TrainingFailed("SEAL used no document: " + "; ".join(f"{k}: {v}" for k, v in
                                                                    result["skipped_documents"].items()))
    return SealTraining(
        result["adapter_dir"], metrics, list(result["used_document_ids"]), list(result.get("update_texts") or []),
        list(result.get("anchors") or []),
    )
