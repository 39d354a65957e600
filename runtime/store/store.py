"""The :class:`Store`: the runtime's DuckDB log of interactions, feedback, knowledge, runs and adapters.

Writes and durability
    One background writer thread owns all writes (see :mod:`runtime.store.writer`). ``log_interaction``,
    ``add_signal`` and ``add_document`` build the row (with a client-generated id) in the caller's
    thread, put it on a bounded queue and return the id at once: the request path never waits on disk.
    Control-plane updates (runs, adapters, decisions, consumption) go through the same queue but wait
    for their own commit and raise their own errors.

Backpressure
    If the queue is full (the writer cannot keep up or is stalled), a write blocks for at most
    ``put_timeout_s`` and then raises :class:`StoreBackpressureError`. In normal operation the queue is
    nowhere near full, so this only happens when the disk is the bottleneck; failing loudly beats
    growing memory without bound.

Crash loss window
    ``flush()`` returns once everything enqueued before it is committed, and ``close()`` (also run
    by ``with`` and, for stores left open, at interpreter exit) flushes, so a clean shutdown loses
    nothing that was acknowledged. A hard crash (SIGKILL, power loss) loses the rows still in the queue
    or in the batch being written: normally at most ``flush_interval_s`` plus one batch write (tens of
    milliseconds); under overload, at most the queue's contents (``queue_size`` rows).

Errors
    A background write that fails (after the batch is retried row by row) is logged and kept; the next
    ``flush()`` or ``close()`` raises :class:`StoreWriterError` listing it. Reads do not raise them.

Reads
    Read methods first wait for the writer to commit what is queued (so a caller reads its own writes),
    then run on a fresh cursor; they are safe to call from any thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import duckdb

from runtime.processes import check_not_spawning
from runtime.store import control, registry
from runtime.store.encoding import check_choice, check_messages, new_id, now_us, to_json, utcnow
from runtime.store.errors import (
    ReadOnlyStoreError,
    StoreBackpressureError,
    StoreClosedError,
    StoreError,
    StoreTimeoutError,
)
from runtime.store.inserts import make_inserter, warm_up
from runtime.store.log_sync import LogSync
from runtime.store.migrations import MIGRATIONS, Migration
from runtime.store.models import (
    ADAPTER_ROLES,
    ADAPTER_STATUSES,
    DECISION_KINDS,
    INTERACTION_KINDS,
    LEARNING_STATES,
    REVIEW_DECISIONS,
    RUN_STATUSES,
    SIGNAL_KINDS,
    AdapterRecord,
    AdapterRole,
    AdapterStatus,
    DecisionKind,
    Document,
    Interaction,
    InteractionKind,
    LearningRun,
    LearningState,
    PolicyDecision,
    ReviewDecision,
    RunStatus,
    Signal,
    SignalKind,
    SignalReview,
)
from runtime.store.opening import open_database
from runtime.store.reads import StoreReads
from runtime.store.writer import CallOp, FlushOp, InsertOp, QueueItem, StopOp, Writer

T = TypeVar("T")

_INSERT_COLUMNS: dict[str, tuple[str, ...]] = {
    "interactions": Interaction.COLUMNS,
    "signals": Signal.COLUMNS,
    "documents": Document.COLUMNS,
    "learning_runs": LearningRun.COLUMNS,
    "policy_decisions": PolicyDecision.COLUMNS,
    "signal_reviews": SignalReview.COLUMNS,
}
_WAIT_SLICE_S = 0.1


class Store(StoreReads):
    """The runtime's DuckDB store; one per file per process.

    Args:
        path: the DuckDB file. A missing file is created (with parent directories); an older schema is
            migrated forward; a newer schema, a corrupt file or a foreign DuckDB file is refused untouched.
        queue_size: capacity of the write queue (rows and updates waiting for the writer).
        batch_size: most operations committed in one transaction. Large by default because each commit
            syncs the WAL (about 10 ms on a plain disk): 512-row batches cap ingest near 15k rows/s on a
            2-core machine, 4096 reaches 25k+. Under light load batches are small anyway.
        flush_interval_s: how long the writer keeps collecting a batch after its first operation (the
            normal crash loss window).
        read_only: open for inspection only (no writer thread, writes raise ``ReadOnlyStoreError``). Fails
            with ``StoreLockedError`` while another process has the file open for writing.
        put_timeout_s: how long a write may block on a full queue before ``StoreBackpressureError``.
        migrations: the migration list to apply (tests and tooling; defaults to the package's own).
        ship_to, import_from, writer_id, ship_interval_s: log shipping (:mod:`runtime.store.shipping`): every
            ``ship_interval_s`` a background thread ships the rows committed here to the fsspec URL ``ship_to`` as
            Parquet segments under ``writer_id`` (default: an id the store makes and keeps), and imports what
            other processes shipped to ``import_from``; :meth:`close` ships once more. Off by default.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | Path, *, queue_size: int = 10_000, batch_size: int = 4096,
                 flush_interval_s: float = 0.05, read_only: bool = False, put_timeout_s: float = 5.0,
                 migrations: Sequence[Migration] | None = None, ship_to: str | None = None,
                 import_from: str | None = None, writer_id: str | None = None, ship_interval_s: float = 5.0) -> None:
        check_not_spawning(f"a Store on {path}")
        if queue_size < 1 or batch_size < 1 or flush_interval_s < 0 or put_timeout_s <= 0:
            raise ValueError(
                "queue_size and batch_size must be >= 1, flush_interval_s >= 0 and put_timeout_s > 0"
            )
        self.path: Path = Path(path).expanduser().resolve()
        self.read_only: bool = read_only
        self._put_timeout_s = put_timeout_s
        self._closed = False
        self._state_lock = threading.Lock()
        self._cursor_lock = threading.Lock()
        self._writer: Writer | None = None
        self._rejected_writes = 0
        self.log_sync: LogSync | None = None
        """The background log shipping of this store (``None`` unless ``ship_to`` or ``import_from`` is set)."""
        if not read_only:
            registry.claim(str(self.path), self)
        try:
            self._conn, self.schema_version = open_database(
                self.path, read_only=read_only, migrations=MIGRATIONS if migrations is None else migrations
            )
        except BaseException:
            registry.release(str(self.path), self)
            raise
        try:
            self._read_root = self._conn.cursor()
            if not read_only:
                warm_up()
                inserters = {table: make_inserter(self._conn, table, columns)
                             for table, columns in _INSERT_COLUMNS.items()}
                self._writer = Writer(
                    self._conn, inserters, queue_size=queue_size, batch_size=batch_size,
                    flush_interval_s=flush_interval_s, name=f"store-writer:{self.path.name}",
                )
                if ship_to is not None or import_from is not None:
                    self.log_sync = LogSync(self, ship_to=ship_to, import_from=import_from, writer=writer_id,
                                            interval_s=ship_interval_s)
                    self.log_sync.start()
        except BaseException:
            if self._writer is not None:
                self._writer.put(StopOp(), timeout=None)
                self._writer.join()
            self._conn.close()
            registry.release(str(self.path), self)
            raise

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        closed = ", closed" if self._closed else ""
        return f"Store({str(self.path)!r}, {mode}, schema v{self.schema_version}{closed})"

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything enqueued before this call is committed.

        Raises :class:`StoreWriterError` if background writes failed since the last flush, and
        :class:`StoreTimeoutError` if ``timeout`` seconds pass first. A no-op on a read-only or closed store.
        """
        if self._writer is None or self._closed:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        marker = FlushOp()
        if self._put_marker(marker, timeout):
            self._wait(marker.future, None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._raise_writer_errors()

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the writer and close the file. Idempotent.

        Raises :class:`StoreWriterError` (after closing) if background writes failed since the last flush.
        """
        if self.log_sync is not None and not self._closed:
            self.log_sync.stop()  # one last shipment while the writer still runs
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
            if writer is not None:
                while writer.is_alive():
                    try:
                        writer.put(StopOp(), timeout=_WAIT_SLICE_S)
                        break
                    except queue.Full:
                        continue
        if writer is not None and not writer.join(timeout):
            raise StoreTimeoutError(f"store {self.path}: writer did not finish within {timeout}s")
        with self._cursor_lock:
            self._read_root.close()
            self._conn.close()
        if not self.read_only:
            registry.release(str(self.path), self)
        self._raise_writer_errors()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- hot-path writes (enqueue and return) ------------------------------------------------------

    def log_interaction(self, messages: Iterable[Mapping[str, Any]], response: str, *,
                        kind: InteractionKind = "live", shadow_of: str | None = None,
                        thread_id: str | None = None, adapter: str | None = None, model: str | None = None,
                        latency_ms: float | None = None, prompt_tokens: int | None = None,
                        completion_tokens: int | None = None,
                        metadata: Mapping[str, Any] | None = None) -> str:
        """Log one model call; return its id without waiting for the disk.

        ``messages`` is the input conversation (``[{"role", "content"}, ...]``), ``adapter`` the adapter
        that served it (``None`` = base model). A ``kind="shadow"`` call must name the live interaction it
        mirrors in ``shadow_of``.
        """
        check_choice(kind, INTERACTION_KINDS, "kind")
        if (kind == "shadow") != (shadow_of is not None):
            raise ValueError(
                "a shadow interaction needs shadow_of (the live interaction id); a live one must not have it"
            )
        if not isinstance(response, str):
            raise TypeError(f"response must be a str, got {type(response).__name__}")
        row = (new_id(), now_us(), thread_id, kind, shadow_of, to_json(check_messages(messages), "messages"),
               response, adapter, model, latency_ms, prompt_tokens, completion_tokens,
               to_json(metadata or {}, "metadata"))
        self._put(InsertOp("interactions", row))
        return row[0]

    def add_signal(self, kind: SignalKind, *, interaction_id: str | None = None, rating: float | None = None,
                   text: str | None = None, messages: Iterable[Mapping[str, Any]] | None = None,
                   comment: str | None = None, metadata: Mapping[str, Any] | None = None,
                   principal: str | None = None, state: LearningState = "pending",
                   state_reason: str | None = None) -> str:
        """Record feedback; return its id without waiting for the disk.

        - ``rating``: needs ``rating`` (a number); ``interaction_id`` says what was rated.
        - ``correction`` / ``demonstration``: need ``text`` (the right answer) and the prompt it answers,
          as ``interaction_id`` (a logged interaction) and/or ``messages``.

        ``principal`` is who sent it; ``state`` is ``pending`` (learned next) or ``review`` (awaiting an
        operator's approval, with ``state_reason``).
        """
        check_choice(kind, SIGNAL_KINDS, "kind")
        _check_arrival_state(state)
        if kind == "rating":
            if not isinstance(rating, (int, float)) or isinstance(rating, bool):
                raise ValueError("a rating signal needs a numeric rating")
            rating = float(rating)
        elif not isinstance(text, str) or (interaction_id is None and messages is None):
            raise ValueError(f"a {kind} signal needs text and an interaction_id or messages")
        encoded = None if messages is None else to_json(check_messages(messages), "messages")
        row = (new_id(), now_us(), kind, interaction_id, rating, text, encoded, comment,
               to_json(metadata or {}, "metadata"), None, None, state, state_reason,
               None if state == "pending" else now_us(), principal)
        self._put(InsertOp("signals", row))
        return row[0]

    def add_document(self, text: str, *, title: str | None = None, questions: Sequence[Any] | None = None,
                     metadata: Mapping[str, Any] | None = None, principal: str | None = None,
                     state: LearningState = "pending", state_reason: str | None = None) -> str:
        """Record a document of new knowledge (``questions`` probe it); return its id without waiting.
        ``principal``, ``state`` and ``state_reason`` as for :meth:`add_signal`."""
        if not isinstance(text, str) or not text:
            raise ValueError("a document needs non-empty text")
        _check_arrival_state(state)
        row = (new_id(), now_us(), title, text, to_json(list(questions or []), "questions"),
               to_json(metadata or {}, "metadata"), None, None, state, state_reason,
               None if state == "pending" else now_us(), principal)
        self._put(InsertOp("documents", row))
        return row[0]

    # --- control-plane writes (wait for their own commit) --------------------------------------

    def mark_consumed(self, run_id: str, *, signal_ids: Iterable[str] = (),
                      document_ids: Iterable[str] = ()) -> int:
        """Mark pending signals/documents ``learned`` by ``run_id`` (an approved update was trained on them).

        Rows no longer pending keep their state and run. Returns how many rows were marked.
        """
        return self.set_learning_state("learned", signal_ids=signal_ids, document_ids=document_ids, run_id=run_id)

    def set_learning_state(self, state: LearningState, *, signal_ids: Iterable[str] = (),
                           document_ids: Iterable[str] = (), reason: str | None = None, run_id: str | None = None,
                           from_states: Sequence[LearningState] | None = None) -> int:
        """Move signals and documents to ``state``; return how many moved (waits for the commit).

        Only rows in ``from_states`` move; by default the moves that make sense: to ``learned`` or ``held``
        from ``pending`` (a cycle's outcome, with its ``run_id``); to ``pending`` from ``held`` or
        ``dismissed`` (the operator retries them; the next cycle learns them); to ``dismissed`` from
        ``pending`` or ``held`` (the operator's ``reason`` is kept).
        """
        check_choice(state, LEARNING_STATES, "state")
        if from_states is None:
            from_states = {"learned": ("pending",), "held": ("pending",), "pending": ("held", "dismissed", "review"),
                           "dismissed": ("pending", "held", "review"), "review": ()}[state]
        for value in from_states:
            check_choice(value, LEARNING_STATES, "from_states")
        changed = 0
        for table, ids in (("signals", list(signal_ids)), ("documents", list(document_ids))):
            if ids:
                fn = partial(control.set_learning_state, table=table, ids=ids, state=state, reason=reason,
                             run_id=run_id, from_states=list(from_states), now=utcnow())
                changed += int(self._call(fn, f"set {table} {state}"))
        return changed

    def review_signals(self, signal_ids: Iterable[str], decision: ReviewDecision, *, reason: str | None = None,
                       reviewer: str | None = None) -> int:
        """Decide on signals (or documents) awaiting review: ``approve`` makes them pending (the next cycle
        learns them), ``reject`` dismisses them. Each decision is stored (:meth:`signal_reviews`) with its reason
        and reviewer. Ids not awaiting review are left alone; returns how many were decided."""
        check_choice(decision, REVIEW_DECISIONS, "decision")
        wanted = list(dict.fromkeys(signal_ids))
        signals = {s.id for s in self.signals(state="review")}
        documents = {d.id for d in self.documents(state="review")}
        ids = [i for i in wanted if i in signals or i in documents]
        if not ids:
            return 0
        state: LearningState = "pending" if decision == "approve" else "dismissed"
        moved = self.set_learning_state(
            state, signal_ids=[i for i in ids if i in signals], document_ids=[i for i in ids if i in documents],
            from_states=("review",), reason=reason or f"{decision}d by {reviewer or 'an operator'}",
        )
        for signal_id in ids:
            self._insert_and_wait("signal_reviews", (new_id(), signal_id, decision, reason, reviewer, now_us()))
        return moved

    def create_run(self, method: str, *, config: Mapping[str, Any] | None = None,
                   parent_adapter: str | None = None, data_counts: Mapping[str, Any] | None = None) -> str:
        """Create a ``pending`` learning run; return its id once committed."""
        row = (new_id(), method, "pending", now_us(), None, None, None, to_json(config or {}, "config"),
               to_json({}, "metrics"), to_json(data_counts or {}, "data_counts"), parent_adapter, None)
        return str(self._insert_and_wait("learning_runs", row))

    def update_run(self, run_id: str, *, status: RunStatus | None = None, error: str | None = None,
                   metrics: Mapping[str, Any] | None = None, data_counts: Mapping[str, Any] | None = None,
                   output_adapter: str | None = None) -> None:
        """Update a run; only the arguments given change. Waits for the commit.

        ``status="running"`` stamps ``started_at``; ``succeeded``/``failed`` stamp ``ended_at``. Raises
        :class:`UnknownRecordError` for an unknown id.
        """
        changes: dict[str, Any] = {}
        if status is not None:
            changes["status"] = check_choice(status, RUN_STATUSES, "status")
        if error is not None:
            changes["error"] = error
        if metrics is not None:
            changes["metrics"] = to_json(dict(metrics), "metrics")
        if data_counts is not None:
            changes["data_counts"] = to_json(dict(data_counts), "data_counts")
        if output_adapter is not None:
            changes["output_adapter"] = output_adapter
        fn = partial(control.update_run, run_id=run_id, changes=changes, now=utcnow())
        self._call(fn, f"update run {run_id!r}")

    def upsert_adapter(self, name: str, path: str | Path, *, parent: str | None = None,
                       method: str | None = None, run_id: str | None = None,
                       status: AdapterStatus = "candidate", checksum: str | None = None,
                       metrics: Mapping[str, Any] | None = None,
                       lineage: Sequence[str] | None = None, role: AdapterRole = "serving") -> AdapterRecord:
        """Insert or replace the adapter ``name``; return the stored record.

        ``lineage`` defaults to the parent's lineage followed by the parent. ``created_at`` is kept on
        replace.
        """
        check_choice(status, ADAPTER_STATUSES, "status")
        check_choice(role, ADAPTER_ROLES, "role")
        now = utcnow()
        row = {"name": name, "path": str(path), "parent": parent, "method": method, "run_id": run_id, "role": role,
               "status": status, "checksum": checksum, "metrics": to_json(dict(metrics or {}), "metrics"),
               "lineage": None if lineage is None else to_json(list(lineage), "lineage"),
               "created_at": now, "updated_at": now}
        record = self._call(partial(control.upsert_adapter, row=row), f"upsert adapter {name!r}")
        assert isinstance(record, AdapterRecord)
        return record

    def set_adapter_status(self, name: str, status: AdapterStatus) -> None:
        """Change an adapter's status (raises :class:`UnknownRecordError` if there is no such adapter)."""
        check_choice(status, ADAPTER_STATUSES, "status")
        fn = partial(control.set_adapter_status, name=name, status=status, now=utcnow())
        self._call(fn, f"set adapter {name!r} status")

    def record_decision(self, adapter: str, decision: DecisionKind, *, reasons: Sequence[str] = (),
                        checks: Any = None, run_id: str | None = None) -> str:
        """Record a policy decision on ``adapter`` with its reasons and check results; wait for the commit."""
        check_choice(decision, DECISION_KINDS, "decision")
        row = (new_id(), now_us(), adapter, decision, to_json(list(reasons), "reasons"),
               to_json(checks, "checks"), run_id)
        return str(self._insert_and_wait("policy_decisions", row))

    def write_stats(self) -> dict[str, int]:
        """``queue_depth`` (writes waiting for the writer) and ``rejected_writes`` (refused since opening
        because the queue stayed full: :class:`StoreBackpressureError`, the rows were not stored)."""
        return {"queue_depth": self._writer.queue_depth if self._writer is not None else 0,
                "rejected_writes": self._rejected_writes}

    # --- internals -----------------------------------------------------------------------------

    def _put(self, item: InsertOp | CallOp) -> None:
        """Queue a write; blocks at most ``put_timeout_s`` on a full queue."""
        if self._writer is None:
            raise ReadOnlyStoreError(f"store {self.path} was opened read-only")
        try:
            queued = self._enqueue(item, self._put_timeout_s)
        except queue.Full:
            self._rejected_writes += 1
            raise self._backpressure() from None
        if not queued:
            raise StoreClosedError(f"store {self.path} is closed")

    def _put_marker(self, marker: FlushOp, timeout: float | None) -> bool:
        """Queue a flush marker (``False`` if the store is closed); waits up to ``timeout`` for room."""
        try:
            return self._enqueue(marker, timeout)
        except queue.Full:
            raise StoreTimeoutError(f"store {self.path}: not flushed within {timeout}s") from None

    def _enqueue(self, item: QueueItem, timeout: float | None) -> bool:
        """Put ``item`` on the writer's queue unless the store is closed; ``queue.Full`` after ``timeout``.

        The state lock makes "not closed, then queued" atomic, so nothing lands behind ``close()``'s stop.
        """
        assert self._writer is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._state_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise queue.Full
        try:
            if self._closed:
                return False
            while True:
                remaining = _WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
                try:
                    self._writer.put(item, timeout=max(0.0, min(remaining, _WAIT_SLICE_S)))
                    return True
                except queue.Full:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    if not self._writer.is_alive():
                        raise StoreError(f"store {self.path}: the writer thread has stopped") from None
        finally:
            self._state_lock.release()

    def _backpressure(self) -> StoreBackpressureError:
        return StoreBackpressureError(
            f"store {self.path}: the write queue stayed full for {self._put_timeout_s}s; the writer is not "
            "keeping up (slow disk?) or has stalled"
        )

    def _wait(self, future: Future[T], timeout: float | None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = _WAIT_SLICE_S if deadline is None else min(_WAIT_SLICE_S, deadline - time.monotonic())
            try:
                return future.result(timeout=max(remaining, 0))
            except TimeoutError:
                pass
            if future.done():
                return future.result()
            if self._writer is not None and not self._writer.is_alive():
                raise StoreError(f"store {self.path}: the writer thread has stopped")
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreTimeoutError(f"store {self.path}: not flushed within {timeout}s") from None

    def _call(self, fn: Any, description: str) -> Any:
        future: Future[Any] = Future()
        self._put(CallOp(fn, description, future))
        return self._wait(future, None)

    def _insert_and_wait(self, table: str, row: tuple[Any, ...]) -> Any:
        future: Future[Any] = Future()
        self._put(InsertOp(table, row, future))
        return self._wait(future, None)

    def _raise_writer_errors(self) -> None:
        error = self._writer.take_error() if self._writer is not None else None
        if error is not None:
            raise error

    def _sync(self) -> None:
        """Wait until queued writes are committed, without raising their errors (reads use this)."""
        if self._writer is not None and not self._closed:
            marker = FlushOp()
            if self._put_marker(marker, None):
                self._wait(marker.future, None)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._sync()
        with self._cursor_lock:
            if self._closed:
                raise StoreClosedError(f"store {self.path} is closed")
            cursor = self._read_root.cursor()
        try:
            return cursor.execute(sql, list(params)).fetchall()
        except duckdb.Error as exc:
            raise StoreError(f"store {self.path}: query failed: {exc}") from exc
        finally:
            cursor.close()


def _check_arrival_state(state: str) -> None:
    if state not in ("pending", "review"):
        raise ValueError(f"a new signal is pending or awaiting review, not {state!r}")
