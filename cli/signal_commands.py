"""`runtime signals ...`: learning signals and their state; retry or dismiss those a vetoed update left held;
approve or reject those awaiting review."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli.common import (
    USAGE_ERROR,
    ConfigOption,
    JsonOption,
    ServerOption,
    clip,
    console,
    fail,
    load,
    print_json,
    readable_store,
)
from runtime.store.models import LEARNING_STATES, ReviewDecision

if TYPE_CHECKING:
    from cli.remote import AdminClient, RemoteStore
    from runtime.store import Store

signals_app = typer.Typer(
    help="Learning signals and their state; retry or dismiss those a vetoed update left held; approve or reject "
    "those awaiting review.",
    invoke_without_command=True,
)


StateOption = Annotated[
    str | None,
    typer.Option("--state", "-s", help="pending, learned, held, dismissed or review (default: all)."),
]


@signals_app.callback()
def signals_cmd(
    ctx: typer.Context,
    config: ConfigOption = None,
    state: StateOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Newest signals shown.")] = 50,
    as_json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """List learning signals with their state (`held`: a vetoed update used them; retry or dismiss them)."""
    if ctx.invoked_subcommand is not None:
        return
    if state is not None and state not in LEARNING_STATES:
        fail(f"--state must be one of {', '.join(sorted(LEARNING_STATES))}", USAGE_ERROR)
    cfg = load(config)
    with readable_store(cfg, server) as store:
        rows = store.signals(state=state)[-limit:]  # type: ignore[arg-type]
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"Learning signals ({len(rows)}{', ' + state if state else ''})")
    for col in ("id", "kind", "state", "from", "prompt", "text", "why / run"):
        table.add_column(col, overflow="fold")
    for sig in rows:
        prompt = next((m["content"] for m in reversed(sig.messages or []) if m.get("role") == "user"), "")
        why = sig.state_reason or ""
        table.add_row(
            sig.id[:12], sig.kind, sig.state, sig.principal or "", clip(prompt, 50),
            clip(sig.text or sig.comment or "", 50),
            clip(why, 60) + (f" [dim]{sig.consumed_by_run[:8]}[/dim]" if sig.consumed_by_run else ""),
        )
    console.print(table)


def _resolve_signal_ids(store: Store | RemoteStore, ids: list[str]) -> list[str]:
    """Full ids for ids or unique prefixes (as the tables show them); exits 1 naming any that do not match."""
    known = [s.id for s in store.signals()]
    resolved, problems = [], []
    for given in ids:
        matches = [k for k in known if k.startswith(given)]
        if len(matches) == 1:
            resolved.append(matches[0])
        else:
            problems.append(f"{given!r} matches {'no signal' if not matches else f'{len(matches)} signals'}")
    if problems:
        fail(f"{'; '.join(problems)}; see `runtime signals`")
    return resolved


def _server_client(store: Store | RemoteStore) -> AdminClient | None:
    """The admin client when `store` is a running server's (changes go through its API), else ``None``."""
    return getattr(store, "client", None)


@signals_app.command("retry")
def signals_retry(
    ids: Annotated[list[str] | None, typer.Argument(help="Signal ids (or unique prefixes).")] = None,
    config: ConfigOption = None,
    all_held: Annotated[bool, typer.Option("--all-held", help="Every held signal.")] = False,
    server: ServerOption = None,
) -> None:
    """Make held (or dismissed) signals pending again: the next learning cycle learns them."""
    cfg = load(config)
    with readable_store(cfg, server, read_only=False) as store:
        client = _server_client(store)
        chosen = [s.id for s in store.signals(state="held")] if all_held else _resolve_signal_ids(store, ids or [])
        if not chosen:
            fail("nothing to retry: give signal ids or --all-held (see `runtime signals --state held`)")
        if client is not None:
            moved = client.post("/admin/signals/retry", {"ids": chosen})["retried"]
        else:
            moved = store.set_learning_state("pending", signal_ids=chosen, reason="retried by operator")
    console.print(f"[green]{moved} signal(s) pending again[/green]; the next cycle learns them"
                  + (f" ({len(chosen) - moved} were not held or dismissed)" if moved < len(chosen) else ""))


@signals_app.command("dismiss")
def signals_dismiss(
    ids: Annotated[list[str], typer.Argument(help="Signal ids (or unique prefixes).")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why it is not to be learned (kept).")],
    config: ConfigOption = None,
    server: ServerOption = None,
) -> None:
    """Dismiss held or pending signals with a reason: they are never learned (unless retried)."""
    if not reason.strip():
        fail("--reason must say why the signals are dismissed", USAGE_ERROR)
    cfg = load(config)
    with readable_store(cfg, server, read_only=False) as store:
        client = _server_client(store)
        chosen = _resolve_signal_ids(store, ids)
        if client is not None:
            moved = client.post("/admin/signals/dismiss", {"ids": chosen, "reason": reason.strip()})["dismissed"]
        else:
            moved = store.set_learning_state("dismissed", signal_ids=chosen, reason=reason.strip())
    console.print(f"[yellow]{moved} signal(s) dismissed[/yellow]"
                  + (f" ({len(chosen) - moved} were already learned or dismissed)" if moved < len(chosen) else ""))


def _review(ids: list[str], decision: ReviewDecision, reason: str | None, reviewer: str | None,
            config: Path | None, server: str | None) -> None:
    cfg = load(config)
    with readable_store(cfg, server, read_only=False) as store:
        client = _server_client(store)
        chosen = _resolve_signal_ids(store, ids)
        if client is not None:
            moved = client.post("/admin/signals/review", {"ids": chosen, "decision": decision, "reason": reason,
                                                          "reviewer": reviewer})["decided"]
        else:
            moved = store.review_signals(chosen, decision, reason=reason, reviewer=reviewer)
    done = "approved: the next cycle learns them" if decision == "approve" else "rejected: they are never learned"
    console.print(f"{moved} signal(s) {done}"
                  + (f" ({len(chosen) - moved} were not awaiting review)" if moved < len(chosen) else ""))


ReviewerOption = Annotated[str | None, typer.Option("--reviewer", help="Who decided (stored with the decision).")]


@signals_app.command("approve")
def signals_approve(
    ids: Annotated[list[str], typer.Argument(help="Signal ids (or unique prefixes) awaiting review.")],
    reason: Annotated[str | None, typer.Option("--reason", "-r", help="Why (stored).")] = None,
    reviewer: ReviewerOption = None,
    config: ConfigOption = None,
    server: ServerOption = None,
) -> None:
    """Approve signals awaiting review (`runtime signals --state review`): the next learning cycle learns them."""
    _review(ids, "approve", reason, reviewer, config, server)


@signals_app.command("reject")
def signals_reject(
    ids: Annotated[list[str], typer.Argument(help="Signal ids (or unique prefixes) awaiting review.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why they are not to be learned (stored).")],
    reviewer: ReviewerOption = None,
    config: ConfigOption = None,
    server: ServerOption = None,
) -> None:
    """Reject signals awaiting review, with a reason: they are dismissed and never learned."""
    if not reason.strip():
        fail("--reason must say why the signals are rejected", USAGE_ERROR)
    _review(ids, "reject", reason.strip(), reviewer, config, server)
