"""`runtime serve`, and the `runtime` console script: the CLI of :mod:`cli` with the serve command added."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli import app, run
from cli.common import USAGE_ERROR, ConfigOption, console, fail, load
from runtime.config import ConfigError


def serve_cmd(
    config: ConfigOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    admin_token: Annotated[
        str | None,
        typer.Option(help="Bearer token of the /admin routes (default: $RUNTIME_ADMIN_TOKEN; none: admin off)."),
    ] = None,
    dashboard_token: Annotated[
        bool | None,
        typer.Option("--dashboard-token/--no-dashboard-token",
                     help="Make the dashboard ask for the admin token (default: only when not on loopback)."),
    ] = None,
    background_learning: Annotated[
        bool, typer.Option(help="Run the scheduled learning loop in the server process.")
    ] = True,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted.")] = 1 << 20,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Most new tokens one request may ask for (default: the context).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    api_keys: Annotated[
        Path | None,
        typer.Option(help="API keys with roles for the public routes (default: $RUNTIME_API_KEYS; made with "
                     "`runtime keys add`). Without keys the chat, feedback and teach routes are open."),
    ] = None,
    allow_unauthenticated: Annotated[
        bool,
        typer.Option(help="Serve on a non-loopback address although anyone who reaches it may chat, rate, correct "
                     "and teach (every signal is training data)."),
    ] = False,
    role: Annotated[
        str,
        typer.Option(help="learner: serve, learn and own the adapter registry. replica: serve and log only (no "
                     "learning; the learner's engine.replicas loads and switches adapters here through /admin/replica, "
                     "which needs --admin-token)."),
    ] = "learner",
    grace_s: Annotated[
        float,
        typer.Option(min=0, help="On SIGTERM or Ctrl-C, how long requests in flight may finish before they are "
                     "cancelled; a second signal stops at once."),
    ] = 30.0,
) -> None:
    """Serve the OpenAI-compatible API, feedback and admin routes, and the dashboard (see docs/server.md)."""
    import os

    from rich.markup import escape

    from policies import PolicyError
    from runtime.api_keys import ApiKeysError, load_api_keys
    from runtime.models import ModelNotFoundError
    from runtime.server_file import remove_server_file, write_server_file
    from runtime.store import StoreError
    from server import ServerLimits, create_app
    from server.app import shutdown_app
    from server.http_protocol import graceful_server, uvicorn_config

    loopback = host in ("127.0.0.1", "::1", "localhost")
    keys_path = api_keys or (Path(os.environ["RUNTIME_API_KEYS"]) if os.environ.get("RUNTIME_API_KEYS") else None)
    keys = None
    if keys_path is not None:
        try:
            keys = load_api_keys(keys_path)
        except ApiKeysError as exc:
            fail(exc, USAGE_ERROR)
    if not loopback and keys is None and not allow_unauthenticated:
        fail(
            f"refusing to serve on {host}: the chat, feedback and teach routes take no credentials, so anyone who "
            "reaches this address could teach the model (corrections and taught answers are training data). "
            "Give API keys (--api-keys FILE, made with `runtime keys add`), serve on 127.0.0.1 behind an "
            "authenticating proxy, or pass --allow-unauthenticated to accept this.",
            USAGE_ERROR,
        )
    if role not in ("learner", "replica"):
        fail(f"--role must be learner or replica, not {role!r}", USAGE_ERROR)
    cfg = load(config)
    _check_port_free(host, port)
    token = admin_token or os.environ.get("RUNTIME_ADMIN_TOKEN") or None
    try:
        with console.status(f"Loading {cfg.model.name}..."):
            server_app = create_app(
                cfg, admin_token=token, limits=ServerLimits(max_body_bytes=max_body_bytes, max_tokens=max_tokens),
                dashboard_requires_token=(not loopback) if dashboard_token is None else dashboard_token,
                background_learning=background_learning, api_keys=keys, role=role,  # type: ignore[arg-type]
            )
    except (ConfigError, PolicyError, StoreError, ModelNotFoundError) as exc:
        fail(exc, USAGE_ERROR)
    shown = escape(f"[{host}]" if ":" in host else host)
    console.print(f"OpenAI API at [bold]http://{shown}:{port}/v1[/bold], dashboard at http://{shown}:{port}/dashboard")
    if token is None:
        console.print("[yellow]admin routes are off:[/yellow] set RUNTIME_ADMIN_TOKEN or pass --admin-token")
    if role == "replica":
        console.print("serving replica: logs interactions, never learns; the learner loads adapters via /admin/replica")
    write_server_file(cfg.store_path, host, port)  # how `runtime` commands find this server (runtime.server_file)
    # Removed at the app's shutdown: after a graceful stop uvicorn re-raises the signal, ending the process.
    server_app.state.runtime.owned.callback(remove_server_file, cfg.store_path)
    server = graceful_server(uvicorn_config(server_app, host=host, port=port, log_level=log_level, grace_s=grace_s))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on; the stop was graceful (as uvicorn.run)
        pass
    finally:
        remove_server_file(cfg.store_path)
        shutdown_app(server_app)  # a no-op after a graceful stop; after a forced one, uvicorn skipped it


def _check_port_free(host: str, port: int) -> None:
    """Fail at once, before the model loads, when the address is taken."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another server running there? "
                 "Choose another --port.", USAGE_ERROR)


app.command("serve")(serve_cmd)


def main() -> None:
    """Console-script entry point (``runtime``)."""
    run(app)
