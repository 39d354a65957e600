"""The single background writer: takes batches from a bounded queue and commits each in one transaction.

Producers put operations on the queue and return. The writer takes a batch (see
:class:`~runtime.store.queueing.BatchQueue` for when), groups consecutive inserts per table into one
batch insert each (see :mod:`runtime.store.inserts`), and commits the batch in ONE transaction.

If a batch fails, it is rolled back and replayed one operation per transaction, so one bad row costs
only itself. Failures of fire-and-forget operations are logged and kept until the next ``flush()`` /
``close()`` raises them; operations with a future get their own exception.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import duckdb

from runtime.store.errors import StoreWriterError, WriteFailure
from runtime.store.inserts import Inserter
from runtime.store.queueing import BatchQueue

logger = logging.getLogger("runtime.store")

MAX_KEPT_FAILURES = 100


@dataclass(slots=True)
class InsertOp:
    """Insert one row (values in the table's insert-column order; the first value is its key)."""

    table: str
    row: tuple[Any, ...]
    future: Future[Any] | None = None


@dataclass(slots=True)
class CallOp:
    """Run ``fn(connection)`` inside the writer's transaction; its return value resolves ``future``."""

    fn: Callable[[duckdb.DuckDBPyConnection], Any]
    description: str
    future: Future[Any] | None = None


@dataclass(slots=True)
class FlushOp:
    """Resolved once every operation queued before it has been committed (or has failed)."""

    future: Future[None] = field(default_factory=Future)


class StopOp:
    """Ends the writer thread after everything before it is written."""


WriteOp = InsertOp | CallOp
QueueItem = InsertOp | CallOp | FlushOp | StopOp
Segment = CallOp | dict[str, list[InsertOp]]


class Writer:
    """Owns the read-write connection's writes; one thread, one bounded queue."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, inserters: Mapping[str, Inserter], *,
                 queue_size: int, batch_size: int, flush_interval_s: float, name: str) -> None:
        self._conn = conn
        self._inserters = dict(inserters)
        self._queue: BatchQueue[QueueItem] = BatchQueue(queue_size, batch_size, flush_interval_s)
        self._failures: list[WriteFailure] = []
        self._dropped_failures = 0
        self._failures_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- producer side -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Items waiting for the writer."""
        return len(self._queue)

    def put(self, item: QueueItem, timeout: float | None) -> None:
        """Queue ``item``; raises ``queue.Full`` if the queue stays full for ``timeout`` seconds."""
        urgent = not isinstance(item, (InsertOp, CallOp)) or item.future is not None
        self._queue.put(item, urgent=urgent, timeout=timeout)

    def is_alive(self) -> bool:
        """Whether the writer thread is still running."""
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; return whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def take_error(self) -> StoreWriterError | None:
        """Return (and forget) the failures collected since the last call, as one error."""
        with self._failures_lock:
            if not self._failures and not self._dropped_failures:
                return None
            error = StoreWriterError(self._failures, self._dropped_failures)
            self._failures = []
            self._dropped_failures = 0
        return error

    # --- writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            ops: list[WriteOp] = []
            flushes: list[FlushOp] = []
            for item in self._queue.take():
                if isinstance(item, StopOp):
                    stop = True
                elif isinstance(item, FlushOp):
                    flushes.append(item)
                else:
                    ops.append(item)
            try:
                if ops:
                    self._write(ops)
            except BaseException as exc:  # a bug here must not kill the thread silently
                logger.exception("store writer failed unexpectedly while writing a batch")
                for op in ops:
                    self._fail(op, exc)
            for flush in flushes:
                flush.future.set_result(None)

    def _write(self, ops: list[WriteOp]) -> None:
        segments = _segments(ops)
        try:
            self._conn.execute("BEGIN TRANSACTION")
            results = [self._apply(segment) for segment in segments]
            self._conn.execute("COMMIT")
        except Exception as exc:
            _rollback(self._conn)
            if len(ops) == 1:
                self._fail(ops[0], exc)
            else:
                logger.warning("store batch of %d writes failed (%s); retrying one by one", len(ops), exc)
                self._replay(ops)
            return
        for segment, result in zip(segments, results, strict=True):
            if isinstance(segment, CallOp):
                _resolve(segment, result)
            else:
                for inserts in segment.values():
                    for op in inserts:
                        _resolve(op, op.row[0])

    def _apply(self, segment: Segment) -> Any:
        if isinstance(segment, CallOp):
            return segment.fn(self._conn)
        for table, inserts in segment.items():
            self._inserters[table](self._conn, [op.row for op in inserts])
        return None

    def _replay(self, ops: list[WriteOp]) -> None:
        for op in ops:
            segment: Segment = op if isinstance(op, CallOp) else {op.table: [op]}
            try:
                self._conn.execute("BEGIN TRANSACTION")
                result = self._apply(segment)
                self._conn.execute("COMMIT")
            except Exception as exc:
                _rollback(self._conn)
                self._fail(op, exc)
                continue
            _resolve(op, result if isinstance(op, CallOp) else op.row[0])

    def _fail(self, op: WriteOp, exc: BaseException) -> None:
        if op.future is not None:
            if not op.future.done():
                op.future.set_exception(exc)
            return
        failure = WriteFailure(_describe(op), exc)
        logger.error("store write failed and was not saved: %s", failure)
        with self._failures_lock:
            if len(self._failures) < MAX_KEPT_FAILURES:
                self._failures.append(failure)
            else:
                self._dropped_failures += 1


def _resolve(op: WriteOp, result: Any) -> None:
    if op.future is not None and not op.future.done():
        op.future.set_result(result)


def _describe(op: WriteOp) -> str:
    if isinstance(op, InsertOp):
        return f"insert into {op.table} (key {op.row[0]!r})"
    return op.description


def _segments(ops: list[WriteOp]) -> list[Segment]:
    """Split at each call; between calls, group inserted rows per table (inserts into different tables
    commute, and each table keeps its own order)."""
    segments: list[Segment] = []
    inserts: dict[str, list[InsertOp]] = {}
    for op in ops:
        if isinstance(op, InsertOp):
            inserts.setdefault(op.table, []).append(op)
        else:
            if inserts:
                segments.append(inserts)
                inserts = {}
            segments.append(op)
    if inserts:
        segments.append(inserts)
    return segments


def _rollback(conn: duckdb.DuckDBPyConnection) -> None:
    try:
        conn.execute("ROLLBACK")
    except duckdb.Error:  # the failed statement may have ended the transaction already
        pass

