"""Operator routes under ``/admin``, behind the admin bearer token.

Reads (adapters, decisions, runs) come straight from the store; promotion, rollback, learning and the
shadow report go through the `RuntimeService`, which also tells the engine what to serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.errors import APIError
from server.learn_jobs import LEARN_METHODS
from server.replica_routes import refuse_on_replica
from server.schemas import (
    LearnRequest,
    PromoteRequest,
    SignalDismissRequest,
    SignalRetryRequest,
    SignalReviewRequest,
)
from server.serialize import adapter_dict, decision_dict, jsonable, run_dict
from server.state import ServerState, get_state

T = TypeVar("T")


def require_admin(request: Request, state: ServerState = Depends(get_state)) -> ServerState:
    """Dependency of every admin route: the bearer token must match."""
    state.check_admin(request)
    return state


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


async def _service_call(fn: Callable[..., T], *args: Any) -> T:
    """Run a service operation in a worker thread; map its errors to statuses."""
    try:
        return await run_in_threadpool(fn, *args)
    except KeyError as exc:
        raise APIError(404, exc.args[0] if exc.args else str(exc), code="not_found") from None
    except LookupError as exc:
        raise APIError(409, str(exc), code="nothing_to_do") from None
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None
    except RuntimeError as exc:  # e.g. AdapterVerificationError: the adapter changed on disk
        raise APIError(409, str(exc), code="conflict") from None


@router.get("/adapters")
async def adapters(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Every adapter in the registry with status and lineage, plus what the engine serves now."""
    def read() -> dict[str, Any]:
        loaded = set(state.engine.list_adapters())
        return {"active": state.engine.active_adapter, "loaded": sorted(loaded),
                "adapters": [adapter_dict(r, loaded=r.name in loaded) for r in state.store.adapters()]}

    return await run_in_threadpool(read)


@router.get("/adapters/{name}")
async def adapter(name: str, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """One adapter: lineage, metrics, its training run and the decisions about it."""
    def read() -> dict[str, Any]:
        rec = state.store.get_adapter(name)
        if rec is None:
            raise APIError(404, f"No adapter named {name!r}; see GET /admin/adapters.", code="not_found")
        run = state.store.get_run(rec.run_id) if rec.run_id else None
        return {"adapter": adapter_dict(rec, loaded=state.engine.has_adapter(name)),
                "run": run_dict(run) if run else None,
                "decisions": [decision_dict(d) for d in state.store.decisions(adapter=name)]}

    return await run_in_threadpool(read)


@router.post("/adapters/{name}/promote", dependencies=[Depends(refuse_on_replica)])
async def promote(name: str, request: Request, body: PromoteRequest | None = None,
                  state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Make ``name`` the active adapter (the engine serves it at once). An adapter the gate vetoed needs
    ``{"force": true, "reason": "..."}``; the promotion is recorded as forced, by whom and why."""
    service = state.service
    body = body or PromoteRequest()
    by = state.admin_principal(request)
    reason = body.reason or "promoted by operator"
    record = await _service_call(lambda: service.promote(name, reason=reason, force=body.force, by=by))
    return {"active": adapter_dict(record, loaded=state.engine.has_adapter(record.name))}


@router.post("/rollback", dependencies=[Depends(refuse_on_replica)])
async def rollback(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Restore the adapter that was active before the current one (or the base model)."""
    service = state.service
    record = await _service_call(service.rollback)
    return {"active": None if record is None else adapter_dict(record, loaded=state.engine.has_adapter(record.name)),
            "serving": record.name if record is not None else "base"}


@router.post("/learn", status_code=202, dependencies=[Depends(refuse_on_replica)])
async def learn(body: LearnRequest | None = None, state: ServerState = Depends(get_state)) -> JSONResponse:
    """Start one learning cycle in the background; poll ``GET /admin/learn/{job}`` (or ``/admin/runs``)."""
    service = state.service
    method = body.method if body is not None else None
    if method is not None and method not in LEARN_METHODS:
        raise APIError(400, f"Unknown learning method {method!r}; use one of {', '.join(LEARN_METHODS)}.",
                       param="method")
    if service.cycle_running and state.learn_jobs.running() is None:
        raise APIError(409, "A learning cycle started by the background loop is running; see GET /admin/runs.",
                       code="learning_in_progress")
    job, started = state.learn_jobs.start(service.learn_now, method)
    if not started:
        raise APIError(409, f"A learning cycle is already running (job {job.id}); poll GET /admin/learn/{job.id}.",
                       code="learning_in_progress")
    return JSONResponse(job.to_dict(), status_code=202, headers={"Location": f"/admin/learn/{job.id}"})


@router.get("/learn")
async def learn_jobs(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Learning cycles this server started, newest first."""
    return {"jobs": [j.to_dict() for j in state.learn_jobs.all()]}


@router.get("/learn/{job_id}")
async def learn_job(job_id: str, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """One learning job: ``running``, ``finished`` (with the cycle's result) or ``error``."""
    job = state.learn_jobs.get(job_id)
    if job is None:
        raise APIError(404, f"No learning job {job_id!r}; see GET /admin/learn.", code="not_found")
    return job.to_dict()


@router.get("/interactions")
async def interactions(limit: int = Query(20, ge=1, le=10_000),
                       state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """The most recent interactions, newest first, with their messages."""
    rows = await run_in_threadpool(lambda: state.store.recent_interactions(limit=limit))
    return {"interactions": [jsonable(r) for r in rows]}


@router.get("/decisions")
async def decisions(limit: int = Query(50, ge=1, le=1000), adapter: str | None = None,
                    state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Policy decisions (gate verdicts and promotion events) with their reasons, newest first."""
    rows = await run_in_threadpool(state.store.decisions, limit, adapter=adapter)
    return {"decisions": [decision_dict(d) for d in rows]}


@router.get("/runs")
async def runs(limit: int = Query(50, ge=1, le=1000), status: str | None = None,
               state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Learning runs, newest first."""
    try:
        rows = await run_in_threadpool(state.store.runs, limit, status=status)
    except ValueError as exc:
        raise APIError(400, str(exc), param="status") from None
    return {"runs": [run_dict(r) for r in rows]}


@router.get("/runs/{run_id}")
async def run(run_id: str, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """One learning run, with its full metrics (loss history included)."""
    row = await run_in_threadpool(state.store.get_run, run_id)
    if row is None:
        raise APIError(404, f"No learning run {run_id!r}; see GET /admin/runs.", code="not_found")
    return jsonable(row)


@router.get("/shadow-report")
async def shadow_report(adapter: str | None = None, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """How the shadow adapter compares with the live one on mirrored traffic."""
    service = state.service
    report = await _service_call(service.shadow_report, adapter)
    return jsonable(report.to_dict())


@router.get("/signals")
async def signals(limit: int = Query(100, ge=1, le=10_000), state: str | None = None,
                  server: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Learning signals, newest last, optionally in one state (``pending``, ``learned``, ``held``, ``dismissed``,
    ``review``).

    ``held`` signals were used by an update the gate vetoed: retry or dismiss them. ``review`` signals wait
    for an operator's decision (``POST /admin/signals/review``).
    """
    try:
        rows = await run_in_threadpool(server.store.signals, state=state)
    except ValueError as exc:
        raise APIError(400, str(exc), param="state") from None
    return {"signals": [jsonable(s) for s in rows[-limit:]]}


@router.post("/signals/retry", dependencies=[Depends(refuse_on_replica)])
async def retry_signals(body: SignalRetryRequest, server: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Make held (or dismissed) signals pending: the next cycle learns them, through the gate again."""
    def retry() -> dict[str, Any]:
        ids = [s.id for s in server.store.signals(state="held")] if body.all_held else body.ids
        if not ids:
            raise APIError(400, "Give signal ids, or all_held: true.", param="ids")
        return {"retried": server.store.set_learning_state("pending", signal_ids=ids, reason="retried by operator"),
                "requested": len(ids)}

    return await run_in_threadpool(retry)


@router.post("/signals/dismiss", dependencies=[Depends(refuse_on_replica)])
async def dismiss_signals(body: SignalDismissRequest, server: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Dismiss held or pending signals with a reason; they are not learned unless retried."""
    moved = await run_in_threadpool(
        lambda: server.store.set_learning_state("dismissed", signal_ids=body.ids, reason=body.reason)
    )
    return {"dismissed": moved, "requested": len(body.ids)}


@router.post("/signals/review", dependencies=[Depends(refuse_on_replica)])
async def review_signals(body: SignalReviewRequest, request: Request,
                         server: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Approve (the next cycle learns them) or reject (dismissed, with the reason) signals awaiting review.
    Every decision is stored with its reason and reviewer (``GET /admin/signals/reviews``)."""
    reviewer = body.reviewer or server.admin_principal(request)
    decided = await run_in_threadpool(
        lambda: server.store.review_signals(body.ids, body.decision, reason=body.reason, reviewer=reviewer)
    )
    return {"decided": decided, "requested": len(body.ids), "decision": body.decision}


@router.get("/signals/reviews")
async def signal_reviews(signal_id: str | None = None, server: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Stored review decisions, oldest first (of one signal with ``signal_id``)."""
    rows = await run_in_threadpool(server.store.signal_reviews, signal_id)
    return {"reviews": [jsonable(r) for r in rows]}

