"""Tables (server/tables/) against the reference models; errors, bytes, qr, the engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.reference import (
    INT64_MAX,
    INT64_MIN,
    RefTable,
    check_map,
    initial_values,
    make_reference,
    reachable_nbytes,
)

from embps.protos.config import (
    FTRL,
    SGD,
    Adagrad,
    Adam,
    Initializer,
    InitKind,
    Norm,
    TableConfig,
    TableKind,
)
from embps.server import errors
from embps.server.engine import Engine
from embps.server.kernels import hashmap as hm
from embps.server.tables import Snapshot, Table, make_table

RTOL, ATOL = 1e-6, 1e-7
DIM = 4

OPTIMIZERS = {
    "sgd": SGD(lr=0.5),
    "adagrad": Adagrad(lr=0.1, initial_accumulator_value=0.1),
    "adam": Adam(lr=0.01),
    "ftrl": FTRL(alpha=0.1, beta=1.0, l1=0.001, l2=0.01),
}


def cfg(kind: str = "dynamic", opt: str = "sgd", **kw) -> TableConfig:
    base: dict = {"name": "t", "dim": DIM, "kind": kind, "optimizer": OPTIMIZERS[opt]}
    if kind in ("dynamic", "adaptive"):
        base["initial_capacity"] = 16
    if kind == "static":
        base["hash_bucket_size"] = 7
    if kind == "adaptive":
        base.update(hash_bucket_size=5, promote_threshold=2, sketch_width=32, sketch_depth=2)
    if kind == "qr":
        base.update(qr_quotient_buckets=3, qr_remainder_buckets=4)
    base.update(kw)
    return TableConfig(**base)


# Each table kind with the options that change its behaviour; the optimizer
# varies so that every one runs under every kind.
CONFIGS = {
    "dynamic-sgd": cfg(default_value=0.25),
    "dynamic-adagrad": cfg(opt="adagrad"),
    "dynamic-adam": cfg(opt="adam"),
    "dynamic-ftrl": cfg(opt="ftrl"),
    "dynamic-admission": cfg(opt="adagrad", admission_threshold=2),
    "dynamic-lfu": cfg(max_rows=5, eviction="lfu"),
    "dynamic-lru": cfg(opt="adam", max_rows=5, eviction="lru"),
    "dynamic-full": cfg(max_rows=5),
    "dynamic-admission-full": cfg(admission_threshold=3, max_rows=4),
    "dynamic-ttl-l2": cfg(steps_to_live=2, l2_evict_threshold=0.03),
    "static-sgd": cfg("static"),
    "static-adagrad": cfg("static", "adagrad"),
    "static-adam": cfg("static", "adam"),
    "static-ftrl": cfg("static", "ftrl"),
    "adaptive-sgd": cfg("adaptive"),
    "adaptive-adagrad": cfg("adaptive", "adagrad"),
    "adaptive-adam": cfg("adaptive", "adam"),
    "adaptive-ftrl": cfg("adaptive", "ftrl"),
    "adaptive-lfu": cfg("adaptive", "adagrad", max_rows=5, eviction="lfu"),
    "adaptive-lru": cfg("adaptive", max_rows=5, eviction="lru"),
    "adaptive-full": cfg("adaptive", max_rows=5),
    "adaptive-ttl": cfg("adaptive", steps_to_live=1, l2_evict_threshold=0.02),
    "qr-mult-sgd": cfg("qr", qr_combiner="mult"),
    "qr-add-adagrad": cfg("qr", "adagrad", qr_combiner="add"),
    "qr-concat-adam": cfg("qr", "adam", qr_combiner="concat"),
    "qr-mult-ftrl": cfg("qr", "ftrl", qr_combiner="mult"),
}


# --------------------------------------------------------------------------
# Helpers: compare a table with its model
# --------------------------------------------------------------------------


def assert_rows(got: np.ndarray, exp: np.ndarray) -> None:
    assert got.dtype == np.float32
    assert got.shape == exp.shape
    np.testing.assert_allclose(got, exp, rtol=RTOL, atol=ATOL)


def predicted_stats(table: Table) -> dict:
    s = table.stats().as_dict()
    return {k: s[k] for k in ("keys", "dynamic_rows", "static_rows", "step", *table.counters)}


def dynamic_parts(table: Table) -> list:
    part = getattr(table, "part", None)
    return [part] if part is not None else []


def check_state(table: Table, model: RefTable) -> None:
    """Stats equal the model's; bytes are exact; the map's invariants hold."""
    assert predicted_stats(table) == model.stats()
    stats = table.stats()
    # The storage arrays; the deletion log has its own test (bytes of every reachable array).
    assert stats.bytes == reachable_nbytes(table, skip=("_deleted",)) == table.memory_bytes()
    assert stats.bytes == stats.dynamic_bytes + stats.static_bytes
    for part in dynamic_parts(table):
        contents = check_map(part.buckets, part.meta, part.free)
        assert contents == model.part.row_of, "rows differ from the allocator model"
        for key, row in contents.items():
            assert part.row_keys[row] == key
            ref = model.part.data[row]
            assert part.block.freq[row] == ref.freq
            assert part.block.last_step[row] == ref.last_step


def check_sketch(table: Table, model: RefTable) -> None:
    sketch = getattr(table, "sketch", None)
    ref = getattr(model, "sketch", None)
    assert (sketch is None) == (ref is None)
    if sketch is not None:
        np.testing.assert_array_equal(sketch.counters, ref.dense())


def snapshot(table: Table, keys) -> tuple:
    """What a failed request must not change: stats, sketch counters, rows (read without training)."""
    rows = table.pull(keys, train=False)
    sketch = getattr(table, "sketch", None)
    counters = None if sketch is None else sketch.counters.copy()
    return table.stats().as_dict(), counters, rows


def assert_unchanged(table: Table, keys, before: tuple) -> None:
    """Compare with a snapshot; reads the rows again (one more inference pull)."""
    assert table.stats().as_dict() == before[0]
    sketch = getattr(table, "sketch", None)
    if sketch is not None:
        np.testing.assert_array_equal(sketch.counters, before[1])
    np.testing.assert_array_equal(table.pull(keys, train=False), before[2])


# --------------------------------------------------------------------------
# Property: random operation sequences against the reference models
# --------------------------------------------------------------------------

KEY_POOL = [INT64_MIN, INT64_MIN + 1, -(2**40), -7, -1, 0, 1, 2, 3, 5, 8, 2**40, INT64_MAX]
KEY = st.one_of(st.sampled_from(KEY_POOL), st.integers(-30, 30))
KEYS = st.lists(KEY, max_size=16)
OP = st.one_of(
    st.tuples(st.just("pull"), KEYS, st.booleans(), st.sampled_from([None, "mask"])),
    # Small training pulls (three times the weight): a table at max_rows evicts
    # instead of refusing the batch.
    *[
        st.tuples(
            st.just("pull"), st.lists(KEY, min_size=1, max_size=4), st.just(True), st.just(None)
        )
    ]
    * 3,
    st.tuples(
        st.just("push"), KEYS, st.integers(0, 2**31), st.one_of(st.none(), st.integers(0, 12))
    ),
    st.tuples(st.just("erase"), st.lists(KEY, max_size=6)),
    st.tuples(st.just("evict")),
    st.tuples(
        st.just("prune"), st.sampled_from([0.0, 0.01, 0.03, 0.06]), st.sampled_from(list(Norm))
    ),
    # A training pull of 40 fresh keys: the arena and the buckets grow mid-batch.
    st.tuples(st.just("grow"), st.integers(0, 2**31)),
)


def run_ops(table: Table, model: RefTable, ops: list) -> None:
    seen: set[int] = set(KEY_POOL)
    is_adaptive = table.config.kind == TableKind.ADAPTIVE
    for op in ops:
        name = op[0]
        if name in ("pull", "grow"):
            if name == "pull":
                keys, train, mask_mode = op[1], op[2], op[3]
            else:
                rng = np.random.default_rng(op[1])
                keys, train, mask_mode = rng.integers(-(10**6), 10**6, 40).tolist(), True, None
            mask = None
            if mask_mode and is_adaptive:
                mask = (np.random.default_rng(len(keys)).random(len(keys)) < 0.5).tolist()
            seen.update(keys)
            try:
                exp = model.pull(keys, train=train, mask=mask)
            except errors.ResourceExhausted:
                everything = sorted(seen)
                before = snapshot(table, everything)
                with pytest.raises(errors.ResourceExhausted):
                    table.pull(keys, train=train, mask=None if mask is None else np.array(mask))
                assert_unchanged(table, everything, before)
                model.pull(everything, train=False)  # the two reads of snapshot/assert_unchanged
                model.pull(everything, train=False)
                check_sketch(table, model)
            else:
                got = table.pull(
                    np.array(keys, dtype=np.int64),
                    train=train,
                    mask=None if mask is None else np.array(mask, dtype=bool),
                )
                assert_rows(got, exp)
        elif name == "push":
            keys, seed, step = op[1], op[2], op[3]
            grads = np.random.default_rng(seed).normal(0, 0.05, (len(keys), DIM))
            grads = grads.astype(np.float32)
            seen.update(keys)
            applied, dropped = model.push(keys, grads, step)
            res = table.push(np.array(keys, dtype=np.int64), grads, step=step)
            assert (res.applied, res.dropped) == (applied, dropped)
        elif name == "erase":
            assert table.erase(op[1]) == model.erase(op[1])
        elif name == "evict":
            assert table.evict().rows == model.evict()
        else:
            before = table.memory_bytes()
            res = table.prune(op[1], op[2])
            assert res.rows == model.prune(op[1], op[2])
            assert res.bytes == max(0, before - table.memory_bytes())
        check_state(table, model)
    keys = sorted(seen)
    assert_rows(table.pull(keys, train=False), model.pull(keys, train=False))
    check_state(table, model)
    check_sketch(table, model)


@pytest.mark.parametrize("name", list(CONFIGS))
@settings(max_examples=100, deadline=None, derandomize=True)
@given(ops=st.lists(OP, min_size=6, max_size=30))
# Edge cases first: empty batches; the sentinel key with duplicates; the same 40
# fresh keys three times (admission, promotion, capacity); growth, prune, growth.
@example(ops=[])
@example(ops=[("pull", [], True, None), ("push", [], 0, None), ("erase", [])])
@example(
    ops=[
        ("pull", [INT64_MIN, INT64_MIN, 0, -1, INT64_MAX], True, "mask"),
        ("push", [INT64_MIN, 0, INT64_MIN, 0], 1, None),
        ("erase", [INT64_MIN, INT64_MIN]),
        ("pull", [INT64_MIN, -1], True, None),
        ("push", [-1, INT64_MIN], 2, 7),
    ]
)
@example(ops=[("grow", 0), ("grow", 0), ("grow", 0)])
@example(ops=[("grow", 0), ("prune", 0.06, Norm.L2), ("grow", 1), ("evict",), ("grow", 0)])
def test_table_matches_reference_model(name, ops):
    config = CONFIGS[name]
    run_ops(make_table(config), make_reference(config), ops)


def apply_op(table: Table, op: tuple) -> object:
    """Run one generated op on a table; ResourceExhausted becomes the result "full"."""
    name = op[0]
    try:
        if name == "pull":
            mask = None
            if op[3] and table.config.kind == TableKind.ADAPTIVE:
                mask = np.random.default_rng(len(op[1])).random(len(op[1])) < 0.5
            return table.pull(op[1], train=op[2], mask=mask)
        if name == "grow":
            return table.pull(np.random.default_rng(op[1]).integers(-(10**6), 10**6, 40))
        if name == "push":
            grads = np.random.default_rng(op[2]).normal(0, 0.05, (len(op[1]), DIM))
            return table.push(op[1], grads.astype(np.float32), step=op[3])
        if name == "erase":
            return table.erase(op[1])
        if name == "evict":
            return table.evict().rows
        return table.prune(op[1], op[2]).rows
    except errors.ResourceExhausted:
        return "full"


def assert_same_result(a: object, b: object) -> None:
    if isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


SNAPSHOT_CONFIGS = [
    "dynamic-admission",
    "dynamic-lfu",
    "dynamic-ttl-l2",
    "static-adam",
    "adaptive-lru",
    "adaptive-ftrl",
    "qr-concat-adam",
]


@pytest.mark.parametrize("name", SNAPSHOT_CONFIGS)
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    before=st.lists(OP, min_size=3, max_size=15),
    between=st.lists(OP, max_size=12),
    after=st.lists(OP, max_size=8),
)
def test_a_restored_table_continues_exactly_like_the_original(name, before, between, after):
    """Full snapshot -> load gives the same table; full + incremental gives the latest one."""
    config = CONFIGS[name]
    table = make_table(config)
    for op in before:
        apply_op(table, op)
    full = table.snapshot()
    restored = make_table(config)
    restored.load(full)
    for op in between:
        assert_same_result(apply_op(restored, op), apply_op(table, op))
    chained = make_table(config)
    chained.load(full)
    chained.load(table.snapshot(since_version=full.version))
    assert predicted_stats(chained) == predicted_stats(table)
    keys = sorted(set(KEY_POOL) | set(range(-30, 31)))
    for op in [("pull", keys, False, None), *after]:
        assert_same_result(apply_op(chained, op), apply_op(table, op))


# --------------------------------------------------------------------------
# Edge cases, each table kind
# --------------------------------------------------------------------------

KINDS = ["dynamic", "static", "adaptive", "qr"]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_requests(kind):
    table = make_table(cfg(kind))
    for keys in ([], np.array([], dtype=np.int64), np.zeros((0, 3), dtype=np.int32)):
        out = table.pull(keys)
        assert out.shape == (0, DIM) and out.dtype == np.float32
    for grads in (np.zeros((0, DIM)), np.zeros(0)):
        res = table.push([], grads)
        assert (res.applied, res.dropped) == (0, 0)
    assert table.erase([]) == 0
    assert table.stats().pulled_rows == 0 and table.stats().keys == 0


@pytest.mark.parametrize("kind", KINDS)
def test_keys_of_any_integer_shape_and_dtype_are_flattened(kind):
    table = make_table(cfg(kind))
    ref = table.pull(np.array([1, 2, 3, 4], dtype=np.int64))
    for keys in (
        np.array([[1, 2], [3, 4]], dtype=np.int32),
        np.array([1, 2, 3, 4], dtype=np.uint8),
        [1, 2, 3, 4],
    ):
        np.testing.assert_array_equal(table.pull(keys, train=False), ref)


def test_dynamic_rows_are_the_initializer_of_the_key_and_infer_reads_the_default():
    config = cfg(default_value=-3.5, seed=7)
    table = make_table(config)
    keys = [INT64_MIN, -(2**40), -1, 0, 1, INT64_MAX, 0, -1]
    np.testing.assert_array_equal(table.pull(keys, train=False), np.full((8, DIM), -3.5))
    assert table.stats().keys == 0, "an inference pull creates no rows"
    got = table.pull(keys)
    np.testing.assert_array_equal(got, initial_values(config, keys, 7, DIM))
    assert table.stats().keys == 6
    np.testing.assert_array_equal(got[6:], got[[3, 2]])


def test_a_resize_in_the_middle_of_a_batch_keeps_every_row():
    """initial_capacity 16: a batch of 500 keys crosses several arena and bucket growths."""
    config = cfg(opt="adagrad")
    table = make_table(config)
    first = table.pull(np.arange(10))
    keys = np.random.default_rng(1).permutation(np.arange(-250, 250))
    got = table.pull(keys)
    np.testing.assert_array_equal(got, initial_values(config, keys.tolist(), 0, DIM))
    np.testing.assert_array_equal(table.pull(np.arange(10), train=False), first)
    assert table.stats().keys == 500
    assert table.part.n_buckets >= 512 and table.part.block.rows >= 500
    check_map(table.part.buckets, table.part.meta, table.part.free)


@pytest.mark.parametrize("kind", ["dynamic", "adaptive"])
def test_a_table_at_max_rows_without_eviction_refuses_new_keys_and_changes_nothing(kind):
    table = make_table(cfg(kind, max_rows=4))
    mask = np.ones(4, dtype=bool) if kind == "adaptive" else None
    table.pull([1, 2, 3, 4], mask=mask)
    assert table.stats().keys == 4
    keys = [1, 2, 3, 4, 5, 6]
    before = snapshot(table, keys)
    with pytest.raises(errors.ResourceExhausted, match="max_rows"):
        table.pull([5, 1], mask=np.array([True, True]) if kind == "adaptive" else None)
    assert_unchanged(table, keys, before)
    table.pull([1, 2, 3, 4, 4], mask=np.ones(5, dtype=bool) if kind == "adaptive" else None)
    assert table.erase([2]) == 1
    table.pull([5], mask=np.ones(1, dtype=bool) if kind == "adaptive" else None)
    assert table.stats().keys == 4, "an erased row makes room again"


def test_a_failed_pull_does_not_count_admission_sightings():
    """ResourceExhausted must change nothing: not the sketch, not admissions_rejected."""
    table = make_table(cfg(admission_threshold=2, max_rows=1))
    table.pull([1])
    table.pull([1])
    assert table.stats().keys == 1
    before = snapshot(table, [1, 2, 3])
    with pytest.raises(errors.ResourceExhausted):
        table.pull([2, 3, 3])  # 2: first sighting (rejected), 3: second sighting (admitted)
    assert_unchanged(table, [1, 2, 3], before)


def test_a_failed_pull_does_not_count_promotion_sightings():
    table = make_table(cfg("adaptive", max_rows=1, promote_threshold=2))
    table.pull([1], mask=np.array([True]))
    before = snapshot(table, [1, 2, 3])
    with pytest.raises(errors.ResourceExhausted):
        table.pull([2, 3], mask=np.array([True, True]))
    assert_unchanged(table, [1, 2, 3], before)


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_eviction_at_max_rows_takes_the_smallest_score_ties_by_the_smaller_key(policy):
    table = make_table(cfg(max_rows=4, eviction=policy))
    table.pull([10, 11, 12, 13])  # rows 0..3, freq 1, last_step 0
    table.push([10, 11, 12, 13], np.zeros((4, DIM)), step=0)
    table.pull([11, 11, 12])  # freq: 10:1 11:3 12:2 13:1
    assert table.part.find(np.array([10, 11, 12, 13])).tolist() == [0, 1, 2, 3]
    table.push([12], np.zeros((1, DIM)), step=5)  # last_step: 12:5, others 0
    table.pull([13])  # freq 13:2, last_step 13:5
    # Candidates (13 is in the batch): lfu freq 10:1 11:3 12:2, lru last_step 10:0 11:0 12:5.
    # One victim: lfu 10 (smallest); lru 10 (tie with 11 at 0: the smaller key).
    table.pull([20, 13])
    # Next: 13 and 20 are in the batch; lfu evicts 12 (freq 2 < 3), lru 11 (step 0 < 5).
    table.pull([21, 13, 20])
    keys = [10, 11, 12, 13, 20, 21]
    have = [k for k, r in zip(keys, table.part.find(np.array(keys)), strict=True) if r >= 0]
    assert have == {"lfu": [11, 13, 20, 21], "lru": [12, 13, 20, 21]}[policy]
    stats = table.stats()
    assert stats.keys == 4 and stats.evictions == 2


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_eviction_never_takes_keys_of_the_current_batch(policy):
    table = make_table(cfg(max_rows=3, eviction=policy))
    table.pull([1, 2, 3])
    table.pull([1, 1, 1, 2, 2, 3, 3])
    table.pull([3, 4])  # 1 and 2 are hotter, 3 is protected by the batch
    rows = table.part.find(np.array([1, 2, 3, 4]))
    assert (rows[[2, 3]] >= 0).all()
    with pytest.raises(errors.ResourceExhausted, match="smaller batches"):
        table.pull([5, 6, 7, 8])  # more new keys than max_rows
    with pytest.raises(errors.ResourceExhausted):
        table.pull([1, 2, 4, 9])  # room needs a victim, but every row is in the batch


def test_admission_threshold_counts_sightings_duplicates_included():
    table = make_table(cfg(admission_threshold=3, default_value=0.5))
    assert (table.pull([7, 8]) == 0.5).all()
    assert (table.pull([7]) == 0.5).all()
    out = table.pull([7, 8, 8])  # 7: 3rd sighting; 8: 2nd and 3rd
    assert table.stats().keys == 2
    assert not (out == 0.5).all(axis=1).any()
    np.testing.assert_array_equal(out[1], out[2])
    assert table.stats().admissions_rejected == 4  # 7, 8, 7, then the first 8 of the batch
    assert table.push([9], np.ones((1, DIM))).dropped == 1, "keys without a row drop their grads"


def test_steps_to_live_and_l2_threshold_eviction():
    table = make_table(cfg(opt="sgd", steps_to_live=2, initializer=Initializer("constant", 1.0)))
    table.pull([1, 2, 3])
    table.push([1], np.zeros((1, DIM)), step=3)  # table step 3; 1 touched at 3
    assert table.evict().rows == 2, "rows untouched since step 0 are dead after 2 steps"
    assert table.part.find(np.array([1, 2, 3])).tolist()[1:] == [-1, -1]
    table2 = make_table(cfg(l2_evict_threshold=1.5, initializer=Initializer("constant", 0.5)))
    table2.pull([1, 2])
    table2.push([2], np.full((1, DIM), -1.0))  # row 2 -> 1.0 per element: L2 = 2
    assert table2.evict().rows == 1
    assert table2.stats().keys == 1 and table2.stats().evictions == 1


# --------------------------------------------------------------------------
# Errors: the whole request is rejected and nothing changes
# --------------------------------------------------------------------------

BAD_PUSHES = {
    "grads-too-few-rows": ([1, 2], np.zeros((1, DIM))),
    "grads-wrong-dim": ([1, 2], np.zeros((2, DIM + 1))),
    "grads-flat": ([1, 2], np.zeros(2 * DIM)),
    "grads-nan": ([1, 2], np.array([[0.1] * DIM, [0.1, np.nan, 0.1, 0.1]])),
    "grads-inf": ([1, 2], np.array([[np.inf] + [0.0] * (DIM - 1), [0.1] * DIM])),
    "grads-overflow-to-inf": ([1], np.full((1, DIM), 1e300)),
    "grads-strings": ([1], np.array([["a"] * DIM])),
    "keys-float": (np.array([1.0, 2.0]), np.zeros((2, DIM))),
    "keys-bool": (np.array([True, False]), np.zeros((2, DIM))),
    "keys-uint64-too-big": (np.array([2**63], dtype=np.uint64), np.zeros((1, DIM))),
    "keys-strings": (np.array(["1"]), np.zeros((1, DIM))),
}


@pytest.mark.parametrize("case", list(BAD_PUSHES))
@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_push_raises_invalid_argument_and_changes_nothing(kind, case):
    table = make_table(cfg(kind, "adagrad"))
    keys = [1, 2, 3, 0, -1]
    table.pull(keys)
    before = snapshot(table, keys)
    bad_keys, bad_grads = BAD_PUSHES[case]
    with pytest.raises(errors.InvalidArgument):
        table.push(bad_keys, bad_grads)
    assert_unchanged(table, keys, before)
    table.push([1], np.ones((1, DIM)))  # and the auto step did not advance
    assert table.stats().step == 0


@pytest.mark.parametrize("kind", KINDS)
def test_bad_pulls_and_arguments_raise_invalid_argument_and_change_nothing(kind):
    table = make_table(cfg(kind))
    keys = [1, 2, 3]
    table.pull(keys)
    bad_calls = [
        lambda: table.pull(np.array([1.5])),
        lambda: table.pull(np.array([2**64 - 1], dtype=np.uint64)),
        lambda: table.pull(["a"]),
        lambda: table.erase(np.array([0.5])),
        lambda: table.push([1], np.ones((1, DIM)), step=-1),
        lambda: table.push([1], np.ones((1, DIM)), step=1.5),
        lambda: table.prune(-1.0),
        lambda: table.prune(float("nan")),
        lambda: table.prune(0.1, norm="l3"),
    ]
    if kind == "adaptive":
        bad_calls += [
            lambda: table.pull([4, 5], mask=np.array([True])),
            lambda: table.pull([4, 5], mask=np.array([1, 0])),
        ]
    else:
        bad_calls.append(lambda: table.pull([4, 5], mask=np.array([True, True])))
    for call in bad_calls:
        before = snapshot(table, keys)
        with pytest.raises(errors.InvalidArgument):
            call()
        assert_unchanged(table, keys, before)


def test_invalid_argument_is_the_grpc_invalid_argument_code():
    import grpc

    table = make_table(cfg())
    with pytest.raises(errors.InvalidArgument) as exc:
        table.push([1], np.zeros((2, DIM)))
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT  # what ErrorInterceptor aborts with
    assert "(1, 4)" in str(exc.value), "the message states the expected shape"


# --------------------------------------------------------------------------
# Bytes accounting
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["dynamic-admission", "static-adam", "adaptive-ftrl", "qr-concat-adam"]
)
def test_stats_bytes_is_the_sum_of_every_reachable_array(name):
    table = make_table(CONFIGS[name])
    for _ in range(3):
        table.pull(np.arange(-50, 50))
        table.push(np.arange(0, 30), np.ones((30, DIM)))
        table.erase(np.arange(0, 10))
        stats = table.stats()
        assert stats.bytes == reachable_nbytes(table) == table.memory_bytes()
        assert stats.bytes == stats.dynamic_bytes + stats.static_bytes
        if stats.keys:
            assert stats.bytes_per_key == stats.bytes / stats.keys


def test_churn_without_checkpoints_keeps_memory_bounded():
    """Erase and re-create the same 50 keys many times: reachable memory must not keep growing."""
    table = make_table(cfg())
    keys = np.arange(50)
    sizes = []
    for cycle in range(300):
        table.pull(keys)
        table.erase(keys)
        if cycle in (20, 299):
            sizes.append(reachable_nbytes(table))
    assert sizes[1] <= sizes[0] + 1024, f"memory grew from {sizes[0]} to {sizes[1]} bytes"


@pytest.mark.parametrize("kind", ["dynamic", "adaptive"])
@pytest.mark.parametrize("n_keys", [16, 200])
def test_prune_reports_the_rows_and_bytes_it_freed(kind, n_keys):
    """memory_bytes() drops by exactly PruneResult.bytes, and compaction never grows memory."""
    table = make_table(cfg(kind, initializer=Initializer("constant", 1.0)))
    keys = np.arange(n_keys)
    table.pull(keys, mask=np.ones(n_keys, dtype=bool) if kind == "adaptive" else None)
    assert table.stats().keys == n_keys
    small = keys[: n_keys // 8 or 1]
    table.push(small, np.full((small.shape[0], DIM), 1.9))  # SGD lr 0.5: 1.0 -> 0.05
    before = table.memory_bytes()
    res = table.prune(0.5)
    after = table.memory_bytes()
    assert res.rows == small.shape[0]
    assert after <= before, f"prune grew the table from {before} to {after} bytes"
    assert res.bytes == before - after
    assert table.stats().keys == n_keys - small.shape[0]
    assert table.stats().pruned_rows == res.rows
    assert table.prune(0.5).rows == 0


@pytest.mark.parametrize("kind", ["static", "qr"])
def test_prune_never_deletes_shared_rows(kind):
    table = make_table(cfg(kind))
    before = table.pull(np.arange(20), train=False)
    res = table.prune(1e9)
    assert (res.rows, res.bytes) == (0, 0)
    np.testing.assert_array_equal(table.pull(np.arange(20), train=False), before)


# --------------------------------------------------------------------------
# qr
# --------------------------------------------------------------------------


def test_qr_keys_below_q_times_m_map_to_distinct_pairs():
    table = make_table(cfg("qr", qr_quotient_buckets=5, qr_remainder_buckets=7))
    q, r = table.parts_of(np.arange(35, dtype=np.int64))
    assert len(set(zip(q.tolist(), r.tolist(), strict=True))) == 35
    assert q.min() == 0 and q.max() == 4 and r.min() == 0 and r.max() == 6
    # keys congruent modulo Q*m share both parts, negative keys included
    q2, r2 = table.parts_of(np.arange(35, dtype=np.int64) - 35 * 1000)
    np.testing.assert_array_equal(q, q2)
    np.testing.assert_array_equal(r, r2)
    # with an initializer that separates rows, the 35 pulled rows are distinct
    rows = table.pull(np.arange(35), train=False)
    assert np.unique(rows, axis=0).shape[0] == 35


@pytest.mark.parametrize("combiner", ["mult", "add", "concat"])
def test_qr_gradients_reach_both_parts(combiner):
    """SGD on (Q, R) with a numpy reference of d(combine(Q[q], R[r])) over repeated keys."""
    config = cfg("qr", qr_combiner=combiner, qr_quotient_buckets=3, qr_remainder_buckets=4)
    table = make_table(config)
    pd = DIM // 2 if combiner == "concat" else DIM
    Q = table.quotient.values.astype(np.float64).copy()
    R = table.remainder.values.astype(np.float64).copy()
    keys = np.array([0, 5, 5, 11, 4, -1, 17, 3])
    g = np.random.default_rng(3).normal(size=(keys.shape[0], DIM)).astype(np.float32)
    qi, ri = keys % 12 // 4, keys % 12 % 4
    dQ = np.zeros_like(Q)
    dR = np.zeros_like(R)
    g64 = g.astype(np.float64)
    for i in range(keys.shape[0]):
        if combiner == "mult":
            dQ[qi[i]] += g64[i] * R[ri[i]]
            dR[ri[i]] += g64[i] * Q[qi[i]]
        elif combiner == "add":
            dQ[qi[i]] += g64[i]
            dR[ri[i]] += g64[i]
        else:
            dQ[qi[i]] += g64[i, :pd]
            dR[ri[i]] += g64[i, pd:]
    table.push(keys, g)
    lr = config.optimizer.lr
    np.testing.assert_allclose(table.quotient.values, Q - lr * dQ, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(table.remainder.values, R - lr * dR, rtol=RTOL, atol=ATOL)
    Qn, Rn = Q - lr * dQ, R - lr * dR
    comb = {
        "mult": Qn[qi] * Rn[ri],
        "add": Qn[qi] + Rn[ri],
        "concat": np.concatenate([Qn[qi], Rn[ri]], axis=1),
    }[combiner]
    np.testing.assert_allclose(table.pull(keys, train=False), comb, rtol=1e-5, atol=ATOL)


# --------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------


def test_engine_creation_is_idempotent_and_rejects_a_different_config():
    engine = Engine()
    config = cfg()
    assert engine.create_table(config) is True
    assert engine.create_table(dataclasses.replace(config)) is False
    with pytest.raises(errors.AlreadyExists, match="dim"):
        engine.create_table(dataclasses.replace(config, dim=8))
    table = engine.table("t")
    table.pull([1])
    assert engine.table("t") is table
    with pytest.raises(errors.TableNotFound, match="'u'"):
        engine.table("u")
    assert [t.name for t in engine.tables()] == ["t"]
    assert engine.drop_table("t") is True and engine.drop_table("t") is False
    with pytest.raises(errors.TableNotFound):
        engine.table("t")


def test_engine_evict_sweeps_every_table_or_one():
    engine = Engine()
    engine.create_table(cfg(steps_to_live=1))
    engine.create_table(dataclasses.replace(cfg(steps_to_live=1), name="u"))
    engine.create_table(cfg("static", name="s"))
    for name in ("t", "u"):
        engine.table(name).pull([1, 2])
        engine.table(name).push([1], np.zeros((1, DIM)), step=5)
    assert [(r.table, r.rows) for r in engine.evict()] == [("s", 0), ("t", 1), ("u", 1)]
    engine.table("t").pull([3])
    engine.table("t").push([1], np.zeros((1, DIM)), step=9)
    assert [(r.table, r.rows) for r in engine.evict("t")] == [("t", 1)]  # 3, not u's rows
    assert engine.table("u").stats().keys == 1
    with pytest.raises(errors.TableNotFound):
        engine.evict("nope")


def test_initializer_kinds_give_the_documented_rows():
    keys = np.arange(4000)
    zeros = make_table(cfg(initializer=Initializer(InitKind.ZEROS))).pull(keys[:5])
    assert (zeros == 0).all()
    const = make_table(cfg(initializer=Initializer("constant", 0.75))).pull(keys[:5])
    assert (const == 0.75).all()
    uni = make_table(cfg(initializer=Initializer("uniform", -2.0, 3.0))).pull(keys)
    assert uni.min() >= -2.0 and uni.max() < 3.0
    assert abs(uni.mean() - 0.5) < 0.05 and abs(uni.std() - 5 / 12**0.5) < 0.05
    normal = make_table(cfg(initializer=Initializer("normal", 1.0, 2.0))).pull(keys)
    assert abs(normal.mean() - 1.0) < 0.05 and abs(normal.std() - 2.0) < 0.05
    # Same key and seed: same row in another table; another seed: another row.
    again = make_table(cfg(initializer=Initializer("normal", 1.0, 2.0))).pull(keys[::-1])
    np.testing.assert_array_equal(again[::-1], normal)
    other = make_table(cfg(seed=1, initializer=Initializer("normal", 1.0, 2.0))).pull(keys[:5])
    assert not np.isclose(other, normal[:5]).any()


def test_static_rows_shared_by_colliding_keys():
    table = make_table(cfg("static", hash_bucket_size=3))
    keys = np.arange(30)
    rows = table.static_rows_of(keys)
    assert set(rows.tolist()) == {0, 1, 2}
    k0 = keys[rows == rows[0]][:2]
    table.push([int(k0[0])], np.ones((1, DIM)))
    out = table.pull(k0, train=False)
    np.testing.assert_array_equal(out[0], out[1])
    assert table.stats().keys == 0 and table.stats().static_rows == 3


def test_step_bookkeeping():
    table = make_table(cfg())
    table.push([1], np.zeros((1, DIM)))
    table.push([1], np.zeros((1, DIM)), step=10)
    table.push([1], np.zeros((1, DIM)), step=4)
    assert table.stats().step == 10
    table.push([1], np.zeros((1, DIM)))  # auto step continues after the largest seen
    assert table.stats().step == 11
    assert table.stats().pushed_rows == 0, "no row for key 1: every push dropped it"


def test_hash_map_sentinel_key_is_an_ordinary_key_for_tables():
    table = make_table(cfg(opt="adam"))
    out = table.pull([INT64_MIN, INT64_MIN + 1, INT64_MIN])
    np.testing.assert_array_equal(out[0], out[2])
    assert not np.array_equal(out[0], out[1])
    assert table.stats().keys == 2
    assert table.part.meta[hm.M_SENTINEL_ROW] >= 0
    table.push([INT64_MIN], np.ones((1, DIM)))
    assert not np.array_equal(table.pull([INT64_MIN], train=False)[0], out[0])
    assert table.erase([INT64_MIN, INT64_MIN]) == 1
    assert table.stats().keys == 1


def test_push_replay_windows_travel_with_the_snapshot():
    """A table's snapshot holds exactly the (client, sequence) pairs its rows hold."""
    table = make_table(cfg())
    keys = np.arange(5)
    table.pull(keys)
    g = np.ones((5, DIM), np.float32)
    assert not table.push(keys, g, client_id="c", sequence=3).replayed
    snap = table.snapshot()
    assert table.push(keys, g, client_id="c", sequence=3).replayed  # nothing changes
    assert not table.push(keys, g, client_id="c", sequence=4).replayed  # after the snapshot
    copy = make_table(cfg())
    bad = Snapshot(snap.config, dict(snap.arrays), dict(snap.state))
    bad.arrays["replay.ends"] = np.array([99], dtype=np.int64)
    with pytest.raises(ValueError, match="replay"):
        copy.load(bad)
    assert copy.stats().keys == 0 and len(copy.replay) == 0  # refused before any change
    copy.load(snap)
    before = copy.pull(keys, train=False)
    res = copy.push(keys, g, client_id="c", sequence=3)
    assert (res.applied, res.dropped, res.replayed) == (0, 0, True)
    np.testing.assert_array_equal(copy.pull(keys, train=False), before)
    assert not copy.push(keys, g, client_id="c", sequence=4).replayed  # the snapshot lacks it


def test_trim_keeps_deletions_a_recent_follower_needs_and_forgets_gone_followers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint's trim keeps deletions a follower seen within FOLLOWER_TTL_S still
    needs; a follower away longer is forgotten (its entry dropped, its deletions trimmed)."""
    import embps.server.tables.base as base

    t = make_table(TableConfig("t", DIM, optimizer=SGD(lr=0.1)))
    t.pull(np.arange(10, dtype=np.int64))
    t.changes(0)  # deletions are kept for the feed from here on
    t.changes(t.version, epoch=t.epoch, follower="r1")
    seen = t.version
    t.erase(np.array([3, 4], dtype=np.int64))
    t.trim_deleted(t.version)
    page = t.changes(seen, epoch=t.epoch)
    assert not page.resync and sorted(page.deleted.tolist()) == [3, 4]  # r1 needs them
    clock = [base.time.monotonic() + base.FOLLOWER_TTL_S + 1]
    monkeypatch.setattr(base.time, "monotonic", lambda: clock[0])
    t.trim_deleted(t.version)
    assert t._followers == {}
    assert t.changes(seen, epoch=t.epoch).resync  # r1's deletions are gone: it starts over
