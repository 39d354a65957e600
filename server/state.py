"""What the routes share: the engine, the store, the chat model, the `RuntimeService`, settings."""

from __future__ import annotations

import secrets
from contextlib import ExitStack
from dataclasses import dataclass, field

from fastapi import Request

from agent.chat_model import EngineChatModel
from agent.learning_agent import LearningAgent
from orchestration.service import RuntimeService
from runtime.api_keys import ApiKeys, Role
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
        admin_token: the bearer token of ``/admin`` routes (``None``: admin routes refuse with 403 unless an API
            key with the ``admin`` role is presented).
        api_keys: the API keys of the public routes (``None``: those routes are open, signals have no principal).
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
    shut_down: bool = False
    """Whether the app's shutdown ran (it runs once)."""
    api_keys: ApiKeys | None = None

    @property
    def chat_model(self) -> EngineChatModel:
        return self.chat.chat_model

    def check_admin(self, request: Request) -> None:
        """Raise 403 (no token configured) or 401 (missing/wrong token) unless the request may administer: the
        admin token, or an API key with the ``admin`` role."""
        given = _bearer(request)
        if self.api_keys is not None and given is not None:
            key = self.api_keys.authenticate(given)
            if key is not None and "admin" in key.roles:
                return
        if not self.admin_token:
            raise APIError(403, f"Admin routes are disabled: no admin token is set. Set {ADMIN_TOKEN_ENV} or start "
                           "`runtime serve --admin-token TOKEN`, then send `Authorization: Bearer TOKEN`.",
                           code="admin_disabled")
        if given is None or not secrets.compare_digest(given.encode(), self.admin_token.encode()):
            raise APIError(401, "Missing or wrong admin token: send `Authorization: Bearer <token>`.",
                           code="invalid_admin_token", headers={"WWW-Authenticate": "Bearer"})

    def admin_principal(self, request: Request) -> str:
        """Who is administering: the principal of an admin API key, else ``admin`` (the admin token)."""
        given = _bearer(request)
        key = self.api_keys.authenticate(given) if self.api_keys is not None and given is not None else None
        return key.principal if key is not None else "admin"

    def principal_for(self, request: Request, role: Role) -> str | None:
        """The principal of the request's API key, which must have `role` (401 without a valid key, 403 without
        the role); ``None`` when the server has no API keys (open routes)."""
        if self.api_keys is None:
            return None
        given = _bearer(request)
        key = self.api_keys.authenticate(given) if given is not None else None
        if key is None:
            raise APIError(401, "Missing or unknown API key: send `Authorization: Bearer <key>` (keys are made with "
                           "`runtime keys add`).", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if role not in key.roles:
            raise APIError(403, f"The key of {key.principal!r} does not have the {role!r} role (it has "
                           f"{', '.join(key.roles)}).", code="missing_role")
        return key.principal


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def get_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a FastAPI dependency)."""
    return request.app.state.runtime  # type: ignore[no-any-return]
