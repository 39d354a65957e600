"""Schema versions and ordered migrations.

``MIGRATIONS`` is a list of ``(version, step)``; a step is SQL (one or more statements) or a callable
taking the connection. Versions start at 1 and strictly increase. The table ``schema_version`` holds one
row per applied version. :func:`apply_migrations` runs every pending step and records it in ONE
transaction, so a failure leaves the file exactly at its previous version.

To change the schema, append a step; never edit a released one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from runtime.store.errors import MigrationError, NotAStoreError, SchemaTooNewError

MigrationStep = str | Callable[[duckdb.DuckDBPyConnection], None]
Migration = tuple[int, MigrationStep]

_V1 = """
CREATE TABLE interactions (
    id VARCHAR PRIMARY KEY,
    created_at TIMESTAMP NOT NULL,
    thread_id VARCHAR,
    kind VARCHAR NOT NULL,
    shadow_of VARCHAR,
    messages JSON NOT NULL,
    response VARCHAR NOT NULL,
    adapter VARCHAR,
    model VARCHAR,
    latency_ms DOUBLE,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    metadata JSON
);
CREATE TABLE signals (
    id VARCHAR PRIMARY KEY,
    created_at TIMESTAMP NOT NULL,
    kind VARCHAR NOT NULL,
    interaction_id VARCHAR,
    rating DOUBLE,
    text VARCHAR,
    messages JSON,
    comment VARCHAR,
    metadata JSON,
    consumed_by_run VARCHAR,
    consumed_at TIMESTAMP
);
CREATE TABLE documents (
    id VARCHAR PRIMARY KEY,
    created_at TIMESTAMP NOT NULL,
    title VARCHAR,
    text VARCHAR NOT NULL,
    questions JSON,
    metadata JSON,
    consumed_by_run VARCHAR,
    consumed_at TIMESTAMP
);
CREATE TABLE learning_runs (
    id VARCHAR PRIMARY KEY,
    method VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL,
    started_at TIMESTAMP,
    ended_at TIMESTAMP,
    error VARCHAR,
    config JSON,
    metrics JSON,
    data_counts JSON,
    parent_adapter VARCHAR,
    output_adapter VARCHAR
);
CREATE TABLE adapters (
    name VARCHAR PRIMARY KEY,
    path VARCHAR NOT NULL,
    parent VARCHAR,
    method VARCHAR,
    run_id VARCHAR,
    status VARCHAR NOT NULL,
    checksum VARCHAR,
    metrics JSON,
    lineage JSON,
    created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE policy_decisions (
    id VARCHAR PRIMARY KEY,
    created_at TIMESTAMP NOT NULL,
    adapter VARCHAR NOT NULL,
    decision VARCHAR NOT NULL,
    reasons JSON,
    checks JSON,
    run_id VARCHAR
);
"""

_V2_LEARNING_STATES = """
ALTER TABLE signals ADD COLUMN state VARCHAR DEFAULT 'pending';
ALTER TABLE signals ADD COLUMN state_reason VARCHAR;
ALTER TABLE signals ADD COLUMN state_changed_at TIMESTAMP;
ALTER TABLE documents ADD COLUMN state VARCHAR DEFAULT 'pending';
ALTER TABLE documents ADD COLUMN state_reason VARCHAR;
ALTER TABLE documents ADD COLUMN state_changed_at TIMESTAMP;
UPDATE signals SET state = 'learned' WHERE consumed_by_run IS NOT NULL;
UPDATE documents SET state = 'learned' WHERE consumed_by_run IS NOT NULL;
UPDATE signals SET state = 'held',
    state_reason = 'its update was vetoed by the gate (recorded before signal states existed)'
    WHERE consumed_by_run IN (SELECT r.id FROM learning_runs r JOIN adapters a ON a.name = r.output_adapter
                              WHERE a.status = 'rejected');
UPDATE documents SET state = 'held',
    state_reason = 'its update was vetoed by the gate (recorded before signal states existed)'
    WHERE consumed_by_run IN (SELECT r.id FROM learning_runs r JOIN adapters a ON a.name = r.output_adapter
                              WHERE a.status = 'rejected');
"""
"""Signals and documents get a learning state; those a vetoed update consumed are held for the operator."""

_V3_ADAPTER_ROLES = """
ALTER TABLE adapters ADD COLUMN role VARCHAR DEFAULT 'serving';
UPDATE adapters SET role = 'generator', method = 'seal' WHERE method = 'seal-generator';
"""
"""Adapters get a role; SEAL's self-edit generators (method ``seal-generator`` before) become role ``generator``."""

_V4_PRINCIPALS_AND_REVIEWS = """
ALTER TABLE signals ADD COLUMN principal VARCHAR;
ALTER TABLE documents ADD COLUMN principal VARCHAR;
CREATE TABLE signal_reviews (
    id VARCHAR PRIMARY KEY,
    signal_id VARCHAR NOT NULL,
    decision VARCHAR NOT NULL,
    reason VARCHAR,
    reviewer VARCHAR,
    decided_at TIMESTAMP NOT NULL
);
"""
"""Signals and documents record who sent them; review decisions (approve or reject, why, by whom) are kept."""

_V5_LOG_SHIPPING = """
CREATE SEQUENCE log_seq;
ALTER TABLE interactions ADD COLUMN log_seq BIGINT DEFAULT nextval('log_seq');
ALTER TABLE signals ADD COLUMN log_seq BIGINT DEFAULT nextval('log_seq');
ALTER TABLE documents ADD COLUMN log_seq BIGINT DEFAULT nextval('log_seq');
ALTER TABLE interactions ADD COLUMN origin VARCHAR;
ALTER TABLE signals ADD COLUMN origin VARCHAR;
ALTER TABLE documents ADD COLUMN origin VARCHAR;
CREATE TABLE log_writer (
    writer_id VARCHAR NOT NULL,
    next_segment BIGINT NOT NULL
);
CREATE TABLE shipped_marks (
    table_name VARCHAR PRIMARY KEY,
    last_log_seq BIGINT NOT NULL,
    segment BIGINT,
    shipped_at TIMESTAMP NOT NULL
);
CREATE TABLE imported_segments (
    name VARCHAR PRIMARY KEY,
    writer_id VARCHAR NOT NULL,
    segment BIGINT NOT NULL,
    table_name VARCHAR NOT NULL,
    rows_in_segment BIGINT NOT NULL,
    rows_added BIGINT NOT NULL,
    imported_at TIMESTAMP NOT NULL
);
"""
"""Log shipping (:mod:`runtime.store.shipping`): rows get a commit-ordered ``log_seq`` (the single writer takes
values in commit order, so "everything up to N" is a high-water mark) and the ``origin`` writer id of the
process that logged them (NULL: this store); the writer's id, segment counter and marks; the segments imported."""

MIGRATIONS: list[Migration] = [
    (1, _V1),
    (2, _V2_LEARNING_STATES),
    (3, _V3_ADAPTER_ROLES),
    (4, _V4_PRINCIPALS_AND_REVIEWS),
    (5, _V5_LOG_SHIPPING),
]
"""The migrations this version of the package knows, oldest first."""

SCHEMA_VERSION_TABLE = "schema_version"


def latest_version(migrations: Sequence[Migration]) -> int:
    """The version a file has once every step in ``migrations`` is applied (0 for an empty list)."""
    return migrations[-1][0] if migrations else 0


SCHEMA_VERSION: int = latest_version(MIGRATIONS)
"""The schema version written by this version of the package."""


def validate_migrations(migrations: Sequence[Migration]) -> None:
    """Raise ``ValueError`` unless versions are positive and strictly increasing."""
    previous = 0
    for version, _step in migrations:
        if not isinstance(version, int) or version <= previous:
            raise ValueError(f"migration versions must be positive and strictly increasing, got {version} "
                             f"after {previous}")
        previous = version


def _table_names(conn: duckdb.DuckDBPyConnection) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
    ).fetchall()
    return {row[0] for row in rows}


def read_schema_version(conn: duckdb.DuckDBPyConnection, path: Path | str) -> int:
    """The file's schema version: 0 for an empty database.

    Raises :class:`NotAStoreError` for a DuckDB file holding other tables but no ``schema_version``.
    """
    tables = _table_names(conn)
    if SCHEMA_VERSION_TABLE not in tables:
        if tables:
            raise NotAStoreError(
                f"{path} is a DuckDB database but not a runtime store (it has tables {sorted(tables)[:5]} "
                "and no schema_version table); point the runtime at another path"
            )
        return 0
    row = conn.execute(f"SELECT max(version) FROM {SCHEMA_VERSION_TABLE}").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def too_new_error(path: Path | str, found: int, known: int) -> SchemaTooNewError:
    """The error for a file whose schema is newer than this code understands."""
    return SchemaTooNewError(
        f"store {path} has schema version {found}, but this version of the runtime only knows up to "
        f"version {known}; it was written by a newer release. Upgrade the runtime package to open it "
        "(the file was not modified)."
    )


def apply_migrations(conn: duckdb.DuckDBPyConnection, path: Path | str,
                     migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database up to ``latest_version(migrations)`` in one transaction; return that version.

    Raises :class:`SchemaTooNewError` if the file is already newer, and :class:`MigrationError` (after
    rolling back) if a step fails.
    """
    validate_migrations(migrations)
    target = latest_version(migrations)
    conn.execute("BEGIN TRANSACTION")
    try:
        current = read_schema_version(conn, path)
        if current > target:
            raise too_new_error(path, current, target)
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION_TABLE} "
            "(version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"
        )
        for version, step in migrations:
            if version <= current:
                continue
            try:
                if isinstance(step, str):
                    conn.execute(step)
                else:
                    step(conn)
            except Exception as exc:
                raise MigrationError(
                    f"migrating store {path} from schema version {current} to {target} failed at step "
                    f"{version}: {type(exc).__name__}: {exc}. The file was left at version {current}."
                ) from exc
            conn.execute(
                f"INSERT INTO {SCHEMA_VERSION_TABLE} VALUES (?, ?)",
                [version, datetime.now(UTC).replace(tzinfo=None)],
            )
        conn.execute("COMMIT")
    except BaseException:
        try:
            conn.execute("ROLLBACK")
        except duckdb.Error:  # the failure may have ended the transaction already
            pass
        raise
    return target
