"""Parquet log segments on shared storage: their names, and putting one there atomically.

A segment holds the rows of one table that one writer committed since its previous segment::

    <url>/<writer id>/<segment:012d>.<table>.parquet        e.g. s3://logs/app-1/000000000007.signals.parquet

``url`` is an fsspec URL (``file:///...``, ``s3://...``, ``memory://...``) or a plain path
(see :mod:`runtime.shared_storage`). A segment is uploaded under a temporary name starting with ``.tmp-`` and then
moved to its final name, so a reader that lists final names never sees half a segment.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runtime.shared_storage import filesystem, join_url
from runtime.store.errors import StoreError

SHIPPED_TABLES: tuple[str, ...] = ("interactions", "documents", "signals")
"""The log tables every process ships, in import order (a signal's interaction arrives with or before it)."""

WRITER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A writer id is one path component: letters, digits, ``.``, ``_``, ``-``; it starts with a letter or digit."""

_SEGMENT_FILE = re.compile(r"^(\d{12})\.(" + "|".join(SHIPPED_TABLES) + r")\.parquet$")


class LogStore(Protocol):
    """What shipping and importing use of a :class:`~runtime.store.store.Store` (structural, so that these modules
    and the store, which starts their background thread, do not import each other): its path, reads after the
    writer caught up, and functions run in the writer's transaction."""

    path: Path

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def _call(self, fn: Any, description: str) -> Any: ...


class LogShippingError(StoreError):
    """A segment could not be shipped or imported; the message says why and what to do. Nothing was lost: a
    writer keeps its rows until a segment holding them is uploaded, and an importer retries what failed."""


@dataclass(frozen=True, order=True)
class SegmentName:
    """Where one segment lives, relative to the shared location."""

    writer_id: str
    segment: int
    table: str

    @property
    def name(self) -> str:
        """``<writer>/<segment:012d>.<table>``: the key an importer remembers."""
        return f"{self.writer_id}/{self.segment:012d}.{self.table}"

    @property
    def file(self) -> str:
        """The file name within the writer's folder."""
        return f"{self.segment:012d}.{self.table}.parquet"

    @property
    def order(self) -> tuple[str, int, int]:
        """Import order: writer, then segment, then table (interactions before the signals about them)."""
        return (self.writer_id, self.segment, SHIPPED_TABLES.index(self.table))


def check_writer_id(writer_id: str) -> str:
    """Return `writer_id` if it can name a folder of segments; a clear ``ValueError`` otherwise."""
    if not isinstance(writer_id, str) or not re.match(WRITER_ID_PATTERN, writer_id):
        raise ValueError(
            f"writer id {writer_id!r} cannot name a segment folder: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. app-1)"
        )
    return writer_id


def parse_segment(relative: str) -> SegmentName | None:
    """The segment at ``<writer>/<file>`` (relative to the shared location), or ``None`` for anything else
    (temporary uploads, foreign files)."""
    parts = relative.strip("/").split("/")
    if len(parts) != 2 or not re.match(WRITER_ID_PATTERN, parts[0]):
        return None
    found = _SEGMENT_FILE.match(parts[1])
    if found is None:
        return None
    return SegmentName(parts[0], int(found.group(1)), found.group(2))


class SharedLog:
    """The shared location segments are shipped to and imported from (an fsspec URL or a plain path)."""

    def __init__(self, url: str) -> None:
        self.url = str(url)
        try:
            self.fs, root = filesystem(self.url)
        except ValueError as exc:
            raise LogShippingError(str(exc)) from exc
        self.root: str = root.rstrip("/") or "/"
        self.local: bool = "file" in _protocols(self.fs)

    def path(self, segment: SegmentName) -> str:
        """The segment's path within the filesystem."""
        return join_url(self.root, segment.writer_id, segment.file)

    def list_segments(self) -> list[SegmentName]:
        """Every complete segment at the location, in import order (an absent location holds none)."""
        if not self.fs.exists(self.root):
            return []
        found = []
        for path in self.fs.find(self.root, maxdepth=2, detail=False):
            relative = str(path)[len(self.root):].lstrip("/")
            segment = parse_segment(relative)
            if segment is not None:
                found.append(segment)
        return sorted(found, key=lambda s: s.order)

    def put(self, local_file: Path, segment: SegmentName) -> str:
        """Upload `local_file` as `segment`: under a temporary name first, then moved to the final one.

        Refuses to replace an existing segment (two stores shipping under one writer id would overwrite each
        other's rows): raises :class:`LogShippingError`.
        """
        final = self.path(segment)
        folder = join_url(self.root, segment.writer_id)
        temporary = join_url(folder, f".tmp-{segment.file}.{uuid.uuid4().hex[:12]}")
        try:
            self.fs.makedirs(folder, exist_ok=True)
            if self.fs.exists(final):
                raise LogShippingError(
                    f"segment {segment.name} already exists at {self.url}: another store ships under writer id "
                    f"{segment.writer_id!r}. Give each process its own store.writer_id; this store's rows were kept "
                    "and ship once the id is unique"
                )
            self.fs.put_file(str(local_file), temporary)
            self.fs.mv(temporary, final)
        except LogShippingError:
            raise
        except Exception as exc:  # any backend's I/O error: the rows stay in the spool
            _remove_quietly(self.fs, temporary)
            raise LogShippingError(
                f"could not upload segment {segment.name} to {self.url}: {type(exc).__name__}: {exc}. The rows stay "
                "in the local store and ship on the next attempt"
            ) from exc
        return final

    def fetch(self, segment: SegmentName, scratch: Path) -> Path:
        """A local file holding `segment`: the file itself on a local filesystem, else a copy under `scratch`."""
        path = self.path(segment)
        if self.local:
            return Path(path)
        target = scratch / f"{segment.writer_id}.{segment.file}"
        self.fs.get_file(path, str(target))
        return target


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _remove_quietly(fs: Any, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except Exception:  # best effort: a leftover temporary name is ignored by every reader
        pass
