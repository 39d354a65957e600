"""The serving-only role (``runtime serve --role replica``) and its adapter routes under ``/admin/replica``.

A replica serves and logs interactions (its DuckDB file is a local spool) but never learns: no learning loop
runs, and the learning routes (learn, promote, rollback, signal review) answer 409 saying to use the learner.
The learner's :class:`~runtime.engines.replica_set.ReplicaSet` drives its adapters through these routes, behind
the admin token::

    GET    /admin/replica                    role, base model, active adapter, loaded adapters (with checksums)
    PUT    /admin/replica/adapters/{name}    {"location", "checksum", "activate"}: fetch, verify, then (re)load
    DELETE /admin/replica/adapters/{name}
    PUT    /admin/replica/active             {"name": "<adapter>" | null}: the default adapter; the replica is in step
    DELETE /admin/replica/active             out of step: requests that do not name a model are refused

A replica is *in step* once a learner has set its default adapter (``PUT /admin/replica/active``, or a load with
``activate``). Until then (a fresh or restarted process, whose engine has no adapters yet) and after the learner
takes it out of step (``DELETE /admin/replica/active``: it missed a promotion), a request that does not name a
model, i.e. one that asks for the active adapter, is answered 503 ``replica_not_in_step`` with ``Retry-After``, so that
no process following the fleet's promotions (``engine.follow_replicas``) is served a stale default. Requests
that name a model (the learner always names one) are served as usual.

The checksum is verified (:func:`runtime.adapters.fetch_adapter`) before anything is loaded; a mismatch answers
409 ``adapter_verification_failed`` and changes nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from runtime.adapters import AdapterVerificationError, fetch_adapter
from runtime.engines import ACTIVE, AdapterChoice, AdapterLoadError, UnknownAdapterError
from server.errors import APIError
from server.schemas import RequestBody
from server.state import ServerState, get_state

__all__ = [
    "ReplicaAdapters", "ServerRole", "refuse_on_replica", "refuse_default_out_of_step", "router", "server_role",
    "set_role",
]

ServerRole = Literal["learner", "replica"]
"""``learner``: serves, learns and owns the adapter registry (the default); ``replica``: serves and logs only."""

_CHECKSUM = r"^[0-9a-f]{64}$"


@dataclass
class _Loaded:
    location: str
    checksum: str


class ReplicaAdapters:
    """The adapters a replica loaded through ``PUT /admin/replica/adapters/{name}``: where from, which checksum.
    Loads, unloads and switches run one at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded: dict[str, _Loaded] = {}
        self.in_step = False
        """Whether a learner has set the default adapter (and not taken the replica out of step since)."""


def set_role(app: FastAPI, role: ServerRole) -> None:
    """Record the app's role (``create_app`` calls it)."""
    app.state.role = role
    app.state.replica_adapters = ReplicaAdapters()


def server_role(request: Request) -> ServerRole:
    """The role of the app serving ``request``."""
    return getattr(request.app.state, "role", "learner")  # type: ignore[no-any-return]


def refuse_on_replica(request: Request) -> None:
    """A dependency of the learning routes: 409 on a replica, which never learns."""
    if server_role(request) == "replica":
        raise APIError(
            409, "This server runs as a serving replica (`runtime serve --role replica`): it logs interactions but "
            "never learns, promotes or rolls back. Send this to the learner, which promotes on every replica.",
            code="replica_role",
        )


def refuse_default_out_of_step(request: Request, adapter: AdapterChoice) -> None:
    """503 for a request that asks a replica for its default (the active adapter) while it is out of step."""
    if adapter is not ACTIVE or server_role(request) != "replica" or request.app.state.replica_adapters.in_step:
        return
    raise APIError(
        503, "This replica is not in step with the learner yet (just started, or it missed a promotion): it serves "
        "the fleet's active adapter once the learner has set it (PUT /admin/replica/active). Retry on another "
        "replica, or name a model explicitly.", code="replica_not_in_step", headers={"Retry-After": "1"},
    )


def _require_replica(request: Request) -> ReplicaAdapters:
    if server_role(request) != "replica":
        raise APIError(
            409, "The /admin/replica routes exist on `runtime serve --role replica` servers only; this server learns "
            "and owns its registry: promote with POST /admin/adapters/{name}/promote.", code="not_a_replica",
        )
    return request.app.state.replica_adapters  # type: ignore[no-any-return]


def _admin_only(request: Request, state: ServerState = Depends(get_state)) -> None:
    state.check_admin(request)


router = APIRouter(prefix="/admin/replica", tags=["replica"], dependencies=[Depends(_admin_only)])


class AdapterLoadRequest(RequestBody):
    """``PUT /admin/replica/adapters/{name}``."""

    model_config = ConfigDict(extra="forbid")

    location: str = Field(min_length=1, max_length=4096,
                          description="The adapter directory: a path on this machine or an fsspec URL.")
    checksum: str = Field(pattern=_CHECKSUM, description="The registry's SHA-256 of the adapter's files.")
    activate: bool = Field(False, description="Also make it this replica's default adapter.")


class ActiveRequest(RequestBody):
    """``PUT /admin/replica/active``."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(description="A loaded adapter, or null for the base model.")


def _info(state: ServerState, adapters: ReplicaAdapters) -> dict[str, Any]:
    loaded = state.engine.list_adapters()
    return {
        "role": "replica",
        "model": state.resolver.base_id,
        "active": state.engine.active_adapter,
        "in_step": adapters.in_step,
        "adapters": [{"name": n, "location": adapters.loaded[n].location if n in adapters.loaded else None,
                      "checksum": adapters.loaded[n].checksum if n in adapters.loaded else None} for n in loaded],
    }


@router.get("")
async def replica_info(request: Request, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """What this replica serves: the base model, the active adapter and the loaded adapters."""
    adapters = _require_replica(request)
    return await run_in_threadpool(_info, state, adapters)


@router.put("/adapters/{name}")
async def load_adapter(name: str, body: AdapterLoadRequest, request: Request,
                       state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Fetch the adapter at ``location``, verify it against ``checksum``, then load it as ``name`` (a loaded
    ``name`` gets the new weights atomically). Nothing changes when the files do not match."""
    adapters = _require_replica(request)

    def load() -> dict[str, Any]:
        with adapters.lock:
            try:
                local = fetch_adapter(body.location, body.checksum, state.service.registry.cache_dir)
                state.engine.load_adapter(name, local, activate=body.activate, replace=state.engine.has_adapter(name))
            except AdapterVerificationError as exc:
                raise APIError(409, f"Adapter {name!r} refused: {exc}", code="adapter_verification_failed") from None
            except AdapterLoadError as exc:
                raise APIError(422, f"Adapter {name!r} could not be loaded: {exc}",
                               code="adapter_load_failed") from None
            except ValueError as exc:  # an invalid name, or a URL protocol without its fsspec package
                raise APIError(400, str(exc), code="invalid_value") from None
            adapters.loaded[name] = _Loaded(body.location, body.checksum)
            if body.activate:
                adapters.in_step = True
            return _info(state, adapters)

    return await run_in_threadpool(load)


@router.delete("/adapters/{name}")
async def unload_adapter(name: str, request: Request, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Unload ``name``; if it was active, the base model becomes active."""
    adapters = _require_replica(request)

    def unload() -> dict[str, Any]:
        with adapters.lock:
            try:
                state.engine.unload_adapter(name)
            except (UnknownAdapterError, KeyError):
                raise APIError(404, f"No adapter {name!r} is loaded here.", code="not_found") from None
            adapters.loaded.pop(name, None)
            return _info(state, adapters)

    return await run_in_threadpool(unload)


@router.put("/active")
async def set_active(body: ActiveRequest, request: Request, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Make a loaded adapter (or the base model, ``null``) the default for requests that do not name one."""
    adapters = _require_replica(request)

    def switch() -> dict[str, Any]:
        with adapters.lock:
            try:
                state.engine.set_active_adapter(body.name)
            except (UnknownAdapterError, KeyError):
                raise APIError(404, f"No adapter {body.name!r} is loaded here; load it first.", code="not_found") \
                    from None
            adapters.in_step = True
            return _info(state, adapters)

    return await run_in_threadpool(switch)


@router.delete("/active")
async def leave_step(request: Request, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Take this replica out of step (the learner does when it missed a promotion): requests for the default
    adapter are refused with 503 until ``PUT /admin/replica/active`` sets it again."""
    adapters = _require_replica(request)

    def leave() -> dict[str, Any]:
        with adapters.lock:
            adapters.in_step = False
            return _info(state, adapters)

    return await run_in_threadpool(leave)
