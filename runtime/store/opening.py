"""Opening the DuckDB file safely: refuse what we must not touch, migrate what is old.

An existing file is first opened read-only (which never writes, creates a WAL, or "repairs" anything) to
check that it is a DuckDB database, that it is a runtime store, and that its schema is not newer than this
code. Only then is it reopened read-write and migrated.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import duckdb

from runtime.store.errors import (
    CorruptStoreError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
)
from runtime.store.migrations import (
    Migration,
    apply_migrations,
    latest_version,
    read_schema_version,
    too_new_error,
    validate_migrations,
)

_CORRUPT_HINTS = ("not a valid duckdb database", "could not read enough bytes", "corrupt", "checksum")
_CORRUPT_TYPES: tuple[type[BaseException], ...] = (
    duckdb.SerializationException,
    duckdb.InternalException,
    duckdb.FatalException,
)


def classify_open_error(exc: duckdb.Error, path: Path) -> StoreError:
    """Turn a DuckDB error raised while opening ``path`` into a :class:`StoreError` that says what to do."""
    message = str(exc)
    lowered = message.lower()
    if "could not set lock" in lowered or "conflicting lock" in lowered:
        return StoreLockedError(
            f"store {path} is locked by another process (DuckDB allows one writer process, and no readers "
            f"while it writes). Stop that process, or read through it (e.g. its HTTP API). DuckDB: {message}"
        )
    if "different configuration" in lowered:
        return StoreLockedError(
            f"store {path} is already open in this process with other settings (e.g. a writable Store); "
            f"use that Store instead of opening a second one. DuckDB: {message}"
        )
    if "version number" in lowered or "storage version" in lowered:
        return StoreError(
            f"store {path} was written by a different DuckDB storage version; install a duckdb release "
            f"that can read it. The file was not modified. DuckDB: {message}"
        )
    if isinstance(exc, _CORRUPT_TYPES) or any(hint in lowered for hint in _CORRUPT_HINTS):
        return CorruptStoreError(
            f"store {path} is not a readable DuckDB database (corrupt or truncated). It was left untouched. "
            f"Move it aside (e.g. rename it to {path.name}.corrupt) to start a new store, or restore it "
            f"from a backup. DuckDB: {message}"
        )
    return StoreError(f"could not open store {path}: {message}")


_HEADER_SIZE = 4096  # DuckDB file: main header, then two database headers, then fixed-size blocks


def check_not_truncated(path: Path) -> None:
    """Refuse a DuckDB file shorter than its own header says.

    DuckDB opens such a file and only fails when a query reaches a missing block, so a truncated file could
    look healthy until data is read (or written over). The active database header (the one with the higher
    iteration) records ``block_count`` and ``block_alloc_size``. The check is skipped when the header does
    not look like the layout it expects, so a future storage format is never refused by mistake.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(3 * _HEADER_SIZE)
    if len(head) < 3 * _HEADER_SIZE or head[8:12] != b"DUCK":
        return  # DuckDB itself rejects these
    headers = [struct.unpack_from("<6Q", head, offset) for offset in (_HEADER_SIZE, 2 * _HEADER_SIZE)]
    _checksum, _iteration, _meta, _free, block_count, block_size = max(headers, key=lambda h: h[1])
    plausible = block_size & (block_size - 1) == 0 and 4096 <= block_size <= 1 << 30 and block_count < 1 << 40
    if plausible and size < 3 * _HEADER_SIZE + block_count * block_size:
        raise CorruptStoreError(
            f"store {path} is truncated ({size} bytes, but its header describes {block_count} blocks of "
            f"{block_size} bytes). It was left untouched. Move it aside (e.g. rename it to "
            f"{path.name}.corrupt) to start a new store, or restore it from a backup."
        )


def _connect(path: Path, *, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.Error as exc:
        raise classify_open_error(exc, path) from exc


def _probe(path: Path, target: int) -> tuple[duckdb.DuckDBPyConnection, int]:
    """Open an existing file read-only and check it; return the open connection and its version."""
    check_not_truncated(path)
    conn = _connect(path, read_only=True)
    try:
        try:
            version = read_schema_version(conn, path)
        except duckdb.Error as exc:
            raise classify_open_error(exc, path) from exc
        if version > target:
            raise too_new_error(path, version, target)
    except BaseException:
        conn.close()
        raise
    return conn, version


def open_database(path: Path, *, read_only: bool,
                  migrations: Sequence[Migration]) -> tuple[duckdb.DuckDBPyConnection, int]:
    """Open (creating or migrating as needed) the store at ``path``; return the connection and version.

    A missing file is created, with its parent directories, unless ``read_only``. A read-only open of a
    file whose schema is older than the code is refused: open it read-write once to migrate it.
    """
    validate_migrations(migrations)
    target = latest_version(migrations)
    if path.exists():
        if not path.is_file():
            raise StoreError(f"store path {path} exists but is not a file")
        conn, version = _probe(path, target)
        if read_only:
            if version < target:
                conn.close()
                raise StoreError(
                    f"store {path} has schema version {version}, older than this runtime's {target}; it "
                    "cannot be migrated read-only. Open it once read-write (e.g. start the app) first."
                )
            return conn, version
        conn.close()
    elif read_only:
        raise StoreNotFoundError(f"no store at {path} (a read-only open never creates one)")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path, read_only=False)
    try:
        version = apply_migrations(conn, path, migrations)
    except BaseException:
        conn.close()
        raise
    return conn, version
