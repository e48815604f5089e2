"""Many threads on one table: every push is applied exactly once, whatever runs beside it.

SGD(lr=1) with gradients of 1.0 from a zeros initializer: the final value of a key
is minus the exact number of times it appeared in a push (duplicates included).
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
from support.reference import check_map

from embps.protos.config import SGD, Initializer, TableConfig
from embps.server.tables import Table, make_table

THREADS = 8
PUSHES = 150
BATCH = 12
DIM = 3


def configs() -> dict[str, TableConfig]:
    base = {"name": "t", "dim": DIM, "optimizer": SGD(lr=1.0), "initializer": Initializer("zeros")}
    return {
        "dynamic": TableConfig(**base, initial_capacity=16),
        "adaptive": TableConfig(
            **base, kind="adaptive", hash_bucket_size=4, promote_threshold=1000, initial_capacity=16
        ),
        "static": TableConfig(**base, kind="static", hash_bucket_size=4096),
    }


def hot_keys(table: Table) -> np.ndarray:
    """24 keys, negative and 0 included; for a static table, keys with distinct rows."""
    cand = np.arange(-12, 200, dtype=np.int64)
    if table.config.kind == "static":
        _, first = np.unique(table.static_rows_of(cand), return_index=True)
        cand = cand[np.sort(first)]
    return cand[:24]


def run_threads(target, n: int) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("kind", ["dynamic", "adaptive", "static"])
def test_concurrent_pushes_are_each_applied_exactly_once(kind):
    table = make_table(configs()[kind])
    keys = hot_keys(table)
    mask = np.ones(keys.shape[0], dtype=bool) if kind == "adaptive" else None
    np.testing.assert_array_equal(table.pull(keys, mask=mask), 0.0)  # rows exist (promoted)
    counts: list[Counter] = [Counter() for _ in range(THREADS)]
    stop = threading.Event()

    def pusher(i: int) -> None:
        rng = np.random.default_rng(1000 + i)
        for _ in range(PUSHES):
            batch = rng.choice(keys, size=BATCH)  # overlapping keys, duplicates in a batch
            res = table.push(batch, np.ones((BATCH, DIM), dtype=np.float32))
            assert res.applied == BATCH
            counts[i].update(batch.tolist())

    def puller(i: int) -> None:
        rng = np.random.default_rng(2000 + i)
        fresh = 10_000 * (i + 1)
        while not stop.is_set():
            out = table.pull(rng.choice(keys, size=BATCH), train=bool(i % 2))
            assert (out <= 0).all() and (out == np.round(out)).all(), "a torn row"
            if kind != "static":  # new keys: the arena and the buckets grow under the pushes
                new = np.arange(fresh, fresh + 40)
                table.pull(new, mask=np.ones(40, dtype=bool) if kind == "adaptive" else None)
                fresh += 40
            table.stats()

    pullers = [threading.Thread(target=puller, args=(i,)) for i in range(2)]
    for t in pullers:
        t.start()
    try:
        run_threads(pusher, THREADS)
    finally:
        stop.set()
        for t in pullers:
            t.join(timeout=120)
    total = sum(counts, Counter())
    assert sum(total.values()) == THREADS * PUSHES * BATCH
    got = table.pull(keys, train=False)
    exp = -np.array([total[int(k)] for k in keys], dtype=np.float32)
    np.testing.assert_array_equal(got, np.repeat(exp[:, None], DIM, axis=1))
    stats = table.stats()
    assert stats.pushed_rows == THREADS * PUSHES * BATCH
    assert stats.step == THREADS * PUSHES - 1, "every push got its own auto step"
    if kind != "static":
        assert stats.keys > keys.shape[0], "the concurrent inserts happened"
        fresh_rows = table.pull(np.arange(10_000, 10_040), train=False)
        np.testing.assert_array_equal(fresh_rows, 0.0)


def test_concurrent_erase_and_reinsert_keeps_the_map_consistent():
    """Threads erase and re-create overlapping keys; every surviving key is findable once."""
    table = make_table(configs()["dynamic"])
    keys = np.arange(-50, 50, dtype=np.int64)

    def churn(i: int) -> None:
        rng = np.random.default_rng(i)
        for _ in range(100):
            batch = rng.choice(keys, size=10)
            if rng.random() < 0.5:
                table.erase(batch)
            else:
                table.pull(batch)

    run_threads(churn, THREADS)
    part = table.part
    contents = check_map(part.buckets, part.meta, part.free)
    assert table.stats().keys == len(contents)
    assert set(contents) <= set(keys.tolist())
    rows = part.find(keys)
    assert sorted(rows[rows >= 0].tolist()) == sorted(contents.values())


@pytest.mark.parametrize("kind", ["dynamic", "adaptive", "static"])
def test_reads_run_during_a_snapshot_and_changes_wait_for_it(kind):
    """A snapshot holds the lock shared while it copies: inference pulls, frequencies and
    stats of the same table finish meanwhile; a push and a training pull wait, and the
    snapshot holds the rows as they were before them."""
    table = make_table(configs()[kind])
    keys = hot_keys(table)
    mask = np.ones(keys.shape[0], dtype=bool) if kind == "adaptive" else None
    table.pull(keys, mask=mask)
    copying, release = threading.Event(), threading.Event()

    def slow_copy(name, src, rows):  # the checkpoint writer's hook, called under the lock
        copying.set()
        assert release.wait(30), "the test never released the snapshot"
        return src.copy() if rows is None else src[rows]

    snap: dict = {}
    snapper = threading.Thread(target=lambda: snap.update(s=table.snapshot(copy=slow_copy)))
    snapper.start()
    assert copying.wait(30)
    reads = {
        "inference pull": lambda: table.pull(keys, train=False),
        "frequencies": lambda: table.frequencies(keys),
        "stats": table.stats,
    }
    changes = {
        "push": lambda: table.push(keys, np.ones((keys.shape[0], DIM), np.float32)),
        "training pull": lambda: table.pull(keys),
    }
    done: dict = {}
    threads = {
        name: threading.Thread(target=lambda n=name, f=f: done.update({n: f()}), daemon=True)
        for name, f in {**reads, **changes}.items()
    }
    try:
        for t in threads.values():
            t.start()
        for name in reads:
            threads[name].join(30)
            assert name in done, f"{name} waited for the snapshot"
        np.testing.assert_array_equal(done["inference pull"], 0.0)
        for name in changes:
            assert threads[name].is_alive() and name not in done, f"{name} ran during it"
    finally:
        release.set()
    snapper.join(30)
    for t in threads.values():
        t.join(30)
    assert set(done) == set(threads)
    part = "static" if kind == "static" else "dynamic"
    assert (snap["s"].arrays[f"{part}.values"] == 0.0).all(), "the push got into the snapshot"
    np.testing.assert_array_equal(table.pull(keys, train=False), -1.0)


@pytest.mark.parametrize("kind", ["dynamic", "adaptive"])
def test_concurrent_inference_pulls_count_every_row(kind):
    """Inference pulls share the lock; their row counters still count each pull once."""
    table = make_table(configs()[kind])
    keys = hot_keys(table)
    table.pull(keys[:12], mask=np.ones(12, dtype=bool) if kind == "adaptive" else None)
    before = table.stats()

    def reader(i: int) -> None:
        for _ in range(PUSHES):
            table.pull(keys, train=False)

    run_threads(reader, THREADS)
    after = table.stats()
    n = THREADS * PUSHES * keys.shape[0]
    assert after.pulled_rows - before.pulled_rows == n
    if kind == "adaptive":  # 12 keys promoted, 12 on static rows
        assert after.pulled_dynamic - before.pulled_dynamic == n // 2
        assert after.pulled_static - before.pulled_static == n // 2
