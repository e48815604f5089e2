"""A readers-writer lock for a table: reads share it, changes hold it alone.

A table's read-only calls (inference pulls, ``frequencies``, ``stats``, the copy
of a checkpoint snapshot) only read its arrays, and the numba kernels they run
release the GIL, so several can run at once: an inference pull no longer waits
for a checkpoint's copy of a large table, nor for another inference pull.
Training pulls, pushes and every other change hold the lock alone.

Writers are preferred: once a writer waits, new readers wait behind it, so a
steady stream of inference pulls cannot starve training. Not reentrant: a
thread that holds the lock (either way) must not take it again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RWLock:
    """Shared (``read()``) and exclusive (``write()``) holds, writer-preferring."""

    __slots__ = ("_cond", "_readers", "_writer", "_writers_waiting")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads holding it shared
        self._writer = False  # a thread holds it exclusively
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared: with other readers, never with a writer."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
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
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()

    def state(self) -> tuple[int, bool, int]:
        """(readers holding it, whether a writer holds it, writers waiting): for tests."""
        with self._cond:
            return self._readers, self._writer, self._writers_waiting
