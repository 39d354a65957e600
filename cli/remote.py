"""The CLI beside a running server: commands act through its admin API when it holds the store.

``runtime serve`` holds the store's lock, so a command that opened the store directly would fail. Instead
every command asks :func:`server_url` whether a server is in charge: the one named by ``--server`` (or
``RUNTIME_SERVER``), else the one whose address file sits beside the configured store
(:mod:`runtime.server_file`). When there is one, reads go through :class:`RemoteStore` (the store's read
methods, answered by ``/admin`` and turned back into the same records) and actions through
:class:`AdminClient`; the output and the exit codes are the same as with the store opened directly.

The admin token comes from ``RUNTIME_ADMIN_TOKEN`` (or an API key with the admin role in
``RUNTIME_API_KEY``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NoReturn

from runtime.config import RuntimeConfig
from runtime.server_file import read_server_file
from runtime.store.encoding import from_jsonable
from runtime.store.models import AdapterRecord, Interaction, LearningRun, PolicyDecision, Signal

__all__ = ["AdminClient", "RemoteError", "RemoteStore", "server_url"]

SERVER_ENV = "RUNTIME_SERVER"
TOKEN_ENVS = ("RUNTIME_ADMIN_TOKEN", "RUNTIME_API_KEY")


class RemoteError(Exception):
    """An admin API call that did not succeed; ``usage`` when the fault is the caller's set-up (exit 2)."""

    def __init__(self, message: str, *, status: int | None = None, usage: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.usage = usage


def server_url(cfg: RuntimeConfig, server: str | None = None) -> str | None:
    """The server to act through: ``server`` (``--server``), else ``RUNTIME_SERVER``, else the live server
    holding the configured store; ``None`` when the store is free to open."""
    given = server or os.environ.get(SERVER_ENV)
    if given:
        return given.rstrip("/")
    info = read_server_file(cfg.store_path)
    return info.url if info is not None else None


class AdminClient:
    """JSON calls to a running server's ``/admin`` routes (and ``/v1`` ones an operator uses), with the token
    from the environment. Failures raise :class:`RemoteError` with the server's own message."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        token = token or next((os.environ[e] for e in TOKEN_ENVS if os.environ.get(e)), None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._has_token = token is not None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Any:
        return self._call("POST", path, json=dict(body) if body is not None else None)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(
                f"the server at {self.url} holds the store but did not answer ({exc.__class__.__name__}: {exc}); "
                "wait until it has started, or stop it to use the store directly", usage=True,
            ) from None
        if response.is_success:
            return response.json()
        self._raise(response)

    def _raise(self, response: Any) -> NoReturn:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip()[:300] or response.reason_phrase
        status = response.status_code
        if status in (401, 403):
            hint = ("set RUNTIME_ADMIN_TOKEN to the server's admin token" if not self._has_token
                    else "check RUNTIME_ADMIN_TOKEN")
            raise RemoteError(f"the server at {self.url} refused the admin call ({status}: {message}); {hint}",
                              status=status, usage=True)
        raise RemoteError(message, status=status, usage=status == 422)


class RemoteStore:
    """The store's read methods the CLI uses, answered by a running server's admin API."""

    def __init__(self, client: AdminClient) -> None:
        self.client = client

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def adapters(self) -> list[AdapterRecord]:
        return [from_jsonable(AdapterRecord, a) for a in self.client.get("/admin/adapters")["adapters"]]

    def active_adapter(self) -> str | None:
        """What the server's engine serves now (``None``: the base model)."""
        return self.client.get("/admin/adapters")["active"]

    def get_adapter(self, name: str) -> AdapterRecord | None:
        try:
            return from_jsonable(AdapterRecord, self.client.get(f"/admin/adapters/{name}")["adapter"])
        except RemoteError as exc:
            if exc.status == 404:
                return None
            raise

    def get_run(self, run_id: str) -> LearningRun | None:
        try:
            return from_jsonable(LearningRun, self.client.get(f"/admin/runs/{run_id}"))
        except RemoteError as exc:
            if exc.status == 404:
                return None
            raise

    def decisions(self, limit: int | None = None, *, adapter: str | None = None) -> list[PolicyDecision]:
        rows = self.client.get("/admin/decisions", limit=limit or 1000, adapter=adapter)["decisions"]
        return [from_jsonable(PolicyDecision, d) for d in rows]

    def recent_interactions(self, limit: int = 20) -> list[Interaction]:
        rows = self.client.get("/admin/interactions", limit=limit)["interactions"]
        return [from_jsonable(Interaction, r) for r in rows]

    def signals(self, *, state: str | None = None) -> list[Signal]:
        rows = self.client.get("/admin/signals", limit=10_000, state=state)["signals"]
        return [from_jsonable(Signal, s) for s in rows]
