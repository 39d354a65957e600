"""The engine's FIFO reentrant lock."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from runtime.engines.fair_lock import FairRLock


def test_reentrant_and_owner_checked() -> None:
    lock = FairRLock()
    with lock, lock:
        pass
    lock.acquire()
    errors: list[Exception] = []

    def other() -> None:
        try:
            lock.release()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    lock.release()
    assert errors and "another thread" in str(errors[0])
    with pytest.raises(RuntimeError):
        lock.release()


def test_waiters_are_served_in_arrival_order() -> None:
    lock = FairRLock()
    order: list[int] = []
    lock.acquire()
    threads = []
    for i in range(5):
        thread = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        thread.start()
        threads.append(thread)
        while lock.waiting < i + 1:  # wait until thread i is queued before starting the next
            time.sleep(0.001)
    assert lock.waiting == 5  # what the engine reports as its queue depth
    lock.release()
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4] and lock.waiting == 0


def test_a_releasing_thread_does_not_jump_the_queue() -> None:
    lock = FairRLock()
    got: list[str] = []
    lock.acquire()
    waiter = threading.Thread(target=lambda: (lock.acquire(), got.append("waiter"), lock.release()))
    waiter.start()
    while not lock._waiting:
        time.sleep(0.001)
    lock.release()
    lock.acquire()  # asks again at once: the waiter, queued first, must have had its turn
    got.append("releaser")
    lock.release()
    waiter.join()
    assert got == ["waiter", "releaser"]


class _InterruptingCondition(threading.Condition):
    """A condition whose ``wait`` raises ``KeyboardInterrupt`` in the thread named ``victim`` once ``interrupt``
    is set, as a Ctrl-C arriving while that thread waits would; ``queued[name]`` is set whenever the thread of
    that name waits."""

    def __init__(self, victim: str, names: list[str]) -> None:
        super().__init__(threading.Lock())
        self.victim = victim
        self.interrupt = threading.Event()
        self.queued = {name: threading.Event() for name in names}

    def wait(self, timeout: float | None = None) -> bool:
        name = threading.current_thread().name
        if name in self.queued:
            self.queued[name].set()  # still holding the lock: a release can only come once this thread waits
        woken = super().wait(timeout)
        if name == self.victim and self.interrupt.is_set():
            raise KeyboardInterrupt
        return woken


def test_an_interrupted_waiter_gives_up_its_place() -> None:
    lock = FairRLock()
    cond = _InterruptingCondition("victim", ["victim", "next"])
    lock._cond = cond  # type: ignore[assignment]
    outcome: dict[str, Any] = {}
    next_acquired = threading.Event()

    def victim() -> None:
        try:
            with lock:
                outcome["victim"] = "acquired"
        except KeyboardInterrupt:
            outcome["victim"] = "interrupted"

    def next_in_line() -> None:
        with lock:
            next_acquired.set()

    lock.acquire()
    first = threading.Thread(target=victim, name="victim", daemon=True)
    first.start()
    assert cond.queued["victim"].wait(timeout=10)
    second = threading.Thread(target=next_in_line, name="next", daemon=True)
    second.start()
    assert cond.queued["next"].wait(timeout=10)  # queued behind the victim
    cond.interrupt.set()
    lock.release()  # wakes both; the victim, first in line, is interrupted instead of taking the lock
    first.join(timeout=10)
    second.join(timeout=10)  # a safety net: without the fix the second thread waits forever
    assert outcome == {"victim": "interrupted"}
    assert next_acquired.is_set()
    assert not lock._waiting
    with lock:  # and the lock is still free for anyone
        pass
