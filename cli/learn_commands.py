"""`runtime learn` and `runtime ingest`: learning cycles by hand or on the policy's schedule, and new documents."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.common import (
    USAGE_ERROR,
    ConfigOption,
    PolicyOption,
    ServerOption,
    admin_client,
    console,
    err_console,
    fail,
    load,
    opened_store,
    remote_errors,
    running_service,
    training_progress,
)
from learners.registry import LEARNING_METHODS
from runtime.config import ConfigError
from runtime.jsonl import JSONLError, read_jsonl

if TYPE_CHECKING:
    from cli.remote import AdminClient
    from orchestration.service import RuntimeService

EXIT_CODES = {"failed": 1, "vetoed": 3, "skipped": 4}
"""Exit codes of `runtime learn --once` by cycle status: 0 learned (activated, shadow, awaiting promotion) or nothing
to learn; 1 the training failed; 2 a bad configuration, policy or store (as every command); 3 the gate vetoed
the update (its signals are held: `runtime signals --state held`); 4 skipped (no spare device)."""


def learn_cmd(
    config: ConfigOption = None,
    method: Annotated[
        str | None,
        typer.Option("--method", "-m", help=f"{', '.join(LEARNING_METHODS)} (default: policy, then config)"),
    ] = None,
    policy: PolicyOption = None,
    once: Annotated[
        bool,
        typer.Option("--once/--loop", help="One cycle now, or the background loop on the policy's schedule."),
    ] = True,
    server: ServerOption = None,
) -> None:
    """Learn from the log: one cycle through the policy gate and promotion, or the scheduled loop.

    Exit codes of --once: 0 learned or nothing to learn; 1 training failed; 2 bad configuration, policy or
    store; 3 vetoed by the gate (its signals are held: `runtime signals --state held`); 4 skipped.
    """
    if method is not None and method not in LEARNING_METHODS:
        fail(f"--method: unknown learning method {method!r}; use one of {', '.join(LEARNING_METHODS)}", USAGE_ERROR)
    cfg = load(config)
    client = admin_client(cfg, server)
    if client is not None:  # the server holding the store learns (its policy), and serves what it learns
        if not once:
            fail(f"the server at {client.url} holds the store and runs its own learning loop (`runtime serve` "
                 "learns on the policy's schedule); use `runtime learn --once` to start a cycle now", USAGE_ERROR)
        with client, remote_errors():
            _learn_through(client, method)
        return
    with running_service(cfg, policy) as service:
        try:
            if once:
                _learn_once(service, method)
            else:
                _learn_loop(service)
        except ConfigError as exc:
            fail(exc, USAGE_ERROR)


def _learn_once(service: RuntimeService, method: str | None) -> None:
    label = method or service.policy.schedule.method or service.config.learning.method
    with training_progress(console, f"{label} training") as progress:
        result = service.learn_now(method, progress=progress, phase=progress.phase)
    _report(result.status, result.message, result.attempts, result.counts)


def _learn_through(client: AdminClient, method: str | None) -> None:
    """One cycle run by the server (``POST /admin/learn``), its progress followed until it ends."""
    job = client.post("/admin/learn", {"method": method} if method else None)
    console.print(f"the server at {client.url} runs the cycle (job {job['id']})")
    with training_progress(console, f"{method or 'cycle'} training") as progress:
        while job["status"] == "running":
            time.sleep(0.5)
            job = client.get(f"/admin/learn/{job['id']}")
            shown = job.get("progress") or {}
            if "phase" in shown:
                progress.phase(shown["phase"], shown.get("phase_done", 0), shown.get("phase_total", 0))
            if "step" in shown and shown.get("phase") in (None, "training"):
                progress(shown["step"], shown.get("total", 0), {k: v for k, v in shown.items() if k == "loss"})
    if job["status"] == "error":
        fail(f"the cycle failed on the server: {job['error']}")
    result = job["result"]
    _report(result["status"], result["message"], result["attempts"], result["counts"])


def _report(status: str, message: str, attempts: list[dict[str, Any]], counts: dict[str, int]) -> None:
    """A cycle's outcome, and its exit code (:data:`EXIT_CODES`)."""
    style = {"activated": "green", "shadow": "green", "awaiting_promotion": "green", "nothing_to_learn": "yellow",
             "skipped": "yellow"}.get(status, "red")
    console.print(f"[{style}]{status}[/{style}]: {message}")
    for attempt in attempts if len(attempts) > 1 else []:
        console.print(
            f"  attempt {attempt['number']}: {attempt['status']} {attempt['adapter'] or ''} "
            f"(lr x{attempt['learning_rate_factor']:g}, anchors {attempt['anchors']}, {attempt['seconds']:.0f} s)"
        )
    if counts:
        console.print(f"examples: {counts}")
    if status in EXIT_CODES:
        raise typer.Exit(EXIT_CODES[status])


def _learn_loop(service: RuntimeService) -> None:
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


def ingest_cmd(
    file: Annotated[Path, typer.Argument(help="A text/markdown document, or a JSONL of {title, context, questions}")],
    config: ConfigOption = None,
    title: Annotated[str | None, typer.Option(help="Title of a text document (default: file name)")] = None,
    questions: Annotated[
        Path | None, typer.Option(help="JSONL of {question, answer}: the document's evaluation set")
    ] = None,
    server: ServerOption = None,
) -> None:
    """Store new documents for knowledge learning (`runtime learn --method seal`).

    Without questions, the model writes question/answer pairs from the document; only pairs whose answer
    appears in the document are kept.
    """
    docs = _read_documents(file, title, questions)
    cfg = load(config)
    client = admin_client(cfg, server)
    if client is not None:  # the server holding the store stores them (POST /v1/documents)
        with client, remote_errors():
            for doc in docs:
                stored = client.post("/v1/documents", {"text": doc["text"], "title": doc["title"],
                                                       "questions": doc["questions"] or None})
                kept = len(doc["questions"])
                console.print(
                    f"stored [bold]{doc['title'] or stored['id'][:8]}[/bold] through {client.url}: "
                    + (f"{kept} supplied questions" if kept else "its questions are written when it is learned")
                )
        return
    engine = None
    if any(not d["questions"] for d in docs):
        from runtime.factory import create_engine

        with console.status("Loading the model to write evaluation questions..."):
            engine = create_engine(cfg)
    from learners.seal_questions import prepare_tau

    try:
        with opened_store(cfg, read_only=False) as store:
            for doc in docs:
                tau = prepare_tau(doc["text"], doc["questions"], engine, title=doc["title"])
                doc_id = store.add_document(
                    doc["text"], title=doc["title"], questions=[p.to_dict() for p in tau.pairs],
                    metadata={"source": str(file), "tau": tau.source, "tau_dropped": tau.dropped},
                )
                console.print(
                    f"stored [bold]{doc['title'] or doc_id[:8]}[/bold]: {len(tau.pairs)} {tau.source} questions "
                    f"kept, {tau.dropped} dropped (answer not in the document, or no answer)"
                )
                if not tau.pairs:
                    err_console.print(
                        f"[yellow]warning:[/yellow] {doc['title'] or doc_id[:8]} has no evaluation questions: SEAL "
                        "cannot measure whether it learned the document. Give --questions (a JSONL of "
                        "{question, answer}), or a longer document the model can ask about."
                    )
    finally:
        if engine is not None:
            engine.close()


def _read_documents(file: Path, title: str | None, questions: Path | None) -> list[dict[str, Any]]:
    if not file.is_file():
        fail(f"{file}: no such file", USAGE_ERROR)
    try:
        if file.suffix == ".jsonl":
            docs = []
            for n, row in read_jsonl(file):
                if not isinstance(row.get("context"), str):
                    fail(f"{file}:{n}: expected {{title, context, questions}} with a text `context`", USAGE_ERROR)
                docs.append({"text": row["context"], "title": row.get("title"), "questions": row.get("questions", [])})
            return docs
        text = file.read_text(encoding="utf-8")
        if not text.strip():
            fail(f"{file}: the document is empty", USAGE_ERROR)
        qs = [row for _n, row in read_jsonl(questions)] if questions is not None else []
    except (JSONLError, UnicodeDecodeError) as exc:
        fail(exc, USAGE_ERROR)
    return [{"text": text, "title": title or file.stem, "questions": qs}]
