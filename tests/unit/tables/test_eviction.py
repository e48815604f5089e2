"""Eviction sweeps page through a table: the same result as one page, one lock hold per
page, counted by reason; the Evictor records its sweeps by trigger."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from embps.protos.config import SGD, Initializer, TableConfig
from embps.server.eviction import Evictor
from embps.server.metrics import ShardMetrics
from embps.server.tables import make_table

DIM = 4


def table_with_stale_rows(kind: str, n: int = 1000, seed: int = 0):
    extra = {"hash_bucket_size": 16, "promote_threshold": 1} if kind == "adaptive" else {}
    t = make_table(TableConfig("t", DIM, kind=kind, optimizer=SGD(lr=1.0), steps_to_live=5,
                               l2_evict_threshold=0.3, initial_capacity=16,
                               initializer=Initializer("constant", 0.1), **extra))  # fmt: skip
    rng = np.random.default_rng(seed)
    keys = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    t.pull(keys)
    late = keys[rng.random(n) < 0.4]  # touched at step 20: not stale
    big = late[: late.size // 2]  # and pushed far from 0: L2 above the threshold
    t.push(late, np.zeros((late.size, DIM), np.float32), step=20)
    t.push(big, np.full((big.size, DIM), -1.0, np.float32), step=20)
    t.erase(keys[::50])  # holes in the arena, so pages hold fewer live rows than their size
    return t, keys, late, big


@pytest.mark.parametrize("kind", ["dynamic", "adaptive"])
@pytest.mark.parametrize("page_rows", [1, 7, 64, 1 << 16])
def test_a_paged_sweep_equals_one_page(kind: str, page_rows: int) -> None:
    one, keys, late, big = table_with_stale_rows(kind)
    paged, *_ = table_with_stale_rows(kind)
    whole = one.evict(page_rows=1 << 30)
    res = paged.evict(page_rows=page_rows)
    assert (res.rows, res.steps_to_live_rows, res.l2_rows) == (
        whole.rows, whole.steps_to_live_rows, whole.l2_rows)  # fmt: skip
    survivors = np.isin(keys, big) & ~np.isin(keys, keys[::50])
    assert res.rows == keys.size - int((keys[::50]).size) - int(survivors.sum())
    assert res.l2_rows == int((np.isin(keys, late) & ~np.isin(keys, big)
                              & ~np.isin(keys, keys[::50])).sum())  # fmt: skip
    assert res.bytes == res.rows * (paged.config.row_bytes + 8)
    assert np.array_equal(paged.part.find(keys) >= 0, survivors)
    s = paged.stats()
    assert (s.evictions, s.evictions_steps_to_live, s.evictions_l2, s.evictions_capacity) == (
        res.rows, res.steps_to_live_rows, res.l2_rows, 0)  # fmt: skip


def test_each_page_is_its_own_lock_hold() -> None:
    t, *_ = table_with_stale_rows("dynamic")
    real = t._lock

    class Counting:
        holds = 0

        def read(self):
            return real.read()

        def let_waiters_in(self):
            real.let_waiters_in()

        @contextlib.contextmanager
        def write(self):
            with real.write():
                Counting.holds += 1
                yield

    t._lock = Counting()
    top = t.part.live_rows()[-1] + 1
    t.evict(page_rows=100)
    assert Counting.holds == -(-int(top) // 100)  # ceil(top / page): released between pages


def test_a_table_without_eviction_options_is_not_swept() -> None:
    t = make_table(TableConfig("t", DIM))
    t.pull(np.arange(100))
    t.push(np.arange(100), np.zeros((100, DIM), np.float32), step=1000)
    res = t.evict()
    assert (res.rows, res.bytes) == (0, 0) and t.stats().keys == 100
    static = make_table(TableConfig("s", DIM, kind="static", hash_bucket_size=8))
    assert static.evict().rows == 0


def test_page_rows_is_checked() -> None:
    t, *_ = table_with_stale_rows("dynamic", n=10)
    with pytest.raises(ValueError, match="page_rows"):
        t.evict(page_rows=0)


def test_evictor_records_sweeps_by_trigger() -> None:
    t, *_ = table_with_stale_rows("dynamic")
    plain = make_table(TableConfig("plain", DIM))
    metrics = ShardMetrics(0, 1, lambda: [plain, t])
    ev = Evictor(0, lambda: [plain, t], metrics)
    out = ev.sweep(trigger="periodic")
    assert [r.table for r in out] == ["plain", "t"] and out[1].rows > 0
    ev.before_checkpoint(t)
    hist = metrics.registry.get_sample_value
    assert hist("embps_eviction_sweep_duration_seconds_count", {"trigger": "periodic"}) == 1
    assert hist("embps_eviction_sweep_duration_seconds_count", {"trigger": "checkpoint"}) == 1
    assert hist("embps_evictions_total", {"table": "t", "reason": "l2"}) == out[1].l2_rows
    with pytest.raises(ValueError, match="trigger"):
        ev.sweep(trigger="sometimes")
