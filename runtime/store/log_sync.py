"""The background thread that ships a store's log (and, on a learner, imports the others'), off the request path.

A :class:`~runtime.store.store.Store` opened with ``ship_to`` and/or ``import_from`` starts one. Each round ships
what was committed since the last round (:func:`~runtime.store.shipping.ship_segments`) and imports the segments
other processes shipped (:func:`~runtime.store.importing.import_segments`); the first round runs at once (a spool
left by a process that was down ships on restart), then one every ``interval_s``. A failed round is logged and
retried on the next; :meth:`LogSync.stop` (run by ``Store.close``) ships one last time.
"""

from __future__ import annotations

import logging
import threading

from runtime.store.importing import ImportReport, import_segments
from runtime.store.segments import LogStore, SharedLog, check_writer_id
from runtime.store.shipping import ShipReport, ship_segments

log = logging.getLogger("runtime.store")


class LogSync:
    """Ships to `ship_to` and imports from `import_from` (fsspec URLs or paths; either may be ``None``) every
    `interval_s` seconds, in a daemon thread."""

    def __init__(self, store: LogStore, *, ship_to: str | None, import_from: str | None, writer: str | None,
                 interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("the log shipping interval must be > 0 seconds")
        if writer is not None:
            check_writer_id(writer)
        # Opening the filesystems now imports their packages now, not at interpreter exit (a late import fails).
        for url in (ship_to, import_from):
            if url is not None:
                SharedLog(url)
        self.store = store
        self.ship_to = ship_to
        self.import_from = import_from
        self.writer = writer
        self.interval_s = interval_s
        self.last_ship: ShipReport | None = None
        self.last_import: ImportReport | None = None
        self.last_error: str | None = None
        """Why the latest round failed (``None`` once a round succeeds)."""
        self._rounds = 0
        self._round_done = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"log-sync:{store.path.name}", daemon=True)

    def start(self) -> None:
        """Start the background rounds."""
        self._thread.start()

    @property
    def rounds(self) -> int:
        """Rounds completed (successfully or not)."""
        return self._rounds

    def wait_for_rounds(self, count: int, timeout: float | None = None) -> bool:
        """Block until `count` rounds have completed; return whether they did within `timeout` seconds."""
        with self._round_done:
            return self._round_done.wait_for(lambda: self._rounds >= count, timeout)

    def run_once(self) -> None:
        """One round now: ship, then import; failures are logged and kept in :attr:`last_error`."""
        errors = []
        if self.ship_to is not None:
            try:
                self.last_ship = ship_segments(self.store, self.ship_to, writer=self.writer)
            except Exception as exc:
                errors.append(f"shipping to {self.ship_to}: {exc}")
        if self.import_from is not None:
            try:
                self.last_import = import_segments(self.store, self.import_from)
                errors += list(self.last_import.failed.values())
            except Exception as exc:
                errors.append(f"importing from {self.import_from}: {exc}")
        self.last_error = "; ".join(errors) or None
        if self.last_error:
            log.warning("log sync of %s: %s", self.store.path, self.last_error)
        with self._round_done:
            self._rounds += 1
            self._round_done.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the rounds, then ship once more (everything committed so far). Never raises: a final shipment
        that fails is logged, and the rows ship from the store when it is next opened."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.ship_to is None:
            return
        try:
            self.last_ship = ship_segments(self.store, self.ship_to, writer=self.writer)
        except Exception as exc:
            self.last_error = f"final shipment to {self.ship_to}: {exc}"
            log.warning("log sync of %s: %s; the rows stay in the store and ship when it is next opened",
                        self.store.path, self.last_error)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # a bug must not end the thread silently
                log.exception("log sync of %s failed unexpectedly", self.store.path)
            if self._stop.wait(self.interval_s):
                break
