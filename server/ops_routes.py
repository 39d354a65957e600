"""Operations routes: ``GET /healthz`` (liveness with model, engine and store status) and ``GET /metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.metrics import CONTENT_TYPE
from server.state import ServerState, get_state

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz(state: ServerState = Depends(get_state)) -> JSONResponse:
    """200 when the engine and the store answer; 503 (same body, ``status: unavailable``) when not."""
    body = await run_in_threadpool(health, state)
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


def health(state: ServerState) -> dict[str, Any]:
    """The health report (blocking: it reads the store)."""
    engine = state.engine
    store_status: dict[str, Any] = {"path": str(state.store.path), "schema_version": state.store.schema_version}
    try:
        store_status["counts"] = state.store.counts()
        store_status["ok"] = True
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        store_status.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    try:
        loaded = engine.list_adapters()
        engine_status: dict[str, Any] = {"ok": True, "loaded_adapters": loaded}
    except Exception as exc:  # noqa: BLE001
        engine_status = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    engine_status.update(
        kind=state.config.engine.kind, implementation=type(engine).__name__, active_adapter=engine.active_adapter,
        context_length=getattr(engine, "context_length", None), device=str(getattr(engine, "device", "")) or None,
    )
    running = state.learn_jobs.running()
    ok = store_status["ok"] and engine_status["ok"]
    return {
        "status": "ok" if ok else "unavailable",
        "model": state.resolver.base_id,
        "engine": engine_status,
        "store": store_status,
        "service": state.service is not None,
        "learning_job": running.id if running else None,
        "admin": state.admin_token is not None,
    }


@router.get("/metrics", include_in_schema=False)
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Prometheus text exposition of this server's metrics."""
    body = await run_in_threadpool(state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
