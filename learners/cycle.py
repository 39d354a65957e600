"""One learning cycle: log -> dataset -> worker process -> verified adapter -> gate -> promotion.

:data:`Gate` judges the published candidate (:class:`policies.gate.PolicyGate` with a policy; without one,
:func:`approve_all`). An approved candidate is then, by ``promotion``: made the active adapter in the
registry (``direct``), put in shadow mode (``shadow``), or left waiting for ``runtime adapters promote``
(``manual``). The registry only records states; an engine is told by the caller
(:class:`runtime.service.RuntimeService`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from learners.datasets import DatasetBuild, build_dataset, mark_used
from learners.worker import (
    ProgressFn,
    TrainingFailed,
    TrainJob,
    pick_training_device,
    run_training_process,
)
from runtime.adapters import AdapterRegistry, AdapterVerificationError, Lineage
from runtime.config import ConfigError, RuntimeConfig
from runtime.cpu import learner_cpu_threads
from runtime.models import resolve_model
from runtime.store import AdapterRecord, Store

LEARNING_METHODS = ("sdft", "sft", "auto", "seal")


class NoAcceptableCandidate(RuntimeError):
    """No candidate of an ``auto`` cycle passed the target and retention checks; nothing was published."""


PromotionMode = Literal["direct", "shadow", "manual"]


@dataclass
class GateDecision:
    """A gate's verdict on a candidate."""

    approved: bool
    reasons: list[str]
    checks: list[dict[str, Any]] = field(default_factory=list)
    """Per-check results (stored with the decision)."""


Gate = Callable[[AdapterRecord, DatasetBuild], GateDecision]
"""Decides on a published candidate."""


def approve_all(candidate: AdapterRecord, build: DatasetBuild) -> GateDecision:
    """The gate without a policy: every verified candidate is approved."""
    return GateDecision(True, ["no policy configured: verified candidates are approved"])


@dataclass
class CycleResult:
    """What one cycle did."""

    status: str
    """``nothing_to_learn``, ``skipped`` (no spare device), ``failed``, ``vetoed``, ``activated``, ``shadow``
    or ``awaiting_promotion``."""
    message: str
    run_id: str | None = None
    adapter: AdapterRecord | None = None
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def method_settings(config: RuntimeConfig, method: str) -> dict[str, Any]:
    """The YAML ``learning.<method>`` section, checked against the method's settings dataclass."""
    from learners.lora import LoraSettings

    section = dict(getattr(config.learning, method, {}) or {})
    if method == "sdft":
        from learners.sdft import SDFTSettings as settings_cls
    else:
        from learners.sft import SFTSettings as settings_cls
    for name, cls, values in ((method, settings_cls, section), ("lora", LoraSettings, config.learning.lora)):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"learning.{name}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(known))})"
            )
    return section


def run_cycle(
    config: RuntimeConfig,
    store: Store,
    method: str | None = None,
    *,
    gate: Gate = approve_all,
    promotion: PromotionMode = "direct",
    progress: ProgressFn | None = None,
    serving_device: str | None = None,
    device: str | None = None,
    num_threads: int | None = None,
    timeout_s: float | None = None,
) -> CycleResult:
    """Run one learning cycle with `method` (default: the config's).

    ``sdft``, ``sft`` and ``auto`` learn from unconsumed corrections and taught answers; ``auto`` trains
    the configured candidates and keeps the one that learns with the smallest retention drop (see
    :mod:`learners.auto`). ``seal`` learns unconsumed documents through self-edits (see :mod:`learners.seal`).
    The published candidate goes to `gate`, and an approved one is promoted by `promotion`.

    Training runs on `device` (default: a spare GPU that is not `serving_device`, else the CPU) with
    `num_threads` CPU threads (default: half the cores, :func:`runtime.cpu.learner_cpu_threads`).
    """
    method = method or config.learning.method
    if method not in LEARNING_METHODS:
        raise ValueError(f"learning method {method!r} is not available; use one of {', '.join(LEARNING_METHODS)}")
    settings = _settings(config, method)
    registry = AdapterRegistry(config.adapters_dir, store)
    build = build_dataset(
        store,
        promote_positive_ratings=config.learning.promote_positive_ratings,
        min_positive_score=config.learning.min_positive_score,
        replay_fraction=config.learning.replay_fraction,
    )
    documents = []
    if method == "seal":
        from learners.seal import documents_from_store

        documents = documents_from_store(store)
        counts = {"documents": len(documents), "replay": len(build.replay)}
        if not documents:
            return CycleResult("nothing_to_learn", "no new documents", counts=counts)
    else:
        counts = build.counts()
        if not build.new:
            return CycleResult("nothing_to_learn", "no new corrections or demonstrations", counts=counts)

    parent = registry.active()
    device = device or pick_training_device(serving_device or config.engine.device)
    run_id = store.create_run(
        method,
        config={"settings": settings, "lora": config.learning.lora, "device": device},
        parent_adapter=parent.name if parent else None,
        data_counts=counts,
    )
    store.update_run(run_id, status="running")
    staging = registry.staging_dir(run_id)
    history: list[dict[str, float]] = []

    def on_progress(step: int, total: int, logs: dict[str, float]) -> None:
        if logs:
            history.append({"step": step, **logs})
        if progress is not None:
            progress(step, total, logs)

    job = TrainJob(
        method="sft",
        base_model_dir=str(resolve_model(config.model.name, config.model.cache_dir)),
        examples=[dataclasses.asdict(e) for e in build.examples],
        output_dir=str(staging / "adapter"),
        lora=dict(config.learning.lora),
        parent_adapter_dir=parent.path if parent else None,
        device=device,
        num_threads=num_threads or learner_cpu_threads(),
    )
    used_documents: list[str] = []
    try:
        if method == "auto":
            from learners.auto import select_candidate

            chosen = select_candidate(config, build, job, on_progress, timeout_s=timeout_s)
            trained_method, adapter_dir, metrics = chosen.method, chosen.adapter_dir, chosen.metrics
        elif method == "seal":
            from learners.seal_cycle import train_seal

            trained_method = "seal"
            adapter_dir, metrics, used_documents = train_seal(
                registry, run_id, job, documents, build, settings, on_progress, timeout_s=timeout_s
            )
        else:
            trained_method, adapter_dir = method, job.output_dir
            job.method, job.settings = method, settings  # type: ignore[assignment]
            result = run_training_process(job, on_progress, timeout_s=timeout_s)
            metrics = {"train_seconds": result["train_seconds"], "steps": result["num_steps"], **result["summary"]}
        record = registry.publish(
            adapter_dir,
            registry.new_name(trained_method),
            Lineage(parent.name if parent else None, trained_method, run_id, counts, metrics),
        )
    except (TrainingFailed, AdapterVerificationError, OSError, NoAcceptableCandidate) as exc:
        store.update_run(run_id, status="failed", error=str(exc), metrics={"history": history})
        return CycleResult("failed", str(exc), run_id=run_id, counts=counts)
    finally:
        registry.discard_staging(run_id)

    if method == "seal":
        store.mark_consumed(run_id, document_ids=used_documents)
    else:
        mark_used(store, build, run_id)
    store.update_run(
        run_id, status="succeeded", output_adapter=record.name, metrics={**metrics, "history": history}
    )
    verdict = gate(record, build)
    store.record_decision(
        record.name, "approve" if verdict.approved else "veto", reasons=verdict.reasons, checks=verdict.checks,
        run_id=run_id,
    )
    metrics = {**metrics, "gate": {"approved": verdict.approved, "reasons": verdict.reasons}}
    if not verdict.approved:
        store.set_adapter_status(record.name, "rejected")
        rejected = store.get_adapter(record.name)
        return CycleResult("vetoed", "; ".join(verdict.reasons), run_id, rejected, counts, metrics)
    if promotion == "direct":
        active = registry.activate(record.name, reason="approved by the gate", run_id=run_id)
        return CycleResult("activated", f"{record.name} is active", run_id, active, counts, metrics)
    if promotion == "shadow":
        shadow = registry.shadow(record.name, run_id=run_id)
        return CycleResult("shadow", f"{record.name} answers mirrored traffic in shadow mode", run_id, shadow,
                           counts, metrics)
    return CycleResult(
        "awaiting_promotion", f"{record.name} was approved; promote it with `runtime adapters promote {record.name}`",
        run_id, store.get_adapter(record.name), counts, metrics,
    )


def _settings(config: RuntimeConfig, method: str) -> dict[str, Any]:
    """The method's settings as plain data, validated (unknown keys are `ConfigError`s)."""
    if method == "auto":
        from learners.auto import auto_settings

        return dataclasses.asdict(auto_settings(config))
    if method == "seal":
        from learners.seal import seal_settings_from_dict

        return seal_settings_from_dict({"lora": config.learning.lora, **config.learning.seal}).to_dict()
    return method_settings(config, method)
