"""Exceptions raised by the store. Every one derives from :class:`StoreError`."""

from __future__ import annotations

from dataclasses import dataclass


class StoreError(Exception):
    """Base class for every error raised by :mod:`runtime.store`."""


class SchemaTooNewError(StoreError):
    """The file was written by a newer version of this package than the one running."""


class MigrationError(StoreError):
    """A schema migration failed; the file was left at its previous version."""


class CorruptStoreError(StoreError):
    """The file exists but is not a readable DuckDB database (random bytes, truncated, damaged)."""


class NotAStoreError(StoreError):
    """The file is a DuckDB database, but not one created by this package."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A read-only open was asked for a path where no store exists."""


class StoreLockedError(StoreError):
    """Another process (or another writable ``Store`` in this process) holds the database file."""


class StoreClosedError(StoreError):
    """The store was used after :meth:`Store.close`."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened with ``read_only=True``."""


class StoreBackpressureError(StoreError):
    """The write queue stayed full for longer than the store's ``put_timeout_s``."""


class StoreTimeoutError(StoreError, TimeoutError):
    """``flush``/``close`` did not finish within the given timeout."""


class UnknownRecordError(StoreError, KeyError):
    """An update named a run or adapter that does not exist."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, slots=True)
class WriteFailure:
    """One write the background writer could not commit."""

    description: str
    error: BaseException

    def __str__(self) -> str:
        return f"{self.description}: {type(self.error).__name__}: {self.error}"


class StoreWriterError(StoreError):
    """Background writes failed; raised by the next ``flush()`` or ``close()``.

    ``failures`` lists what was lost (up to a cap; ``dropped`` counts the rest).
    """

    def __init__(self, failures: list[WriteFailure], dropped: int = 0) -> None:
        self.failures = failures
        self.dropped = dropped
        total = len(failures) + dropped
        first = failures[0] if failures else "?"
        super().__init__(f"{total} background store write(s) failed and were not saved; first: {first}")
