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
    from runtime.store import Store

app = typer.Typer(
    help="An agent that keeps learning from its own use. See README.md.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show the effective configuration or its JSON schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")
adapters_app = typer.Typer(help="The adapter registry: list adapters, show one's lineage.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")

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


@app.command("learn")
def learn_cmd(
    config: ConfigOption = None,
    method: Annotated[
        str | None, typer.Option("--method", "-m", help="sdft, sft, auto or seal (default: config)")
    ] = None,
) -> None:
    """Run one learning cycle on the current log and activate the resulting adapter."""
    from learners.cycle import run_cycle

    cfg = _load(config)
    store = _open_store(cfg, read_only=False)
    try:
        with training_progress(console, f"{method or cfg.learning.method} training") as progress:
            result = run_cycle(cfg, store, method, progress=progress)
        style = {"activated": "green", "nothing_to_learn": "yellow"}.get(result.status, "red")
        console.print(f"[{style}]{result.status}[/{style}]: {result.message}")
        if result.counts:
            console.print(f"examples: {result.counts}")
        if result.status == "failed":
            raise typer.Exit(1)
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    finally:
        store.close()


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


@app.command("demo")
def demo_cmd(
    config: ConfigOption = None,
    method: Annotated[str | None, typer.Option("--method", "-m", help="sdft or sft (default: config)")] = None,
) -> None:
    """The main job on the embedded default: ask, be corrected, learn, and answer again."""
    from runtime.demo import run_demo

    run_demo(_load(config), console, method=method)


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
