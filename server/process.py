"""`runtime serve` as a child process: start it on a free loopback port, wait for ``/healthz``, stop it.

Shared by the scripts that drive the real server from outside (``benchmarks/server_load.py``,
``examples/serve_and_learn.py``)::

    port = free_port()
    proc = start_server(config_path, port, log_path, admin_token="s3cret")
    try:
        health = wait_ready(f"http://127.0.0.1:{port}", proc, log_path, timeout_s=900)
        ...
    finally:
        stop_server(proc)

The server's stdout and stderr go to ``log_path``; errors quote its tail. The admin token travels in the
child's environment (``RUNTIME_ADMIN_TOKEN``), not on its command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
"""The checkout the child runs in (``python -m server`` imports the packages from here)."""

ADMIN_TOKEN_ENV = "RUNTIME_ADMIN_TOKEN"


class ServerStartError(RuntimeError):
    """`runtime serve` exited, or did not answer ``/healthz``, while starting; the message has its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_server(
    config_path: Path,
    port: int,
    log_path: Path,
    *,
    admin_token: str | None = None,
    host: str = "127.0.0.1",
    background_learning: bool = False,
    log_level: str = "warning",
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m server serve`` with this interpreter; returns at once (see :func:`wait_ready`).

    Args:
        config_path: the runtime.yaml the server loads.
        port, host: where it listens.
        log_path: receives the server's stdout and stderr (created or truncated).
        admin_token: bearer token of ``/admin`` (passed as ``$RUNTIME_ADMIN_TOKEN``); ``None``: admin off.
        background_learning: run the policy's scheduled learning loop in the server (``runtime serve``'s
            default is on; off keeps a measurement free of cycles nobody asked for).
        log_level: uvicorn's.
        env: extra environment variables for the child.
        extra_args: more ``runtime serve`` options (e.g. ``["--max-tokens", "16"]``).
    """
    child_env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    child_env.pop(ADMIN_TOKEN_ENV, None)
    if admin_token:
        child_env[ADMIN_TOKEN_ENV] = admin_token
    command = [
        sys.executable, "-m", "server", "serve", "--config", str(config_path), "--host", host,
        "--port", str(port), "--log-level", log_level,
        "--background-learning" if background_learning else "--no-background-learning", *(extra_args or []),
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT)


def log_tail(log_path: Path, chars: int = 3000) -> str:
    """The last `chars` characters of the server log (empty if it cannot be read)."""
    try:
        return log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Poll ``GET {url}/healthz`` until it answers 200; returns its JSON.

    Raises:
        ServerStartError: the process exited, or no 200 came within `timeout_s` (the model may be loading
            slowly: raise the timeout); the message quotes the log's tail.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"runtime serve exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            response = httpx.get(url + "/healthz", timeout=5)
            if response.status_code == 200:
                return dict(response.json())
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServerStartError(f"runtime serve was not ready within {timeout_s:.0f}s:\n{log_tail(log_path)}")


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """Stop the server gracefully (SIGINT: uvicorn's shutdown runs the lifespan, which flushes the store and
    closes the service), killing it only if it has not exited after `timeout_s`; returns its exit code
    (negative: the signal that ended it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)
