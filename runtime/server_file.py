"""The running server's address, kept beside the store it holds, so that the CLI can find it.

``runtime serve`` holds the store's lock for as long as it runs, so a second process cannot open the store.
The server writes ``<store>.server.json`` (its URL and process id) when it starts and removes it when it
stops; the CLI reads it and acts through the server's admin API instead of opening the store. The file holds
no secret: the admin token comes from the environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["ServerInfo", "read_server_file", "remove_server_file", "server_file", "write_server_file"]


@dataclass(frozen=True)
class ServerInfo:
    """Where a running ``runtime serve`` answers, and which process it is."""

    url: str
    pid: int


def server_file(store_path: Path) -> Path:
    """The file that names the server holding ``store_path``."""
    return store_path.with_name(store_path.name + ".server.json")


def _connectable_host(host: str) -> str:
    """An address a local client can reach for a server bound to ``host`` (a wildcard means loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def write_server_file(store_path: Path, host: str, port: int) -> ServerInfo:
    """Record that this process serves ``store_path`` on ``host:port`` (written atomically)."""
    info = ServerInfo(url=f"http://{_connectable_host(host)}:{port}", pid=os.getpid())
    path = server_file(store_path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(info)) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return info


def remove_server_file(store_path: Path) -> None:
    """Remove the file if this process wrote it (a newer server's file is left alone)."""
    path = server_file(store_path)
    info = read_server_file(store_path, live_only=False)
    if info is not None and info.pid == os.getpid():
        path.unlink(missing_ok=True)


def read_server_file(store_path: Path, *, live_only: bool = True) -> ServerInfo | None:
    """The server holding ``store_path``, or ``None`` when there is none (no file, an unreadable one, or, with
    ``live_only``, one whose process has exited)."""
    try:
        data = json.loads(server_file(store_path).read_text(encoding="utf-8"))
        info = ServerInfo(url=str(data["url"]), pid=int(data["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if live_only and not _alive(info.pid):
        return None
    return info


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
