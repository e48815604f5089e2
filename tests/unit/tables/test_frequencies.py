"""``Table.frequencies`` (server/tables/): own-row counts, sketch estimates, zeros; read only."""

from __future__ import annotations

import numpy as np
import pytest

from embps.protos.config import SGD, Initializer, TableConfig
from embps.server import errors
from embps.server.tables import make_table

DIM = 3


def cfg(kind: str, **kw: object) -> TableConfig:
    base: dict = {"name": "t", "dim": DIM, "kind": kind, "optimizer": SGD(lr=0.1)}
    if kind in ("dynamic", "adaptive"):
        base["initial_capacity"] = 16
    if kind == "static":
        base["hash_bucket_size"] = 7
    if kind == "adaptive":
        base.update(hash_bucket_size=5, promote_threshold=3, sketch_width=1024, sketch_depth=4)
    if kind == "qr":
        base.update(qr_quotient_buckets=3, qr_remainder_buckets=4)
    base.update(kw)
    return TableConfig(**base)


def test_empty_request_gives_an_empty_int64_array() -> None:
    t = make_table(cfg("dynamic"))
    out = t.frequencies(np.empty(0, dtype=np.int64))
    assert out.dtype == np.int64 and out.shape == (0,)


def test_dynamic_counts_every_training_sighting_duplicates_included() -> None:
    t = make_table(cfg("dynamic"))
    t.pull([5, 9, 5])  # 5 twice, 9 once
    t.pull([5, 11])
    t.pull([9, 5], train=False)  # inference: not counted
    got = t.frequencies(np.array([11, 5, 42, 9, 5]))
    np.testing.assert_array_equal(got, [1, 3, 0, 1, 3])
    assert got.dtype == np.int64


def test_growth_keeps_the_counts() -> None:
    t = make_table(cfg("dynamic"))
    keys = np.arange(1000, dtype=np.int64) * 7919  # many resizes of a 16-row table
    t.pull(keys)
    t.pull(keys[::2])
    want = np.ones(1000, dtype=np.int64)
    want[::2] = 2
    np.testing.assert_array_equal(t.frequencies(keys), want)


def test_frequencies_change_nothing() -> None:
    t = make_table(cfg("adaptive"))
    t.pull([1, 2, 2, 3, 3, 3])
    before = t.snapshot()
    t.frequencies([1, 2, 3, 4, 5])
    after = t.snapshot()
    assert after.state == before.state
    assert after.arrays.keys() == before.arrays.keys()
    for name, a in before.arrays.items():
        np.testing.assert_array_equal(after.arrays[name], a, err_msg=name)


def test_dynamic_with_admission_reads_the_sketch_until_admitted() -> None:
    t = make_table(cfg("dynamic", admission_threshold=3))
    t.pull([7, 7])  # two sightings: not admitted, counted in the sketch
    assert t.stats().keys == 0
    np.testing.assert_array_equal(t.frequencies([7, 8]), [2, 0])
    t.pull([7])  # third: admitted; its row starts counting from this pull
    assert t.stats().keys == 1
    np.testing.assert_array_equal(t.frequencies([7]), [1])


def test_adaptive_static_keys_read_the_sketch_and_promoted_keys_their_row() -> None:
    t = make_table(cfg("adaptive"))
    t.pull([1, 2, 2])
    np.testing.assert_array_equal(t.frequencies([1, 2, 3]), [1, 2, 0])
    t.pull([2, 4])  # key 2's third sighting: promoted (its row's freq starts at the sketch count)
    assert t.stats().promotions == 1
    f2 = int(t.frequencies([2])[0])
    assert f2 >= 3
    t.pull([2, 2])
    assert int(t.frequencies([2])[0]) == f2 + 2
    np.testing.assert_array_equal(t.frequencies([1, 4]), [1, 1])


@pytest.mark.parametrize("kind", ["static", "qr"])
def test_tables_without_a_sketch_read_zero(kind: str) -> None:
    t = make_table(cfg(kind))
    t.pull([1, 2, 2, 3])
    np.testing.assert_array_equal(t.frequencies([1, 2, 3, 4]), [0, 0, 0, 0])


def test_pruned_rows_lose_their_count() -> None:
    t = make_table(cfg("dynamic", initializer=Initializer(kind="constant", a=0.0)))
    t.pull([1, 2])
    t.push([2], np.ones((1, DIM), dtype=np.float32))
    assert t.prune(0.1).rows == 1  # key 1 (all zeros) goes, key 2 stays
    np.testing.assert_array_equal(t.frequencies([1, 2]), [0, 1])


def test_bad_keys_are_invalid_argument() -> None:
    t = make_table(cfg("dynamic"))
    with pytest.raises(errors.InvalidArgument):
        t.frequencies(np.array([1.5, 2.0]))
