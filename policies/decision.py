"""A gate's verdict on a candidate adapter, and the gate used without a policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from learners.datasets import DatasetBuild
from runtime.store import AdapterRecord

__all__ = ["Gate", "GateDecision", "approve_all"]


@dataclass
class GateDecision:
    """A gate's verdict on a candidate."""

    approved: bool
    reasons: list[str]
    checks: list[dict[str, Any]] = field(default_factory=list)
    """Per-check results (stored with the decision)."""
    repair_prompts: list[list[dict[str, str]]] = field(default_factory=list)
    """For a veto that gate-guided repair may address (protected or retention checks only): the prompts of the
    failing checks, to train on as anchors with the active model's answers. Empty: not repairable (the
    candidate did not learn, or the taught answers contradict a protected behaviour)."""


Gate = Callable[[AdapterRecord, DatasetBuild], GateDecision]
"""Decides on a published candidate (:class:`policies.gate.PolicyGate`, or :func:`approve_all`)."""


def approve_all(candidate: AdapterRecord, build: DatasetBuild) -> GateDecision:
    """The gate without a policy: every verified candidate is approved."""
    return GateDecision(True, ["no policy configured: verified candidates are approved"])
