"""SEAL's outer loop, ReST-EM: keep the rewarded self-edits, SFT the self-edit generator on them, repeat.

The generator is its own LoRA adapter on the base model (``generator_dir``), never the serving adapter:
round r samples from the generator of round r-1 (the base model, or the given generator, in round 1) and
its SFT continues from that generator's weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .callbacks import ProgressFn
from .examples import DemoExample
from .seal_config import SEALSettings
from .seal_edits import format_prompt
from .seal_inner import (
    Candidate,
    Deadline,
    TauScore,
    evaluate_candidate,
    make_candidate,
    passage_candidate,
    sample_self_edits,
)
from .seal_questions import QAPair
from .sft_trainer import train_sft

__all__ = [
    "GENERATOR_ADAPTER",
    "RestEmResult",
    "SearchDocument",
    "generator_examples",
    "passage_thresholds",
    "run_rest_em",
    "select_self_edits",
    "train_generator",
]

GENERATOR_ADAPTER = "seal-generator"
"""Name of the self-edit generator inside the learner's engine, and the prefix of its published adapters (which have
the role ``generator``)."""


@dataclass
class SearchDocument:
    """A document in the self-edit search: its text, tau and the no-update baseline on tau."""

    id: str
    text: str
    title: str | None
    pairs: list[QAPair]
    baseline: TauScore


@dataclass
class RoundReport:
    round: int
    candidates: int
    kept: int
    generator_examples: int
    generator_dir: str | None
    generator_train_seconds: float = 0.0
    mean_reward: float | None = None
    stopped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RestEmResult:
    candidates: list[Candidate] = field(default_factory=list)
    rounds: list[RoundReport] = field(default_factory=list)
    generator_dir: str | None = None
    """The last trained generator (``None`` if no round trained one)."""
    reached: set[str] = field(default_factory=set)
    """Documents with at least one scored candidate."""
    eval_seconds: list[float] = field(default_factory=list)
    """Wall-clock of every scored candidate (train + tau)."""


def _rank(c: Candidate) -> tuple[float, float]:
    return (c.reward if c.reward is not None else float("-inf"), c.gains.get("logprob", float("-inf")))


def select_self_edits(
    candidates: Sequence[Candidate],
    mode: str = "best",
    min_gain: float = 0.0,
    *,
    sources: Sequence[str] = (),
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, list[Candidate]]:
    """The kept candidates of each document (pure).

    ``best``: the one with the highest reward (ties: the larger log-prob gain, then the earliest), if its reward
    is above ``min_gain``; ``all_beating_baseline``: every one whose reward is above ``min_gain``, best first.
    ``thresholds`` raises the bar per document (e.g. :func:`passage_thresholds`). Unscored candidates are never
    kept. ``sources`` limits the candidates considered (e.g. ``["self_edit"]``).
    """
    if mode not in ("best", "all_beating_baseline"):
        raise ValueError(f"selection must be 'best' or 'all_beating_baseline', got {mode!r}")
    by_doc: dict[str, list[Candidate]] = {}
    for c in candidates:
        if sources and c.source not in sources:
            continue
        by_doc.setdefault(c.document_id, []).append(c)
    kept: dict[str, list[Candidate]] = {}
    for doc, group in by_doc.items():
        bar = max(min_gain, (thresholds or {}).get(doc, float("-inf")))
        beating = [c for c in group if c.reward is not None and c.reward > bar]
        beating.sort(key=_rank, reverse=True)  # stable: earlier candidates win ties
        if beating:
            kept[doc] = beating[:1] if mode == "best" else beating
    return kept


def passage_thresholds(candidates: Sequence[Candidate]) -> dict[str, float]:
    """Per document, the reward of training on the passage alone (for ``selection_baseline: passage_only``)."""
    return {c.document_id: c.reward for c in candidates if c.source == "passage_only" and c.reward is not None}


def selection_thresholds(candidates: Sequence[Candidate], settings: SEALSettings) -> dict[str, float] | None:
    """The per-document bars ``settings.selection_baseline`` asks for (``None``: just ``min_gain``)."""
    return passage_thresholds(candidates) if settings.selection_baseline == "passage_only" else None


def generator_examples(kept: dict[str, list[Candidate]]) -> list[DemoExample]:
    """(self-edit prompt -> cleaned self-edit) pairs for the generator's SFT; self-edits without lines are left out."""
    return [
        DemoExample(prompt=c.prompt, demonstration=c.text, source_id=c.document_id)
        for group in kept.values()
        for c in group
        if c.source == "self_edit" and c.lines
    ]


def train_generator(
    base_model_dir: str | Path,
    examples: Sequence[DemoExample],
    output_dir: str | Path,
    settings: SEALSettings,
    previous_generator_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> Any:
    """SFT of the self-edit generator: continues from ``previous_generator_dir`` (else a fresh
    ``settings.generator_lora`` adapter on the base model). Returns the ``TrainResult``."""
    return train_sft(
        base_model_dir, list(examples), output_dir, settings.generator_training, settings.generator_lora,
        previous_generator_dir, progress,
    )


def run_rest_em(
    engine: Any,
    base_model_dir: str | Path,
    documents: Sequence[SearchDocument],
    settings: SEALSettings,
    *,
    work_dir: str | Path,
    parent_adapter_dir: str | Path | None = None,
    generator_adapter_dir: str | Path | None = None,
    deadline: Deadline | None = None,
    progress: ProgressFn | None = None,
    on_round: Callable[[int, str | None], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RestEmResult:
    """``settings.rounds`` ReST-EM rounds over ``documents``; round dirs ``work_dir/generator-round-<r>`` are kept.

    Each round samples k self-edits per document from the current generator, scores each (inner loop), keeps
    them by ``settings.selection`` and trains the generator on the kept ones. With ``rounds == 0`` only the
    base self-edits of one pass are scored (no generator training). The passage-only candidate (if enabled)
    is scored once, in the first pass. ``on_round(r, generator_dir)`` is called after each round.
    """
    deadline = deadline or Deadline(None)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = RestEmResult()
    generator = str(generator_adapter_dir) if generator_adapter_dir else None
    if generator:
        engine.load_adapter(GENERATOR_ADAPTER, generator, replace=True)
    passes = max(1, settings.rounds)
    total = passes * len(documents) * settings.num_self_edits
    total += len(documents) if settings.passage_only_candidate else 0
    done = 0

    def tick(c: Candidate) -> None:
        nonlocal done
        done += 1
        result.eval_seconds.append(c.seconds)
        if progress is not None:
            progress(done, total, {"round": float(c.round), "reward": float(c.reward or 0.0)})

    try:
        for r in range(1, passes + 1):
            report = RoundReport(r, 0, 0, 0, generator)
            round_candidates: list[Candidate] = []
            for d_index, doc in enumerate(documents):
                if deadline.expired():
                    report.stopped = "time budget spent"
                    break
                if r == 1 and settings.passage_only_candidate:
                    c = evaluate_candidate(
                        engine, base_model_dir, passage_candidate(doc.id, doc.text, doc.title), doc.pairs, settings,
                        baseline=doc.baseline, parent_adapter_dir=parent_adapter_dir, work_dir=work_dir,
                    )
                    result.candidates.append(c)
                    result.reached.add(doc.id)
                    tick(c)
                prompt = format_prompt(settings.format, doc.text, doc.title, settings.templates)
                raws = sample_self_edits(
                    engine, prompt, settings, adapter=GENERATOR_ADAPTER if generator else None,
                    seed=settings.seed + 1000 * r + d_index,
                )
                for i, raw in enumerate(raws):
                    if deadline.expired():
                        report.stopped = "time budget spent"
                        break
                    c = make_candidate(doc.id, doc.text, doc.title, raw, settings, round=r, index=i)
                    evaluate_candidate(
                        engine, base_model_dir, c, doc.pairs, settings, baseline=doc.baseline,
                        parent_adapter_dir=parent_adapter_dir, work_dir=work_dir,
                    )
                    round_candidates.append(c)
                    result.reached.add(doc.id)
                    tick(c)
                    if log is not None:
                        log(f"round {r} doc {doc.id} self-edit {i}: {len(c.lines)} lines, reward {c.reward:+.3f} "
                            f"({c.seconds:.0f}s)")
                if report.stopped:
                    break
            result.candidates.extend(round_candidates)
            report.candidates = len(round_candidates)
            rewards = [c.reward for c in round_candidates if c.reward is not None]
            report.mean_reward = sum(rewards) / len(rewards) if rewards else None
            kept = select_self_edits(round_candidates, settings.selection, settings.min_gain, sources=["self_edit"],
                                     thresholds=selection_thresholds(result.candidates, settings))
            report.kept = sum(len(v) for v in kept.values())
            examples = generator_examples(kept)
            report.generator_examples = len(examples)
            if settings.rounds >= 1 and examples:
                out = work_dir / f"generator-round-{r}"
                start = time.perf_counter()
                try:
                    train_generator(base_model_dir, examples, out, settings, generator)
                except ValueError as exc:  # e.g. every example longer than generator_training.max_length
                    report.stopped = f"generator training failed: {exc}"
                else:
                    generator = str(out)
                    engine.load_adapter(GENERATOR_ADAPTER, generator, replace=True)
                    result.generator_dir = generator
                report.generator_train_seconds = round(time.perf_counter() - start, 2)
            report.generator_dir = generator
            result.rounds.append(report)
            if log is not None:
                log(f"round {r}: {report.candidates} self-edits, {report.kept} kept, mean reward "
                    f"{report.mean_reward}, generator {generator}")
            if on_round is not None:
                on_round(r, generator)
            if report.stopped:
                break
    finally:
        if engine.has_adapter(GENERATOR_ADAPTER):
            engine.unload_adapter(GENERATOR_ADAPTER)
    return result
