"""A bounded FIFO that hands the writer whole batches and wakes it only when needed.

``queue.Queue`` wakes the consumer on every put; at tens of thousands of rows per second that ping-pong
of the GIL costs more than the insert. Here the writer sleeps until the first item arrives, then until
the batch is full, an urgent item arrives (somebody waits on it), or ``flush_interval_s`` has passed
since the oldest item was queued.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchQueue(Generic[T]):
    """Bounded multi-producer, single-consumer queue with batch takes."""

    def __init__(self, maxsize: int, batch_size: int, flush_interval_s: float) -> None:
        self.maxsize = maxsize
        self._batch_size = batch_size
        self._enough = min(batch_size, maxsize)  # a full batch, or a full queue: write without waiting
        self._flush_interval_s = flush_interval_s
        self._items: deque[tuple[T, bool]] = deque()
        self._urgent = 0
        self._oldest_at = 0.0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, *, urgent: bool = False, timeout: float | None = None) -> None:
        """Append ``item``; block while full, raising ``queue.Full`` after ``timeout`` seconds."""
        with self._lock:
            if len(self._items) >= self.maxsize:
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self._items) >= self.maxsize:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise queue.Full
                    self._not_full.wait(remaining)
            self._items.append((item, urgent))
            size = len(self._items)
            if size == 1:
                self._oldest_at = time.monotonic()
            if urgent:
                self._urgent += 1
            if size == 1 or urgent or size == self._enough:
                self._not_empty.notify()

    def take(self) -> list[T]:
        """Block for the next batch: up to ``batch_size`` items, oldest first."""
        with self._lock:
            while not self._items:
                self._not_empty.wait()
            while not self._urgent and len(self._items) < self._enough:
                remaining = self._oldest_at + self._flush_interval_s - time.monotonic()
                if remaining <= 0:
                    break
                self._not_empty.wait(remaining)
            count = min(len(self._items), self._batch_size)
            batch: list[T] = []
            for _ in range(count):
                item, urgent = self._items.popleft()
                self._urgent -= urgent
                batch.append(item)
            # items left behind are older than _oldest_at's deadline already: the next take won't wait
            self._not_full.notify_all()
            return batch
