"""Learning method ``auto``: train a few candidates, keep the one that learns without forgetting.

One cycle trains each configured candidate (a method with setting overrides, e.g. rewrite and SFT at two
learning rates) in the worker process, within a compute budget. Each candidate is then evaluated beside
the current adapter:

- **target**: the new examples' prompts, answered greedily without the demonstration in context; an
  example passes when the answer says what the demonstration adds to the prompt (``target_metric``
  ``new_content``, at least ``target_min_score`` of those tokens; token F1 against the whole demonstration
  let an answer that echoes the question with a wrong fact pass, see ``runtime.textmatch``);
- **retention**: a reading-comprehension suite (passages in context) whose accuracy must not drop more
  than ``max_retention_drop`` points below the current adapter's.

The kept candidate passes the target (``min_target_acc``) with the smallest retention drop within the
budget (ties: the higher target accuracy, then the cheaper training). Every candidate's figures and the
reason for the choice are recorded in the run's metrics; the policy gate then judges the chosen one.
Settings in :mod:`learners.auto_config`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learners.auto_config import AutoSettings
from learners.datasets import DatasetBuild
from learners.registry import scale_settings
from learners.worker import CallJob, ProgressFn, TrainingFailed, TrainJob, run_call_process, run_training_process
from runtime.textmatch import TargetMetric, gives_taught_answer

__all__ = ["Candidate", "NoAcceptableCandidate", "evaluate_candidates", "select_candidate"]


class NoAcceptableCandidate(RuntimeError):
    """No candidate of an ``auto`` cycle passed the target and retention checks; nothing was published."""


@dataclass
class Candidate:
    """One trained and evaluated candidate."""

    index: int
    method: str
    overrides: dict[str, Any]
    adapter_dir: str
    metrics: dict[str, Any]


def select_candidate(
    settings: AutoSettings,
    method_sections: dict[str, Any],
    build: DatasetBuild,
    job: TrainJob,
    progress: ProgressFn | None = None,
    *,
    timeout_s: float | None = None,
    learning_rate_factor: float = 1.0,
    epochs_factor: float = 1.0,
) -> Candidate:
    """Train and evaluate the candidates; return the chosen one (its metrics hold the whole comparison).

    A repair attempt scales every candidate's learning rate and epochs. The job's anchors are answered by the
    first candidate's worker and reused by the others (``job.anchors`` holds the answered ones afterwards).
    """
    staging = Path(job.output_dir).parent
    budget = settings.budget_s if settings.budget_s is not None else timeout_s
    started = time.monotonic()
    trained: list[Candidate] = []
    skipped: list[str] = []
    for i, spec in enumerate(settings.candidates):
        method = spec["method"]
        overrides = {k: v for k, v in spec.items() if k != "method"}
        remaining = None if budget is None else budget - (time.monotonic() - started)
        if remaining is not None and remaining <= 0:
            skipped.append(f"candidate {i} ({method} {overrides}) not trained: compute budget spent")
            continue
        cand_job = TrainJob(
            **{
                **job.__dict__,
                "method": method,
                "settings": scale_settings(
                    method, {**method_sections.get(method, {}), **overrides}, learning_rate_factor, epochs_factor
                ),
                "output_dir": str(staging / f"candidate-{i}"),
            }
        )
        try:
            result = run_training_process(cand_job, progress, timeout_s=remaining)
        except TrainingFailed as exc:
            skipped.append(f"candidate {i} ({method} {overrides}) failed: {str(exc).splitlines()[0]}")
            continue
        job.anchors = result.get("anchors") or job.anchors
        trained.append(
            Candidate(i, method, overrides, cand_job.output_dir, {"train_seconds": result["train_seconds"]})
        )
    if not trained:
        raise NoAcceptableCandidate("no candidate finished training: " + "; ".join(skipped))
    evaluation = run_call_process(
        CallJob(
            "auto-eval",
            "learners.auto_trainer:evaluate_candidates",
            {
                "base_model_dir": job.base_model_dir,
                "parent_adapter_dir": job.parent_adapter_dir,
                "candidate_dirs": [c.adapter_dir for c in trained],
                "prompts": [e.prompt for e in build.new],
                "demonstrations": [e.demonstration for e in build.new],
                "retention_file": settings.retention_file,
                "retention_questions": settings.retention_questions,
                "target_metric": settings.target_metric,
                "target_min_score": settings.target_min_score,
                "device": job.device,
            },
            device=job.device,
            num_threads=job.num_threads,
        ),
        timeout_s=timeout_s,
    )
    reference = evaluation["reference_retention"]
    for cand, figures in zip(trained, evaluation["candidates"], strict=True):
        cand.metrics.update(figures)
    eligible = [
        c
        for c in trained
        if c.metrics["target_acc"] >= settings.min_target_acc
        and c.metrics["retention_drop"] <= settings.max_retention_drop
    ]
    comparison = {
        "candidates": [
            {"index": c.index, "method": c.method, "overrides": c.overrides, **c.metrics} for c in trained
        ],
        "reference_retention": reference,
        "skipped": skipped,
        "limits": {"min_target_acc": settings.min_target_acc, "max_retention_drop": settings.max_retention_drop},
    }
    if not eligible:
        raise NoAcceptableCandidate(
            "no candidate learned the new examples within the retention budget: "
            + "; ".join(
                f"#{c.index} {c.method} target {c.metrics['target_acc']:.2f}, "
                f"drop {c.metrics['retention_drop']:.1f}"
                for c in trained
            )
        )
    best = min(
        eligible, key=lambda c: (c.metrics["retention_drop"], -c.metrics["target_acc"], c.metrics["train_seconds"])
    )
    best.metrics = {
        **best.metrics,
        "auto": {
            **comparison,
            "chosen": best.index,
            "reason": (
                f"candidate #{best.index} ({best.method} {best.overrides}) passes the target "
                f"({best.metrics['target_acc']:.2f} >= {settings.min_target_acc}) with the smallest retention "
                f"drop ({best.metrics['retention_drop']:.1f} <= {settings.max_retention_drop} points) "
                f"among {len(eligible)} eligible of {len(trained)} trained"
            ),
        },
    }
    return best


def evaluate_candidates(
    base_model_dir: str,
    parent_adapter_dir: str | None,
    candidate_dirs: list[str],
    prompts: list[list[dict[str, str]]],
    demonstrations: list[str],
    retention_file: str,
    retention_questions: int,
    target_metric: TargetMetric,
    target_min_score: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """Target and retention figures of each candidate beside the current adapter (runs in the worker)."""
    from learners.evaluation import ask, load_questions, retention_accuracy
    from runtime.engines import TransformersEngine

    items = load_questions(retention_file, limit=retention_questions)
    engine = TransformersEngine(base_model_dir, device="cpu" if device == "cpu" else "cuda")
    try:
        reference_adapter = None
        if parent_adapter_dir:
            engine.load_adapter("reference", parent_adapter_dir)
            reference_adapter = "reference"
        reference = retention_accuracy(engine, items, reference_adapter).accuracy
        figures = []
        for i, adapter_dir in enumerate(candidate_dirs):
            name = f"candidate-{i}"
            engine.load_adapter(name, adapter_dir)
            answers = ask(engine, prompts, demonstrations, name, max_new_tokens=64)
            hits = sum(
                gives_taught_answer(target_metric, r, d, p, target_min_score)
                for r, d, p in zip(answers.responses, demonstrations, prompts, strict=True)
            )
            retention = retention_accuracy(engine, items, name).accuracy
            figures.append(
                {
                    "target_acc": hits / len(demonstrations),
                    "retention_acc": retention,
                    "retention_drop": 100.0 * (reference - retention),
                }
            )
            engine.unload_adapter(name)
    finally:
        engine.close()
    return {"reference_retention": reference, "candidates": figures}
