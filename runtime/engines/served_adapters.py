"""The adapters an HTTP engine has on its server: engine names, server names, revisions and the active one.

An adapter is known to the engine by the name callers use and to the server by a *server name*. The two are
equal until the adapter is reloaded by swapping (:func:`load_next_revision`): the new weights are then
loaded under ``<name>@r<revision>`` and requests switch to that name, so the suffix ``@r<number>`` is
reserved. No HTTP here: the engine does the server calls and records their outcome in an
:class:`AdapterTable`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from runtime.engines.base import AdapterChoice, selected_adapter
from runtime.engines.errors import AdapterLoadError, UnknownAdapterError
from runtime.engines.http_errors import ServerAdapterExistsError

__all__ = [
    "AdapterTable",
    "RequestTarget",
    "ServedAdapter",
    "check_adapter_name",
    "load_next_revision",
    "revision_name",
    "split_revision",
]

log = logging.getLogger(__name__)

_REVISION = re.compile(r"^(?P<name>.+)@r(?P<revision>\d+)$")
_REVISIONS_TRIED = 20


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter the engine knows: the path the server loaded it from and the name the server uses."""

    path: str
    server_name: str
    revision: int = 0


@dataclass(frozen=True)
class RequestTarget:
    """What serves one request: the engine's adapter name and the server's (both ``None`` for the base).

    ``server_default`` (a follower of a runtime replica): the request names no model, and the server answers with
    its own active adapter, which it reports.
    """

    name: str | None
    server_name: str | None
    server_default: bool = False


def revision_name(name: str, revision: int) -> str:
    """The server name of revision ``revision`` of adapter ``name`` (``<name>@r<revision>``)."""
    return f"{name}@r{revision}"


def split_revision(server_name: str) -> tuple[str, int]:
    """The engine name and revision a server name stands for (revision 0 when it has no ``@r<n>`` suffix)."""
    match = _REVISION.match(server_name)
    return (match["name"], int(match["revision"])) if match else (server_name, 0)


def load_next_revision(
    name: str, path: str, current: ServedAdapter, load: Callable[[str], None], *, server_kind: str, unload_route: str
) -> ServedAdapter:
    """Load the weights in ``path`` under the first free server name after ``current``'s revision.

    ``load(server_name)`` does the loading; a name the server already has (a revision left there by an
    earlier process, which stays there) is skipped. Returns the entry of the loaded revision.

    Raises:
        AdapterLoadError: ``load`` failed, or the next revisions are all taken (the message names
            ``unload_route`` as the way to free them). ``server_kind`` names the server in the log.
    """
    for revision in range(current.revision + 1, current.revision + _REVISIONS_TRIED + 1):
        server_name = revision_name(name, revision)
        try:
            load(server_name)
        except ServerAdapterExistsError:
            log.warning("The %s server already has %r; trying the next revision", server_kind, server_name)
            continue
        return ServedAdapter(path, server_name, revision)
    raise AdapterLoadError(
        f"Could not reload adapter {name!r}: the server already has revisions {current.revision + 1} to "
        f"{current.revision + _REVISIONS_TRIED} of it loaded. Unload them on the server (POST {unload_route}) "
        f"or restart it."
    )


def check_adapter_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` can name an adapter on a server.

    ``:`` separates the base model from the adapter in SGLang's ``model`` field, and the ``@r<n>`` suffix is
    reserved for reloads.
    """
    if not isinstance(name, str) or not name or name != name.strip() or ":" in name or _REVISION.match(name):
        raise ValueError(
            f"Invalid adapter name {name!r}: use a non-empty name without ':', surrounding spaces or an "
            f"'@r<number>' suffix (reserved for reloads)."
        )


class AdapterTable:
    """The engine's adapters (engine name -> :class:`ServedAdapter`, in load order) and the active one.

    Not thread-safe: the engine holds its lock around every call.
    """

    def __init__(self) -> None:
        self._served: dict[str, ServedAdapter] = {}
        self.active: str | None = None
        """The default adapter for requests (``None`` = the base model)."""

    def names(self) -> list[str]:
        """Adapter names, in load order."""
        return list(self._served)

    def get(self, name: str) -> ServedAdapter | None:
        """The entry of ``name``, or ``None`` when it is not loaded."""
        return self._served.get(name)

    def require(self, name: str) -> ServedAdapter:
        """The entry of ``name``; :class:`UnknownAdapterError` when it is not loaded."""
        served = self._served.get(name)
        if served is None:
            raise UnknownAdapterError(name, self.names())
        return served

    def put(self, name: str, served: ServedAdapter, *, activate: bool = False) -> None:
        """Record ``name`` as served by ``served`` (a new name goes last; a known one keeps its place)."""
        self._served[name] = served
        if activate:
            self.active = name

    def remove(self, name: str) -> None:
        """Forget ``name``; if it was active, the base model becomes active."""
        del self._served[name]
        if self.active == name:
            self.active = None

    def set_active(self, name: str | None) -> None:
        """Make ``name`` (or the base model, for ``None``) the default; it must be loaded."""
        if name is not None:
            self.require(name)
        self.active = name

    def target(self, adapter: AdapterChoice) -> RequestTarget:
        """What serves a request that chose ``adapter`` (:data:`~runtime.engines.base.ACTIVE` is resolved
        to the active adapter now)."""
        name = selected_adapter(adapter, self.active)
        if name is None:
            return RequestTarget(None, None)
        return RequestTarget(name, self.require(name).server_name)

    def adopt(self, server_name: str, path: str) -> None:
        """Take over an adapter the server already has (listed in ``/v1/models``): ``<name>@r<n>`` is adopted
        as ``name``, and of several revisions of one name the latest wins."""
        name, revision = split_revision(server_name)
        current = self._served.get(name)
        if current is None or revision > current.revision:
            self._served[name] = ServedAdapter(path, server_name, revision)
