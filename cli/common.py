"""What every command shares: the consoles, the common options, one way to fail, and the runtime's parts as
context managers (a store or a service is always closed, whatever the command does)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from learners.config import load_config
from runtime.config import ConfigError, RuntimeConfig
from runtime.store.encoding import jsonable

if TYPE_CHECKING:
    from cli.remote import AdminClient, RemoteStore
    from orchestration.service import RuntimeService
    from runtime.store import Store

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="runtime.yaml (default: ./runtime.yaml if present, else defaults)."),
]
PolicyOption = Annotated[
    Path | None, typer.Option("--policy", "-p", help="Policy YAML (default: the config's `policy`).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ServerOption = Annotated[
    str | None,
    typer.Option("--server", help="Act through this running `runtime serve` (URL; env RUNTIME_SERVER). Default: the "
                 "server holding the configured store, if one runs, else the store itself. Its admin token comes "
                 "from RUNTIME_ADMIN_TOKEN."),
]

def print_json(data: Any) -> None:
    """Print `data` as JSON on stdout (dataclasses as dicts, datetimes in ISO 8601): every `--json` output."""
    sys.stdout.write(json.dumps(jsonable(data), indent=2, default=str) + "\n")


USAGE_ERROR = 2
"""Exit code of a bad configuration, policy, store or argument (every command)."""


def fail(message: object, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with `code`."""
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def load(config: Path | None) -> RuntimeConfig:
    """The configuration (file, ``RUNTIME_*`` overrides, defaults); exits 2 naming the file and line of a problem."""
    try:
        return load_config(config)
    except ConfigError as exc:
        fail(exc, USAGE_ERROR)


@contextmanager
def opened_store(cfg: RuntimeConfig, *, read_only: bool) -> Iterator[Store]:
    """The store the config names, closed at the end; exits 2 if it cannot be opened."""
    from runtime.factory import open_store
    from runtime.store import StoreError, StoreLockedError

    try:
        store = open_store(cfg, read_only=read_only)
    except StoreLockedError as exc:
        fail(f"{exc}\nIf a `runtime serve` on another data dir or host holds it, name it: --server URL (with "
             "RUNTIME_ADMIN_TOKEN set).", USAGE_ERROR)
    except StoreError as exc:
        fail(exc, USAGE_ERROR)
    with store:
        yield store


def admin_client(cfg: RuntimeConfig, server: str | None) -> AdminClient | None:
    """A client of the running server that holds the store (or of ``--server``); ``None`` when none runs, so
    the command opens the store itself (see :mod:`cli.remote`)."""
    from cli.remote import AdminClient, server_url

    url = server_url(cfg, server)
    return AdminClient(url) if url is not None else None


@contextmanager
def remote_errors() -> Iterator[None]:
    """Admin API failures as the command's own errors: exit 2 for set-up problems (no token, no answer, a bad
    argument), 1 for a refused action, as the local path exits."""
    from cli.remote import RemoteError

    try:
        yield
    except RemoteError as exc:
        fail(exc, USAGE_ERROR if exc.usage else 1)


@contextmanager
def readable_store(cfg: RuntimeConfig, server: str | None = None, *, read_only: bool = True
                   ) -> Iterator[Store | RemoteStore]:
    """The store to read: through the running server's admin API when one holds it, else opened here."""
    from cli.remote import RemoteStore

    client = admin_client(cfg, server)
    if client is None:
        with opened_store(cfg, read_only=read_only) as store:
            yield store
        return
    with remote_errors(), RemoteStore(client) as remote:
        yield remote


@contextmanager
def running_service(cfg: RuntimeConfig, policy: Path | None) -> Iterator[RuntimeService]:
    """The runtime service (engine, store, policy) for a one-shot command, closed at the end.

    A bad policy, store or model exits 2 with the reason.
    """
    from orchestration.service import RuntimeService
    from policies import PolicyError
    from runtime.models import ModelNotFoundError
    from runtime.store import StoreError

    try:
        service = RuntimeService.from_config(cfg, policy=policy)
    except (PolicyError, ConfigError, StoreError, ModelNotFoundError, FileNotFoundError) as exc:
        fail(exc, USAGE_ERROR)
    with service:
        yield service


def clip(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@contextmanager
def training_progress(out: Console, label: str) -> Iterator[CycleProgress]:
    """A rich progress bar for a learning cycle; yields a :class:`CycleProgress` (call it with training steps;
    its ``phase`` follows the cycle's phases)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"[bold]{label}"), TextColumn("{task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), console=out,
    ) as bar:
        task = bar.add_task(label, total=None, loss="", phase="")
        yield CycleProgress(bar, task)


class CycleProgress:
    """Callbacks for one cycle's progress bar: ``self(step, total, logs)`` and ``self.phase(name, done, total)``."""

    def __init__(self, bar: Any, task: Any) -> None:
        self._bar, self._task = bar, task

    def __call__(self, step: int, total: int, logs: dict[str, float]) -> None:
        loss = f"loss {logs['loss']:.4f}" if "loss" in logs else ""
        self._bar.update(self._task, completed=step, total=total or None, loss=loss)

    def phase(self, name: str, done: int, total: int) -> None:
        shown = f"{name} {done}/{total}" if total else name
        if name == "training":
            self._bar.update(self._task, phase=shown)
        else:  # the bar follows this phase's n/N (gate checks) until training steps take it back
            self._bar.update(self._task, phase=shown, completed=done, total=total or None, loss="")
