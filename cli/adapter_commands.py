"""`runtime adapters ...` and `runtime decisions`: the registry, promotion, rollback and the gate's verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    USAGE_ERROR,
    ConfigOption,
    JsonOption,
    PolicyOption,
    ServerOption,
    admin_client,
    console,
    fail,
    load,
    print_json,
    readable_store,
    remote_errors,
    running_service,
)

adapters_app = typer.Typer(help="The adapter registry: list, show lineage, promote, roll back.", no_args_is_help=True)


@adapters_app.command("list")
def adapters_list(config: ConfigOption = None, as_json: JsonOption = False, server: ServerOption = None) -> None:
    """List the registry's adapters with status, method and parent."""
    with readable_store(load(config), server) as store:
        if as_json:
            print_json(store.adapters())
            return
        table = Table(title="Adapters")
        for col in ("name", "status", "method", "parent", "run", "created", "train s", "examples"):
            table.add_column(col)
        for rec in store.adapters():
            counts = rec.metrics.get("data_counts", {})
            table.add_row(
                rec.name, rec.status, rec.method or "", rec.parent or "base", (rec.run_id or "")[:8],
                rec.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                f"{rec.metrics.get('train_seconds', 0):.0f}",
                f"{counts.get('new', 0)}+{counts.get('replay', 0)} replay",
            )
    console.print(table)


@adapters_app.command("show")
def adapters_show(name: str, config: ConfigOption = None, as_json: JsonOption = False,
                  server: ServerOption = None) -> None:
    """Show one adapter: lineage, run, metrics, checksum."""
    with readable_store(load(config), server) as store:
        rec = store.get_adapter(name)
        if rec is None:
            fail(f"no adapter named {name!r}; see `runtime adapters list`")
        run = store.get_run(rec.run_id) if rec.run_id else None
    if as_json:
        print_json({"adapter": rec, "run": run})
        return
    console.print(f"[bold]{rec.name}[/bold]  status={rec.status}  method={rec.method}  role={rec.role}")
    console.print(f"path: {rec.path}\nchecksum: {rec.checksum}")
    console.print("lineage: " + " -> ".join(["base", *rec.lineage, rec.name]))
    if run is not None:
        console.print(f"run {run.id}: {run.status}, data {run.data_counts}")
    shown = {k: v for k, v in rec.metrics.items() if k != "history"}
    console.print_json(json.dumps(shown, default=str))


@adapters_app.command("export")
def adapters_export(
    name: str,
    directory: Annotated[Path, typer.Argument(help="A new (or empty) directory to write it into.")],
    config: ConfigOption = None,
    server: ServerOption = None,
) -> None:
    """Export NAME with its base model's public id and a model card, for vLLM, SGLang or PEFT elsewhere."""
    from runtime.adapter_export import export_adapter
    from runtime.adapters import AdapterRegistry, AdapterVerificationError
    from runtime.models import public_model_id

    cfg = load(config)
    with readable_store(cfg, server) as store:  # the record from the store; the files from the registry's directory
        try:
            registry = AdapterRegistry(cfg.adapters_dir, store)  # type: ignore[arg-type]
            exported = export_adapter(registry, store, name, directory, public_model_id(cfg.model.name))  # type: ignore[arg-type]
        except (KeyError, FileExistsError, AdapterVerificationError) as exc:
            fail(exc.args[0] if exc.args else exc)
    console.print(f"exported [bold]{name}[/bold] to {exported.path} (base model {exported.base_model})")
    console.print("serve it with vLLM:")
    typer.echo(f"  {exported.vllm_command}")
    console.print("or SGLang:")
    typer.echo(f"  {exported.sglang_command}")


@adapters_app.command("promote")
def adapters_promote(
    name: str,
    config: ConfigOption = None,
    policy: PolicyOption = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even an adapter the gate vetoed.")] = False,
    reason: Annotated[str | None, typer.Option("--reason", "-r", help="Why (recorded; required with --force).")
                      ] = None,
    server: ServerOption = None,
) -> None:
    """Make NAME the serving adapter (a candidate waiting for manual promotion, a shadow, or an older one)."""
    if force and not (reason or "").strip():
        fail("--force needs --reason: a promotion past the gate's veto is recorded with why", USAGE_ERROR)
    import getpass

    cfg = load(config)
    client = admin_client(cfg, server)
    if client is not None:  # the server that holds the store promotes (and serves) it
        with client, remote_errors():
            active = client.post(f"/admin/adapters/{name}/promote",
                                 {"force": force, "reason": reason or "promoted by operator"})["active"]
        lineage = active["lineage"]
        console.print(f"[green]{active['name']} is active[/green] (lineage: {' -> '.join(['base', *lineage])})")
        return
    with running_service(cfg, policy) as service:
        try:
            record = service.promote(name, force=force, reason=reason or "promoted by operator",
                                     by=getpass.getuser())
        except (KeyError, ValueError) as exc:
            fail(exc.args[0] if exc.args else exc)
    console.print(f"[green]{record.name} is active[/green] (lineage: {' -> '.join(['base', *record.lineage])})")


@adapters_app.command("rollback")
def adapters_rollback(config: ConfigOption = None, policy: PolicyOption = None, server: ServerOption = None) -> None:
    """Serve the adapter that was active before the current one again (or the base model)."""
    cfg = load(config)
    client = admin_client(cfg, server)
    if client is not None:
        with client, remote_errors():
            before = client.get("/admin/adapters")["active"]
            restored = client.post("/admin/rollback")["serving"]
        console.print(f"[green]rolled back[/green] {before} -> {'base model' if restored == 'base' else restored}")
        return
    with running_service(cfg, policy) as service:
        before = service.engine.active_adapter
        try:
            restored = service.rollback()
        except LookupError as exc:
            fail(exc)
    console.print(f"[green]rolled back[/green] {before} -> {restored.name if restored else 'base model'}")


def decisions_cmd(
    config: ConfigOption = None,
    adapter: Annotated[str | None, typer.Option("--adapter", "-a", help="Only this adapter.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 20,
    as_json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """The gate's decisions and promotion events, newest first, with their reasons (--json: every check)."""
    with readable_store(load(config), server) as store:
        decisions = store.decisions(limit, adapter=adapter)
        if as_json:
            print_json(decisions)
            return
        table = Table(title="Decisions")
        for col in ("time", "adapter", "decision", "attempt", "reasons", "checks"):
            table.add_column(col)
        styles = {"veto": "red", "approve": "green", "promote": "green", "rollback": "yellow", "retire": "yellow"}
        for d in decisions:
            style = styles.get(d.decision, "")
            checks = d.checks if isinstance(d.checks, list) else []
            passed = sum(bool(c.get("passed")) for c in checks)
            run = store.get_run(d.run_id) if d.run_id and d.decision in ("approve", "veto") else None
            number = run.config.get("attempt", 1) if run else None
            attempt = "" if number is None else ("first" if number == 1 else f"repair {number - 1}")
            table.add_row(
                d.created_at.strftime("%Y-%m-%d %H:%M:%S"), d.adapter, f"[{style}]{d.decision}[/{style}]" if style
                else d.decision, attempt, "; ".join(d.reasons), f"{passed}/{len(checks)} passed" if checks else "",
            )
    console.print(table)
