"""Control-plane writes (runs, adapters, consumption), run inside the writer's transaction.

Each function takes the writer's connection first; :class:`~runtime.store.store.Store` binds the rest
and waits for the result, so these updates are synchronous and atomic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import duckdb

from runtime.store.errors import UnknownRecordError
from runtime.store.models import FINISHED_RUN_STATUSES, AdapterRecord


def _count(result: duckdb.DuckDBPyConnection) -> int:
    row = result.fetchone()
    return int(row[0]) if row else 0


def update_run(conn: duckdb.DuckDBPyConnection, run_id: str, changes: dict[str, Any], now: datetime) -> None:
    """Apply ``changes`` (column -> value, JSON already encoded) to a run; stamp start/end times."""
    sets = [f"{column} = ?" for column in changes]
    params = list(changes.values())
    status = changes.get("status")
    if status == "running":
        sets.append("started_at = coalesce(started_at, ?)")
        params.append(now)
    elif status in FINISHED_RUN_STATUSES:
        sets += ["started_at = coalesce(started_at, ?)", "ended_at = ?"]
        params += [now, now]
    if not sets:
        sets.append("id = id")
    sql = f"UPDATE learning_runs SET {', '.join(sets)} WHERE id = ?"
    updated = _count(conn.execute(sql, [*params, run_id]))
    if not updated:
        raise UnknownRecordError(f"no learning run with id {run_id!r}")


def upsert_adapter(conn: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> AdapterRecord:
    """Insert or replace an adapter (keeping its ``created_at``); derive ``lineage`` from the parent."""
    if row["lineage"] is None:
        lineage: list[str] = []
        if row["parent"] is not None:
            found = conn.execute("SELECT lineage FROM adapters WHERE name = ?", [row["parent"]]).fetchone()
            lineage = [*(json.loads(found[0]) if found and found[0] else []), row["parent"]]
        row = {**row, "lineage": json.dumps(lineage)}
    columns = list(AdapterRecord.COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in ("name", "created_at"))
    conn.execute(
        f"INSERT INTO adapters ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT (name) DO UPDATE SET {updates}",
        [row[c] for c in columns],
    )
    stored = conn.execute(
        f"SELECT {', '.join(columns)} FROM adapters WHERE name = ?", [row["name"]]
    ).fetchone()
    assert stored is not None
    return AdapterRecord.from_row(stored)


def set_adapter_status(conn: duckdb.DuckDBPyConnection, name: str, status: str, now: datetime) -> None:
    """Change one adapter's status."""
    updated = _count(conn.execute(
        "UPDATE adapters SET status = ?, updated_at = ? WHERE name = ?", [status, now, name]
    ))
    if not updated:
        raise UnknownRecordError(f"no adapter named {name!r}")


def set_learning_state(conn: duckdb.DuckDBPyConnection, table: str, ids: Sequence[str], state: str,
                       reason: str | None, run_id: str | None, from_states: Sequence[str], now: datetime) -> int:
    """Move rows of ``signals`` or ``documents`` in one of ``from_states`` to ``state``; return how many moved.

    ``run_id`` (when given) becomes ``consumed_by_run``; back to ``pending``, the run is cleared so the next
    cycle learns the row again.
    """
    if table not in ("signals", "documents"):
        raise ValueError(f"no learning state in table {table!r}")
    if not ids:
        return 0
    sets = ["state = ?", "state_reason = ?", "state_changed_at = ?"]
    params: list[Any] = [state, reason, now]
    if state == "pending":
        sets += ["consumed_by_run = NULL", "consumed_at = NULL"]
    elif run_id is not None:
        sets += ["consumed_by_run = ?", "consumed_at = ?"]
        params += [run_id, now]
    sql = (f"UPDATE {table} SET {', '.join(sets)} "
           "WHERE list_contains(?::VARCHAR[], id) AND list_contains(?::VARCHAR[], state)")
    return _count(conn.execute(sql, [*params, list(ids), list(from_states)]))
