"""Batch inserts: many rows of one table in one statement.

With pyarrow (a dependency of ``datasets``, so normally present) the rows become an Arrow table that
DuckDB scans directly. Without it, each column is bound as one list parameter and expanded with
``UNNEST`` (slower: every value is converted on its own). Either way the statement names its columns,
so tables that later migrations widen keep working.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import duckdb

try:
    import pyarrow as pa
except ImportError:  # pragma: no cover - the fallback is tested by forcing use_arrow=False
    pa = None  # type: ignore[assignment]

Inserter = Callable[[duckdb.DuckDBPyConnection, Sequence[tuple[Any, ...]]], None]
"""Insert rows (tuples in the inserter's column order) through the given connection.

TIMESTAMP values are given as integer microseconds since the Unix epoch (UTC), which is cheaper to
produce on the hot path and to convert than ``datetime`` objects."""


_warm_lock = threading.Lock()
_warm = False


def warm_up() -> None:
    """Do one Arrow insert on a scratch in-memory database (once per process), so lazy imports happen now.

    pyarrow and DuckDB import pandas (hundreds of milliseconds) the first time they see an Arrow array.
    Doing it when a writable store opens keeps that cost off the first batch and, above all, away from
    interpreter exit, where a late import fails ("can't register atexit after shutdown") and would lose
    the final flush of a store that was not closed.
    """
    global _warm
    if pa is None or _warm:
        return
    with _warm_lock:
        if _warm:
            return
        conn = duckdb.connect()
        try:
            conn.execute("CREATE TABLE warm (a VARCHAR, t TIMESTAMP)")
            batch = pa.table({"a": pa.array(["x"]), "t": pa.array([0], pa.timestamp("us"))})
            conn.register("_store_batch_warm", batch)
            conn.execute("INSERT INTO warm (a, t) SELECT a, t FROM _store_batch_warm")
            conn.unregister("_store_batch_warm")
        finally:
            conn.close()
        _warm = True


def column_types(conn: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """Column name -> DuckDB type name, from the live schema."""
    return {row[0]: row[1] for row in conn.execute(f"DESCRIBE {table}").fetchall()}


def _arrow_type(duck_type: str) -> Any:
    assert pa is not None
    known = {
        "VARCHAR": pa.string(), "JSON": pa.string(), "TIMESTAMP": pa.timestamp("us"),
        "DOUBLE": pa.float64(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "BOOLEAN": pa.bool_(),
    }
    return known.get(duck_type)  # None: let pyarrow infer, DuckDB casts on insert


def make_inserter(conn: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], *,
                  use_arrow: bool | None = None) -> Inserter:
    """Build the batch inserter for ``table``; ``use_arrow=None`` picks Arrow when pyarrow is importable."""
    types = column_types(conn, table)
    missing = [c for c in columns if c not in types]
    if missing:
        raise ValueError(f"table {table} has no column(s) {missing}")
    names = list(columns)
    column_list = ", ".join(names)
    if use_arrow is None:
        use_arrow = pa is not None
    if use_arrow:
        if pa is None:
            raise ImportError("pyarrow is not installed")
        schema = [(name, _arrow_type(types[name])) for name in names]
        view = f"_store_batch_{table}"
        sql = f"INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {view}"

        def insert_arrow(target: duckdb.DuckDBPyConnection, rows: Sequence[tuple[Any, ...]]) -> None:
            values = zip(*rows, strict=True)
            arrays = [pa.array(list(col), type=arrow_type) for (_n, arrow_type), col in zip(schema, values,
                                                                                         strict=True)]
            target.register(view, pa.Table.from_arrays(arrays, names=names))
            try:
                target.execute(sql)
            finally:
                target.unregister(view)

        return insert_arrow

    selects = ", ".join(
        "make_timestamp(UNNEST(?::BIGINT[]))" if types[name] == "TIMESTAMP" else f"UNNEST(?::{types[name]}[])"
        for name in names
    )
    unnest_sql = f"INSERT INTO {table} ({column_list}) SELECT {selects}"

    def insert_unnest(target: duckdb.DuckDBPyConnection, rows: Sequence[tuple[Any, ...]]) -> None:
        target.execute(unnest_sql, [list(col) for col in zip(*rows, strict=True)])

    return insert_unnest
