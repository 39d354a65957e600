"""`runtime logs ...`: ship this process's log to shared storage, import what other processes shipped, and see
where a store stands (docs/log_shipping.md).

These open the store named by the config themselves (its process must be stopped: DuckDB allows one writer); a
running process ships and imports in the background on its own (``store.ship_to`` / ``store.import_from``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import USAGE_ERROR, ConfigOption, JsonOption, console, fail, load, opened_store, print_json
from runtime.config import RuntimeConfig

if TYPE_CHECKING:
    from runtime.store import Store

logs_app = typer.Typer(
    help="Ship this store's log to shared storage as Parquet segments, import other processes' segments, and "
    "show what is shipped.",
    no_args_is_help=True,
)

UrlOption = Annotated[str | None, typer.Option(help="fsspec URL or path (default: from the config).")]


@contextmanager
def _store_without_sync(cfg: RuntimeConfig) -> Iterator[Store]:
    """The configured store, opened read-write without its background shipping (this command does it)."""
    quiet = cfg.model_copy(update={"store": cfg.store.model_copy(update={"ship_to": None, "import_from": None})})
    with opened_store(quiet, read_only=False) as store:
        yield store


@logs_app.command("ship")
def ship_cmd(
    config: ConfigOption = None,
    to: Annotated[str | None, typer.Option("--to", help="fsspec URL or path (default: store.ship_to).")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Ship every row again, shipped or not (to replace "
                                             "segments lost or damaged at the shared location).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Ship the rows committed since the last shipment (e.g. the spool of a process that was down)."""
    from runtime.store import LogShippingError, ship_segments

    cfg = load(config)
    url = to or cfg.store.ship_to
    if not url:
        fail("nowhere to ship to: pass --to URL or set store.ship_to in runtime.yaml", USAGE_ERROR)
    with _store_without_sync(cfg) as store:
        try:
            report = ship_segments(store, url, writer=cfg.store.writer_id, everything=everything)
        except LogShippingError as exc:
            fail(exc)
    if as_json:
        print_json(report)
    elif report.segment is None:
        console.print(f"nothing new to ship (writer {report.writer_id})")
    else:
        rows = ", ".join(f"{n} {table}" for table, n in report.rows.items()) or "no rows"
        console.print(f"shipped segment {report.segment} of writer {report.writer_id} to {url}: {rows}")


@logs_app.command("import")
def import_cmd(
    config: ConfigOption = None,
    source: Annotated[str | None, typer.Option("--from", help="fsspec URL or path (default: store.import_from).")]
    = None,
    as_json: JsonOption = False,
) -> None:
    """Import the segments other processes shipped, each once; exits 1 naming any that could not be imported."""
    from runtime.store import LogShippingError, import_segments

    cfg = load(config)
    url = source or cfg.store.import_from
    if not url:
        fail("nowhere to import from: pass --from URL or set store.import_from in runtime.yaml", USAGE_ERROR)
    with _store_without_sync(cfg) as store:
        try:
            report = import_segments(store, url)
        except LogShippingError as exc:
            fail(exc)
    if as_json:
        print_json(report)
    else:
        rows = ", ".join(f"{n} {table}" for table, n in report.rows_added.items()) or "no new rows"
        console.print(f"imported {len(report.imported)} segments from {url} ({rows}); "
                      f"{report.already_imported} imported before")
    for name, reason in report.failed.items():
        console.print(f"[red]not imported:[/red] {name}: {reason}")
    if report.failed:
        raise typer.Exit(1)


@logs_app.command("status")
def status_cmd(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """The store's writer id, rows not shipped yet, and segments imported."""
    from runtime.store.shipping import shipping_status

    cfg = load(config)
    with opened_store(cfg, read_only=True) as store:
        status = shipping_status(store)
    if as_json:
        print_json(status)
        return
    console.print(f"writer id: {status['writer_id'] or '(none yet: nothing shipped)'}")
    for table, info in status["tables"].items():  # type: ignore[attr-defined]
        console.print(f"  {table}: {info['unshipped_rows']} rows not shipped; last segment {info['last_segment']}")
    console.print(f"imported: {status['segments_imported']} segments, {status['rows_imported']} rows")
