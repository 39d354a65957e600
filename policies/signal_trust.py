"""Admitting a new signal by its sender's trust (the policy's ``signals`` section, :class:`SignalTrust`).

A signal from a trusted sender is ``pending`` (the next cycle learns it). One from a sender whose trust is
``review`` waits in state ``review`` until an operator approves or rejects it (``runtime signals review``,
``/admin/signals/review``, the dashboard), or, with ``min_agreeing_principals`` of 2 or more, until that many
distinct senders have sent the same correction: the same question (normalised last user turn) and the same
answer (normalised text).
"""

from __future__ import annotations

from learners.anchors import prompt_key
from learners.datasets import signal_example
from policies.schema import SignalTrust
from runtime.store import Signal, Store
from runtime.store.models import LearningState
from runtime.textmatch import normalise

__all__ = ["AGREEMENT_REVIEWER", "arrival_state", "release_agreed"]

AGREEMENT_REVIEWER = "agreement"
"""The reviewer recorded when agreement, not an operator, released signals."""


def arrival_state(trust: SignalTrust, principal: str | None) -> tuple[LearningState, str | None]:
    """The state a new signal from `principal` starts in, and why (for ``review``)."""
    if trust.trust_of(principal) == "learn":
        return "pending", None
    who = f"principal {principal!r}" if principal is not None else "a sender without an API key"
    how = (f"; or {trust.min_agreeing_principals} distinct principals sending the same correction"
           if trust.min_agreeing_principals > 1 else "")
    return "review", f"signals of {who} need review (policy signals section){how}"


def release_agreed(store: Store, trust: SignalTrust, signal_id: str) -> int:
    """Release signals awaiting review that enough distinct principals agree on with `signal_id`; returns
    how many were released (0 when agreement is off or not yet reached)."""
    if trust.min_agreeing_principals < 2:
        return 0
    waiting = store.signals(state="review")
    target = next((s for s in waiting if s.id == signal_id), None)
    key = _agreement_key(target, store) if target is not None else None
    if key is None:
        return 0
    agreeing = [s for s in waiting if s.principal is not None and _agreement_key(s, store) == key]
    if len({s.principal for s in agreeing}) < trust.min_agreeing_principals:
        return 0
    reason = f"{len({s.principal for s in agreeing})} principals sent the same correction"
    return store.review_signals([s.id for s in agreeing], "approve", reason=reason, reviewer=AGREEMENT_REVIEWER)


def _agreement_key(signal: Signal, store: Store) -> tuple[str, str] | None:
    if signal.kind == "rating":
        return None
    example = signal_example(signal, store)
    if isinstance(example, str):
        return None
    return prompt_key(example.prompt), normalise(example.demonstration)
