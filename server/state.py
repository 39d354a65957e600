"""What the routes share: the engine, the store, the chat model, the `RuntimeService`, settings."""

from __future__ import annotations

import secrets
from contextlib import ExitStack
from dataclasses import dataclass, field

from fastapi import Request

from agent.chat_model import EngineChatModel
from agent.learning_agent import LearningAgent
from orchestration.service import RuntimeService
from runtime.config import RuntimeConfig
from runtime.engines import Engine
from runtime.store import Store
from server.errors import APIError
from server.learn_jobs import LearnJobs
from server.limits import ServerLimits
from server.metrics import ServerMetrics
from server.serving import ChatService, ModelResolver

ADMIN_TOKEN_ENV = "RUNTIME_ADMIN_TOKEN"
"""Environment variable holding the admin bearer token (or `runtime serve --admin-token`)."""


@dataclass
class ServerState:
    """One app's shared objects (``app.state.runtime``).

    Attributes:
        config: the runtime configuration.
        engine: the serving engine.
        store: the interaction log.
        service: the `RuntimeService` (learning, promotion, rollback, shadow mode and its report).
        agent: a `LearningAgent` on the same engine and store; the feedback routes use its validation.
        chat: runs chat completions through the chat model (logged like agent calls).
        resolver: maps a request's ``model`` to the adapter that serves it.
        limits: request size limits.
        metrics: the app's Prometheus metrics.
        learn_jobs: learning cycles started through ``POST /admin/learn``.
        admin_token: the bearer token of ``/admin`` routes (``None``: admin routes refuse with 403).
        dashboard_requires_token: whether ``/dashboard/api`` routes need the admin token too.
        owned: what this app created and closes at shutdown.
    """

    config: RuntimeConfig
    engine: Engine
    store: Store
    service: RuntimeService
    agent: LearningAgent
    chat: ChatService
    resolver: ModelResolver
    limits: ServerLimits
    metrics: ServerMetrics
    learn_jobs: LearnJobs
    admin_token: str | None
    dashboard_requires_token: bool
    owned: ExitStack = field(default_factory=ExitStack)

    @property
    def chat_model(self) -> EngineChatModel:
        return self.chat.chat_model

    def check_admin(self, request: Request) -> None:
        """Raise 403 (no token configured) or 401 (missing/wrong token) unless the request may administer."""
        if not self.admin_token:
            raise APIError(403, f"Admin routes are disabled: no admin token is set. Set {ADMIN_TOKEN_ENV} or start "
                           "`runtime serve --admin-token TOKEN`, then send `Authorization: Bearer TOKEN`.",
                           code="admin_disabled")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.admin_token.encode()):
            raise APIError(401, "Missing or wrong admin token: send `Authorization: Bearer <token>`.",
                           code="invalid_admin_token", headers={"WWW-Authenticate": "Bearer"})


def get_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a FastAPI dependency)."""
    return request.app.state.runtime  # type: ignore[no-any-return]
