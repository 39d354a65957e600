"""`create_app`: the runtime's HTTP server (OpenAI-compatible API, feedback, admin, dashboard, metrics).

    from server import create_app
    app = create_app(load_config("runtime.yaml"), admin_token="s3cret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

or ``runtime serve --config runtime.yaml``. See docs/server.md for the routes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from agent.learning_agent import LearningAgent
from orchestration.service import RuntimeService
from runtime.api_keys import ApiKeys
from runtime.config import RuntimeConfig
from runtime.engines import Engine
from runtime.factory import create_engine, open_store
from runtime.store import Store
from server import admin_routes, dashboard, feedback_routes, openai_routes, ops_routes, replica_routes
from server.errors import install_error_handlers
from server.learn_jobs import LearnJobs
from server.limits import BodySizeLimitMiddleware, ServerLimits
from server.metrics import MetricsMiddleware, ServerMetrics
from server.serving import ChatService, ModelResolver
from server.state import ADMIN_TOKEN_ENV, ServerState

log = logging.getLogger(__name__)

__all__ = ["create_app"]


def create_app(
    config: RuntimeConfig,
    *,
    engine: Engine | None = None,
    store: Store | None = None,
    service: RuntimeService | None = None,
    admin_token: str | None = None,
    limits: ServerLimits | None = None,
    dashboard_requires_token: bool = False,
    background_learning: bool = True,
    api_keys: ApiKeys | None = None,
    role: replica_routes.ServerRole = "learner",
) -> FastAPI:
    """Build the server app.

    Args:
        config: the runtime configuration (model, engine, store, learning, policy).
        engine: the serving engine; default: built from ``config`` (and closed at shutdown).
        store: the interaction log; default: opened from ``config`` (and closed at shutdown).
        service: the `RuntimeService` behind learning, promotion, rollback, shadow mode and the shadow
            report; default: one built from ``config`` on the same engine and store (it loads the
            registry's active and shadow adapters into the engine, and is closed at shutdown).
        admin_token: bearer token of the ``/admin`` routes; default: ``$RUNTIME_ADMIN_TOKEN``. Without one
            the admin routes answer 403 saying how to set it.
        limits: request size limits (:class:`ServerLimits` defaults).
        dashboard_requires_token: make the dashboard's data route require the admin token too.
        background_learning: start the service's scheduled learning loop with the app (lifespan).
        api_keys: API keys with roles for the public routes (:mod:`runtime.api_keys`); signals are recorded
            under the key's principal. ``None``: the public routes are open.
        role: ``learner`` (serves, learns, owns the adapter registry) or ``replica`` (serves and logs only: no
            learning loop, the learning routes answer 409, and ``/admin/replica`` lets the learner's replica set
            load, verify and switch adapters; see docs/replicas.md).
    """
    if role == "replica":
        background_learning = False
    if service is not None:
        engine = engine or service.engine
        store = store or service.store
    with ExitStack() as building:  # what this call creates is closed again if anything below fails
        if store is None:
            store = building.enter_context(open_store(config))
        if engine is None:
            engine = building.enter_context(create_engine(config))
        if service is None:
            service = building.enter_context(RuntimeService.from_config(config, engine=engine, store=store))
        owned = building.pop_all()
    token = admin_token if admin_token is not None else os.environ.get(ADMIN_TOKEN_ENV) or None

    # The agent's chat model logs every call and, with a service, feeds shadow mode.
    agent = LearningAgent(engine, store=store, system_prompt=config.engine.system_prompt, service=service,
                          max_new_tokens=config.engine.max_new_tokens, temperature=config.engine.temperature)
    learn_jobs = LearnJobs()
    resolver = ModelResolver(engine, service.registry)
    holder: dict[str, ServerState] = {}
    metrics = ServerMetrics(lambda: _snapshot(holder["state"]))
    state = ServerState(
        config=config, engine=engine, store=store, service=service, agent=agent, chat=ChatService(agent.chat_model),
        resolver=resolver, limits=limits or ServerLimits(), metrics=metrics, learn_jobs=learn_jobs,
        admin_token=token, dashboard_requires_token=dashboard_requires_token, owned=owned, api_keys=api_keys,
    )
    holder["state"] = state

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        started = False
        if background_learning and not service.engine.follower:  # a follower's learner learns for it
            service.start_background()
            started = True
        try:
            yield
        finally:
            _shutdown(state, started)

    app = FastAPI(
        title="learning-runtime",
        summary="OpenAI-compatible chat completions from an agent that keeps learning from its use.",
        version="0.1",
        lifespan=lifespan,
    )
    app.state.runtime = state
    replica_routes.set_role(app, role)
    install_error_handlers(app)
    for router in (openai_routes.router, feedback_routes.router, admin_routes.router, replica_routes.router,
                   dashboard.router, ops_routes.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=state.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last = outermost: sees every status
    return app


def _snapshot(state: ServerState) -> dict[str, Any]:
    return {
        "model": state.resolver.base_id,
        "active_adapter": state.engine.active_adapter,
        "loaded_adapters": len(state.engine.list_adapters()),
        "engine_queue_depth": state.engine.queue_depth(),
        "store_counts": state.store.counts(),
        "learning": state.learn_jobs.running() is not None,
        "adapters_refused": len(state.service.integrity_failures) + state.resolver.refused,
        "learning_figures": state.store.learning_figures(),
        "store_writes": state.store.write_stats(),
    }


def shutdown_app(app: FastAPI) -> None:
    """Run the app's shutdown if its lifespan did not (uvicorn skips it on a forced exit); otherwise nothing."""
    state: ServerState = app.state.runtime
    _shutdown(state, state.service.loop is not None)


def _shutdown(state: ServerState, started_background: bool) -> None:
    """Stop the learning loop, flush the log and close what the app created (the service, the engine, the store).
    Runs once: a second call does nothing."""
    if state.shut_down:
        return
    state.shut_down = True
    try:
        state.service.stop_learning()  # the loop, and a cycle in progress (scheduled or by hand) is cancelled
        if not state.store.closed:
            state.store.flush()
    except Exception:  # noqa: BLE001 - shutdown goes on
        log.exception("stopping the learning loop or flushing the store at shutdown failed")
    try:
        state.owned.close()  # every callback runs even if one raises
    except Exception:  # noqa: BLE001
        log.exception("closing what the server created failed")
