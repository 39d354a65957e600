"""`runtime log` and `runtime config`: what the store holds, and the effective configuration."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.common import ConfigOption, JsonOption, ServerOption, clip, console, fail, load, print_json, readable_store
from cli.remote import server_url
from learners.config import full_config_schema
from runtime.config import dump_config

if TYPE_CHECKING:
    from cli.remote import RemoteStore
    from runtime.store import Store

config_app = typer.Typer(help="Show the effective configuration or its JSON schema.", no_args_is_help=True)


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file + RUNTIME_* overrides + defaults) as YAML."""
    sys.stdout.write(dump_config(load(config)))


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the JSON schema of runtime.yaml (with every learning method's settings)."""
    sys.stdout.write(json.dumps(full_config_schema(), indent=2) + "\n")


def log_cmd(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Rows of each table.")] = 20,
    as_json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """Show recent interactions and learning signals from the store."""
    cfg = load(config)
    if not cfg.store_path.exists() and server_url(cfg, server) is None:
        fail(f"no store at {cfg.store_path} yet: run `runtime demo` or an app first")
    with readable_store(cfg, server) as store:
        if as_json:
            print_json({"interactions": store.recent_interactions(limit=limit), "signals": store.signals()[-limit:]})
            return
        print_log(store, console, limit=limit)


def print_log(store: Store | RemoteStore, out: Console, *, limit: int = 20) -> None:
    """Render the recent interactions and signals of `store` as two tables."""
    interactions = store.recent_interactions(limit=limit)
    table = Table(title=f"Recent interactions ({len(interactions)})", show_lines=False)
    table.add_column("id / thread", no_wrap=True)
    table.add_column("adapter", overflow="fold")
    table.add_column("prompt", ratio=2)
    table.add_column("response", ratio=3)
    table.add_column("ms / tokens", no_wrap=True, justify="right")
    for row in reversed(interactions):
        user = next((m["content"] for m in reversed(row.messages) if m.get("role") == "user"), "")
        kind = "" if row.kind == "live" else f" ({row.kind})"
        table.add_row(
            f"{row.id[:8]}\n[dim]{(row.thread_id or '')[:12]}{kind}[/dim]",
            row.adapter or "base",
            clip(user, 80),
            clip(row.response, 120),
            f"{row.latency_ms or 0:.0f}\n[dim]{row.prompt_tokens}+{row.completion_tokens}[/dim]",
        )
    out.print(table)
    signals = store.signals()
    sig_table = Table(title=f"Learning signals ({len(signals)})")
    for col in ("kind", "interaction", "rating", "text", "state"):
        sig_table.add_column(col, overflow="fold")
    for sig in signals[-limit:]:
        sig_table.add_row(
            sig.kind,
            (sig.interaction_id or "")[:8],
            "" if sig.rating is None else f"{sig.rating:g}",
            clip(sig.text or sig.comment or "", 60),
            sig.state + (f" [dim]{sig.consumed_by_run[:8]}[/dim]" if sig.consumed_by_run else ""),
        )
    out.print(sig_table)
