"""``DynamicPart``: a table's own rows: hash map int64 key -> row of a growable Block, with a free list. Dynamic and adaptive tables hold one; the base table's snapshot, feed and eviction page through it."""

from __future__ import annotations

import numpy as np

from embps.server.kernels import hashmap as hm
from embps.server.parallel import run_in_pieces
from embps.server.tables.block import (
    BLOCK_FIELDS,
    ROW_GROWTH,
    TRAINING,
    Block,
    RowIndex,
    Storage,
    _adoptable,
    unique_keys,
)


class DynamicPart:
    """Hash map int64 key -> row of a growable Block, with a free list.

    The arena grows by ROW_GROWTH, the last step clipped to ``max_rows`` (the
    table's ``row_limit``; None: unbounded); buckets double before the load
    factor passes hashmap.MAX_LOAD; the free list never outgrows the arena.
    """

    def __init__(
        self,
        dim: int,
        n_slots: int,
        initial_capacity: int,
        max_rows: int | None = None,
        storage: Storage = TRAINING,
    ) -> None:
        row_cap = max(int(initial_capacity), 16)
        if max_rows is not None:
            row_cap = min(row_cap, max_rows)
        self.max_rows = max_rows
        self.block = Block(row_cap, dim, n_slots, storage)
        self.row_keys = np.full(row_cap, hm.EMPTY, dtype=np.int64)
        cap = hm.capacity_for(row_cap)
        self.buckets = hm.new_buckets(cap)
        self.meta = hm.new_meta(cap, row_cap)
        self.free = np.empty(0, dtype=np.int64)

    # ---------------------------------------------------------------- sizes
    @property
    def size(self) -> int:
        """Keys stored (the sentinel key included)."""
        return int(self.meta[hm.M_SIZE]) + int(self.meta[hm.M_SENTINEL_ROW] >= 0)

    @property
    def n_buckets(self) -> int:
        """Bucket count (a power of two)."""
        return int(self.buckets.shape[0] // 2)

    @property
    def load_factor(self) -> float:
        """Stored keys per bucket."""
        return float(self.meta[hm.M_SIZE]) / self.n_buckets

    @property
    def nbytes(self) -> int:
        """Bytes of the index, the arena and the free list."""
        return int(
            self.block.nbytes
            + self.row_keys.nbytes
            + self.buckets.nbytes
            + self.meta.nbytes
            + self.free.nbytes
        )

    # ---------------------------------------------------------------- map
    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, -1 where absent: int64 (n,)."""
        rows = np.empty(keys.shape[0], dtype=np.int64)
        buckets, meta = self.buckets, self.meta
        run_in_pieces(keys.shape[0], lambda a, b: hm.find(buckets, meta, keys[a:b], rows[a:b]))
        return rows

    def insert(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """find_or_insert with growth in the middle of the batch.

        Returns (rows int64 (n,), inserted bool (n,)). New rows are *not* initialised.
        """
        n = keys.shape[0]
        rows = np.empty(n, dtype=np.int64)
        inserted = np.zeros(n, dtype=np.bool_)
        start = 0
        while True:
            start = hm.find_or_insert(
                self.buckets, self.meta, self.free, keys, start, rows, inserted
            )
            if start == n:
                break
            if keys[start] != hm.EMPTY and self.meta[hm.M_SIZE] >= self.meta[hm.M_GROW_AT]:
                self._rehash(self.n_buckets * 2)
            else:
                self._grow_rows(n - start)
        new = rows[inserted]
        self.row_keys[new] = keys[inserted]
        return rows, inserted

    def free_list_growth(self, more: int) -> int:
        """Length the free list must grow to before ``more`` rows are freed (0: none)."""
        # Every row may be on the free list at once, never more: the arena bounds it.
        need = min(int(self.meta[hm.M_FREE_TOP]) + more, self.block.rows)
        if self.free.shape[0] >= need:
            return 0
        return min(max(need, 2 * self.free.shape[0]), self.block.rows)

    def erase_keys(self, keys: np.ndarray, spare: np.ndarray | None = None) -> np.ndarray:
        """Delete keys; their rows go to the free list. Returns the freed rows (-1: absent).

        spare: int64 (m,), an array allocated (and its pages touched) outside the
        table's lock by a caller that expects the free list to grow
        (``free_list_growth``); used if m is at least the length needed.
        """
        grow = self.free_list_growth(keys.shape[0])
        if grow:
            grown = (
                spare if spare is not None and spare.shape[0] >= grow else np.empty(grow, np.int64)
            )
            grown[: self.free.shape[0]] = self.free
            self.free = grown
        rows = np.empty(keys.shape[0], dtype=np.int64)
        hm.erase(self.buckets, self.meta, self.free, keys, rows)
        freed = rows[rows >= 0]
        self.row_keys[freed] = hm.EMPTY
        return rows

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        """Keys stored in live ``rows`` (int64 (k,))."""
        keys = self.row_keys[rows].copy()
        sent = self.meta[hm.M_SENTINEL_ROW]
        if sent >= 0:
            keys[rows == sent] = hm.EMPTY
        return keys

    def live_rows_in(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        """(rows in [start, stop) holding a key, ascending: int64 (k,); the arena's
        used top). A page of ``live_rows``: bounded work for sweeps."""
        top = int(self.meta[hm.M_NEXT_ROW])
        lo, hi = min(start, top), min(stop, top)
        live = self.row_keys[lo:hi] != hm.EMPTY
        sent = int(self.meta[hm.M_SENTINEL_ROW])
        if lo <= sent < hi:
            live[sent - lo] = True
        return np.flatnonzero(live).astype(np.int64) + lo, top

    def live_rows(self) -> np.ndarray:
        """Rows holding a key, ascending: int64 (size,)."""
        top = int(self.meta[hm.M_NEXT_ROW])
        live = self.row_keys[:top] != hm.EMPTY
        sent = int(self.meta[hm.M_SENTINEL_ROW])
        if sent >= 0:
            live[sent] = True
        return np.flatnonzero(live).astype(np.int64)

    # ---------------------------------------------------------------- growth
    def _rehash(self, cap: int) -> None:
        """Move every key into a new bucket array of ``cap`` buckets.

        LIMITATIONS. Whole-table under the table's write lock (Redis ``dict.c`` rehashes
        incrementally; this does not): a rehash of N keys holds the lock for one pass
        over them: 0.23 s at 10M keys here (23 ns a key, ``hm.rehash`` into 2^25 buckets),
        and only when the load factor passes 0.75, so about log2(N) times in a table's
        life. Incremental rehashing would make every probe look in two arrays.
        """
        new = hm.new_buckets(cap)
        hm.rehash(self.buckets, new)
        self.buckets = new
        self.meta[hm.M_GROW_AT] = hm.grow_limit(cap)

    def _grow_rows(self, at_least: int) -> None:
        old = self.block.rows
        new = max(old + at_least, int(old * ROW_GROWTH))
        if self.max_rows is not None:
            new = min(new, self.max_rows)  # a partial last step, up to the row limit
        if new <= old:
            raise RuntimeError(
                "internal: arena at its row limit; the table must evict before inserting"
            )
        self.block.resize(new)
        keys = np.full(new, hm.EMPTY, dtype=np.int64)
        keys[:old] = self.row_keys
        self.row_keys = keys
        self.meta[hm.M_ROW_CAP] = new

    def compact(self, headroom: float = 0.25) -> None:
        """Move live rows into a dense prefix and shrink the arena and buckets to fit them
        and ``headroom`` (a fraction) more.

        Row numbers change; keys, values, slots and metadata move together.

        LIMITATIONS. Whole-table under the table's write lock: one pass over the live rows
        (a copy of each array) and a rebuild of the buckets. It runs after a prune (an
        admin call, rare), not on the training path; at 10M rows of dim 16 expect about a
        second in which the table answers nothing.
        """
        live = self.live_rows()
        keys = self.keys_of(live)
        block = self.block.take(live)
        row_cap = min(
            max(16, len(live) + int(len(live) * headroom)), self.block.rows
        )  # never grows
        block.resize(row_cap)
        cap = min(hm.capacity_for(row_cap), self.n_buckets)
        self.buckets = hm.new_buckets(cap)
        self.meta = hm.new_meta(cap, row_cap)
        self.free = np.empty(0, dtype=np.int64)
        self.block = block
        self.row_keys = np.full(row_cap, hm.EMPTY, dtype=np.int64)
        rows, _ = self.insert(keys)  # the bump allocator hands out 0..k-1 in order
        assert np.array_equal(rows, np.arange(len(keys))), "compaction must keep row order"

    def build_index(self, keys: np.ndarray) -> RowIndex:
        """The hash map of ``keys`` (int64 (k,), k >= 16; key keys[i] -> row i), built aside
        for ``adopt_rows`` (this part must be empty). A repeated key is found by the insert
        (it takes no row): then ``distinct`` is False, so no sort is needed to check the
        keys distinct.

        An empty part's buckets are all EMPTY: the map takes them when they have the size
        needed (a table created with initial_capacity for its rows), sparing 16 bytes per
        bucket of fresh memory; the part keeps the smallest empty buckets meanwhile, still
        a valid empty part (``adopt_rows`` gives them back if the keys repeat).
        """
        assert self.size == 0, "build_index needs an empty part"
        k = int(keys.shape[0])
        cap = hm.capacity_for(k)
        taken = self.buckets.shape[0] == 2 * cap
        if taken:
            buckets = self.buckets
            self.buckets = hm.new_buckets(hm.MIN_CAPACITY)
            self.meta[hm.M_GROW_AT] = hm.grow_limit(hm.MIN_CAPACITY)
        else:
            buckets = hm.new_buckets(cap)
        meta = hm.new_meta(cap, k)
        rows = np.empty(k, dtype=np.int64)
        inserted = np.zeros(k, dtype=np.bool_)
        # k keys fit cap buckets and k rows: one call inserts all (a repeat takes no row).
        done = hm.find_or_insert(
            buckets, meta, np.empty(0, dtype=np.int64), keys, 0, rows, inserted
        )
        distinct = done == k and bool(inserted.all())
        if distinct:
            assert rows[0] == 0 and rows[-1] == k - 1, "the bump allocator hands out 0..k-1"
        return RowIndex(keys, buckets, meta, distinct, taken)

    def adopt_rows(
        self, keys: np.ndarray, fields_: dict[str, np.ndarray], index: RowIndex | None = None
    ) -> None:
        """Become exactly these rows (this part must be empty): the arrays are taken, not copied.

        keys: int64 (k,); fields_: BLOCK_FIELDS arrays of k rows. Row i holds keys[i]
        (``keys`` itself becomes ``row_keys``). index: the map ``build_index(keys)`` made
        earlier (built here when None or made for other keys). Raises
        ValueError("duplicate keys"), the part unchanged, when a key repeats.
        """
        assert self.size == 0, "adopt_rows needs an empty part"
        k = int(keys.shape[0])
        if k < 16:
            if unique_keys(keys).shape[0] != k:
                raise ValueError("duplicate keys")
            self.upsert_rows(keys, fields_)
            return
        if index is None or index.keys is not keys:
            index = self.build_index(keys)
        if not index.distinct:
            if index.taken and self.n_buckets == hm.MIN_CAPACITY:  # give the buckets back, empty
                index.buckets[0::2] = hm.EMPTY
                index.buckets[1::2] = -1
                self.buckets = index.buckets
                self.meta[hm.M_GROW_AT] = hm.grow_limit(self.n_buckets)
            raise ValueError("duplicate keys")
        block = Block(0, self.block.dim, self.block.n_slots, self.block.storage)
        for f in BLOCK_FIELDS:
            setattr(block, f, fields_[f])
        self.block, self.buckets, self.meta = block, index.buckets, index.meta
        self.free = np.empty(0, dtype=np.int64)
        self.row_keys = keys if _adoptable(keys) else keys.copy()

    def put_values(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Set the values of ``keys`` (int64 (k,), distinct) to ``values`` float32 (k, dim),
        inserting the keys that have no row (their slots and metadata zeroed): a replica
        mirroring a change feed."""
        rows, inserted = self.insert(keys)
        self.block.zero_meta(rows[inserted])
        self.block.set_values(rows, values)

    def upsert_rows(self, keys: np.ndarray, fields_: dict[str, np.ndarray]) -> None:
        """Set the rows of ``keys`` (int64 (k,), distinct) from ``fields_`` (BLOCK_FIELDS arrays)."""
        rows, _ = self.insert(keys)
        for f in BLOCK_FIELDS:
            getattr(self.block, f)[rows] = fields_[f]
