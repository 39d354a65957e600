"""`RuntimeReplicaEngine`: the engine interface on a ``runtime serve --role replica`` server.

A runtime replica speaks the OpenAI chat API (``POST /v1/chat/completions``, streaming too, ``GET /v1/models``;
an adapter is chosen by the ``model`` field) and, behind its admin token, the replica adapter routes
(``server/replica_routes.py``)::

    GET    /admin/replica                    {"role", "model", "active", "adapters": [{"name", "location", "checksum"}]}
    PUT    /admin/replica/adapters/{name}    {"location", "checksum", "activate"}: fetch, verify, (re)load
    DELETE /admin/replica/adapters/{name}
    PUT    /admin/replica/active             {"name": "<adapter>" | null}: the default; the replica is then in step
    DELETE /admin/replica/active             out of step: requests for the default are refused (503)

The replica verifies the checksum before it loads anything, so this client always sends one: the one it is
given (:meth:`RuntimeReplicaEngine.load_verified`, with the registry's checksum) or the one ``checksum_of`` reads
for a path (:meth:`RuntimeReplicaEngine.load_adapter`). It never learns and has no prompt log-probs, so
:meth:`score`, :meth:`count_tokens` and :meth:`generate` raise :class:`UnsupportedOperationError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.engines.base import ACTIVE, AdapterChoice, AdapterChoices, Generation, SamplingParams
from runtime.engines.errors import AdapterLoadError, EngineError
from runtime.engines.http_errors import ServerError, UnsupportedOperationError
from runtime.engines.openai_http import OpenAIHTTPEngine
from runtime.engines.openai_protocol import response_code, response_message, route_missing, server_path
from runtime.engines.served_adapters import RequestTarget, ServedAdapter

__all__ = ["ChecksumOf", "FollowerError", "ReplicaNotInStepError", "RuntimeReplicaEngine"]

log = logging.getLogger(__name__)

ChecksumOf = Callable[[str], str | None]
"""The checksum of the adapter at a path (``None`` when it cannot tell, e.g. for a URL)."""

REPLICA_ROUTE = "/admin/replica"
FOLLOWED_DEFAULT = RequestTarget(None, None, server_default=True)
"""A follower's request for the active adapter: ``model: "default"``, answered by the replica's own default."""


class ReplicaNotInStepError(EngineError):
    """The replica has no default set by a learner yet (or was taken out of step): a follower's request for the
    active adapter was refused (503 ``replica_not_in_step``); another replica may serve it."""


class FollowerError(EngineError):
    """An adapter change asked of an engine that follows the learner's promotions (``engine.follow_replicas``)."""


def follower_refusal(what: str) -> FollowerError:
    """The error for an adapter change (``what``) on a following engine."""
    return FollowerError(
        f"Cannot {what}: this engine follows the fleet's learner (engine.follow_replicas: true), which loads, "
        "promotes and rolls back adapters on the replicas. Do it on the learner (runtime adapters promote, or "
        "POST /admin/adapters/{name}/promote there)."
    )


class RuntimeReplicaEngine(OpenAIHTTPEngine):
    """A ``runtime serve --role replica`` server as an :class:`~runtime.engines.base.Engine` (chat and streaming;
    arguments as :class:`~runtime.engines.openai_http.OpenAIHTTPEngine`, plus ``checksum_of``).

    Args:
        api_key: the replica's admin token (``--admin-token``), or an API key with the ``chat`` and ``admin``
            roles: the adapter routes are admin routes.
        checksum_of: the checksum of a local adapter directory, used by :meth:`load_adapter` (the factory passes
            the registry's); without it, only :meth:`load_verified` can load adapters.
        follow: follow the learner instead of choosing adapters: a request for the active adapter names no model
            and is served by the replica's default, which the learner sets (and reports in
            :attr:`Generation.adapter`); adapter changes raise :class:`FollowerError`. A replica that is not in step
            refuses such requests (:class:`ReplicaNotInStepError`).

    Every answer names the adapter that served it (the ``adapter`` field of the runtime's responses); an answer
    from another adapter than the one asked for raises :class:`ServerError` rather than being returned.
    """

    server_kind = "runtime replica"
    start_hint = "runtime serve --role replica --port 8001 --admin-token TOKEN (see docs/replicas.md)"

    def __init__(self, base_url: str, model: str | None = None, *, checksum_of: ChecksumOf | None = None,
                 follow: bool = False, **kwargs: Any) -> None:
        self._checksum_of = checksum_of
        self.follow = follow
        self.last_served: str | None = None
        """A follower's latest answer's adapter (``None``: the base model, or nothing answered yet)."""
        super().__init__(base_url, model, **kwargs)

    # -- requests ---------------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[str], params: SamplingParams | None = None, adapter: AdapterChoices = ACTIVE
    ) -> list[Generation]:
        """Not offered: a runtime replica serves chat completions only (use :meth:`chat`)."""
        raise UnsupportedOperationError(
            f"The runtime replica at {self.base_url} serves chat completions only, not raw-prompt completions: "
            "use chat(), or a vLLM/SGLang replica for generate()."
        )

    def _model_field(self, target: RequestTarget) -> str:
        if target.server_default:
            return "default"
        return target.server_name or self.model_name

    def _target(self, adapter: AdapterChoice) -> RequestTarget:
        if self.follow and adapter is ACTIVE:
            return FOLLOWED_DEFAULT
        return super()._target(adapter)

    def _served_adapter(self, answer: Mapping[str, Any], target: RequestTarget) -> str | None:
        served = answer.get("adapter", target.server_name)
        if target.server_default:
            self.last_served = served if isinstance(served, str) else None
            return self.last_served
        if served != target.server_name:
            raise ServerError(
                f"The runtime replica at {self.base_url} answered with adapter {served!r} although "
                f"{target.server_name!r} was asked for; the answer was discarded. Check what loads adapters there."
            )
        return target.name

    def _prompt_logprobs(self, token_ids: list[int], target: RequestTarget) -> list[float | None]:
        raise UnsupportedOperationError(
            f"The runtime replica at {self.base_url} does not serve prompt log-probs: score on the learner's "
            "TransformersEngine, or on a vLLM/SGLang replica."
        )

    def _request_error(
        self, response: Any, method: str, path: str, target: RequestTarget, max_new_tokens: int
    ) -> EngineError:
        if response.status_code == 503 and response_code(response) == "replica_not_in_step":
            return ReplicaNotInStepError(f"{self.base_url}: {response_message(response)}")
        return super()._request_error(response, method, path, target, max_new_tokens)

    # -- adapters ---------------------------------------------------------------------------------------
    def load_adapter(
        self, name: str, path: str | Path, *, activate: bool = False, replace: bool = False
    ) -> None:
        """Have the replica load the adapter at ``path`` (a path its machine can read, or an fsspec URL), with
        the checksum ``checksum_of`` gives for it; see :meth:`load_verified`."""
        location = str(path) if "://" in str(path) else server_path(path)
        checksum = self._checksum_of(location) if self._checksum_of is not None else None
        if checksum is None:
            raise AdapterLoadError(
                f"Cannot load adapter {name!r} on the runtime replica at {self.base_url}: no checksum for "
                f"{location} (the replica verifies one before loading). Use load_verified(name, location, "
                "checksum) with the registry's checksum."
            )
        self.load_verified(name, location, checksum, activate=activate, replace=replace)

    def load_verified(
        self, name: str, location: str, checksum: str, *, activate: bool = False, replace: bool = False
    ) -> None:
        """Have the replica fetch the adapter at ``location``, verify it against ``checksum`` and load it as
        ``name`` (with ``replace``, a loaded ``name`` gets the new weights atomically).

        Raises:
            AdapterExistsError: ``name`` is loaded and ``replace`` is false.
            AdapterLoadError: the replica refused (checksum mismatch, missing files, weights that do not load)
                or could not be reached (then ``__cause__`` is the transport error); nothing changed.
        """
        if self.follow:
            raise follower_refusal(f"load adapter {name!r}")
        with self._admin:
            self._current_for_load(name, replace)
            route = f"{REPLICA_ROUTE}/adapters/{name}"
            body = {"location": location, "checksum": checksum, "activate": activate}
            try:
                response = self._send("PUT", route, body)
            except EngineError as exc:
                raise AdapterLoadError(f"Could not load adapter {name!r} from {location}: {exc}") from exc
            if response.is_error:
                raise AdapterLoadError(
                    f"The runtime replica at {self.base_url} refused adapter {name!r} from {location} "
                    f"(HTTP {response.status_code}): {response_message(response)}. Nothing changed there."
                    + self._route_hint(response)
                )
            with self._lock:
                self._table.put(name, ServedAdapter(location, name), activate=activate)

    def unload_adapter(self, name: str) -> None:
        """Unload ``name`` on the replica; if it was active, the base model becomes active."""
        if self.follow:
            raise follower_refusal(f"unload adapter {name!r}")
        with self._admin:
            with self._lock:
                self._check_open()
                self._table.require(name)
            route = f"{REPLICA_ROUTE}/adapters/{name}"
            response = self._send("DELETE", route)
            if response.is_error and response.status_code != 404:
                raise self._http_error(response, "DELETE", route)
            with self._lock:
                self._table.remove(name)

    def set_active_adapter(self, name: str | None) -> None:
        """Make ``name`` (``None``: the base model) the replica's default for requests that do not name one; the
        replica is then in step (see ``server/replica_routes.py``)."""
        if self.follow:
            raise follower_refusal(f"switch the active adapter to {name!r}")
        with self._admin:
            with self._lock:
                self._check_open()
                if name is not None:
                    self._table.require(name)
            route = f"{REPLICA_ROUTE}/active"
            response = self._send("PUT", route, {"name": name})
            if response.is_error:
                raise self._http_error(response, "PUT", route)
            with self._lock:
                self._table.set_active(name)

    def leave_step(self) -> None:
        """Take the replica out of step (it missed a promotion): it refuses requests for its default adapter
        until :meth:`set_active_adapter` sets it again, so that followers are not served a stale default."""
        if self.follow:
            raise follower_refusal("take a replica out of step")
        response = self._send("DELETE", f"{REPLICA_ROUTE}/active")
        if response.is_error:
            raise self._http_error(response, "DELETE", f"{REPLICA_ROUTE}/active")

    @property
    def active_adapter(self) -> str | None:
        """The active adapter; for a follower, the one the replica last said it served."""
        return self.last_served if self.follow else super().active_adapter

    def replica_info(self) -> dict[str, Any]:
        """What ``GET /admin/replica`` says: the role, the base model, the active adapter, the loaded adapters."""
        response = self._send("GET", REPLICA_ROUTE)
        if response.is_error:
            raise EngineError(
                f"{self.base_url} answered GET {REPLICA_ROUTE} with HTTP {response.status_code}: "
                f"{response_message(response)}." + self._route_hint(response)
            )
        data = self._json(response, REPLICA_ROUTE)
        if not isinstance(data, dict):
            raise ServerError(f"{self.base_url}: unexpected answer to GET {REPLICA_ROUTE}: {str(data)[:300]}")
        return data

    def _discover(self, model: str | None) -> str:
        card, _listed = self._server.base_model(model)
        info = self.replica_info()
        for adapter in info.get("adapters") or ():
            name = str(adapter["name"])
            self._table.put(name, ServedAdapter(str(adapter.get("location") or ""), name))
        active = info.get("active")
        if active is not None and self._table.get(active) is not None:
            self._table.active = active
        if self.follow:
            self.last_served = active if isinstance(active, str) else None
        return str(card["id"])

    def _route_hint(self, response: Any) -> str:
        if route_missing(response):
            return f" Is {self.base_url} a `runtime serve --role replica` server? Start one with: {self.start_hint}"
        if response.status_code in (401, 403):
            return " Give the replica's admin token as the endpoint's api_key."
        return ""
