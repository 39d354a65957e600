"""The engine's FIFO reentrant lock."""

from __future__ import annotations

import threading
import time

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
        while len(lock._waiting) < i + 1:  # wait until thread i is queued before starting the next
            time.sleep(0.001)
    lock.release()
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]


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
