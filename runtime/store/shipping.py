"""Shipping a store's committed log rows to shared storage as Parquet segments (the writer side).

Every process that serves or embeds the agent keeps its own DuckDB file as a local spool. :func:`ship_segments`
exports the rows of :data:`~runtime.store.segments.SHIPPED_TABLES` committed since the last shipment with DuckDB's
own ``COPY ... TO ... (FORMAT parquet)`` and puts them at the shared location (see :mod:`runtime.store.segments`
for names and atomic upload); a learner imports them with :func:`runtime.store.importing.import_segments`.

What was shipped is a high-water mark per table on ``log_seq``, a column the single writer fills from one sequence
in commit order: every row committed later has a higher value, so "everything up to N" never skips a row. The
mark moves only after the upload succeeded; a writer that is down or cannot reach the shared location keeps its
rows and ships them later. The segment number is reserved (committed) before the upload, so a number is never
used twice, even after a crash between upload and mark (the rows are then shipped again in the next segment,
and the importer keeps the first copy).

Only new rows are shipped, as they are at shipping time; later changes to a row (a signal's learning state) are
the learner's to make in its own store.
"""

from __future__ import annotations

import re
import socket
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import duckdb

from runtime.store.encoding import utcnow
from runtime.store.segments import SHIPPED_TABLES, LogStore, SegmentName, SharedLog, check_writer_id

__all__ = ["ShipReport", "default_writer_id", "ship_segments", "shipping_status", "store_lock", "writer_id"]


@dataclass
class ShipReport:
    """What one call of :func:`ship_segments` shipped."""

    writer_id: str
    segment: int | None = None
    """The segment number used; ``None`` when nothing new was committed since the last shipment."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows shipped, by table."""
    files: list[str] = field(default_factory=list)
    """The segment files written (paths within the shared filesystem)."""


_locks: weakref.WeakKeyDictionary[LogStore, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def store_lock(store: LogStore) -> threading.Lock:
    """One lock per store, so shipping and importing rounds of one store never overlap (background thread,
    close, a cycle, the CLI)."""
    with _locks_guard:
        lock = _locks.get(store)
        if lock is None:
            lock = _locks[store] = threading.Lock()
        return lock


def default_writer_id() -> str:
    """A new writer id: this host's name and a random suffix (unique per store file)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip(".-_")[:64] or "writer"
    return f"{host}-{uuid.uuid4().hex[:8]}"


def writer_id(store: LogStore, configured: str | None = None) -> str:
    """The store's writer id: `configured` when given (remembered from then on), else the one the store
    remembers, else a new one (:func:`default_writer_id`, remembered). Stable across restarts of one store."""
    if configured is not None:
        check_writer_id(configured)
    fn = partial(_resolve_writer_id, configured=configured, fresh=default_writer_id())
    return str(store._call(fn, "resolve the log writer id"))


def ship_segments(store: LogStore, url: str, *, writer: str | None = None, everything: bool = False) -> ShipReport:
    """Ship the rows `store` committed since its last shipment to the shared location `url`; return what went.

    Waits for rows already queued to be committed first, so everything acknowledged before the call is shipped.
    Raises :class:`~runtime.store.segments.LogShippingError` when an upload fails; the rows not yet uploaded
    stay marked unshipped and go with the next call. `writer` overrides the store's writer id (see
    :func:`writer_id`). ``everything`` ships every row again, shipped or not (to replace a segment that was lost
    or damaged at the shared location; the importer keeps the rows it already has).
    """
    shared = SharedLog(url)
    with store_lock(store):
        wid = writer_id(store, writer)
        report = ShipReport(wid)
        marks = {str(t): int(n) for t, n in store._query("SELECT table_name, last_log_seq FROM shipped_marks")}
        if everything:
            marks = {}
        highs = {t: store._query(f"SELECT max(log_seq) FROM {t}")[0][0] for t in SHIPPED_TABLES}
        todo = [t for t in SHIPPED_TABLES if highs[t] is not None and int(highs[t]) > marks.get(t, 0)]
        if not todo:
            return report
        report.segment = int(store._call(_reserve_segment, "reserve a log segment number"))
        with tempfile.TemporaryDirectory(prefix="runtime-ship-") as scratch:
            for table in todo:
                local = Path(scratch) / f"{table}.parquet"
                count = _export(store, table, marks.get(table, 0), int(highs[table]), wid, local)
                if count:
                    report.files.append(shared.put(local, SegmentName(wid, report.segment, table)))
                    report.rows[table] = count
                mark = partial(_record_mark, table=table, last=int(highs[table]), segment=report.segment, now=utcnow())
                store._call(mark, f"record {table} shipped")
        return report


def _export(store: LogStore, table: str, after: int, upto: int, wid: str, target: Path) -> int:
    """Write the rows of `table` with ``after < log_seq <= upto`` to the Parquet file `target`; return how many.

    ``log_seq`` stays behind (each store numbers its own rows); ``origin`` names the process that first logged
    the row (this one, unless it was itself imported)."""
    quoted = str(target).replace("'", "''")
    sql = (f"COPY (SELECT * EXCLUDE (log_seq) REPLACE (coalesce(origin, ?) AS origin) FROM {table} "
           f"WHERE log_seq > ? AND log_seq <= ? ORDER BY log_seq) TO '{quoted}' (FORMAT parquet)")
    rows = store._query(sql, [wid, after, upto])
    return int(rows[0][0]) if rows else 0


def _resolve_writer_id(conn: duckdb.DuckDBPyConnection, configured: str | None, fresh: str) -> str:
    row = conn.execute("SELECT writer_id FROM log_writer").fetchone()
    if row is None:
        chosen = configured or fresh
        conn.execute("INSERT INTO log_writer VALUES (?, 1)", [chosen])
        return chosen
    if configured is not None and configured != row[0]:
        conn.execute("UPDATE log_writer SET writer_id = ?", [configured])
        return configured
    return str(row[0])


def _reserve_segment(conn: duckdb.DuckDBPyConnection) -> int:
    row = conn.execute("UPDATE log_writer SET next_segment = next_segment + 1 RETURNING next_segment - 1").fetchone()
    if row is None:
        raise RuntimeError("the store has no log writer id yet; resolve it first")
    return int(row[0])


def _record_mark(conn: duckdb.DuckDBPyConnection, table: str, last: int, segment: int, now: object) -> None:
    conn.execute(
        "INSERT INTO shipped_marks VALUES (?, ?, ?, ?) ON CONFLICT (table_name) DO UPDATE SET "
        "last_log_seq = greatest(shipped_marks.last_log_seq, excluded.last_log_seq), segment = excluded.segment, "
        "shipped_at = excluded.shipped_at",
        [table, last, segment, now],
    )


def shipping_status(store: LogStore) -> dict[str, object]:
    """Where the store stands: its writer id (``None`` before its first shipment), rows not shipped yet and the last
    shipment per table, and how many segments it has imported from other writers."""
    ids = store._query("SELECT writer_id, next_segment FROM log_writer")
    marks = {str(t): (int(n), s, at) for t, n, s, at in
             store._query("SELECT table_name, last_log_seq, segment, shipped_at FROM shipped_marks")}
    tables: dict[str, object] = {}
    for table in SHIPPED_TABLES:
        last, segment, at = marks.get(table, (0, None, None))
        waiting = store._query(f"SELECT count(*) FROM {table} WHERE log_seq > ?", [last])[0][0]
        tables[table] = {"unshipped_rows": int(waiting), "last_segment": segment, "last_shipped_at": at}
    imported = store._query("SELECT count(*), coalesce(sum(rows_added), 0) FROM imported_segments")[0]
    return {"writer_id": ids[0][0] if ids else None, "next_segment": int(ids[0][1]) if ids else 1,
            "tables": tables, "segments_imported": int(imported[0]), "rows_imported": int(imported[1])}
