"""The dashboard's series over time, from the store: training loss per run, and per day the gate's verdicts,
the signals learned, the requests served and their median latency."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from runtime.store import Interaction, LearningRun, PolicyDecision, Signal

MAX_LOSS_POINTS = 120
"""Loss points kept per run (evenly thinned): enough for a curve, small for the page."""


def loss_curves(runs: Sequence[LearningRun], *, max_runs: int = 6) -> list[dict[str, Any]]:
    """``[{run, method, status, points: [[step, loss], ...]}]`` of the newest runs that logged a loss."""
    curves = []
    for run in runs:
        points = [[h["step"], h["loss"]] for h in run.metrics.get("history") or []
                  if isinstance(h, dict) and isinstance(h.get("loss"), int | float) and "step" in h]
        if not points:
            continue
        if len(points) > MAX_LOSS_POINTS:
            stride = len(points) / MAX_LOSS_POINTS
            points = [points[int(i * stride)] for i in range(MAX_LOSS_POINTS - 1)] + [points[-1]]
        curves.append({"run": run.id, "method": run.method, "status": run.status, "points": points})
        if len(curves) == max_runs:
            break
    return curves


def daily(decisions: Sequence[PolicyDecision], learned: Sequence[Signal], interactions: Sequence[Interaction],
          *, days: int = 14) -> list[dict[str, Any]]:
    """Per day (oldest first, the last ``days`` with any activity): gate approvals and vetoes, the veto rate,
    signals learned, live requests and their median latency."""
    rows: dict[str, dict[str, Any]] = defaultdict(lambda: {"approved": 0, "vetoed": 0, "learned": 0, "requests": 0,
                                                           "_latency": []})
    for d in decisions:
        if d.decision in ("approve", "veto"):
            rows[d.created_at.date().isoformat()]["approved" if d.decision == "approve" else "vetoed"] += 1
    for s in learned:
        if s.consumed_at is not None:
            rows[s.consumed_at.date().isoformat()]["learned"] += 1
    for i in interactions:
        if i.kind != "live":
            continue
        row = rows[i.created_at.date().isoformat()]
        row["requests"] += 1
        if i.latency_ms is not None:
            row["_latency"].append(i.latency_ms)
    out = []
    for day in sorted(rows)[-days:]:
        row = rows[day]
        latencies = row.pop("_latency")
        judged = row["approved"] + row["vetoed"]
        out.append({"day": day, **row, "veto_rate": row["vetoed"] / judged if judged else None,
                    "latency_p50_ms": statistics.median(latencies) if latencies else None})
    return out


def signals_by_run(signals: Sequence[Signal], run_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The signals each run used (learned, or held after its veto): ``{run_id: [{id, kind, state, prompt,
    text}]}``."""
    wanted = set(run_ids)
    out: dict[str, list[dict[str, Any]]] = {r: [] for r in run_ids}
    for s in signals:
        if s.consumed_by_run in wanted:
            prompt = next((str(m.get("content", "")) for m in reversed(s.messages or []) if m.get("role") == "user"),
                          "")
            out[s.consumed_by_run].append({"id": s.id, "kind": s.kind, "state": s.state, "prompt": prompt,
                                           "text": s.text})
    return out
