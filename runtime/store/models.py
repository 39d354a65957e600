"""Typed rows returned by the store, with JSON columns decoded.

Each dataclass lists its fields in the same order as ``COLUMNS``, the column list the store selects, so a
row tuple from DuckDB decodes with ``from_row``. Timestamps are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, get_args

InteractionKind = Literal["live", "shadow"]
SignalKind = Literal["rating", "correction", "demonstration"]
RunStatus = Literal["pending", "running", "succeeded", "failed"]
AdapterStatus = Literal["candidate", "active", "shadow", "retired", "rolled_back", "rejected"]
DecisionKind = Literal["approve", "veto", "promote", "shadow", "retire", "rollback"]
AdapterRole = Literal["serving", "generator"]
"""What an adapter is for: ``serving`` answers users (once promoted); ``generator`` is a learner's tool (SEAL's
self-edit generator), never served or promoted."""
LearningState = Literal["pending", "learned", "held", "dismissed", "review"]
"""Where a signal or document stands: ``pending`` (the next cycle learns it), ``learned`` (an approved adapter was
trained on it), ``held`` (its update was vetoed; it waits for the operator to retry or dismiss it) or
``dismissed`` (the operator decided it is not to be learned; the reason is kept) or ``review`` (its sender's
signals need an operator's approval, or agreement from other senders, before they are learned: the policy's
``signals`` section)."""
ReviewDecision = Literal["approve", "reject"]
"""Gate outcomes (approve, veto) and promotion events (promote, shadow, retire, rollback)."""

INTERACTION_KINDS: frozenset[str] = frozenset(get_args(InteractionKind))
SIGNAL_KINDS: frozenset[str] = frozenset(get_args(SignalKind))
RUN_STATUSES: frozenset[str] = frozenset(get_args(RunStatus))
FINISHED_RUN_STATUSES: frozenset[str] = frozenset({"succeeded", "failed"})
ADAPTER_STATUSES: frozenset[str] = frozenset(get_args(AdapterStatus))
DECISION_KINDS: frozenset[str] = frozenset(get_args(DecisionKind))
LEARNING_STATES: frozenset[str] = frozenset(get_args(LearningState))
REVIEW_DECISIONS: frozenset[str] = frozenset(get_args(ReviewDecision))
ADAPTER_ROLES: frozenset[str] = frozenset(get_args(AdapterRole))

Message = dict[str, Any]
"""One chat message, ``{"role": ..., "content": ...}``."""


def _json(value: str | None, default: Any = None) -> Any:
    return default if value is None else json.loads(value)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


def _utc_opt(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Interaction:
    """One model call. A ``shadow`` interaction has ``shadow_of`` = the id of the live one it mirrors."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id", "created_at", "thread_id", "kind", "shadow_of", "messages", "response", "adapter", "model",
        "latency_ms", "prompt_tokens", "completion_tokens", "metadata",
    )

    id: str
    created_at: datetime
    thread_id: str | None
    kind: InteractionKind
    shadow_of: str | None
    messages: list[Message]
    response: str
    adapter: str | None
    """Adapter that served the call; ``None`` means the base model."""
    model: str | None
    latency_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    metadata: dict[str, Any]

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Interaction:
        """Decode a row selected with ``COLUMNS``."""
        (id_, created, thread, kind, shadow_of, messages, response, adapter, model, latency, ptok, ctok,
         meta) = row
        return cls(id_, _utc(created), thread, kind, shadow_of, _json(messages, []), response, adapter,
                   model, latency, ptok, ctok, _json(meta, {}))


@dataclass(frozen=True, slots=True)
class Signal:
    """Feedback on the agent: a rating, a correction or a demonstration.

    ``text`` is the corrected or demonstrated answer; ``messages`` is the prompt conversation (for a
    demonstration not tied to a logged interaction); ``rating`` is the score of a rating.
    """

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id", "created_at", "kind", "interaction_id", "rating", "text", "messages", "comment", "metadata",
        "consumed_by_run", "consumed_at", "state", "state_reason", "state_changed_at", "principal",
    )

    id: str
    created_at: datetime
    kind: SignalKind
    interaction_id: str | None
    rating: float | None
    text: str | None
    messages: list[Message] | None
    comment: str | None
    metadata: dict[str, Any]
    consumed_by_run: str | None
    """The run that last trained on it (the approved one once ``learned``, the vetoed one while ``held``)."""
    consumed_at: datetime | None
    state: LearningState = "pending"
    state_reason: str | None = None
    """Why it is held, dismissed or awaiting review."""
    state_changed_at: datetime | None = None
    principal: str | None = None
    """Who sent it (the API key's principal); ``None`` when it came in without one (embedded use, open server)."""

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Signal:
        """Decode a row selected with ``COLUMNS``."""
        (id_, created, kind, interaction_id, rating, text, messages, comment, meta, run, consumed, state, reason,
         changed, principal) = row
        return cls(id_, _utc(created), kind, interaction_id, rating, text, _json(messages), comment,
                   _json(meta, {}), run, _utc_opt(consumed), state, reason, _utc_opt(changed), principal)


@dataclass(frozen=True, slots=True)
class Document:
    """A piece of new knowledge to learn; ``questions`` (e.g. ``[{"question", "answer"}]``) probe it."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id", "created_at", "title", "text", "questions", "metadata", "consumed_by_run", "consumed_at", "state",
        "state_reason", "state_changed_at", "principal",
    )

    id: str
    created_at: datetime
    title: str | None
    text: str
    questions: list[Any]
    metadata: dict[str, Any]
    consumed_by_run: str | None
    consumed_at: datetime | None
    state: LearningState = "pending"
    """As for signals: ``pending``, ``learned``, ``held`` or ``dismissed``."""
    state_reason: str | None = None
    state_changed_at: datetime | None = None
    principal: str | None = None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Document:
        """Decode a row selected with ``COLUMNS``."""
        id_, created, title, text, questions, meta, run, consumed, state, reason, changed, principal = row
        return cls(id_, _utc(created), title, text, _json(questions, []), _json(meta, {}), run,
                   _utc_opt(consumed), state, reason, _utc_opt(changed), principal)


@dataclass(frozen=True, slots=True)
class SignalReview:
    """An operator's decision on a signal awaiting review: approved (learned next) or rejected (dismissed)."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("id", "signal_id", "decision", "reason", "reviewer", "decided_at")

    id: str
    signal_id: str
    decision: ReviewDecision
    reason: str | None
    reviewer: str | None
    decided_at: datetime

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> SignalReview:
        """Decode a row selected with ``COLUMNS``."""
        id_, signal_id, decision, reason, reviewer, decided = row
        return cls(id_, signal_id, decision, reason, reviewer, _utc(decided))


@dataclass(frozen=True, slots=True)
class LearningRun:
    """One training run of a learner, from ``pending`` to ``succeeded`` or ``failed``."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id", "method", "status", "created_at", "started_at", "ended_at", "error", "config", "metrics",
        "data_counts", "parent_adapter", "output_adapter",
    )

    id: str
    method: str
    status: RunStatus
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    error: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    data_counts: dict[str, Any]
    parent_adapter: str | None
    output_adapter: str | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> LearningRun:
        """Decode a row selected with ``COLUMNS``."""
        id_, method, status, created, started, ended, error, config, metrics, counts, parent, output = row
        return cls(id_, method, status, _utc(created), _utc_opt(started), _utc_opt(ended), error,
                   _json(config, {}), _json(metrics, {}), _json(counts, {}), parent, output)


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """A LoRA adapter on disk. ``lineage`` lists its ancestors, root first, ending with ``parent``."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "name", "path", "parent", "method", "run_id", "status", "checksum", "metrics", "lineage",
        "created_at", "updated_at", "role",
    )

    name: str
    path: str
    parent: str | None
    method: str | None
    run_id: str | None
    status: AdapterStatus
    checksum: str | None
    metrics: dict[str, Any]
    lineage: list[str]
    created_at: datetime
    updated_at: datetime
    role: AdapterRole = "serving"

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> AdapterRecord:
        """Decode a row selected with ``COLUMNS``."""
        name, path, parent, method, run_id, status, checksum, metrics, lineage, created, updated, role = row
        return cls(name, path, parent, method, run_id, status, checksum, _json(metrics, {}),
                   _json(lineage, []), _utc(created), _utc(updated), role)


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The policy gate's verdict on an adapter, with the reasons and the check results behind it."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "id", "created_at", "adapter", "decision", "reasons", "checks", "run_id",
    )

    id: str
    created_at: datetime
    adapter: str
    decision: DecisionKind
    reasons: list[str]
    checks: Any
    run_id: str | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> PolicyDecision:
        """Decode a row selected with ``COLUMNS``."""
        id_, created, adapter, decision, reasons, checks, run_id = row
        return cls(id_, _utc(created), adapter, decision, _json(reasons, []), _json(checks), run_id)
