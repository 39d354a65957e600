"""The operator dashboard: one static page (``GET /dashboard``) reading ``GET /dashboard/api/summary``.

Read-only. By default the summary needs no token, which suits a server on loopback; with
``dashboard_requires_token`` (what `runtime serve` turns on when it listens beyond loopback) the summary
needs the admin bearer token too, and the page asks for it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from server.dashboard_charts import daily, loss_curves, signals_by_run
from server.serialize import (
    adapter_dict,
    decision_dict,
    interaction_dict,
    run_dict,
    shadow_pair_dict,
    signal_dict,
)
from server.state import ServerState, get_state

PAGE = Path(__file__).with_name("static") / "dashboard.html"

router = APIRouter(prefix="/dashboard", tags=["dashboard"])


@router.get("", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The dashboard page (self-contained: no external scripts, styles or fonts)."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={
        "Cache-Control": "no-cache",
        "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                   "img-src 'self' data:; connect-src 'self'",
    })


@router.get("/api/summary")
async def summary(request: Request, limit: int = Query(25, ge=1, le=500),
                  state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Everything the page shows, in one read."""
    if state.dashboard_requires_token:
        state.check_admin(request)
    return await run_in_threadpool(build_summary, state, limit)


def build_summary(state: ServerState, limit: int = 25) -> dict[str, Any]:
    """Recent interactions, adapters with lineage, gate decisions (every check), held signals, signals awaiting
    review, shadow pairs, runs with the signals each used, jobs, and the series the charts draw."""
    store = state.store
    loaded = set(state.engine.list_adapters())
    pairs = store.shadow_pairs(limit)
    runs = store.runs(limit)
    used = signals_by_run(store.signals(), [r.id for r in runs])
    return {
        "generated_at": time.time(),
        "model": state.resolver.base_id,
        "active_adapter": state.engine.active_adapter,
        "loaded_adapters": sorted(loaded),
        "counts": store.counts(),
        "service": state.service is not None,
        "interactions": [interaction_dict(r) for r in store.recent_interactions(limit)],
        "adapters": [adapter_dict(r, loaded=r.name in loaded) for r in reversed(store.adapters())],
        "decisions": [decision_dict(d) for d in store.decisions(limit)],
        "held_signals": [signal_dict(s) for s in store.signals(state="held")[-limit:]],
        "review_signals": [signal_dict(s) for s in store.signals(state="review")[-limit:]],
        "shadow_pairs": [shadow_pair_dict(live, shadow) for live, shadow in pairs],
        "runs": [{**run_dict(r), "signals_used": used[r.id]} for r in runs],
        "charts": {
            "loss": loss_curves(store.runs(50)),
            "daily": daily(store.decisions(5000), store.signals(state="learned"),
                           store.recent_interactions(5000, kind="live")),
        },
        "learn_jobs": [j.to_dict() for j in state.learn_jobs.all()],
    }
