"""Store records as JSON-ready dicts for the admin API and the dashboard."""

from __future__ import annotations

from typing import Any

from runtime.store import AdapterRecord, Interaction, LearningRun, PolicyDecision, Signal
from runtime.store.encoding import jsonable


def adapter_dict(rec: AdapterRecord, *, loaded: bool | None = None) -> dict[str, Any]:
    """An adapter with its lineage spelled out (``base -> ... -> name``); training history left out."""
    out = jsonable(rec)
    out["metrics"] = {k: v for k, v in out["metrics"].items() if k != "history"}
    out["lineage_path"] = ["base", *rec.lineage, rec.name]
    if loaded is not None:
        out["loaded"] = loaded
    return out


def run_dict(run: LearningRun) -> dict[str, Any]:
    """A learning run; its loss history is summarised as the last logged step."""
    out = jsonable(run)
    history = out["metrics"].pop("history", None) or []
    out["last_step"] = history[-1] if history else None
    started, ended = run.started_at, run.ended_at
    out["duration_s"] = (ended - started).total_seconds() if started and ended else None
    return out


def decision_dict(decision: PolicyDecision) -> dict[str, Any]:
    return jsonable(decision)


def signal_dict(signal: Signal) -> dict[str, Any]:
    """A learning signal; ``prompt`` is the last user message it is about (when it carries its messages)."""
    out = jsonable(signal)
    out["prompt"] = _last_user(signal.messages or [])
    return out


def _last_user(messages: list[dict[str, Any]]) -> str:
    return next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")


def interaction_dict(row: Interaction, *, full: bool = False) -> dict[str, Any]:
    """An interaction; ``prompt`` is its last user message (``messages`` only with ``full``)."""
    out = jsonable(row)
    out["prompt"] = _last_user(row.messages)
    if not full:
        out.pop("messages")
    return out


def shadow_pair_dict(live: Interaction, shadow: Interaction) -> dict[str, Any]:
    """A live answer and the shadow adapter's answer to the same request."""
    return {
        "live_id": live.id, "shadow_id": shadow.id, "created_at": shadow.created_at.isoformat(),
        "prompt": _last_user(live.messages), "live_adapter": live.adapter, "shadow_adapter": shadow.adapter,
        "live_response": live.response, "shadow_response": shadow.response,
        "same": live.response.strip() == shadow.response.strip(),
        "live_latency_ms": live.latency_ms, "shadow_latency_ms": shadow.latency_ms,
    }
