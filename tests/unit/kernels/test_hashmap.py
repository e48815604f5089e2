"""Hash-map kernels (server/kernels/hashmap.py) against a dict, with the DESIGN invariants checked."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.reference import INT64_MAX, INT64_MIN, check_map, fmix64, home_bucket, slot_hash

from embps.protos.routing import fmix64_one
from embps.server.kernels import hashmap as hm

EMPTY = INT64_MIN


class KernelMap:
    """The kernels plus the caller's duties (growth, free-list room), as a table does them.

    Growth is the smallest step allowed, so batches stop and resume often.
    """

    def __init__(self, cap: int = 16, row_cap: int = 4) -> None:
        self.buckets = hm.new_buckets(cap)
        self.meta = hm.new_meta(cap, row_cap)
        self.free = np.empty(0, dtype=np.int64)
        self.rehashes = 0
        self.row_grows = 0

    @property
    def cap(self) -> int:
        return self.buckets.shape[0] // 2

    def insert(self, keys: list[int]) -> tuple[np.ndarray, np.ndarray]:
        k = np.asarray(keys, dtype=np.int64)
        rows = np.full(k.shape[0], -7, dtype=np.int64)
        inserted = np.zeros(k.shape[0], dtype=np.bool_)
        start = 0
        while True:
            stop = hm.find_or_insert(self.buckets, self.meta, self.free, k, start, rows, inserted)
            assert start <= stop <= k.shape[0]
            if stop == k.shape[0]:
                return rows, inserted
            # The stop happened *before* key `stop`: it is untouched and still absent.
            assert rows[stop] == -7
            if k[stop] != EMPTY and self.meta[hm.M_SIZE] >= self.meta[hm.M_GROW_AT]:
                new = hm.new_buckets(self.cap * 2)
                assert hm.rehash(self.buckets, new) == self.meta[hm.M_SIZE]
                self.buckets = new
                self.meta[hm.M_GROW_AT] = hm.grow_limit(self.cap)
                self.rehashes += 1
            else:
                assert self.meta[hm.M_FREE_TOP] == 0
                assert self.meta[hm.M_NEXT_ROW] == self.meta[hm.M_ROW_CAP]
                self.meta[hm.M_ROW_CAP] += 1
                self.row_grows += 1
            start = stop

    def erase(self, keys: list[int]) -> tuple[int, np.ndarray]:
        k = np.asarray(keys, dtype=np.int64)
        need = int(self.meta[hm.M_FREE_TOP]) + k.shape[0]
        if self.free.shape[0] < need:
            grown = np.empty(need, dtype=np.int64)
            grown[: self.free.shape[0]] = self.free
            self.free = grown
        rows = np.empty(k.shape[0], dtype=np.int64)
        n = hm.erase(self.buckets, self.meta, self.free, k, rows)
        return int(n), rows

    def find(self, keys: list[int]) -> tuple[int, np.ndarray]:
        k = np.asarray(keys, dtype=np.int64)
        rows = np.empty(k.shape[0], dtype=np.int64)
        return int(hm.find(self.buckets, self.meta, k, rows)), rows

    def export(self, page: int) -> tuple[list[tuple[int, int]], int]:
        """Walk the whole map with the cursor; returns (entries, calls)."""
        keys = np.empty(page, dtype=np.int64)
        rows = np.empty(page, dtype=np.int64)
        out: list[tuple[int, int]] = []
        cursor, calls = 0, 0
        while True:
            count, cursor = hm.export_page(self.buckets, self.meta, cursor, keys, rows)
            calls += 1
            assert 0 <= count <= page
            out.extend(zip(keys[:count].tolist(), rows[:count].tolist(), strict=True))
            if cursor == 0:
                return out, calls
            assert calls <= self.cap + 2, "cursor walk does not end"

    def check(self) -> dict[int, int]:
        return check_map(self.buckets, self.meta, self.free)


def keys_homing_at(bucket: int, cap: int, count: int) -> list[int]:
    """The first ``count`` non-negative keys whose home bucket in ``cap`` buckets is ``bucket``."""
    out = []
    k = 0
    while len(out) < count:
        if home_bucket(k, cap) == bucket:
            out.append(k)
        k += 1
    return out


# Keys whose home is the *last* bucket for cap 16, 32 and 64: runs wrap around.
WRAP_KEYS = keys_homing_at(63, 64, 10)
POOL = [EMPTY, EMPTY + 1, -(2**40), -1, 0, 1, 2, 3, 2**40, INT64_MAX, *WRAP_KEYS]


class DictMap:
    """Reference: {key: row} and the documented row allocator (LIFO free list, else bump)."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}
        self.free: list[int] = []
        self.next_row = 0

    def insert(self, keys: list[int]) -> tuple[list[int], list[bool]]:
        rows, inserted = [], []
        for k in keys:
            if k in self.rows:
                rows.append(self.rows[k])
                inserted.append(False)
                continue
            if self.free:
                r = self.free.pop()
            else:
                r = self.next_row
                self.next_row += 1
            self.rows[k] = r
            rows.append(r)
            inserted.append(True)
        return rows, inserted

    def erase(self, keys: list[int]) -> list[int]:
        out = []
        for k in keys:
            r = self.rows.pop(k, -1)
            if r >= 0:
                self.free.append(r)
            out.append(r)
        return out


# --------------------------------------------------------------------------
# Sizes and hashes
# --------------------------------------------------------------------------


def test_pure_python_hashes_equal_the_kernels():
    """reference.fmix64 / slot_hash (used by the invariant checks and the sketch model) match."""
    for k in [EMPTY, EMPTY + 1, -1, 0, 1, 12345, 2**40, INT64_MAX]:
        assert fmix64(k) == int(fmix64_one(np.uint64(k & (2**64 - 1))))
        assert slot_hash(k) == int(hm.slot_hash(np.int64(k)))


@pytest.mark.parametrize("n", [0, 1, 12, 13, 24, 25, 1000, 10**6])
def test_capacity_for_is_the_smallest_power_of_two_that_holds_n(n):
    cap = hm.capacity_for(n)
    assert cap >= hm.MIN_CAPACITY and cap & (cap - 1) == 0
    assert hm.grow_limit(cap) >= n
    assert hm.grow_limit(cap) < cap, "there must always be an empty bucket"
    if cap > hm.MIN_CAPACITY:
        assert hm.grow_limit(cap // 2) < n


def test_new_buckets_rejects_a_capacity_that_is_not_a_power_of_two():
    with pytest.raises(AssertionError):
        hm.new_buckets(24)


# --------------------------------------------------------------------------
# Edge cases first
# --------------------------------------------------------------------------


def test_empty_batches_touch_nothing():
    m = KernelMap()
    before = (m.buckets.copy(), m.meta.copy())
    assert m.find([])[0] == 0
    rows, inserted = m.insert([])
    assert rows.shape == (0,) and inserted.shape == (0,)
    assert m.erase([])[0] == 0
    np.testing.assert_array_equal(m.buckets, before[0])
    np.testing.assert_array_equal(m.meta, before[1])
    assert m.export(1) == ([], 1)


def test_find_on_an_empty_map_misses_every_key():
    m = KernelMap()
    found, rows = m.find(POOL)
    assert found == 0
    assert (rows == -1).all()


def test_sentinel_key_lives_in_meta_not_in_the_buckets():
    m = KernelMap()
    rows, inserted = m.insert([EMPTY, 5, EMPTY])
    assert inserted.tolist() == [True, True, False]
    assert rows[0] == rows[2] == m.meta[hm.M_SENTINEL_ROW]
    assert m.meta[hm.M_SIZE] == 1, "the sentinel key is not counted in the buckets"
    assert (m.buckets[0::2] == EMPTY).sum() == m.cap - 1
    assert m.check() == {EMPTY: int(rows[0]), 5: int(rows[1])}
    found, got = m.find([EMPTY, 5, 6])
    assert found == 2 and got.tolist() == [rows[0], rows[1], -1]
    assert m.export(1)[0][0] == (EMPTY, int(rows[0])), "cursor 0 emits the sentinel first"
    n, freed = m.erase([EMPTY, EMPTY])
    assert n == 1 and freed.tolist() == [rows[0], -1]
    assert m.meta[hm.M_SENTINEL_ROW] == -1
    assert m.check() == {5: int(rows[1])}


def test_duplicates_in_one_insert_batch_share_a_row_and_only_the_first_is_inserted():
    m = KernelMap()
    rows, inserted = m.insert([7, 7, -3, 7, -3, 0])
    assert inserted.tolist() == [True, False, True, False, False, True]
    assert rows[0] == rows[1] == rows[3] and rows[2] == rows[4]
    assert len({int(rows[0]), int(rows[2]), int(rows[5])}) == 3
    n, freed = m.erase([7, 7])
    assert n == 1 and freed.tolist() == [rows[0], -1], "a second erase in the batch misses"


def test_find_or_insert_stops_before_passing_the_grow_limit_and_resumes():
    buckets = hm.new_buckets(16)
    meta = hm.new_meta(16, 100)
    free = np.empty(0, dtype=np.int64)
    keys = np.arange(20, dtype=np.int64)
    rows = np.full(20, -7, dtype=np.int64)
    inserted = np.zeros(20, dtype=np.bool_)
    stop = hm.find_or_insert(buckets, meta, free, keys, 0, rows, inserted)
    assert stop == hm.grow_limit(16) == 12
    assert meta[hm.M_SIZE] == 12 and (rows[12:] == -7).all()
    first = rows[:12].copy()
    new = hm.new_buckets(32)
    assert hm.rehash(buckets, new) == 12
    meta[hm.M_GROW_AT] = hm.grow_limit(32)
    assert hm.find_or_insert(new, meta, free, keys, stop, rows, inserted) == 20
    np.testing.assert_array_equal(rows[:12], first)
    np.testing.assert_array_equal(rows, np.arange(20))
    assert inserted.all()
    assert check_map(new, meta, free) == {k: k for k in range(20)}


def test_find_or_insert_stops_when_the_arena_is_full():
    m = KernelMap(cap=16, row_cap=3)
    buckets = m.buckets
    rows = np.full(5, -7, dtype=np.int64)
    inserted = np.zeros(5, dtype=np.bool_)
    keys = np.array([1, 2, 1, 3, 4], dtype=np.int64)
    assert hm.find_or_insert(buckets, m.meta, m.free, keys, 0, rows, inserted) == 4
    assert rows[:4].tolist() == [0, 1, 0, 2] and rows[4] == -7
    # Sentinel key with no row left: also a stop, nothing written.
    assert hm.find_or_insert(buckets, m.meta, m.free, np.array([EMPTY]), 0, rows, inserted) == 0
    assert m.meta[hm.M_SENTINEL_ROW] == -1
    m.meta[hm.M_ROW_CAP] = 4
    assert hm.find_or_insert(buckets, m.meta, m.free, keys, 4, rows, inserted) == 5
    assert rows[4] == 3
    m.check()


def test_erased_rows_are_reused_last_in_first_out():
    m = KernelMap(row_cap=8)
    rows, _ = m.insert([10, 11, 12, 13])
    m.erase([11, 13])
    new_rows, inserted = m.insert([20, 21, 22])
    assert inserted.all()
    assert new_rows.tolist() == [rows[3], rows[1], 4]


def test_backward_shift_deletion_across_the_wrap_around():
    """Keys homing at the last bucket fill 15, 0, 1, ...; deleting any keeps the rest findable."""
    cap = 16
    keys = keys_homing_at(15, cap, 6) + keys_homing_at(0, cap, 2) + keys_homing_at(14, cap, 2)
    m = KernelMap(cap=cap, row_cap=16)
    rows, _ = m.insert(keys)
    assert m.rehashes == 0
    model = dict(zip(keys, rows.tolist(), strict=True))
    order = np.random.default_rng(0).permutation(len(keys))
    for i in order:
        k = keys[i]
        n, freed = m.erase([k])
        assert n == 1 and freed[0] == model.pop(k)
        assert m.check() == model
        found, got = m.find(list(model))
        assert found == len(model) and got.tolist() == list(model.values())
    assert (m.buckets[0::2] == EMPTY).all() and (m.buckets[1::2] == -1).all()


def test_erase_of_absent_keys_changes_nothing():
    m = KernelMap(row_cap=8)
    m.insert([1, 2, 3])
    buckets, meta = m.buckets.copy(), m.meta.copy()
    n, rows = m.erase([4, -1, EMPTY, 0])
    assert n == 0 and (rows == -1).all()
    np.testing.assert_array_equal(m.buckets, buckets)
    np.testing.assert_array_equal(m.meta, meta)


def test_rehash_moves_every_entry_and_keeps_rows():
    m = KernelMap(cap=16, row_cap=16)
    keys = [*WRAP_KEYS[:6], -5, 0, 9, EMPTY]
    rows, _ = m.insert(keys)
    before = m.check()
    for cap in (32, 64, 256):
        new = hm.new_buckets(cap)
        assert hm.rehash(m.buckets, new) == len(keys) - 1, "the sentinel key is not in the buckets"
        m.buckets = new
        m.meta[hm.M_GROW_AT] = hm.grow_limit(cap)
        assert m.check() == before
    assert m.find(keys)[1].tolist() == rows.tolist()


# --------------------------------------------------------------------------
# export_page: the cursor walk
# --------------------------------------------------------------------------


@pytest.mark.parametrize("with_sentinel", [False, True])
@pytest.mark.parametrize("page", [1, 2, 3, 7, 11, 12, 13, 64])
def test_export_walk_returns_every_key_exactly_once(page, with_sentinel):
    m = KernelMap(cap=16, row_cap=4)
    keys = [*WRAP_KEYS[:8], -1, 0, 2**40, INT64_MAX] + ([EMPTY] if with_sentinel else [])
    m.insert(keys)
    m.erase([WRAP_KEYS[2], -1])  # holes from backward shift, no rehash
    contents = m.check()
    entries, calls = m.export(page)
    assert sorted(entries) == sorted(contents.items())
    assert len(entries) == len({k for k, _ in entries}), "a key was emitted twice"
    if with_sentinel:
        assert entries[0] == (EMPTY, contents[EMPTY])
    assert calls <= -(-len(contents) // page) + 1, "work per call is bounded by the page"


def test_export_of_an_exactly_full_last_page_ends_the_walk():
    m = KernelMap(cap=16, row_cap=16)
    m.insert([1, 2, 3, 4])
    keys = np.empty(4, dtype=np.int64)
    rows = np.empty(4, dtype=np.int64)
    count, cursor = hm.export_page(m.buckets, m.meta, 0, keys, rows)
    assert count == 4
    if cursor:
        assert hm.export_page(m.buckets, m.meta, cursor, keys, rows) == (0, 0)
    assert sorted(keys.tolist()) == [1, 2, 3, 4]


@pytest.mark.parametrize("with_sentinel", [False, True])
def test_export_with_an_empty_page_never_claims_the_walk_is_complete(with_sentinel):
    """next_cursor == 0 means 'complete'; a page of 0 entries exported nothing."""
    m = KernelMap(cap=16, row_cap=8)
    m.insert([1, 2, 3] + ([EMPTY] if with_sentinel else []))
    empty = np.empty(0, dtype=np.int64)
    count, cursor = hm.export_page(m.buckets, m.meta, 0, empty, empty)
    assert count == 0
    assert cursor != 0, "the walk reported complete before exporting any entry"


# --------------------------------------------------------------------------
# Property: random batches against the dict model
# --------------------------------------------------------------------------

KEY = st.one_of(st.sampled_from(POOL), st.integers(-20, 20))
OP = st.one_of(
    st.tuples(st.just("insert"), st.lists(KEY, max_size=20)),
    st.tuples(st.just("erase"), st.lists(KEY, max_size=10)),
    st.tuples(st.just("find"), st.lists(KEY, max_size=10)),
    st.tuples(st.just("export"), st.integers(1, 9)),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ops=st.lists(OP, max_size=25))
def test_kernels_match_a_dict(ops):
    m = KernelMap(cap=16, row_cap=2)
    model = DictMap()
    for op, arg in ops:
        if op == "insert":
            rows, inserted = m.insert(arg)
            exp_rows, exp_inserted = model.insert(arg)
            assert rows.tolist() == exp_rows
            assert inserted.tolist() == exp_inserted
        elif op == "erase":
            n, rows = m.erase(arg)
            exp = model.erase(arg)
            assert rows.tolist() == exp
            assert n == sum(r >= 0 for r in exp)
        elif op == "find":
            found, rows = m.find(arg)
            exp = [model.rows.get(k, -1) for k in arg]
            assert rows.tolist() == exp
            assert found == sum(r >= 0 for r in exp)
        else:
            entries, _ = m.export(arg)
            assert sorted(entries) == sorted(model.rows.items())
            assert len(entries) == len(model.rows)
        assert m.check() == model.rows
        assert int(m.meta[hm.M_NEXT_ROW]) == model.next_row
        top = int(m.meta[hm.M_FREE_TOP])
        assert m.free[:top].tolist() == model.free
