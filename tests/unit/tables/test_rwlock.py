"""The tables' readers-writer lock (server/rwlock.py): shared reads, exclusive writes,
writers first. Threads coordinate through events; every wait is bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from embps.server.rwlock import RWLock

WAIT_S = 5.0  # a thread that should finish does so well within this
BLOCKED_S = 0.3  # a thread that should stay blocked is still blocked after this


def start(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_readers_share_the_lock() -> None:
    lock = RWLock()
    inside = threading.Barrier(3, timeout=WAIT_S)  # three readers inside at once, or it breaks

    def reader() -> None:
        with lock.read():
            inside.wait()

    threads = [start(reader) for _ in range(3)]
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert not inside.broken
    assert lock.state() == (0, False, 0)


def test_a_writer_excludes_readers_and_writers() -> None:
    lock = RWLock()
    entered: list[str] = []

    def reader() -> None:
        with lock.read():
            entered.append("reader")

    def writer() -> None:
        with lock.write():
            entered.append("writer")

    with lock.write():
        assert lock.state() == (0, True, 0)
        r, w = start(reader), start(writer)
        r.join(BLOCKED_S)
        w.join(BLOCKED_S)
        assert entered == [] and r.is_alive() and w.is_alive()
    r.join(WAIT_S)
    w.join(WAIT_S)
    assert not r.is_alive() and not w.is_alive()
    assert sorted(entered) == ["reader", "writer"]
    assert lock.state() == (0, False, 0)


def test_a_waiting_writer_goes_before_new_readers() -> None:
    lock = RWLock()
    order: list[str] = []
    reader_in, release_reader = threading.Event(), threading.Event()

    def first_reader() -> None:
        with lock.read():
            reader_in.set()
            release_reader.wait(WAIT_S)
        order.append("first reader out")

    def writer() -> None:
        with lock.write():
            order.append("writer")

    def late_reader() -> None:
        with lock.read():
            order.append("late reader")

    r1 = start(first_reader)
    assert reader_in.wait(WAIT_S)
    w = start(writer)
    for _ in range(100):  # the writer is queued
        if lock.state()[2] == 1:
            break
        threading.Event().wait(0.01)
    assert lock.state() == (1, False, 1)
    r2 = start(late_reader)
    r2.join(BLOCKED_S)
    assert r2.is_alive(), "a new reader overtook the waiting writer"
    release_reader.set()
    for t in (r1, w, r2):
        t.join(WAIT_S)
        assert not t.is_alive()
    assert order == ["first reader out", "writer", "late reader"]
    assert lock.state() == (0, False, 0)


def test_an_exception_inside_releases_the_lock() -> None:
    lock = RWLock()
    for hold in (lock.read, lock.write):
        with pytest.raises(RuntimeError), hold():
            raise RuntimeError("inside")
        assert lock.state() == (0, False, 0)
    with lock.write():  # neither hold leaked
        pass


def test_let_waiters_in_hands_the_lock_to_a_waiting_writer() -> None:
    """Work done in pages lets a waiting writer in between its pages (eviction sweeps)."""
    lock = RWLock()
    order: list[str] = []
    waiting = threading.Event()

    def other() -> None:
        waiting.set()
        with lock.write():
            order.append("other")

    with lock.write():
        order.append("page 1")
        t = threading.Thread(target=other)
        t.start()
        waiting.wait(5)
        deadline = time.monotonic() + 5
        while lock.state()[2] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # until the other thread waits for the lock
    lock.let_waiters_in(timeout=5)
    with lock.write():
        order.append("page 2")
    t.join(5)
    assert order == ["page 1", "other", "page 2"]


def test_let_waiters_in_returns_at_once_when_nobody_waits() -> None:
    lock = RWLock()
    t0 = time.monotonic()
    lock.let_waiters_in(timeout=5)
    assert time.monotonic() - t0 < 0.5
