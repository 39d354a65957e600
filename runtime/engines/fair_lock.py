"""A first-come, first-served reentrant lock.

``threading.RLock`` makes no promise of order: a thread that releases it and asks again at once usually
wins, so under steady load (clients queued on the engine) an adapter load or a gate evaluation can wait
for many requests, and tail latency grows. This lock serves waiters in arrival order.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class FairRLock:
    """A reentrant lock granted in FIFO order of the threads asking for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._waiting: deque[object] = deque()

    def acquire(self) -> bool:
        """Wait for the lock (behind the threads that asked first) and take it; always returns ``True``.

        A wait interrupted by an exception (``KeyboardInterrupt``, an asynchronous exception) gives up the
        place in the queue and raises it.
        """
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            ticket = object()
            self._waiting.append(ticket)
            try:
                while self._owner is not None or self._waiting[0] is not ticket:
                    self._cond.wait()
            except BaseException:  # e.g. KeyboardInterrupt: a ticket left at the head would block everyone
                self._waiting.remove(ticket)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self) -> None:
        """Release one level of ownership; the lock is free once every ``acquire`` was released."""
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a FairRLock held by another thread")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @property
    def waiting(self) -> int:
        """How many threads are queued for the lock (not counting its holder)."""
        with self._cond:
            return len(self._waiting)

    def __enter__(self) -> FairRLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
