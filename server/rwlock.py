"""A readers-writer lock for a table: reads share it, changes hold it alone.

A table's read-only calls (inference pulls, ``frequencies``, ``stats``, the copy
of a checkpoint snapshot) only read its arrays, and the numba kernels they run
release the GIL, so several can run at once: an inference pull no longer waits
for a checkpoint's copy of a large table, nor for another inference pull.
Training pulls, pushes and every other change hold the lock alone.

Writers are preferred: once a writer waits, new readers wait behind it, so a
steady stream of inference pulls cannot starve training. Not reentrant: a
thread that holds the lock (either way) must not take it again.

Bulk work that takes the lock page by page (eviction sweeps) calls
``let_waiters_in`` between pages: a release followed at once by a new acquire would
otherwise win almost every time under the GIL (the releasing thread keeps running),
and the pages would hold the lock back to back as if it were never released.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Shared (``read()``) and exclusive (``write()``) holds, writer-preferring."""

    __slots__ = ("_cond", "_grants", "_readers", "_readers_waiting", "_writer",
                 "_writers_waiting", "_yielding")  # fmt: skip

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding it shared
        self._writer = False  # a thread holds it exclusively
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._grants = 0  # holds granted so far (either way)
        self._yielding = 0  # threads in let_waiters_in

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared: with other readers, never with a writer."""
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writer or self._writers_waiting:
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
            self._readers += 1
            self._granted()
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock alone: no reader and no other writer."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
            self._granted()
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()

    def let_waiters_in(self, timeout: float = 0.05) -> None:
        """Called without holding the lock: if threads wait for it, block until one of
        them got it (or ``timeout`` seconds passed), so that work done in pages lets
        others in between its pages. Returns at once when nobody waits."""
        with self._cond:
            if not (self._writers_waiting or self._readers_waiting):
                return
            seen = self._grants
            self._yielding += 1
            try:
                self._cond.wait_for(lambda: self._grants != seen, timeout)
            finally:
                self._yielding -= 1

    def _granted(self) -> None:
        self._grants += 1
        if self._yielding:
            self._cond.notify_all()

    def state(self) -> tuple[int, bool, int]:
        """(readers holding it, whether a writer holds it, writers waiting): for tests."""
        with self._cond:
            return self._readers, self._writer, self._writers_waiting
