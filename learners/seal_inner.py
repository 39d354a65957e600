"""SEAL's inner loop: sample self-edits, try each as a small temporary LoRA update, reward the gain on tau.

Each candidate's sequences (self-edit lines + passage) train a temporary adapter that continues from the
serving adapter (or starts fresh on the base model); the adapter is loaded into the engine, tau is asked
WITHOUT the document in context, and the reward is the metric's gain over the no-update baseline. The
temporary adapter is unloaded and deleted right after.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.engines import SamplingParams

from .evaluation import ask
from .examples import TrainingText
from .seal_config import SEALSettings
from .seal_edits import format_prompt, parse_self_edit, passage_text, training_sequences
from .seal_questions import QAPair
from .sft_trainer import train_sft_texts

__all__ = [
    "Candidate",
    "Deadline",
    "TauScore",
    "evaluate_sequences",
    "sample_self_edits",
    "score_tau",
]


class Deadline:
    """A time budget that may be unlimited."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def expired(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.start >= self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class TauScore:
    """Tau asked without the document: accuracy (containment), token F1 and answer log-prob, means over pairs."""

    containment: float
    f1: float
    logprob: float
    responses: list[str] = field(default_factory=list)

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def to_dict(self, *, responses: bool = False) -> dict[str, Any]:
        out = {"containment": self.containment, "f1": self.f1, "logprob": self.logprob}
        if responses:
            out["responses"] = list(self.responses)
        return out


@dataclass
class Candidate:
    """One self-edit (or the passage alone) tried for one document."""

    document_id: str
    round: int
    index: int
    source: str
    """``self_edit`` or ``passage_only``."""
    prompt: list[dict[str, str]]
    raw: str
    lines: list[str]
    sequences: list[str]
    reward: float | None = None
    gains: dict[str, float] = field(default_factory=dict)
    score: dict[str, float] = field(default_factory=dict)
    responses: list[str] = field(default_factory=list)
    """Answers to tau after the update (the last seed's)."""
    seconds: float = 0.0

    @property
    def text(self) -> str:
        """The cleaned self-edit (its lines), what the generator is trained to write."""
        return "\n".join(self.lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "document_id": self.document_id,
            "round": self.round,
            "index": self.index,
            "source": self.source,
            "lines": list(self.lines),
            "num_sequences": len(self.sequences),
            "reward": self.reward,
            "gains": dict(self.gains),
            "score": dict(self.score),
            "responses": list(self.responses),
            "seconds": round(self.seconds, 2),
        }


def score_tau(
    engine: Any,
    pairs: Sequence[QAPair],
    adapter: str | None,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> TauScore:
    """Greedy answers to tau's questions (no document in context) on ``adapter`` (None = base), scored."""
    if not pairs:
        return TauScore(0.0, 0.0, 0.0)
    conversations = [[{"role": "user", "content": p.question}] for p in pairs]
    answers = ask(engine, conversations, [p.answer for p in pairs], adapter,
                  max_new_tokens=max_new_tokens, batch_size=batch_size)
    logprobs: list[float] = []
    for i in range(0, len(pairs), batch_size):
        prompts = [engine.render_chat(c) for c in conversations[i : i + batch_size]]
        rows = engine.score(prompts, [p.answer for p in pairs[i : i + batch_size]], adapter=adapter)
        logprobs.extend(sum(r) / len(r) if r else 0.0 for r in rows)
    return TauScore(answers.accuracy, answers.mean_f1, sum(logprobs) / len(logprobs), answers.responses)


def sample_self_edits(
    engine: Any,
    prompt: list[dict[str, str]],
    settings: SEALSettings,
    *,
    adapter: str | None,
    seed: int,
    k: int | None = None,
    temperature: float | None = None,
) -> list[str]:
    """``k`` self-edits (raw text) sampled from the generator ``adapter`` (None = the base model) in one batch."""
    k = k or settings.num_self_edits
    temperature = settings.temperature if temperature is None else temperature
    params = SamplingParams(
        max_new_tokens=settings.max_self_edit_tokens,
        temperature=temperature,
        top_p=settings.top_p if temperature > 0 else 1.0,
        seed=seed if temperature > 0 else None,
    )
    return [g.text for g in engine.chat([prompt] * k, params, adapter=adapter)]


def make_candidate(
    document_id: str, text: str, title: str | None, raw: str, settings: SEALSettings, *, round: int, index: int
) -> Candidate:
    """Parse a raw self-edit into a candidate (its lines and training sequences)."""
    passage = passage_text(text, title)
    lines = parse_self_edit(
        raw,
        settings.format,
        passage=passage,
        max_lines=settings.max_lines,
        max_line_chars=settings.max_line_chars,
        min_line_chars=settings.min_line_chars,
    )
    return Candidate(
        document_id=document_id,
        round=round,
        index=index,
        source="self_edit",
        prompt=format_prompt(settings.format, text, title, settings.templates),
        raw=raw,
        lines=lines,
        sequences=training_sequences(lines, passage, include_passage=settings.include_passage),
    )


def passage_candidate(document_id: str, text: str, title: str | None) -> Candidate:
    """The "no self-edit" candidate: the passage alone."""
    passage = passage_text(text, title)
    return Candidate(document_id, 0, -1, "passage_only", [], "", [], [passage])


def evaluate_sequences(
    engine: Any,
    base_model_dir: str | Path,
    sequences: Sequence[TrainingText],
    pairs: Sequence[QAPair],
    settings: SEALSettings,
    *,
    baseline: TauScore,
    parent_adapter_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    name: str = "seal-inner",
) -> tuple[float, dict[str, float], TauScore]:
    """Train a temporary LoRA on ``sequences`` per seed, score tau on it, delete it; return (reward, gains, score).

    The reward is ``settings.reward_metric`` after minus ``baseline``; metrics are averaged over
    ``settings.seeds``. With no sequence at all the reward is 0 (no update) and nothing is trained.
    """
    if not sequences:
        return 0.0, {m: 0.0 for m in ("containment", "f1", "logprob")}, baseline
    scores: list[TauScore] = []
    for seed in settings.seeds:
        tmp = Path(tempfile.mkdtemp(prefix="seal-tmp-adapter-", dir=work_dir))
        try:
            train = dataclasses.replace(settings.inner_training, seed=seed)
            train_sft_texts(base_model_dir, sequences, tmp, train, settings.lora, parent_adapter_dir)
            engine.load_adapter(name, tmp, replace=True)
            try:
                scores.append(
                    score_tau(engine, pairs, name, max_new_tokens=settings.eval_max_new_tokens,
                              batch_size=settings.eval_batch_size)
                )
            finally:
                engine.unload_adapter(name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    n = len(scores)
    mean = TauScore(
        sum(s.containment for s in scores) / n,
        sum(s.f1 for s in scores) / n,
        sum(s.logprob for s in scores) / n,
        scores[-1].responses,
    )
    gains = {m: mean.metric(m) - baseline.metric(m) for m in ("containment", "f1", "logprob")}
    return gains[settings.reward_metric], gains, mean


def evaluate_candidate(
    engine: Any,
    base_model_dir: str | Path,
    candidate: Candidate,
    pairs: Sequence[QAPair],
    settings: SEALSettings,
    *,
    baseline: TauScore,
    parent_adapter_dir: str | Path | None,
    work_dir: str | Path | None,
) -> Candidate:
    """Fill ``candidate``'s reward, gains, score and seconds (see :func:`evaluate_sequences`)."""
    start = time.perf_counter()
    reward, gains, score = evaluate_sequences(
        engine, base_model_dir, candidate.sequences, pairs, settings, baseline=baseline,
        parent_adapter_dir=parent_adapter_dir, work_dir=work_dir,
    )
    candidate.reward, candidate.gains, candidate.score = reward, gains, score.to_dict()
    candidate.responses = list(score.responses)
    candidate.seconds = time.perf_counter() - start
    return candidate
