"""One learning cycle: log -> dataset -> worker process -> verified adapter -> gate -> promotion.

:data:`Gate` judges the published candidate (:class:`policies.gate.PolicyGate` with a policy; without one,
:func:`approve_all`). An approved candidate is then, by ``promotion``: made the active adapter in the
registry (``direct``), put in shadow mode (``shadow``), or left waiting for ``runtime adapters promote``
(``manual``). The registry only records states; an engine is told by the caller
(:class:`orchestration.service.RuntimeService`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from learners.anchors import (
    Anchor,
    AnchorSelection,
    answer_with_engine,
    prompt_key,
    repair_anchors,
    select_anchors,
)
from learners.auto_trainer import NoAcceptableCandidate
from learners.callbacks import PhaseFn
from learners.datasets import DatasetBuild, build_dataset
from learners.examples import TrainingText
from learners.executors import executor_from_config
from learners.registry import get_method, method_sections, scale_settings, settings_dict, validate_learning
from learners.worker import (
    PrepareFn,
    ProgressFn,
    TrainingFailed,
    TrainJob,
    pick_training_device,
    run_training_process,
    use_executor,
)
from policies.decision import Gate, GateDecision, approve_all
from policies.gate import PolicyGate
from runtime.adapters import AdapterRegistry, AdapterVerificationError, Lineage
from runtime.config import ConfigError, RepairConfig, RuntimeConfig
from runtime.cpu import learner_cpu_threads
from runtime.engines.base import Engine
from runtime.models import resolve_model
from runtime.store import AdapterRecord, Store, StoreError, import_segments

log = logging.getLogger(__name__)

__all__ = ["Attempt", "CycleResult", "PromotionMode", "run_cycle"]


PromotionMode = Literal["direct", "shadow", "manual"]


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
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """Each training of the cycle (:class:`Attempt` as a dict): the first, then every gate-guided repair."""
    held: int = 0
    """Signals (or documents) held for the operator because the cycle ended vetoed."""


@dataclass
class Attempt:
    """One training of a cycle (the first, or a gate-guided repair) and the gate's verdict on it."""

    number: int
    """1 for the first training, 2, 3, ... for repairs."""
    run_id: str
    status: Literal["approved", "vetoed", "failed"]
    reasons: list[str]
    seconds: float
    """Wall-clock of the attempt: its anchors answered by the serving engine, training in the worker, verification,
    publishing and the gate."""
    adapter: str | None = None
    anchors: dict[str, int] = field(default_factory=dict)
    """Anchors trained on, by source."""
    learning_rate_factor: float = 1.0
    epochs_factor: float = 1.0
    repairable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Context:
    """What every attempt of one cycle shares."""

    config: RuntimeConfig
    store: Store
    registry: AdapterRegistry
    method: str
    settings: dict[str, Any]
    sections: dict[str, dict[str, Any]]
    """Every method's YAML section (``auto`` trains candidates of the others)."""
    build: DatasetBuild
    documents: list[Any]
    counts: dict[str, int]
    parent: AdapterRecord | None
    device: str
    num_threads: int
    gate: Gate
    progress: Callable[[int, int, dict[str, float]], None]
    history: list[dict[str, float]]
    phase: PhaseFn
    seal_texts: list[TrainingText] = field(default_factory=list)
    used_documents: list[str] = field(default_factory=list)
    engine: Engine | None = None
    """The serving engine: it answers the anchors (see :func:`run_cycle`)."""


def _import_shipped_logs(store: Store, url: str) -> None:
    """Bring in what other processes shipped (runtime.store.importing), so their signals reach this cycle; an
    unreachable share is logged and the cycle learns from what the store holds."""
    try:
        report = import_segments(store, url)
    except StoreError as exc:
        log.warning("learning cycle: shipped logs not imported from %s (%s); learning from what is here", url, exc)
        return
    if report.imported:
        log.info("learning cycle: imported %d log segments (%s new rows) from %s", len(report.imported),
                 report.rows_added, url)


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
    protected_prompts: Sequence[list[dict[str, str]]] = (),
    max_signals_per_principal: int | None = None,
    phase: PhaseFn | None = None,
    engine: Engine | None = None,
) -> CycleResult:
    """Run one learning cycle with `method` (default: the config's; see :mod:`learners.registry`).

    ``rewrite``, ``sdft`` and ``sft`` learn from pending corrections and taught answers; ``auto`` trains
    candidates of those and keeps the one that learns with the smallest retention drop (see
    :mod:`learners.auto_trainer`). ``seal`` learns pending documents through self-edits (see
    :mod:`learners.seal`).
    Every training also trains on anchors (``learning.anchors``: prompts answered by the active model, from
    the log, `protected_prompts` and a built-in probe; see :mod:`learners.anchors`). With `engine` (the serving
    engine, holding the active adapter), the anchors are answered there before the worker starts, as users are
    served; without one (or when it cannot answer), the worker answers them.

    The published candidate goes to `gate`. A veto by protected or retention checks is repaired within
    ``learning.repair``: the failing prompts join the anchors, the learning rate (and epochs) are scaled
    down, and a new candidate is trained and judged; every attempt is a run, an adapter and a decision of its
    own. The first approved candidate is promoted by `promotion`. When the cycle ends vetoed, its signals are
    ``held`` for the operator (``runtime signals``); when it is approved, they are ``learned``.

    Training runs on `device` (default: a spare GPU that is not `serving_device`, else the CPU) with
    `num_threads` CPU threads (default: half the cores, :func:`runtime.cpu.learner_cpu_threads`), in a child
    process; with ``learning.executor: ray``, as a Ray task with the resources of ``learning.ray`` instead.
    """
    method = method or config.learning.method
    kind = get_method(method).kind
    problems = validate_learning(config.learning)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(f"{'.'.join(k)}: {m}" for k, m in problems))
    sections = method_sections(config.learning)
    if kind == "documents":  # SEAL's adapters take learning.lora's shape unless its own section says otherwise
        sections[method] = {"lora": config.learning.lora, **sections[method]}
    settings = settings_dict(method, sections[method])
    registry = AdapterRegistry(config.adapters_dir, store)

    def on_phase(name: str, done: int, total: int) -> None:
        log.info("learning cycle (%s): %s %d/%d", method, name, done, total)
        if phase is not None:
            phase(name, done, total)

    if config.store.import_from:
        _import_shipped_logs(store, config.store.import_from)
    on_phase("dataset", 0, 1)
    build = build_dataset(
        store,
        promote_positive_ratings=config.learning.promote_positive_ratings,
        min_positive_score=config.learning.min_positive_score,
        replay_fraction=config.learning.replay_fraction,
        max_per_principal=max_signals_per_principal,
    )
    documents: list[Any] = []
    if kind == "documents":
        from learners.seal import documents_from_store

        documents = documents_from_store(store)
        counts = {"documents": len(documents), "replay": len(build.replay)}
        if not documents:
            return CycleResult("nothing_to_learn", "no new documents", counts=counts)
    else:
        counts = build.counts()
        if not build.new:
            return CycleResult("nothing_to_learn", "no new corrections or demonstrations", counts=counts)

    history: list[dict[str, float]] = []

    def on_progress(step: int, total: int, logs: dict[str, float]) -> None:
        if logs:
            history.append({"step": step, **logs})
        if progress is not None:
            progress(step, total, logs)

    ctx = _Context(
        config, store, registry, method, settings, sections, build, documents, counts, registry.active(),
        device or pick_training_device(serving_device or config.engine.device),
        num_threads or learner_cpu_threads(), gate, on_progress, history, on_phase, engine=engine,
    )
    asked = [e.prompt for e in build.new]
    anchors = select_anchors(
        store, config.learning.anchors, protected=protected_prompts, exclude=asked,
        min_positive_score=config.learning.min_positive_score, examples=len(build.examples),
    ).anchors
    repair = config.learning.repair
    executor = executor_from_config(config.learning)
    started = time.monotonic()
    attempts: list[Attempt] = []
    while True:
        number = len(attempts) + 1
        budget = timeout_s
        if number > 1 and repair.time_budget_s is not None:
            left = repair.time_budget_s - (time.monotonic() - started)
            budget = left if budget is None else min(budget, left)
        with use_executor(executor):  # learning.executor: also for jobs a method starts itself (auto, SEAL)
            attempt, verdict, record, anchors = _attempt(
                ctx, number, anchors, attempts[-1].run_id if attempts else None, budget
            )
        attempts.append(attempt)
        if attempt.status == "failed":
            return CycleResult("failed", "; ".join(attempt.reasons), attempt.run_id, counts=counts,
                               attempts=[a.to_dict() for a in attempts])
        assert verdict is not None and record is not None
        if verdict.approved:
            break
        stop = _no_repair(verdict, number, repair, time.monotonic() - started)
        taught = {prompt_key(m) for m in asked}
        if stop is None and all(prompt_key(p) in taught for p in verdict.repair_prompts):
            stop = "not repairable: the failing prompts are the ones being taught"
        if stop is not None:
            held = _settle(ctx, "held", attempt.run_id, reason="vetoed: " + "; ".join(verdict.reasons))
            message = "; ".join(verdict.reasons)
            if number > 1:
                message += f" (after {number} attempts)"
            message += (f"; {stop}; {held} signal(s) held for review (`runtime signals --state held`: retry or "
                        "dismiss them)")
            return CycleResult("vetoed", message, attempt.run_id, store.get_adapter(record.name), counts,
                               {"gate": {"approved": False, "reasons": verdict.reasons}},
                               [a.to_dict() for a in attempts], held=held)
        anchors = anchors + repair_anchors(verdict.repair_prompts, anchors, asked)

    _settle(ctx, "learned", attempt.run_id)
    run = store.get_run(attempt.run_id)
    metrics = {**(run.metrics if run else {}), "gate": {"approved": True, "reasons": verdict.reasons}}
    metrics.pop("history", None)
    done = [a.to_dict() for a in attempts]
    repaired = f" (repaired: attempt {number})" if number > 1 else ""
    ctx.phase("promotion", 0, 1)
    if promotion == "direct":
        approver = "approved by the gate" if gate is not approve_all else "approved (no policy: every verified " \
            "candidate is)"
        active = registry.activate(record.name, reason=f"{approver}{repaired}", run_id=attempt.run_id)
        return CycleResult("activated", f"{record.name} is active{repaired}", attempt.run_id, active, counts,
                           metrics, done)
    if promotion == "shadow":
        shadow = registry.shadow(record.name, run_id=attempt.run_id)
        return CycleResult("shadow", f"{record.name} answers mirrored traffic in shadow mode{repaired}",
                           attempt.run_id, shadow, counts, metrics, done)
    return CycleResult(
        "awaiting_promotion",
        f"{record.name} was approved{repaired}; promote it with `runtime adapters promote {record.name}`",
        attempt.run_id, store.get_adapter(record.name), counts, metrics, done,
    )


def _answer_on_engine(
    engine: Engine, active: AdapterRecord | None, anchors: list[Anchor], max_new_tokens: int
) -> list[Anchor]:
    """The anchors answered by the serving engine with the active adapter; unchanged (the worker answers them)
    when the engine does not hold that adapter or fails."""
    name = active.name if active else None
    if all(a.answered for a in anchors):
        return anchors
    if name is not None and not engine.has_adapter(name):
        return anchors
    try:
        return answer_with_engine(engine, name, anchors, max_new_tokens=max_new_tokens)
    except Exception as exc:  # an engine that cannot answer now costs only speed: the worker answers them
        log.warning("learning cycle: the serving engine could not answer the anchors (%s: %s); the training "
                    "process answers them", type(exc).__name__, exc)
        return anchors


def _answer_from_gate(gate: Gate, active: AdapterRecord | None, anchors: list[Anchor]) -> None:
    """Answer the unanswered protected anchors with the answers of the active model that the policy gate already
    holds (it asked them to judge an earlier candidate against the same active adapter: a repair attempt, or an
    earlier cycle); the worker cuts them to ``learning.anchors.max_new_tokens``. Nothing is asked here: the
    others are asked of the serving engine at the anchors' length. Nothing happens when the gate is not a
    :class:`PolicyGate` or judges against another adapter than the one the update starts from."""
    name = active.name if active else None
    todo = [a for a in anchors if a.source == "protected" and not a.answered]
    if not todo or not isinstance(gate, PolicyGate) or gate.engine.active_adapter != name:
        return
    known = {json.dumps(m): g for m, g in gate.kept_active_answers(name)}
    for anchor in todo:
        generation = known.get(json.dumps(anchor.messages))
        if generation is not None:
            anchor.take_answer(generation)


def _no_repair(verdict: GateDecision, number: int, repair: RepairConfig, elapsed: float) -> str | None:
    """Why a vetoed attempt is not repaired (``None``: repair it)."""
    if not verdict.repair_prompts:
        return "not repairable (only protected and retention vetoes are)"
    if number > repair.max_attempts:
        return f"no repair attempt left (learning.repair.max_attempts: {repair.max_attempts})"
    if repair.time_budget_s is not None and elapsed >= repair.time_budget_s:
        return f"the repair time budget ({repair.time_budget_s:g} s) is spent"
    return None


def _attempt(
    ctx: _Context, number: int, anchors: list[Anchor], previous_run: str | None, timeout_s: float | None
) -> tuple[Attempt, GateDecision | None, AdapterRecord | None, list[Anchor]]:
    """Train, publish and judge one candidate; returns the attempt, the verdict, the record and the anchors
    (answered by the worker, for the next attempt)."""
    repair = ctx.config.learning.repair
    lr_factor = repair.learning_rate_factor ** (number - 1)
    epochs_factor = repair.epochs_factor ** (number - 1)
    anchor_counts = AnchorSelection(anchors).counts()
    anchor_settings = ctx.config.learning.anchors
    started = time.monotonic()
    _answer_from_gate(ctx.gate, ctx.parent, anchors)
    parent = ctx.parent
    anchor_weight = anchor_settings.weight_for(len(ctx.build.examples))
    anchor_loss = anchor_settings.loss_for(len(ctx.build.examples))
    run_id = ctx.store.create_run(
        ctx.method,
        config={
            "settings": ctx.settings, "lora": ctx.config.learning.lora, "device": ctx.device, "attempt": number,
            "repair_of": previous_run, "anchors": anchor_counts, "anchor_weight": anchor_weight,
            "anchor_loss": anchor_loss,
            "learning_rate_factor": lr_factor, "epochs_factor": epochs_factor,
        },
        parent_adapter=parent.name if parent else None,
        data_counts=ctx.counts,
    )
    ctx.store.update_run(run_id, status="running")
    staging = ctx.registry.staging_dir(run_id)
    job = TrainJob(
        method="sft",
        base_model_dir=str(resolve_model(ctx.config.model.name, ctx.config.model.cache_dir)),
        examples=[dataclasses.asdict(e) for e in ctx.build.examples],
        output_dir=str(staging / "adapter"),
        lora=dict(ctx.config.learning.lora),
        parent_adapter_dir=parent.path if parent else None,
        parent_adapter_checksum=parent.checksum if parent else None,
        device=ctx.device,
        num_threads=ctx.num_threads,
        anchors=[a.to_dict() for a in anchors],
        anchor_settings={
            "loss": anchor_loss, "weight": anchor_weight, "balance": anchor_settings.balance,
            "batch_size": anchor_settings.batch_size, "max_new_tokens": anchor_settings.max_new_tokens,
        },
    )

    chosen = anchors

    def answer_on_engine(job: TrainJob) -> None:
        """The anchors the gate did not answer, answered by the serving engine while the worker starts."""
        if ctx.engine is not None:
            answered = _answer_on_engine(ctx.engine, parent, chosen, anchor_settings.max_new_tokens)
            job.anchors = [a.to_dict() for a in answered]

    def attempt_of(status: Literal["approved", "vetoed", "failed"], reasons: list[str], adapter: str | None = None,
                   repairable: bool = False) -> Attempt:
        return Attempt(number, run_id, status, reasons, time.monotonic() - started, adapter, anchor_counts,
                       lr_factor, epochs_factor, repairable)

    try:
        ctx.phase("training", number, 1 + ctx.config.learning.repair.max_attempts)
        trained_method, adapter_dir, metrics, answered = _train(
            ctx, job, run_id, number, lr_factor, epochs_factor, timeout_s, answer_on_engine
        )
        ctx.phase("verification", 0, 1)
        record = ctx.registry.publish(
            adapter_dir,
            ctx.registry.new_name(trained_method),
            Lineage(parent.name if parent else None, trained_method, run_id, ctx.counts, metrics),
        )
    except (TrainingFailed, AdapterVerificationError, OSError, NoAcceptableCandidate) as exc:
        ctx.store.update_run(run_id, status="failed", error=str(exc), metrics={"history": ctx.history})
        return attempt_of("failed", [str(exc)]), None, None, anchors
    finally:
        ctx.registry.discard_staging(run_id)

    if answered:
        anchors = [Anchor(**a) for a in answered]
        metrics["anchors"] = [
            {"source": a.source, "prompt": _clip(a.messages[-1]["content"]), "answer": _clip(a.answer or "")}
            for a in anchors
        ]
    ctx.store.update_run(
        run_id, status="succeeded", output_adapter=record.name, metrics={**metrics, "history": list(ctx.history)}
    )
    ctx.history.clear()
    ctx.phase("gate", 0, 0)
    if isinstance(ctx.gate, PolicyGate):
        verdict = ctx.gate(record, ctx.build, on_check=lambda done, total: ctx.phase("gate", done, total))
    else:
        verdict = ctx.gate(record, ctx.build)
    ctx.store.record_decision(
        record.name, "approve" if verdict.approved else "veto", reasons=verdict.reasons, checks=verdict.checks,
        run_id=run_id,
    )
    if not verdict.approved:
        ctx.store.set_adapter_status(record.name, "rejected")
        vetoed = attempt_of("vetoed", verdict.reasons, record.name, bool(verdict.repair_prompts))
        return vetoed, verdict, record, anchors
    return attempt_of("approved", verdict.reasons, record.name), verdict, record, anchors


def _train(
    ctx: _Context, job: TrainJob, run_id: str, number: int, lr_factor: float, epochs_factor: float,
    timeout_s: float | None, prepare: PrepareFn,
) -> tuple[str, str, dict[str, Any], list[dict[str, Any]]]:
    """Run the method in the worker; returns (method recorded, adapter dir, metrics, answered anchors).
    `prepare` fills in the job's anchors: while the worker starts for a ``trainer`` method, first otherwise."""
    kind = get_method(ctx.method).kind
    if kind != "trainer":
        prepare(job)
    if kind == "selection":
        from learners.auto_trainer import select_candidate

        chosen = select_candidate(
            get_method("auto").settings(ctx.sections["auto"]), ctx.sections, ctx.build, job, ctx.progress,
            timeout_s=timeout_s, learning_rate_factor=lr_factor, epochs_factor=epochs_factor,
        )
        return chosen.method, chosen.adapter_dir, chosen.metrics, job.anchors
    if kind == "documents" and number == 1:
        from learners.seal_cycle import train_seal

        seal = train_seal(
            ctx.registry, run_id, job, ctx.documents, ctx.build, ctx.settings, ctx.progress, timeout_s=timeout_s
        )
        ctx.used_documents, ctx.seal_texts = seal.used_document_ids, seal.update_texts
        return "seal", seal.adapter_dir, seal.metrics, seal.anchors
    if kind == "documents":  # a repair: the kept self-edits again, without repeating the search
        update = dict(ctx.settings["update_training"])
        job.method, job.texts = "sft", list(ctx.seal_texts)
        job.settings = scale_settings("sft", update, lr_factor, epochs_factor)
        job.lora = dict(ctx.settings["lora"])
    else:
        job.method = ctx.method
        job.settings = scale_settings(ctx.method, ctx.sections[ctx.method], lr_factor, epochs_factor)
    result = run_training_process(
        job, ctx.progress, timeout_s=timeout_s, prepare=prepare if kind == "trainer" else None
    )
    metrics = {"train_seconds": result["train_seconds"], "steps": result["num_steps"], **result["summary"]}
    return ctx.method, job.output_dir, metrics, result.get("anchors") or []


def _settle(ctx: _Context, state: Literal["learned", "held"], run_id: str, reason: str | None = None) -> int:
    """Mark what the cycle learned from ``learned`` (approved) or ``held`` (vetoed); returns how many rows moved."""
    if get_method(ctx.method).kind == "documents":
        ids = ctx.used_documents or [d.id for d in ctx.documents]
        return ctx.store.set_learning_state(state, document_ids=ids, reason=reason, run_id=run_id)
    return ctx.store.set_learning_state(state, signal_ids=ctx.build.signal_ids, reason=reason, run_id=run_id)


def _clip(text: str, width: int = 200) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
