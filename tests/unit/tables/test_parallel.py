"""Batches in pieces on helper threads (server/parallel.py): same result as one call."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from embps.protos.config import FTRL, SGD, Adagrad, Adam, TableConfig
from embps.server import parallel
from embps.server.tables import make_table

N = 3 * parallel.MIN_PIECE + 123  # enough rows for several pieces


@pytest.fixture
def helpers() -> Iterator[None]:
    """Two helper threads, whatever this machine's CPU count; restored afterwards."""
    before = parallel.helper_count()
    parallel.set_helper_count(2)
    yield
    parallel.set_helper_count(before)


def test_pieces_cover_the_batch_exactly_once_on_several_threads(helpers: None) -> None:
    lock = threading.Lock()
    for n in (0, 1, 2 * parallel.MIN_PIECE - 1, 2 * parallel.MIN_PIECE, N):
        hits = np.zeros(n, dtype=np.int64)
        calls: list[tuple[int, str]] = []

        def work(a: int, b: int, hits: np.ndarray = hits, calls: list = calls, n: int = n) -> None:
            assert b - a >= min(n, parallel.MIN_PIECE)
            hits[a:b] += 1
            with lock:
                calls.append((a, threading.current_thread().name))

        parallel.run_in_pieces(n, work)
        assert (hits == 1).all()
        want = min(3, n // parallel.MIN_PIECE) if n >= 2 * parallel.MIN_PIECE else 1
        assert len(calls) == want, (n, calls)
        threads = {name for a, name in calls}
        assert (len(threads) > 1) == (want > 1)
        assert (0, threading.current_thread().name) in calls  # the first piece runs here


def test_an_error_in_a_helper_piece_is_raised_after_every_piece_ran(helpers: None) -> None:
    done: list[int] = []

    def work(a: int, b: int) -> None:
        if a > 0 and a < N // 2:
            raise RuntimeError(f"piece at {a} failed")
        done.append(a)

    with pytest.raises(RuntimeError, match="piece at"):
        parallel.run_in_pieces(N, work)
    assert len(done) == 2  # the other two pieces still finished


def test_no_helpers_runs_everything_in_the_caller() -> None:
    before = parallel.helper_count()
    parallel.set_helper_count(0)
    try:
        seen: list[tuple[int, int, str]] = []
        parallel.run_in_pieces(N, lambda a, b: seen.append((a, b, threading.current_thread().name)))
        assert seen == [(0, N, threading.current_thread().name)]
    finally:
        parallel.set_helper_count(before)
    with pytest.raises(ValueError, match=">= 0"):
        parallel.set_helper_count(-1)


KINDS = {
    "dynamic": {"initial_capacity": 16},
    "static": {"hash_bucket_size": 5000},
    "adaptive": {"hash_bucket_size": 3000, "promote_threshold": 2},
    "qr": {"qr_quotient_buckets": 90, "qr_remainder_buckets": 100},
}
OPTIMIZERS = {
    "sgd": SGD(lr=0.5),
    "adagrad": Adagrad(lr=0.1, initial_accumulator_value=0.1),
    "adam": Adam(lr=0.01),
    "ftrl": FTRL(alpha=0.1, beta=1.0, l1=0.001, l2=0.01),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_table_in_pieces_equals_the_same_table_in_one_piece(kind: str, opt: str) -> None:
    """Pulls (train and infer) and pushes of large batches with duplicates, bit for bit."""
    cfg = TableConfig(name="t", dim=24, kind=kind, optimizer=OPTIMIZERS[opt], **KINDS[kind])
    rng = np.random.default_rng(11)
    pool = rng.integers(-(2**63), 2**63 - 1, 2 * N)
    batches = [pool[rng.integers(0, 2 * N, N)] for _ in range(4)]  # duplicates in each
    grads = [rng.normal(0, 0.1, (N, 24)).astype(np.float32) for _ in range(4)]
    before = parallel.helper_count()
    results = []
    try:
        for helpers in (0, 2):
            parallel.set_helper_count(helpers)
            table = make_table(cfg)
            out = []
            for step, (keys, g) in enumerate(zip(batches, grads, strict=True)):
                out.append(table.pull(keys, train=True))
                res = table.push(keys, g, step=step)
                out.append(np.array([res.applied, res.dropped]))
            out.append(table.pull(pool, train=False))
            results.append(out)
    finally:
        parallel.set_helper_count(before)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a.view(np.uint32) if a.dtype == np.float32 else a,
                                      b.view(np.uint32) if b.dtype == np.float32 else b)  # fmt: skip


def test_a_forked_child_gets_its_own_helpers(helpers: None) -> None:
    """fork(2) copies no threads: a child using the parent's pool would wait forever."""
    import os
    import time

    # every helper thread of the parent busy at once, so all of them exist (and sit idle)
    parallel.run_in_pieces(N, lambda a, b: time.sleep(0.05))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            hits = np.zeros(N, dtype=np.int64)

            def work(a: int, b: int) -> None:
                hits[a:b] += 1

            parallel.run_in_pieces(N, work)
            code = 0 if (hits == 1).all() else 1
        finally:
            os._exit(code)
    deadline = 30.0
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's run_in_pieces did not finish")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
