"""Adaptive tables: static rows for rare keys, promotion with the optimizer state, demotion."""

from __future__ import annotations

import numpy as np
import pytest
from support.reference import CountMin, initial_values, optimizer_step

from embps.protos.config import SGD, Adagrad, Initializer, TableConfig
from embps.server.tables import AdaptiveTable, FrequencySketch, make_table

DIM = 3
ADAGRAD = Adagrad(lr=0.1, initial_accumulator_value=0.1)


def adaptive(**kw) -> AdaptiveTable:
    base: dict = {
        "name": "a",
        "dim": DIM,
        "kind": "adaptive",
        "optimizer": ADAGRAD,
        "hash_bucket_size": 4,
        "promote_threshold": 3,
        "sketch_width": 1024,
        "sketch_depth": 4,
        "initial_capacity": 16,
    }
    base.update(kw)
    table = make_table(TableConfig(**base))
    assert isinstance(table, AdaptiveTable)
    return table


def colliding(table: AdaptiveTable) -> tuple[int, int, int]:
    """Two keys sharing a static row, and a third key with another row."""
    keys = np.arange(1, 100, dtype=np.int64)
    rows = table.static_rows_of(keys)
    a, b = keys[rows == rows[0]][:2]
    c = keys[rows != rows[0]][0]
    return int(a), int(b), int(c)


def srow(table: AdaptiveTable, key: int) -> int:
    return int(table.static_rows_of(np.array([key], dtype=np.int64))[0])


def is_dynamic(table: AdaptiveTable, key: int) -> bool:
    return bool(table.part.find(np.array([key], dtype=np.int64))[0] >= 0)


def dyn_row(table: AdaptiveTable, key: int) -> int:
    return int(table.part.find(np.array([key], dtype=np.int64))[0])


@pytest.mark.parametrize(("width", "depth"), [(1, 1), (16, 2), (64, 4), (1024, 3)])
def test_the_sketch_is_a_conservative_count_min(width, depth):
    """Kernels against the pure-Python count-min; estimates never fall below the true count."""
    sketch = FrequencySketch(width, depth)
    model = CountMin(width, depth)
    keys = np.random.default_rng(width).integers(-50, 50, 600).astype(np.int64)
    keys[::7] = np.iinfo(np.int64).min
    got = sketch.add(keys)
    assert got.tolist() == [model.add(int(k)) for k in keys]
    np.testing.assert_array_equal(sketch.counters, model.dense())
    uniq, true = np.unique(keys, return_counts=True)
    est = sketch.estimate(uniq)
    assert (est >= true).all()
    if width >= 1024:
        np.testing.assert_array_equal(est, true)
    assert sketch.nbytes == 4 * width * depth
    with pytest.raises(ValueError, match="power of two"):
        FrequencySketch(24, 2)


def test_static_rows_start_from_the_initializer_of_their_index():
    table = adaptive(seed=5)
    np.testing.assert_array_equal(
        table.static.values, initial_values(table.config, [0, 1, 2, 3], 5, DIM)
    )
    np.testing.assert_array_equal(table.static.slots, np.float32(0.1))


def test_before_the_threshold_a_key_reads_the_static_row_it_shares():
    table = adaptive()
    a, b, c = colliding(table)
    s = srow(table, a)
    np.testing.assert_array_equal(table.pull([a]), table.static.values[[s]])
    np.testing.assert_array_equal(table.pull([a, b], train=False)[0], table.pull([b])[0])
    g = np.array([[0.5, -1.0, 2.0]], dtype=np.float32)
    before = table.static.values[s].copy()
    table.push([a], g)
    after_b = table.pull([b], train=False)[0]
    assert not np.array_equal(after_b, before), "a push to a moves b: they share a row"
    exp, acc = optimizer_step(ADAGRAD, before, np.full(DIM, 0.1, np.float32), g[0], 1)
    np.testing.assert_allclose(after_b, exp, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(table.static.slots[s], acc, rtol=1e-6)
    assert table.stats().keys == 0 and table.stats().promotions == 0
    other = table.pull([c], train=False)[0]
    np.testing.assert_array_equal(other, table.static.values[srow(table, c)])


def test_promotion_at_the_threshold_carries_the_static_value_and_accumulator():
    table = adaptive()
    a, b, _ = colliding(table)
    s = srow(table, a)
    rng = np.random.default_rng(7)
    for _ in range(2):  # sightings 1 and 2: static
        table.pull([a])
        assert not is_dynamic(table, a)
        table.push([a, a], rng.normal(size=(2, DIM)).astype(np.float32))
    static_w = table.static.values[s].copy()
    static_acc = table.static.slots[s].copy()
    assert (static_acc > 0.1).all(), "the static row has learned"
    out = table.pull([a])  # sighting 3: promoted
    assert is_dynamic(table, a)
    r = dyn_row(table, a)
    np.testing.assert_array_equal(out[0], static_w)
    np.testing.assert_array_equal(table.part.block.values[r], static_w)
    np.testing.assert_array_equal(table.part.block.slots[r], static_acc)
    stats = table.stats()
    assert (stats.promotions, stats.keys, stats.dynamic_rows) == (1, 1, 1)
    # Learning continues from the carried accumulator, not from a fresh one.
    g = rng.normal(size=(1, DIM)).astype(np.float32)
    table.push([a], g)
    carried, _ = optimizer_step(ADAGRAD, static_w, static_acc, g[0], 1)
    fresh, _ = optimizer_step(ADAGRAD, static_w, np.full(DIM, 0.1, np.float32), g[0], 1)
    got = table.pull([a], train=False)[0]
    np.testing.assert_allclose(got, carried, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got, fresh, rtol=1e-4)
    # The static row no longer moves with a, and b still reads it.
    np.testing.assert_array_equal(table.static.values[s], static_w)
    np.testing.assert_array_equal(table.pull([b], train=False)[0], static_w)


def test_duplicates_in_one_pull_count_as_sightings():
    table = adaptive()
    a, _, _ = colliding(table)
    out = table.pull([a, a, a])
    assert is_dynamic(table, a)
    np.testing.assert_array_equal(out, np.repeat(out[:1], 3, axis=0))
    stats = table.stats()
    assert (stats.pulled_static, stats.pulled_dynamic) == (0, 3)


def test_inference_pulls_never_count_or_promote():
    table = adaptive(promote_threshold=1)
    a, _, _ = colliding(table)
    for _ in range(5):
        table.pull([a], train=False)
    assert not is_dynamic(table, a)
    assert table.sketch.estimate(np.array([a]))[0] == 0
    table.pull([a])
    assert is_dynamic(table, a)


def test_the_mask_forces_or_blocks_promotion():
    table = adaptive()
    a, b, c = colliding(table)
    table.pull([a, b], mask=np.array([True, False]))  # first sighting, forced
    assert is_dynamic(table, a) and not is_dynamic(table, b)
    for _ in range(5):  # past the threshold, blocked
        table.pull([c], mask=np.array([False]))
    assert not is_dynamic(table, c)
    assert table.sketch.estimate(np.array([c]))[0] >= 5, "blocked sightings still count"
    table.pull([c])  # no mask: the threshold rules again
    assert is_dynamic(table, c)
    stats = table.stats()
    assert stats.promotions == 2 and stats.keys == 2


def test_eviction_demotes_the_least_frequent_key_to_its_static_row():
    table = adaptive(optimizer=SGD(lr=0.5), max_rows=2, eviction="lfu")
    a, _, c = colliding(table)
    d = next(k for k in range(200, 400) if srow(table, k) not in (srow(table, a), srow(table, c)))
    table.pull([a, c], mask=np.array([True, True]))
    for _ in range(3):
        table.pull([a])
    table.push([c], np.ones((1, DIM), dtype=np.float32))  # c's dynamic row learns
    static_c = table.static.values[srow(table, c)].copy()
    assert not np.array_equal(table.pull([c], train=False)[0], static_c)
    table.pull([d], mask=np.array([True]))  # full: the least frequent (c) goes
    assert is_dynamic(table, a) and is_dynamic(table, d) and not is_dynamic(table, c)
    np.testing.assert_array_equal(table.pull([c], train=False)[0], static_c)
    stats = table.stats()
    assert (stats.keys, stats.evictions, stats.promotions) == (2, 1, 3)
    table.push([c], np.ones((1, DIM), dtype=np.float32))  # demoted: the static row learns
    np.testing.assert_allclose(table.static.values[srow(table, c)], static_c - 0.5, rtol=1e-6)


def test_steps_to_live_demotes_idle_keys():
    table = adaptive(steps_to_live=2)
    a, _, c = colliding(table)
    table.pull([a, c], mask=np.array([True, True]))
    table.push([a], np.zeros((1, DIM)), step=5)
    assert table.evict().rows == 1
    assert is_dynamic(table, a) and not is_dynamic(table, c)
    np.testing.assert_array_equal(
        table.pull([c], train=False)[0], table.static.values[srow(table, c)]
    )


def test_prune_demotes_small_rows_and_keeps_the_rest():
    table = adaptive(optimizer=SGD(lr=1.0), initializer=Initializer("constant", 1.0))
    keys = list(range(10, 30))
    table.pull(keys, mask=np.ones(len(keys), dtype=bool))
    small = keys[:5]
    table.push(small, np.full((5, DIM), 0.99, dtype=np.float32))  # 1.0 -> 0.01
    table.push(keys[5:], np.full((15, DIM), -1.0, dtype=np.float32))  # 1.0 -> 2.0
    res = table.prune(0.5)
    assert res.rows == 5
    assert [is_dynamic(table, k) for k in keys] == [False] * 5 + [True] * 15
    np.testing.assert_array_equal(table.pull(small, train=False), 1.0)  # static rows again
    np.testing.assert_array_equal(table.pull(keys[5:], train=False), 2.0)
    stats = table.stats()
    assert (stats.keys, stats.pruned_rows) == (15, 5)


def test_stats_count_static_and_dynamic_reads():
    table = adaptive()
    a, b, c = colliding(table)
    table.pull([a], mask=np.array([True]))  # 1 dynamic (promoted in the call)
    table.pull([a, b, c, b])  # 1 dynamic, 3 static
    table.pull([a, c], train=False)  # 1 dynamic, 1 static
    stats = table.stats()
    assert (stats.pulled_dynamic, stats.pulled_static) == (3, 4)
    assert stats.pulled_rows == 7
    assert stats.static_rows == 4 and stats.promotions == 1
    table.push([a, b, b], np.ones((3, DIM)))
    assert table.stats().pushed_rows == 3


@pytest.mark.parametrize("promote_threshold", [1, 2, 4])
def test_a_key_is_promoted_at_exactly_the_threshold(promote_threshold):
    table = adaptive(promote_threshold=promote_threshold)
    a, _, _ = colliding(table)
    for i in range(1, promote_threshold + 1):
        table.pull([a])
        assert is_dynamic(table, a) == (i == promote_threshold)


@pytest.mark.parametrize("promote_threshold", [1, 3])
def test_a_promoted_keys_frequency_counts_every_sighting_once(promote_threshold):
    """freq = sightings: the promoting pull is in the sketch's count, and is not added again."""
    table = adaptive(promote_threshold=promote_threshold)
    a, _, _ = colliding(table)
    for _ in range(promote_threshold - 1):
        table.pull([a])
    table.pull([a, a])  # the promoting pull, with a duplicate: two sightings
    assert is_dynamic(table, a)
    seen = promote_threshold + 1
    assert int(table.part.block.freq[dyn_row(table, a)]) == seen
    assert int(table.frequencies([a])[0]) == seen
    table.pull([a])  # afterwards each sighting adds one to the row
    assert int(table.part.block.freq[dyn_row(table, a)]) == seen + 1
