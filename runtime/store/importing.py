"""Importing log segments shipped by other processes into this store (the learner side).

:func:`import_segments` lists the segments at a shared location (see :mod:`runtime.store.segments`), skips the
ones this store has imported before (their names are kept in ``imported_segments``) and those it shipped itself,
and inserts each new segment's rows with DuckDB's ``read_parquet``, anti-joined on the primary key: a segment
imported twice, or a row that arrives in two segments, changes nothing. Each segment is imported and recorded in
ONE transaction. Imported rows are ordinary rows of ``interactions``, ``signals`` and ``documents`` (their
``origin`` column names the writer), so the next learning cycle reads imported signals like local ones.

A segment that cannot be read (corrupt, truncated, written by a newer schema) is reported in
:attr:`ImportReport.failed` and logged, and the others are still imported; it is not recorded, so it is tried
again on the next import (a copy that was being replaced, or a learner that was upgraded, then succeeds).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import duckdb

from runtime.store.encoding import utcnow
from runtime.store.inserts import column_types
from runtime.store.segments import LogShippingError, LogStore, SegmentName, SharedLog
from runtime.store.shipping import store_lock

log = logging.getLogger("runtime.store")

__all__ = ["ImportReport", "import_segments"]

_LOCAL_ONLY_COLUMNS = ("log_seq",)


@dataclass
class ImportReport:
    """What one call of :func:`import_segments` did."""

    imported: list[str] = field(default_factory=list)
    """Segments imported by this call (``<writer>/<segment>.<table>``)."""
    rows_added: dict[str, int] = field(default_factory=dict)
    """New rows, by table."""
    rows_already_present: int = 0
    """Rows of the imported segments that the store already held (shipped twice, or logged here)."""
    already_imported: int = 0
    """Segments at the location that were imported before (or shipped by this store) and skipped."""
    failed: dict[str, str] = field(default_factory=dict)
    """Segment -> why it could not be imported (it is tried again next time)."""


def import_segments(store: LogStore, url: str) -> ImportReport:
    """Import every segment at `url` that `store` has not imported yet; return what happened.

    Raises :class:`~runtime.store.segments.LogShippingError` when the location cannot be listed; a segment
    that fails is reported in :attr:`ImportReport.failed` and does not stop the others.
    """
    shared = SharedLog(url)
    report = ImportReport()
    with store_lock(store):
        own = {str(w) for (w,) in store._query("SELECT writer_id FROM log_writer")}
        done = {str(n) for (n,) in store._query("SELECT name FROM imported_segments")}
        try:
            segments = shared.list_segments()
        except Exception as exc:
            raise LogShippingError(f"could not list log segments at {url}: {type(exc).__name__}: {exc}") from exc
        todo = [s for s in segments if s.writer_id not in own and s.name not in done]
        report.already_imported = len(segments) - len(todo)
        with tempfile.TemporaryDirectory(prefix="runtime-import-") as scratch:
            for segment in todo:
                try:
                    local = shared.fetch(segment, Path(scratch))
                    fn = partial(_import_segment, segment=segment, path=str(local), now=utcnow())
                    try:
                        outcome = store._call(fn, f"import log segment {segment.name}")
                    finally:
                        if not shared.local:  # a downloaded copy; a backlog should not fill the disk
                            local.unlink(missing_ok=True)
                except Exception as exc:
                    reason = _explain(segment, url, exc)
                    report.failed[segment.name] = reason
                    log.warning("log import: %s", reason)
                    continue
                if outcome is None:  # imported meanwhile by another caller
                    report.already_imported += 1
                    continue
                total, added = outcome
                report.imported.append(segment.name)
                report.rows_added[segment.table] = report.rows_added.get(segment.table, 0) + added
                report.rows_already_present += total - added
    return report


def _import_segment(conn: duckdb.DuckDBPyConnection, segment: SegmentName, path: str,
                    now: datetime) -> tuple[int, int] | None:
    """Insert the segment's new rows and record it, in the writer's transaction; ``(rows, added)`` or ``None``
    when it was imported already."""
    if conn.execute("SELECT 1 FROM imported_segments WHERE name = ?", [segment.name]).fetchone():
        return None
    table = segment.table
    known = column_types(conn, table)
    columns = [row[0] for row in conn.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()]
    unknown = [c for c in columns if c not in known or c in _LOCAL_ONLY_COLUMNS]
    if unknown or "id" not in columns:
        raise LogShippingError(
            f"its columns do not fit the {table} table here (unknown: {unknown}, id present: {'id' in columns}); "
            "it was written by a newer schema or is not a runtime log segment: upgrade the learner's runtime package"
        )
    names = ", ".join(columns)
    total_row = conn.execute("SELECT count(*) FROM read_parquet(?)", [path]).fetchone()
    total = int(total_row[0]) if total_row else 0
    added_row = conn.execute(
        f"INSERT INTO {table} ({names}) SELECT DISTINCT ON (id) {names} FROM read_parquet(?) AS src "
        f"WHERE NOT EXISTS (SELECT 1 FROM {table} AS here WHERE here.id = src.id)",
        [path],
    ).fetchone()
    added = int(added_row[0]) if added_row else 0
    conn.execute(
        "INSERT INTO imported_segments VALUES (?, ?, ?, ?, ?, ?, ?)",
        [segment.name, segment.writer_id, segment.segment, table, total, added, now],
    )
    return total, added


def _explain(segment: SegmentName, url: str, exc: BaseException) -> str:
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    return (f"segment {segment.name} at {url} was not imported ({detail}). The other segments were; this one is "
            "tried again on the next import. If it stays unreadable, move it aside and ship that writer's rows again "
            "(`runtime logs ship --all` with its store)")
