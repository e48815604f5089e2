"""Intra-request parallelism: a large batch's read kernels run in pieces on helper threads.

A pull of 16384 rows spends most of a shard's time in two ``nogil`` numba kernels,
the hash-map lookup and the row gather, while the client that sent it waits. The
kernels write disjoint slices of their output, so ``run_in_pieces`` cuts a batch
into contiguous pieces, runs the first piece in the calling thread and the others
on helper threads, and returns when all are done: the same result as one call.

Helpers: one fewer than the CPUs this process may run on, at most 3 (none on one
CPU: then everything runs in the caller). A piece has at least ``MIN_PIECE`` rows,
so small batches never pay for a hand-off (about 20 us).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

MIN_PIECE = 4096  # rows; below 2 * MIN_PIECE a batch runs in the calling thread
MAX_HELPERS = 3

_pool: ThreadPoolExecutor | None = None
_helpers = -1
_lock = threading.Lock()


def helper_count() -> int:
    """Helper threads available to ``run_in_pieces`` (0: everything runs in the caller)."""
    global _helpers
    if _helpers < 0:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        _helpers = max(0, min(MAX_HELPERS, cpus - 1))
    return _helpers


def set_helper_count(helpers: int) -> None:
    """Use ``helpers`` helper threads from now on (0: run every batch in the caller)."""
    global _helpers, _pool
    if helpers < 0:
        raise ValueError(f"helpers must be >= 0, got {helpers}")
    with _lock:
        old, _pool, _helpers = _pool, None, helpers
    if old is not None:
        old.shutdown(wait=True)


def _forget_pool_in_child() -> None:
    """After fork(2) the child has none of the parent's helper threads: start afresh."""
    global _pool, _lock
    _pool = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, helper_count()), thread_name_prefix="embps-kernel")
        return _pool


def run_in_pieces(n: int, work: Callable[[int, int], object]) -> None:
    """Call ``work(a, b)`` over contiguous pieces [a, b) that cover [0, n) exactly once.

    ``work`` must write only its own slice (a ``nogil`` kernel over ``x[a:b]``).
    The first piece runs in this thread; an exception in any piece is raised here
    after every piece has finished.
    """
    pieces = min(helper_count() + 1, n // MIN_PIECE)
    if pieces < 2:
        work(0, n)
        return
    bounds = [n * p // pieces for p in range(pieces + 1)]
    pool = _get_pool()
    futs: list[Future[object]] = [
        pool.submit(work, bounds[p], bounds[p + 1]) for p in range(1, pieces)
    ]
    try:
        work(bounds[0], bounds[1])
    finally:
        for f in futs:
            f.exception()  # wait for every piece before the caller reuses the arrays
    for f in futs:
        f.result()
