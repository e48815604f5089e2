"""Per-table memory cap (``TableConfig.max_bytes``): the table never holds more bytes.

Fixed parts (static / qr blocks, the sketch, the smallest index) must fit at
create; the dynamic part grows only as far as the cap allows (the last arena
step is clipped); at the cap a new key evicts (lfu/lru), is refused with
RESOURCE_EXHAUSTED changing nothing (eviction none), or, in an adaptive
table, stays on its static row (promotion skipped, the pull succeeds).
"""

from __future__ import annotations

import numpy as np
import pytest

from embps.protos.config import (
    FTRL,
    INDEX_MIN_BYTES,
    SGD,
    SKETCH_COUNTER_BYTES,
    SKETCH_DEFAULT_DEPTH,
    SKETCH_DEFAULT_WIDTH,
    Adagrad,
    Adam,
    OptimizerConfig,
    TableConfig,
)
from embps.server import errors
from embps.server.kernels import hashmap as hm
from embps.server.tables import (
    AdaptiveTable,
    DynamicTable,
    FrequencySketch,
    Table,
    make_table,
    row_limit,
)

DIM = 8
SEED = 20240611


def cfg(kind: str = "dynamic", **options: object) -> TableConfig:
    extra: dict[str, object] = {}
    if kind in ("static", "adaptive"):
        extra["hash_bucket_size"] = 64
    if kind == "adaptive":
        extra["promote_threshold"] = 2
        extra["sketch_width"] = 1024
    if kind == "qr":
        extra.update(qr_quotient_buckets=16, qr_remainder_buckets=8)
    extra.update(options)
    return TableConfig("t", dim=DIM, kind=kind, **extra)  # type: ignore[arg-type]


def capped(kind: str, rows: int, **options: object) -> TableConfig:
    """A config whose max_bytes holds exactly ``rows`` own rows (row_limit == rows)."""
    base = cfg(kind, **options)
    per_row = base.row_bytes + 24
    lo = base.fixed_bytes + rows * per_row + 16 * (hm.capacity_for(rows) - hm.MIN_CAPACITY)
    c = cfg(kind, max_bytes=lo, **options)
    assert row_limit(c) == rows
    assert row_limit(cfg(kind, max_bytes=lo - 1, **options)) == rows - 1
    return c


def check_bytes(table: Table) -> int:
    """stats().bytes, asserted <= max_bytes."""
    s = table.stats()
    assert s.bytes <= table.config.max_bytes, (s.bytes, table.config.max_bytes)
    return s.bytes


def rows_of(table: DynamicTable | AdaptiveTable, keys: np.ndarray) -> np.ndarray:
    return table.part.find(np.asarray(keys, dtype=np.int64))


# --------------------------------------------------------------------------
# Config and fixed parts
# --------------------------------------------------------------------------

OPTIMIZERS: list[OptimizerConfig] = [SGD(), Adagrad(), Adam(), FTRL()]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: type(o).__name__)
@pytest.mark.parametrize(
    "kind, options",
    [
        ("dynamic", {}),
        ("dynamic", {"admission_threshold": 3}),
        ("static", {}),
        ("adaptive", {}),
        ("qr", {}),
        ("qr", {"qr_combiner": "concat"}),
    ],
)
def test_fixed_bytes_is_exactly_what_a_table_at_the_smallest_cap_holds(kind, options, opt):
    """max_bytes == fixed_bytes is legal; such a table holds exactly that (no own rows)."""
    c = cfg(kind, optimizer=opt, **options)
    tight = cfg(kind, optimizer=opt, max_bytes=c.fixed_bytes, **options)
    table = make_table(tight)
    assert table.stats().bytes == tight.fixed_bytes
    if kind in ("dynamic", "adaptive"):
        assert row_limit(tight) == 0
    with pytest.raises(
        ValueError, match=f"max_bytes={c.fixed_bytes - 1} is below the {c.fixed_bytes}"
    ):
        cfg(kind, optimizer=opt, max_bytes=c.fixed_bytes - 1, **options)


def test_max_bytes_config_round_trips_and_validates():
    c = cfg("adaptive", max_bytes=10**7)
    assert TableConfig.from_proto(c.to_proto()) == c
    assert TableConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["max_bytes"] == 10**7
    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes must be an integer"):
            cfg(max_bytes=bad)
    with pytest.raises(ValueError, match=r"static rows 3584\b"):  # 64 rows x (8*4 + 24) B
        cfg("static", max_bytes=1000)


def test_row_limit_is_the_smaller_of_max_rows_and_the_byte_budget():
    assert row_limit(cfg()) is None
    assert row_limit(cfg(max_rows=7)) == 7
    c = capped("dynamic", 100)
    assert row_limit(cfg(max_bytes=c.max_bytes, max_rows=7)) == 7
    assert row_limit(cfg(max_bytes=c.max_bytes, max_rows=1000)) == 100
    assert row_limit(cfg("static", max_bytes=10**6)) is None  # nothing grows


# --------------------------------------------------------------------------
# Dynamic tables
# --------------------------------------------------------------------------


def test_growth_is_clipped_to_the_cap_and_the_table_fills_it_exactly():
    """initial 16 rows grow x1.5 (16, 24, 36, 54, 81) and the last step stops at 100."""
    c = capped("dynamic", 100, initial_capacity=16)
    table = make_table(c)
    assert isinstance(table, DynamicTable)
    seen = [table.part.block.rows]
    for i in range(100):
        table.pull([1000 + i])
        check_bytes(table)
        if table.part.block.rows != seen[-1]:
            seen.append(table.part.block.rows)
    assert seen == [16, 24, 36, 54, 81, 100]
    assert table.part.n_buckets == hm.capacity_for(100)
    assert table.stats().keys == 100
    # Full: the bytes are the budget of 100 rows minus the free list and deletion log,
    # which are still empty (they may take 8 bytes per row later).
    assert check_bytes(table) == c.max_bytes - 16 * 100


def test_a_large_initial_capacity_is_clipped_to_the_cap():
    c = capped("dynamic", 40, initial_capacity=1_000_000)
    table = make_table(c)
    assert isinstance(table, DynamicTable)
    assert table.part.block.rows == 40
    check_bytes(table)


def test_without_eviction_the_batch_that_passes_the_cap_is_refused_and_changes_nothing():
    c = capped("dynamic", 50)
    table = make_table(c)
    rng = np.random.default_rng(SEED)
    keys = rng.choice(10**9, size=200, replace=False).astype(np.int64)
    table.pull(keys[:30])
    table.pull(keys[30:45])
    check_bytes(table)
    before = (table.stats(), table.pull(keys, train=False), table.snapshot().arrays)
    batch = np.concatenate([keys[:10], keys[45:60]])  # 15 new keys, only 5 fit
    with pytest.raises(errors.ResourceExhausted, match=r"45 of 50 rows, max_bytes=\d+ holds 50"):
        table.pull(batch)
    after = (table.stats(), table.pull(keys, train=False), table.snapshot().arrays)
    assert (rows_of(table, keys[45:60]) < 0).all(), "nothing from the refused batch is inserted"
    changed = {k for k, v in before[0].as_dict().items() if after[0].as_dict()[k] != v}
    assert changed == {"pulled_rows"}, "only the count of served keys moved (the train=False read)"
    np.testing.assert_array_equal(after[1], before[1])
    assert before[2].keys() == after[2].keys()
    for name, a in before[2].items():
        np.testing.assert_array_equal(a, after[2][name], err_msg=name)
    assert table.capacity_refusals == 15
    table.pull(batch[:15])  # 10 old keys + 5 new: exactly fills the cap
    assert table.stats().keys == 50
    check_bytes(table)
    with pytest.raises(errors.ResourceExhausted):
        table.pull(keys[100:101])
    # Erasing frees rows (their bucket and arena space stay: no growth is needed).
    assert table.erase(keys[:20]) == 20
    check_bytes(table)
    table.pull(keys[100:120])
    assert table.stats().keys == 50
    check_bytes(table)


def test_max_rows_below_the_byte_budget_keeps_its_own_message():
    c = cfg(max_rows=5, max_bytes=10**6)
    table = make_table(c)
    table.pull([1, 2, 3, 4, 5])
    with pytest.raises(errors.ResourceExhausted, match="max_rows=5"):
        table.pull([6])


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_with_eviction_a_full_table_keeps_serving_within_the_cap(policy):
    c = capped("dynamic", 64, eviction=policy, max_rows=10**6, optimizer=Adam())
    table = make_table(c)
    # A full snapshot turns the deletion log on (incremental checkpoints): it counts too.
    table.snapshot()
    hot = np.arange(8, dtype=np.int64)
    rng = np.random.default_rng(SEED)
    peak = 0
    for step in range(60):
        fresh = rng.integers(10**6, 10**9, size=20).astype(np.int64)
        batch = np.concatenate([hot, fresh])
        out = table.pull(batch)
        assert out.shape == (28, DIM)
        table.push(batch, np.full((28, DIM), 0.01, np.float32), step=step)
        peak = max(peak, check_bytes(table))
    s = table.stats()
    assert s.keys == 64
    assert s.evictions == 8 + 20 * 60 - 64  # every key the table saw, but the 64 it holds
    assert (rows_of(table, hot) >= 0).all(), "the hot keys (in every batch) stay"
    assert table._log_bytes() > 0 and peak <= c.max_bytes
    with pytest.raises(errors.ResourceExhausted, match="holds at most 64 rows"):
        table.pull(np.arange(10**6, 10**6 + 65))  # one batch larger than the table
    assert table.stats().evictions == s.evictions, "a refused batch evicts nothing"


def test_deletion_log_and_free_list_stay_within_the_reserve():
    """Erase everything repeatedly with the deletion log on: bytes never pass the cap."""
    c = capped("dynamic", 32)
    table = make_table(c)
    table.snapshot()
    for round_ in range(5):
        keys = np.arange(round_ * 100, round_ * 100 + 32, dtype=np.int64)
        table.pull(keys)
        check_bytes(table)
        assert table.erase(keys) == 32
        check_bytes(table)
    assert table.part.free.shape[0] <= table.part.block.rows


def test_admission_sketch_counts_against_the_cap():
    base = cfg(admission_threshold=2)
    assert base.fixed_bytes == (1 << 18) * 4 * 4 + INDEX_MIN_BYTES  # the default sketch
    c = capped("dynamic", 10, admission_threshold=2)
    table = make_table(c)
    for _ in range(2):
        table.pull(np.arange(10))
    assert table.stats().keys == 10
    check_bytes(table)
    table.pull([99])  # first sighting: no row needed
    with pytest.raises(errors.ResourceExhausted):
        table.pull([99])  # second sighting: admitted, but no room
    table.pull([99], train=False)
    check_bytes(table)


def test_the_default_sketch_is_the_one_the_config_counts():
    """sketch_width / sketch_depth 0: the shape protos/config.py defines (its one default),
    in a table with admission, an adaptive table and a bare FrequencySketch."""
    want = (SKETCH_DEFAULT_DEPTH, SKETCH_DEFAULT_WIDTH)
    assert FrequencySketch().counters.shape == want
    for c in (cfg(admission_threshold=2), cfg("adaptive", sketch_width=0)):
        sketch = make_table(c).sketch  # type: ignore[attr-defined]
        assert sketch.counters.shape == want, c.kind
        assert sketch.nbytes == SKETCH_DEFAULT_WIDTH * SKETCH_DEFAULT_DEPTH * SKETCH_COUNTER_BYTES


def test_a_snapshot_with_more_rows_than_the_cap_does_not_load():
    big = make_table(cfg())
    big.pull(np.arange(60))
    snap = big.snapshot()
    c = capped("dynamic", 50)
    snap.config = c
    table = make_table(c)
    table.pull([10**9])
    with pytest.raises(ValueError, match="would hold 61 own rows, over its limit of 50"):
        table.load(snap)
    assert table.stats().keys == 1, "nothing was loaded"


# --------------------------------------------------------------------------
# Adaptive tables: promotion is skipped, training continues on the static row
# --------------------------------------------------------------------------


def test_adaptive_at_the_cap_skips_promotion_and_trains_the_static_row():
    c = capped("adaptive", 8, optimizer=Adagrad(lr=0.1))
    table = make_table(c)
    assert isinstance(table, AdaptiveTable)
    keys = np.arange(100, 120, dtype=np.int64)
    # Sightings: keys 100..107 three times (hottest), 108..119 twice (at the threshold).
    table.pull(keys[:8])
    out = table.pull(keys)  # 108..119 at 1, 100..107 at 2: 8 promotions, fills the cap
    assert out.shape == (20, DIM)
    assert (rows_of(table, keys[:8]) >= 0).all()
    out = table.pull(keys)  # 108..119 reach 2: no room, the pull still succeeds
    assert (rows_of(table, keys[8:]) < 0).all()
    s = table.stats()
    assert (s.keys, s.promotions) == (8, 8)
    assert table.capacity_refusals == 12
    np.testing.assert_array_equal(
        out[8:], table.static.values[table.static_rows_of(keys[8:])], "static rows are served"
    )
    before = table.static.values[table.static_rows_of(keys[8:])].copy()
    res = table.push(keys, np.full((20, DIM), 0.5, np.float32), step=0)
    assert res.applied == 20 and res.dropped == 0
    after = table.static.values[table.static_rows_of(keys[8:])]
    assert (after < before).all(), "training continues on the static rows"
    check_bytes(table)


def test_adaptive_at_the_cap_promotes_the_hottest_keys_that_fit():
    c = capped("adaptive", 3)
    table = make_table(c)
    for k, times in ((1, 1), (2, 4), (3, 3), (4, 1), (5, 5)):
        for _ in range(times):
            table.pull([k], mask=np.array([False]))
    table.pull([1, 2, 3, 4, 5], mask=np.ones(5, dtype=bool))
    assert (rows_of(table, [5, 2, 3]) >= 0).all() and (rows_of(table, [1, 4]) < 0).all()
    check_bytes(table)


def test_adaptive_with_eviction_at_the_cap_demotes_and_keeps_serving():
    c = capped("adaptive", 16, eviction="lfu", max_rows=10**6)
    table = make_table(c)
    rng = np.random.default_rng(SEED)
    for _ in range(30):
        batch = rng.integers(0, 200, size=32).astype(np.int64)
        table.pull(batch, mask=np.ones(32, dtype=bool))
        check_bytes(table)
    s = table.stats()
    assert s.keys == 16 and s.evictions > 0


def test_adaptive_with_max_rows_only_still_refuses():
    """Without max_bytes, max_rows keeps its contract: the batch is refused."""
    table = make_table(cfg("adaptive", max_rows=1))
    table.pull([1], mask=np.array([True]))
    with pytest.raises(errors.ResourceExhausted, match="max_rows=1"):
        table.pull([2], mask=np.array([True]))
