"""Process-wide bookkeeping of open writable stores.

It refuses a second writable :class:`~runtime.store.store.Store` on the same file in one process (DuckDB
would silently share the database, giving two writer threads), and closes, at interpreter exit, every
store the application forgot to close, so acknowledged writes are committed on a clean shutdown.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Protocol

from runtime.store.errors import StoreLockedError

logger = logging.getLogger("runtime.store")


class Closable(Protocol):
    """What the registry needs from a store."""

    def close(self) -> None: ...


_lock = threading.Lock()
_open: dict[str, Closable] = {}


def claim(key: str, store: Closable) -> None:
    """Record ``store`` as the writer of the file ``key`` (a resolved path), or raise if one is open."""
    with _lock:
        if key in _open:
            raise StoreLockedError(
                f"store {key} is already open for writing in this process; share that Store object "
                "(one writer per file) instead of opening a second one"
            )
        _open[key] = store


def release(key: str, store: Closable) -> None:
    """Forget ``store`` (called by its ``close``)."""
    with _lock:
        if _open.get(key) is store:
            del _open[key]


def close_all() -> None:
    """Close every still-open store; errors are logged, not raised (runs at exit)."""
    with _lock:
        stores = list(_open.values())
    for store in stores:
        try:
            store.close()
        except Exception:
            logger.exception("closing store at exit failed")


atexit.register(close_all)
