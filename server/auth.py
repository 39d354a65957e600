"""Who is calling: the API-key role each public route needs, and the per-principal rate limit on signals.

With API keys (``runtime serve --api-keys FILE``) every public route needs a key with its role (``chat``,
``feedback`` or ``teach``; see :mod:`runtime.api_keys`) and the signals it sends are recorded under the key's
principal. Without keys the routes are open and signals have no principal. The policy's
``signals.rate_limit_per_hour`` caps what one principal may send (429, with ``Retry-After``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from runtime.api_keys import Role
from server.errors import APIError
from server.state import ServerState, get_state

__all__ = ["require_role", "require_signal_role"]

RATE_WINDOW = timedelta(hours=1)


def require_role(role: Role) -> Callable[..., str | None]:
    """A dependency: the request's principal, whose key must have `role` (``None`` on an open server)."""

    def dependency(request: Request, state: ServerState = Depends(get_state)) -> str | None:
        return state.principal_for(request, role)

    return dependency


def require_signal_role(role: Role) -> Callable[..., object]:
    """As :func:`require_role`, for routes that store a signal: also the principal's hourly rate limit."""

    async def dependency(request: Request, state: ServerState = Depends(get_state)) -> str | None:
        principal = state.principal_for(request, role)
        limit = state.service.policy.signals.rate_limit_per_hour
        if principal is not None and limit is not None:
            since = datetime.now(UTC) - RATE_WINDOW
            sent = await run_in_threadpool(_count, state, principal, since)
            if sent >= limit:
                raise APIError(429, f"{principal!r} sent {sent} signals in the last hour; the policy allows "
                               f"{limit} (signals.rate_limit_per_hour). Try again later.", code="rate_limited",
                               headers={"Retry-After": "600"})
        return principal

    return dependency


def _count(state: ServerState, principal: str, since: datetime) -> int:
    return state.store.count_recent_signals(principal, since)  # reads wait for queued writes: acknowledged ones count
