"""A background task that runs every S seconds, at multiples of S on the wall clock.

Periodic checkpoints and periodic eviction sweeps both use it. Firing on the wall
clock's multiples of the period (not S seconds after start) makes every shard of a
cluster fire together without talking, so their checkpoints share a step.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable


class Periodic:
    """Calls ``fn()`` every ``every_s`` seconds on a daemon thread until ``stop``.

    Exceptions from ``fn`` are suppressed (``fn`` logs and counts its own failures);
    the next period runs as usual. ``stop`` waits for a call in progress.
    """

    def __init__(self, name: str, every_s: float, fn: Callable[[], object]) -> None:
        if not every_s > 0:
            raise ValueError(f"the period of {name} must be > 0 seconds, got {every_s}")
        self.name = name
        self.every_s = float(every_s)
        self._fn = fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        every = self.every_s
        while True:
            now = time.time()
            due = (math.floor(now / every) + 1) * every
            if self._stop.wait(due - now):
                return
            with contextlib.suppress(Exception):
                self._fn()

    def stop(self) -> None:
        """Stop firing; waits for a call in progress."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
