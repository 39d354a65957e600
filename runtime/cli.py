"""The `runtime` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from runtime.config import ConfigError, RuntimeConfig, config_schema, dump_config, load_config

if TYPE_CHECKING:
    from runtime.service import RuntimeService
    from runtime.store import Store

app = typer.Typer(
    help="An agent that keeps learning from its own use. See README.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show the effective configuration or its JSON schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")
adapters_app = typer.Typer(
    help="The adapter registry: list, show lineage, promote, roll back.", no_args_is_help=True
)
app.add_typer(adapters_app, name="adapters")
policy_app = typer.Typer(help="Learning policies: validate a file, print the JSON schema.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
shadow_app = typer.Typer(help="Shadow mode: compare the shadow adapter with live serving.", no_args_is_help=True)
app.add_typer(shadow_app, name="shadow")
signals_app = typer.Typer(
    help="Learning signals and their state; retry or dismiss those a vetoed update left held.",
    invoke_without_command=True,
)
app.add_typer(signals_app, name="signals")

EXIT_CODES = {"failed": 1, "vetoed": 3, "skipped": 4}
"""Exit codes of `runtime learn --once` by cycle status: 0 learned (activated, shadow, awaiting promotion) or nothing
to learn; 1 the training failed; 2 a bad configuration, policy or store (as every command); 3 the gate vetoed
the update (its signals are held: `runtime signals --state held`); 4 skipped (no spare device)."""

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="runtime.yaml (default: ./runtime.yaml if present, else defaults)."),
]


def _load(config: Path | None) -> RuntimeConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file + RUNTIME_* overrides + defaults) as YAML."""
    sys.stdout.write(dump_config(_load(config)))


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the JSON schema of runtime.yaml."""
    sys.stdout.write(json.dumps(config_schema(), indent=2) + "\n")


@app.command("log")
def log_cmd(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Rows of each table.")] = 20,
) -> None:
    """Show recent interactions and learning signals from the store."""
    cfg = _load(config)
    if not cfg.store_path.exists():
        err_console.print(f"no store at {cfg.store_path} yet: run `runtime demo` or an app first")
        raise typer.Exit(1)
    store = _open_store(cfg, read_only=True)
    try:
        print_log(store, console, limit=limit)
    finally:
        store.close()


def print_log(store: Store, out: Console, *, limit: int = 20) -> None:
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
            _clip(user, 80),
            _clip(row.response, 120),
            f"{row.latency_ms or 0:.0f}\n[dim]{row.prompt_tokens}+{row.completion_tokens}[/dim]",
        )
    out.print(table)
    signals = store.signals()
    sig_table = Table(title=f"Learning signals ({len(signals)})")
    for col in ("kind", "interaction", "rating", "text", "consumed by"):
        sig_table.add_column(col, overflow="fold")
    for sig in signals[-limit:]:
        sig_table.add_row(
            sig.kind,
            (sig.interaction_id or "")[:8],
            "" if sig.rating is None else f"{sig.rating:g}",
            _clip(sig.text or sig.comment or "", 60),
            (sig.consumed_by_run or "")[:8],
        )
    out.print(sig_table)


@contextmanager
def training_progress(out: Console, label: str) -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    """A rich progress bar for a learning cycle; yields the ``progress(step, total, logs)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(), console=out,
    ) as bar:
        task = bar.add_task(label, total=None, loss="")

        def update(step: int, total: int, logs: dict[str, float]) -> None:
            loss = f"loss {logs['loss']:.4f}" if "loss" in logs else ""
            bar.update(task, completed=step, total=total or None, loss=loss)

        yield update


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _open_store(cfg: RuntimeConfig, *, read_only: bool):
    from runtime.factory import open_store
    from runtime.store import StoreError

    try:
        return open_store(cfg, read_only=read_only)
    except StoreError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


PolicyOption = Annotated[
    Path | None, typer.Option("--policy", "-p", help="Policy YAML (default: the config's `policy`).")
]


def _service(cfg: RuntimeConfig, policy: Path | None) -> RuntimeService:
    """The runtime service for a one-shot command; clear errors for a bad policy, store or model."""
    from policies import PolicyError
    from runtime.models import ModelNotFoundError
    from runtime.service import RuntimeService
    from runtime.store import StoreError

    try:
        return RuntimeService.from_config(cfg, policy=policy)
    except (PolicyError, ConfigError, StoreError, ModelNotFoundError, FileNotFoundError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command("learn")
def learn_cmd(
    config: ConfigOption = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="sdft, sft, auto or seal (default: policy, then config)")
    ] = None,
    policy: PolicyOption = None,
    once: Annotated[
        bool,
        typer.Option("--once/--loop", help="One cycle now, or the background loop on the policy's schedule."),
    ] = True,
) -> None:
    """Learn from the log: one cycle through the policy gate and promotion, or the scheduled loop.

    Exit codes of --once: 0 learned or nothing to learn; 1 training failed; 2 bad configuration, policy or
    store; 3 vetoed by the gate (its signals are held: `runtime signals --state held`); 4 skipped.
    """
    cfg = _load(config)
    service = _service(cfg, policy)
    try:
        if once:
            _learn_once(service, method)
        else:
            _learn_loop(service)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    finally:
        service.close()


def _learn_once(service: RuntimeService, method: str | None) -> None:
    label = method or service.policy.schedule.method or service.config.learning.method
    with training_progress(console, f"{label} training") as progress:
        result = service.learn_now(method, progress=progress)
    style = {"activated": "green", "shadow": "green", "awaiting_promotion": "green", "nothing_to_learn": "yellow",
             "skipped": "yellow"}.get(result.status, "red")
    console.print(f"[{style}]{result.status}[/{style}]: {result.message}")
    for attempt in result.attempts if len(result.attempts) > 1 else []:
        console.print(
            f"  attempt {attempt['number']}: {attempt['status']} {attempt['adapter'] or ''} "
            f"(lr x{attempt['learning_rate_factor']:g}, anchors {attempt['anchors']}, {attempt['seconds']:.0f} s)"
        )
    if result.counts:
        console.print(f"examples: {result.counts}")
    if result.status in EXIT_CODES:
        raise typer.Exit(EXIT_CODES[result.status])


def _learn_loop(service: RuntimeService) -> None:
    import time

    loop = service.start_background()
    schedule = service.policy.schedule
    every = f"cron '{schedule.cron}'" if schedule.cron else f"every {schedule.interval_s:g} s"
    console.print(f"learning loop running ({every}, at least {schedule.min_new_signals} new signals); Ctrl-C stops")
    seen = 0
    try:
        while True:
            time.sleep(1.0)
            history = list(loop.history)
            for outcome in history[seen:]:
                console.print(f"{outcome.at:%H:%M:%S} {outcome.action}: {outcome.status or ''} {outcome.reason}")
            seen = len(history)
    except KeyboardInterrupt:
        console.print("stopping the learning loop")


@app.command("ingest")
def ingest_cmd(
    file: Annotated[Path, typer.Argument(help="A text/markdown document, or a JSONL of {title, context, questions}")],
    config: ConfigOption = None,
    title: Annotated[str | None, typer.Option(help="Title of a text document (default: file name)")] = None,
    questions: Annotated[
        Path | None, typer.Option(help="JSONL of {question, answer}: the document's evaluation set")
    ] = None,
) -> None:
    """Store new documents for knowledge learning (`runtime learn --method seal`).

    Without questions, the model writes question/answer pairs from the document; only pairs whose answer
    appears in the document are kept.
    """
    docs = _read_documents(file, title, questions)
    cfg = _load(config)
    engine = None
    if any(not d["questions"] for d in docs):
        from runtime.factory import create_engine

        with console.status("Loading the model to write evaluation questions..."):
            engine = create_engine(cfg)
    from learners.seal_questions import prepare_tau

    store = _open_store(cfg, read_only=False)
    try:
        for doc in docs:
            tau = prepare_tau(doc["text"], doc["questions"], engine, title=doc["title"])
            doc_id = store.add_document(
                doc["text"], title=doc["title"], questions=[p.to_dict() for p in tau.pairs],
                metadata={"source": str(file), "tau": tau.source, "tau_dropped": tau.dropped},
            )
            console.print(
                f"stored [bold]{doc['title'] or doc_id[:8]}[/bold]: {len(tau.pairs)} {tau.source} questions kept, "
                f"{tau.dropped} dropped (answer not in the document, or no answer)"
            )
    finally:
        store.close()
        if engine is not None:
            engine.close()


def _read_documents(file: Path, title: str | None, questions: Path | None) -> list[dict]:
    if not file.is_file():
        err_console.print(f"[red]error:[/red] {file}: no such file")
        raise typer.Exit(2)
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append({"text": row["context"], "title": row.get("title"), "questions": row.get("questions", [])})
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                err_console.print(f"[red]error:[/red] {file}:{n}: expected {{title, context, questions}} ({exc})")
                raise typer.Exit(2) from None
        return docs
    if not text.strip():
        err_console.print(f"[red]error:[/red] {file}: the document is empty")
        raise typer.Exit(2)
    qs: list = []
    if questions is not None:
        qs = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"text": text, "title": title or file.stem, "questions": qs}]


@adapters_app.command("list")
def adapters_list(config: ConfigOption = None) -> None:
    """List the registry's adapters with status, method and parent."""
    cfg = _load(config)
    store = _open_store(cfg, read_only=True)
    try:
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
    finally:
        store.close()


@adapters_app.command("show")
def adapters_show(name: str, config: ConfigOption = None) -> None:
    """Show one adapter: lineage, run, metrics, checksum."""
    cfg = _load(config)
    store = _open_store(cfg, read_only=True)
    try:
        rec = store.get_adapter(name)
        if rec is None:
            err_console.print(f"no adapter named {name!r}; see `runtime adapters list`")
            raise typer.Exit(1)
        run = store.get_run(rec.run_id) if rec.run_id else None
        console.print(f"[bold]{rec.name}[/bold]  status={rec.status}  method={rec.method}")
        console.print(f"path: {rec.path}\nchecksum: {rec.checksum}")
        console.print("lineage: " + " -> ".join(["base", *rec.lineage, rec.name]))
        if run is not None:
            console.print(f"run {run.id}: {run.status}, data {run.data_counts}")
        shown = {k: v for k, v in rec.metrics.items() if k != "history"}
        console.print_json(json.dumps(shown, default=str))
    finally:
        store.close()


@adapters_app.command("promote")
def adapters_promote(
    name: str,
    config: ConfigOption = None,
    policy: PolicyOption = None,
    force: Annotated[bool, typer.Option("--force", help="Promote even a candidate the gate vetoed.")] = False,
) -> None:
    """Make NAME the serving adapter (a candidate waiting for manual promotion, a shadow, or an older one)."""
    cfg = _load(config)
    service = _service(cfg, policy)
    try:
        record = service.promote(name, force=force)
        console.print(f"[green]{record.name} is active[/green] (lineage: {' -> '.join(['base', *record.lineage])})")
    except (KeyError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc.args[0] if exc.args else exc}")
        raise typer.Exit(1) from None
    finally:
        service.close()


@adapters_app.command("rollback")
def adapters_rollback(config: ConfigOption = None, policy: PolicyOption = None) -> None:
    """Serve the adapter that was active before the current one again (or the base model)."""
    cfg = _load(config)
    service = _service(cfg, policy)
    try:
        before = service.engine.active_adapter
        restored = service.rollback()
        console.print(f"[green]rolled back[/green] {before} -> {restored.name if restored else 'base model'}")
    except LookupError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        service.close()


@app.command("decisions")
def decisions_cmd(
    config: ConfigOption = None,
    adapter: Annotated[str | None, typer.Option("--adapter", "-a", help="Only this adapter.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with every check's result.")] = False,
) -> None:
    """The gate's decisions and promotion events, newest first, with their reasons."""
    cfg = _load(config)
    store = _open_store(cfg, read_only=True)
    try:
        decisions = store.decisions(limit, adapter=adapter)
        if as_json:
            from dataclasses import asdict

            rows = [{**asdict(d), "created_at": d.created_at.isoformat()} for d in decisions]
            sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
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
    finally:
        store.close()


@shadow_app.command("report")
def shadow_report_cmd(
    config: ConfigOption = None,
    policy: PolicyOption = None,
    adapter: Annotated[str | None, typer.Option("--adapter", "-a", help="Default: the current shadow.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Live and shadow answers compared: agreement, rule violations, feedback, and the policy's verdict."""
    from policies import Policy, PolicyError, load_policy
    from policies.shadow import shadow_report

    cfg = _load(config)
    try:
        loaded = load_policy(policy or cfg.policy) if (policy or cfg.policy) else Policy()
    except PolicyError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    store = _open_store(cfg, read_only=True)
    try:
        report = shadow_report(store, loaded, adapter)
    finally:
        store.close()
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return
    console.print(f"[bold]shadow adapter:[/bold] {report.adapter or '(none)'}   pairs: {report.pairs}")
    console.print(
        f"agreement (mean F1 with live): {report.agreement:.2f}   rule violations: shadow {report.shadow_violations}"
        f" / live {report.live_violations}   regressions on positively rated: {report.regressions}/"
        f"{report.rated_positive}   corrections already fixed: {report.fixes}/{report.corrected}"
    )
    console.print(f"[bold]verdict:[/bold] {report.verdict}: {'; '.join(report.reasons)}")
    if report.examples:
        table = Table(title="Recent pairs")
        for col in ("prompt", "live", "shadow", "F1"):
            table.add_column(col)
        for ex in report.examples:
            table.add_row(
                _clip(ex["prompt"], 40), _clip(ex["live"], 50), _clip(ex["shadow"], 50), f"{ex['agreement']:.2f}"
            )
        console.print(table)


StateOption = Annotated[
    str | None, typer.Option("--state", "-s", help="pending, learned, held or dismissed (default: all).")
]


@signals_app.callback()
def signals_cmd(
    ctx: typer.Context,
    config: ConfigOption = None,
    state: StateOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Newest signals shown.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List learning signals with their state (`held`: a vetoed update used them; retry or dismiss them)."""
    if ctx.invoked_subcommand is not None:
        return
    from dataclasses import asdict

    from runtime.store.models import LEARNING_STATES

    if state is not None and state not in LEARNING_STATES:
        err_console.print(f"[red]error:[/red] --state must be one of {', '.join(sorted(LEARNING_STATES))}")
        raise typer.Exit(2)
    cfg = _load(config)
    with _open_store(cfg, read_only=True) as store:
        rows = store.signals(state=state)[-limit:]  # type: ignore[arg-type]
    if as_json:
        data = [{**asdict(s), "created_at": s.created_at.isoformat()} for s in rows]
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    table = Table(title=f"Learning signals ({len(rows)}{', ' + state if state else ''})")
    for col in ("id", "kind", "state", "prompt", "text", "why / run"):
        table.add_column(col, overflow="fold")
    for sig in rows:
        prompt = next((m["content"] for m in reversed(sig.messages or []) if m.get("role") == "user"), "")
        why = sig.state_reason or ""
        table.add_row(
            sig.id[:12], sig.kind, sig.state, _clip(prompt, 50), _clip(sig.text or sig.comment or "", 50),
            _clip(why, 60) + (f" [dim]{sig.consumed_by_run[:8]}[/dim]" if sig.consumed_by_run else ""),
        )
    console.print(table)


def _resolve_signal_ids(store: Store, ids: list[str]) -> list[str]:
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
        err_console.print(f"[red]error:[/red] {'; '.join(problems)}; see `runtime signals`")
        raise typer.Exit(1)
    return resolved


@signals_app.command("retry")
def signals_retry(
    ids: Annotated[list[str] | None, typer.Argument(help="Signal ids (or unique prefixes).")] = None,
    config: ConfigOption = None,
    all_held: Annotated[bool, typer.Option("--all-held", help="Every held signal.")] = False,
) -> None:
    """Make held (or dismissed) signals pending again: the next learning cycle learns them."""
    cfg = _load(config)
    with _open_store(cfg, read_only=False) as store:
        chosen = [s.id for s in store.signals(state="held")] if all_held else _resolve_signal_ids(store, ids or [])
        if not chosen:
            err_console.print("nothing to retry: give signal ids or --all-held (see `runtime signals --state held`)")
            raise typer.Exit(1)
        moved = store.set_learning_state("pending", signal_ids=chosen, reason="retried by operator")
    console.print(f"[green]{moved} signal(s) pending again[/green]; the next cycle learns them"
                  + (f" ({len(chosen) - moved} were not held or dismissed)" if moved < len(chosen) else ""))


@signals_app.command("dismiss")
def signals_dismiss(
    ids: Annotated[list[str], typer.Argument(help="Signal ids (or unique prefixes).")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why it is not to be learned (kept).")],
    config: ConfigOption = None,
) -> None:
    """Dismiss held or pending signals with a reason: they are never learned (unless retried)."""
    if not reason.strip():
        err_console.print("[red]error:[/red] --reason must say why the signals are dismissed")
        raise typer.Exit(2)
    cfg = _load(config)
    with _open_store(cfg, read_only=False) as store:
        chosen = _resolve_signal_ids(store, ids)
        moved = store.set_learning_state("dismissed", signal_ids=chosen, reason=reason.strip())
    console.print(f"[yellow]{moved} signal(s) dismissed[/yellow]"
                  + (f" ({len(chosen) - moved} were already learned or dismissed)" if moved < len(chosen) else ""))


@policy_app.command("validate")
def policy_validate(file: Path) -> None:
    """Check a policy file; every error names its line."""
    from policies import PolicyError, load_policy

    try:
        loaded = load_policy(file)
    except PolicyError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(
        f"[green]valid[/green]: policy '{loaded.name}': {len(loaded.protected)} protected behaviours, "
        f"{len(loaded.retention)} retention suites, promotion {loaded.promotion.mode}"
    )


@policy_app.command("schema")
def policy_schema_cmd() -> None:
    """Print the JSON schema of a policy file."""
    from policies import policy_schema

    sys.stdout.write(json.dumps(policy_schema(), indent=2) + "\n")


@app.command("demo")
def demo_cmd(
    config: ConfigOption = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="sdft or sft (default: config)")] = None,
) -> None:
    """The main job on the embedded default: ask, be corrected, learn, and answer again."""
    from runtime.demo import run_demo

    run_demo(_load(config), console, method=method)


@app.command("serve")
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
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API, feedback and admin routes, and the dashboard (see docs/server.md)."""
    import os

    import uvicorn
    from rich.markup import escape

    from policies import PolicyError
    from runtime.models import ModelNotFoundError
    from runtime.store import StoreError
    from server import ServerLimits, create_app

    cfg = _load(config)
    loopback = host in ("127.0.0.1", "::1", "localhost")
    token = admin_token or os.environ.get("RUNTIME_ADMIN_TOKEN") or None
    try:
        with console.status(f"Loading {cfg.model.name}..."):
            server_app = create_app(
                cfg, admin_token=token, limits=ServerLimits(max_body_bytes=max_body_bytes),
                dashboard_requires_token=(not loopback) if dashboard_token is None else dashboard_token,
                background_learning=background_learning,
            )
    except (ConfigError, PolicyError, StoreError, ModelNotFoundError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    shown = escape(f"[{host}]" if ":" in host else host)
    console.print(f"OpenAI API at [bold]http://{shown}:{port}/v1[/bold], dashboard at http://{shown}:{port}/dashboard")
    if token is None:
        console.print("[yellow]admin routes are off:[/yellow] set RUNTIME_ADMIN_TOKEN or pass --admin-token")
    uvicorn.run(server_app, host=host, port=port, log_level=log_level)


def main() -> None:
    """Console-script entry point."""
    import os

    # The CLI draws its own progress; keep the libraries' loading bars off the terminal.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()


if __name__ == "__main__":
    main()
