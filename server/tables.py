"""Embedding tables: each owns its arrays, a lock, growth and memory accounting.

Kinds (``embps.protos.config.TableKind``):
  dynamic   one collision-free row per admitted key (``DynamicPart``)
  static    ``hash_bucket_size`` rows; row = h(key) % B, colliding keys share
  adaptive  static part for rare keys + dynamic rows for frequent keys + a
            count-min sketch; promotion copies the static row *and its
            optimizer slots* into the new dynamic row, so learning carries over;
            eviction demotes a key back to the static part
  qr        quotient-remainder: rows Q[h // m] and R[h % m] (h = key mod Q*m)
            combined by mult, add or concat; both parts get their gradient

Lock discipline. Every public method validates and converts its input *before*
taking the table's lock (nothing is changed by a bad request), then holds the
lock for the whole operation, so a pull or push is atomic with respect to
every other. The lock is a readers-writer lock (``server/rwlock.py``): calls that
only read (inference pulls, ``frequencies``, ``stats``, ``snapshot``'s copy) share
it, every change (training pulls, pushes, prune, evict, erase, load) holds it
alone, and a waiting change goes before new readers. Kernels release the GIL:
other tables, readers of the same table, and the gRPC threads (de)serialising
other requests, run in parallel.

Steps. ``push(step=s)`` records the trainer's 0-based global step; without it
the table counts its own pushes. The table's step is the largest seen; pulls
stamp rows with it (LRU, steps-to-live). Adam's bias correction uses t = s + 1.

Memory. ``stats().bytes`` is the sum of ``nbytes`` of every array the table
owns (index, arena, slots, metadata, free list, sketch): exact, not estimated.
``max_bytes`` bounds it: ``row_limit`` turns the cap into a row count whose
worst-case arrays fit, growth stops at that count (the last arena step is
clipped), and at the limit a new key evicts (lfu/lru) or its batch is refused
(RESOURCE_EXHAUSTED, nothing changed); an adaptive table under max_bytes
skips the promotion instead, and the key keeps training its static row.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numba import njit

from embps.protos.config import (
    SKETCH_DEFAULT_DEPTH,
    SKETCH_DEFAULT_WIDTH,
    Combiner,
    Eviction,
    Norm,
    TableConfig,
    TableKind,
)
from embps.protos.routing import static_rows_nb
from embps.server import hashmap as hm
from embps.server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from embps.server.optimizers import (
    INIT_CODES,
    apply_optimizer,
    dedup_sum,
    fill_slots,
    gather,
    init_rows,
    initial_slot_values,
    row_norms,
)
from embps.server.parallel import run_in_pieces
from embps.server.replay import REPLAY_ARRAYS, ReplayGuard
from embps.server.rwlock import RWLock
from embps.server.sketch import FrequencySketch

DELETED_LOG_MAX = 1 << 20  # keys kept for incremental snapshots (or the table size, if larger)
ROW_GROWTH = 1.5
# Change feed: rows scanned per call (under the shared lock), and how long the deletions a
# follower still needs are kept past a checkpoint's trim.
FEED_SCAN_ROWS = 1 << 18
FEED_CURSOR_PART = 1 << 40  # cursor = part * FEED_CURSOR_PART + row
FOLLOWER_TTL_S = 300.0
# Rows judged per lock hold by an eviction sweep: about 1 ms of work at dim 16 (a
# pull waits at most that long; docs/benchmarks.md, "Eviction").
EVICT_PAGE_ROWS = 1 << 14
_NORM_CODE = {Norm.L2: 0, Norm.L1: 1, Norm.LINF: 2}


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """applied: keys whose gradient reached a row; dropped: keys with no row (ignored);
    replayed: the (client_id, sequence) was applied before, so nothing was (server/replay.py)."""

    applied: int
    dropped: int
    replayed: bool = False


@dataclass(frozen=True)
class PruneResult:
    """Rows deleted and bytes returned (memory before minus memory after)."""

    rows: int
    bytes: int


@dataclass(frozen=True)
class NarrowResult:
    """A table narrowed to its first ``dim`` columns: the old and new dims and the bytes
    returned (memory before minus memory after)."""

    old_dim: int
    dim: int
    bytes: int


@dataclass(frozen=True)
class EvictResult:
    """One table's eviction sweep: rows evicted by reason, their bytes, its duration.

    bytes: the rows' values, optimizer slots, metadata and key (``config.row_bytes``
    + 8 each), returned to the table's free list for new keys.
    """

    table: str
    rows: int
    bytes: int
    steps_to_live_rows: int
    l2_rows: int
    seconds: float


@dataclass(frozen=True)
class FeedPage:
    """One page of a table's change feed (``Table.changes``).

    epoch: the table's incarnation (new when it is created or restored: versions of
    another epoch mean nothing here). version, step: the table's at the first page of
    a round (a follower that applied the whole round reflects at least that version).
    part: which storage part the rows belong to (``Table.feed_parts``); keys: int64
    (k,) of own rows (None for a shared part), rows: int64 (k,) their row numbers in
    the part (shared parts: the bucket), values: float32 (k, part dim). deleted: int64
    keys deleted since ``since_version`` (the first page of a round only).
    next_cursor: 0 when the round is complete. resync: the follower must start over
    (since_version 0, a fresh table): the epoch changed, or the deletions since its
    version are no longer known.
    """

    epoch: str
    version: int
    step: int
    part: int = 0
    keys: np.ndarray | None = None
    rows: np.ndarray | None = None
    values: np.ndarray | None = None
    deleted: np.ndarray | None = None
    next_cursor: int = 0
    resync: bool = False


@dataclass(frozen=True)
class TableStats:
    """A snapshot of a table's size and counters (field names equal the proto's)."""

    name: str
    keys: int
    dynamic_rows: int
    static_rows: int
    bytes: int
    dynamic_bytes: int
    static_bytes: int
    load_factor: float
    promotions: int
    admissions_rejected: int
    evictions: int
    pruned_rows: int
    pulled_rows: int
    pushed_rows: int
    pulled_static: int
    pulled_dynamic: int
    step: int
    evictions_steps_to_live: int = 0
    evictions_l2: int = 0
    evictions_capacity: int = 0

    @property
    def bytes_per_key(self) -> float:
        """Table bytes per key with its own row (inf for a table without keys)."""
        return self.bytes / self.keys if self.keys else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """Plain mapping of every field."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


BLOCK_FIELDS = ("values", "slots", "freq", "last_step", "version")

# copy(name, src, rows) -> a private copy of src[rows] (all of src when rows is None)
CopyRows = Callable[[str, np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass
class Snapshot:
    """A consistent copy of one table: its config, named arrays and scalar state.

    Array names are ``<part>.<field>``: part ``dynamic`` (rows of own keys, with
    ``dynamic.keys``), ``static``, ``quotient``, ``remainder`` (whole blocks, or
    only the rows in ``<part>.rows`` for an incremental snapshot), and
    ``sketch.counters``. ``deleted`` holds keys deleted since ``base_version``
    (incremental snapshots only). Every array is a private copy.
    """

    config: TableConfig
    arrays: dict[str, np.ndarray]
    state: dict[str, int]
    base_version: int | None = None
    deleted: np.ndarray | None = None

    @property
    def version(self) -> int:
        """The table version this snapshot shows."""
        return int(self.state["version"])


@dataclass
class RowIndex:
    """The hash map of a full snapshot's own keys, built before the rest of it is loaded
    (``Table.prepare_adopt``; used by ``Table.load(..., index=...)``).

    keys: int64 (k,), the snapshot's ``dynamic.keys`` (row i holds keys[i]); slots, meta:
    the map (``hashmap``); distinct: False when a key repeats (the load is refused);
    taken: the buckets are the empty ones the part had (the part keeps the smallest).
    """

    keys: np.ndarray
    slots: np.ndarray
    meta: np.ndarray
    distinct: bool
    taken: bool


# --------------------------------------------------------------------------
# Row kernels
# --------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def touch_rows(freq, last_step, version, rows, step, ver):
    """A training sighting: freq[r] += 1, last_step[r] = step, version[r] = ver, for rows r >= 0.

    rows: int64 (n,). The version stamp puts the changed metadata into the next
    incremental checkpoint.
    """
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0:
            freq[r] += 1
            last_step[r] = step
            version[r] = ver


class Block:
    """Dense rows with optimizer slots and per-row metadata.

    values: float32 (rows, dim); slots: float32 (rows, n_slots * dim);
    freq, last_step, version: int64 (rows,).
    """

    def __init__(self, rows: int, dim: int, n_slots: int) -> None:
        self.dim = dim
        self.n_slots = n_slots
        self.values = np.zeros((rows, dim), dtype=np.float32)
        self.slots = np.zeros((rows, n_slots * dim), dtype=np.float32)
        self.freq = np.zeros(rows, dtype=np.int64)
        self.last_step = np.zeros(rows, dtype=np.int64)
        self.version = np.zeros(rows, dtype=np.int64)

    @property
    def rows(self) -> int:
        """Row capacity."""
        return int(self.values.shape[0])

    @property
    def row_bytes(self) -> int:
        """Bytes one row costs in this block."""
        return 4 * self.dim * (1 + self.n_slots) + 24

    @property
    def nbytes(self) -> int:
        """Bytes of every array of the block."""
        return sum(
            int(a.nbytes)
            for a in (self.values, self.slots, self.freq, self.last_step, self.version)
        )

    def resize(self, rows: int) -> None:
        """Grow or shrink to ``rows`` rows, keeping the prefix."""
        keep = min(rows, self.rows)
        for name in ("values", "slots", "freq", "last_step", "version"):
            old = getattr(self, name)
            new = np.zeros((rows, *old.shape[1:]), dtype=old.dtype)
            new[:keep] = old[:keep]
            setattr(self, name, new)

    def take(self, rows: np.ndarray) -> Block:
        """A new block holding copies of ``rows`` (int64 (k,)) in that order."""
        out = Block(0, self.dim, self.n_slots)
        out.values = self.values[rows]
        out.slots = self.slots[rows]
        out.freq = self.freq[rows]
        out.last_step = self.last_step[rows]
        out.version = self.version[rows]
        return out

    def narrow(self, dim: int) -> None:
        """Keep the first ``dim`` columns of every row and of each of its optimizer slots
        (slot s of a row is columns [s * self.dim, (s + 1) * self.dim) of ``slots``); the
        old arrays are released (new, smaller ones replace them)."""
        rows = self.rows
        self.values = np.ascontiguousarray(self.values[:, :dim])
        slots = self.slots.reshape(rows, self.n_slots, self.dim)[:, :, :dim]
        self.slots = np.ascontiguousarray(slots).reshape(rows, self.n_slots * dim)
        self.dim = dim

    def init(self, rows: np.ndarray, keys: np.ndarray, cfg: TableConfig, seed: int) -> None:
        """Fresh rows: values from the initializer (seeded by key), slots at their initial values."""
        ini = cfg.initializer
        init_rows(self.values, rows, keys, INIT_CODES[ini.kind], ini.a, ini.b, seed)
        if self.n_slots:
            fill_slots(
                self.slots,
                rows,
                self.dim,
                np.asarray(initial_slot_values(cfg.optimizer), dtype=np.float64),
            )
        self.freq[rows] = 0
        self.last_step[rows] = 0
        self.version[rows] = 0


def row_limit(config: TableConfig) -> int | None:
    """Most own (dynamic) rows a table of ``config`` may hold; None: unbounded.

    min(max_rows, the rows that fit in max_bytes). Under max_bytes a row costs
    its arena row (values, slots, metadata: ``config.row_bytes``), its
    ``row_keys`` entry, and one entry each in the free list and the deletion log
    (8 bytes each: both may hold every row), plus the buckets: the power of two
    ``capacity_for(rows)``, 16 bytes each. No array grows past what this count
    allows, so ``stats().bytes <= max_bytes`` at every moment (the fixed parts,
    ``config.fixed_bytes``, are checked to fit when the config is made).
    """
    limit = config.max_rows or None
    if not config.max_bytes or config.kind not in (TableKind.DYNAMIC, TableKind.ADAPTIVE):
        return limit
    meta = hm.META_LEN * 8
    other = config.fixed_bytes - meta - 16 * hm.MIN_CAPACITY  # static part, sketch
    per_row = config.row_bytes + 3 * 8

    def total(rows: int) -> int:
        return other + meta + rows * per_row + 16 * hm.capacity_for(rows)

    lo, hi = 0, max(0, (config.max_bytes - other - meta) // per_row)
    while lo < hi:  # total() grows with rows; total(0) == fixed_bytes <= max_bytes
        mid = (lo + hi + 1) // 2
        if total(mid) <= config.max_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo if limit is None else min(limit, lo)


class DynamicPart:
    """Hash map int64 key -> row of a growable Block, with a free list.

    The arena grows by ROW_GROWTH, the last step clipped to ``max_rows`` (the
    table's ``row_limit``; None: unbounded); buckets double before the load
    factor passes hashmap.MAX_LOAD; the free list never outgrows the arena.
    """

    def __init__(
        self, dim: int, n_slots: int, initial_capacity: int, max_rows: int | None = None
    ) -> None:
        row_cap = max(int(initial_capacity), 16)
        if max_rows is not None:
            row_cap = min(row_cap, max_rows)
        self.max_rows = max_rows
        self.block = Block(row_cap, dim, n_slots)
        self.row_keys = np.full(row_cap, hm.EMPTY, dtype=np.int64)
        cap = hm.capacity_for(row_cap)
        self.slots = hm.new_slots(cap)
        self.meta = hm.new_meta(cap, row_cap)
        self.free = np.empty(0, dtype=np.int64)

    # ---------------------------------------------------------------- sizes
    @property
    def size(self) -> int:
        """Keys stored (the sentinel key included)."""
        return int(self.meta[hm.M_SIZE]) + int(self.meta[hm.M_SENTINEL_ROW] >= 0)

    @property
    def buckets(self) -> int:
        """Bucket count (a power of two)."""
        return int(self.slots.shape[0] // 2)

    @property
    def load_factor(self) -> float:
        """Stored keys per bucket."""
        return float(self.meta[hm.M_SIZE]) / self.buckets

    @property
    def nbytes(self) -> int:
        """Bytes of the index, the arena and the free list."""
        return int(
            self.block.nbytes
            + self.row_keys.nbytes
            + self.slots.nbytes
            + self.meta.nbytes
            + self.free.nbytes
        )

    # ---------------------------------------------------------------- map
    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, -1 where absent: int64 (n,)."""
        rows = np.empty(keys.shape[0], dtype=np.int64)
        slots, meta = self.slots, self.meta
        run_in_pieces(keys.shape[0], lambda a, b: hm.find(slots, meta, keys[a:b], rows[a:b]))
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
            start = hm.find_or_insert(self.slots, self.meta, self.free, keys, start, rows, inserted)
            if start == n:
                break
            if keys[start] != hm.EMPTY and self.meta[hm.M_SIZE] >= self.meta[hm.M_GROW_AT]:
                self._rehash(self.buckets * 2)
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
        hm.erase(self.slots, self.meta, self.free, keys, rows)
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
        new = hm.new_slots(cap)
        hm.rehash(self.slots, new)
        self.slots = new
        self.meta[hm.M_GROW_AT] = hm.grow_limit(cap)

    def _grow_rows(self, at_least: int) -> None:
        old = self.block.rows
        new = max(old + at_least, int(old * ROW_GROWTH))
        if self.max_rows is not None:
            new = min(new, self.max_rows)  # a partial last step, up to the row limit
        if new <= old:
            raise AssertionError("arena at its row limit: the table must evict before inserting")
        self.block.resize(new)
        keys = np.full(new, hm.EMPTY, dtype=np.int64)
        keys[:old] = self.row_keys
        self.row_keys = keys
        self.meta[hm.M_ROW_CAP] = new

    def compact(self) -> None:
        """Move live rows into a dense prefix and shrink the arena and buckets to fit.

        Row numbers change; keys, values, slots and metadata move together.
        """
        live = self.live_rows()
        keys = self.keys_of(live)
        block = self.block.take(live)
        row_cap = min(max(16, len(live) + len(live) // 4), self.block.rows)  # never grows
        block.resize(row_cap)
        cap = min(hm.capacity_for(row_cap), self.buckets)
        self.slots = hm.new_slots(cap)
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
        taken = self.slots.shape[0] == 2 * cap
        if taken:
            slots = self.slots
            self.slots = hm.new_slots(hm.MIN_CAPACITY)
            self.meta[hm.M_GROW_AT] = hm.grow_limit(hm.MIN_CAPACITY)
        else:
            slots = hm.new_slots(cap)
        meta = hm.new_meta(cap, k)
        rows = np.empty(k, dtype=np.int64)
        inserted = np.zeros(k, dtype=np.bool_)
        # k keys fit cap buckets and k rows: one call inserts all (a repeat takes no row).
        done = hm.find_or_insert(slots, meta, np.empty(0, dtype=np.int64), keys, 0, rows, inserted)
        distinct = done == k and bool(inserted.all())
        if distinct:
            assert rows[0] == 0 and rows[-1] == k - 1, "the bump allocator hands out 0..k-1"
        return RowIndex(keys, slots, meta, distinct, taken)

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
            if index.taken and self.buckets == hm.MIN_CAPACITY:  # give the buckets back, empty
                index.slots[0::2] = hm.EMPTY
                index.slots[1::2] = -1
                self.slots = index.slots
                self.meta[hm.M_GROW_AT] = hm.grow_limit(self.buckets)
            raise ValueError("duplicate keys")
        block = Block(0, self.block.dim, self.block.n_slots)
        for f in BLOCK_FIELDS:
            setattr(block, f, fields_[f])
        self.block, self.slots, self.meta = block, index.slots, index.meta
        self.free = np.empty(0, dtype=np.int64)
        self.row_keys = keys if _adoptable(keys) else keys.copy()

    def put_values(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Set the values of ``keys`` (int64 (k,), distinct) to ``values`` float32 (k, dim),
        inserting the keys that have no row (their slots and metadata zeroed): a replica
        mirroring a change feed."""
        rows, inserted = self.insert(keys)
        new = rows[inserted]
        if new.shape[0]:
            self.block.freq[new] = 0
            self.block.last_step[new] = 0
            self.block.version[new] = 0
        self.block.values[rows] = values

    def upsert_rows(self, keys: np.ndarray, fields_: dict[str, np.ndarray]) -> None:
        """Set the rows of ``keys`` (int64 (k,), distinct) from ``fields_`` (BLOCK_FIELDS arrays)."""
        rows, _ = self.insert(keys)
        for f in BLOCK_FIELDS:
            getattr(self.block, f)[rows] = fields_[f]


# --------------------------------------------------------------------------
# Validation (at the boundary, before any lock)
# --------------------------------------------------------------------------


def gather_rows(values: np.ndarray, rows: np.ndarray, default: np.float32, out: np.ndarray) -> None:
    """``optimizers.gather`` (out[i] <- values[rows[i]], default where rows[i] < 0), a large
    batch in pieces on helper threads (server/parallel.py)."""
    run_in_pieces(rows.shape[0], lambda a, b: gather(values, rows[a:b], default, out[a:b]))


def unique_keys(keys: np.ndarray) -> np.ndarray:
    """Distinct keys, ascending: int64 (m,). Sort-based: numpy 2's hash-based np.unique is
    several times slower on int64 batches of this size."""
    if keys.shape[0] < 2:
        return keys.copy()
    s = np.sort(keys)
    keep = np.empty(s.shape[0], dtype=np.bool_)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def as_keys(keys: object) -> np.ndarray:
    """Any integer array of any shape -> contiguous int64 (n,). InvalidArgument otherwise."""
    arr = np.asarray(keys)
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise InvalidArgument(f"keys must be an integer array, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 2**63:
        raise InvalidArgument("keys must fit in int64; got uint64 values >= 2**63")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


@njit(nogil=True, cache=True)
def all_finite(bits: np.ndarray) -> bool:  # pragma: no cover - compiled
    """True when no float32 (given as its uint32 bits (n,)) is NaN or Inf (exponent all ones).

    One pass, no temporary array (``np.isfinite(x).all()`` allocates n bools).
    """
    bad = np.uint32(0)
    for i in range(bits.shape[0]):
        bad |= np.uint32((bits[i] & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
    return bad == 0


def as_grads(grads: object, n: int, dim: int, table: str) -> np.ndarray:
    """float array (n, dim), finite -> contiguous float32 (n, dim). InvalidArgument otherwise."""
    arr = np.asarray(grads)
    if arr.dtype.kind not in "fiu":
        raise InvalidArgument(f"table {table!r}: gradients must be floats, got dtype {arr.dtype}")
    if arr.ndim == 1 and n == 0 and arr.size == 0:
        arr = arr.reshape(0, dim)
    if arr.shape != (n, dim):
        raise InvalidArgument(
            f"table {table!r}: gradients must have shape ({n}, {dim}) (one row of dim {dim} per key), got {arr.shape}"
        )
    with np.errstate(over="ignore"):  # a float64 too large for float32 becomes Inf: refused below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not all_finite(out.reshape(-1).view(np.uint32)):
        bad = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise InvalidArgument(
            f"table {table!r}: gradients contain NaN or Inf (first at key index {bad}); nothing was applied"
        )
    return out


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


class Table:
    """Base of every table kind: locking, steps, counters, validation.

    Subclasses implement ``_pull``, ``_push``, ``_prune``, ``_evict_page``, ``_sizes``.
    """

    def __init__(self, config: TableConfig) -> None:
        self.config = config
        self.name = config.name
        self.dim = config.dim
        self.n_slots = config.slots
        # Reads (inference pulls, frequencies, stats, snapshots) share the lock; every
        # change holds it alone (server/rwlock.py). Counters that reads bump (pulled_*)
        # take _count_lock as well.
        self._lock = RWLock()
        self._count_lock = threading.Lock()
        self.step = 0
        self._auto_step = 0
        self.version = 0
        # Keys deleted since the last trim, as (version, keys): kept only once a full
        # snapshot was taken (an incremental chain may follow), bounded by
        # DELETED_LOG_MAX keys; past it the log is dropped and increments
        # over older versions are refused (take a full snapshot instead).
        self._deleted: list[tuple[int, np.ndarray]] = []
        self._deleted_keys = 0
        self._deleted_floor = -1
        self._track_deleted = False
        self.counters = dict.fromkeys(
            ("promotions", "admissions_rejected", "evictions", "pruned_rows", "pulled_rows",
             "pushed_rows", "pulled_static", "pulled_dynamic", "evictions_steps_to_live",
             "evictions_l2", "evictions_capacity"),
            0,
        )  # fmt: skip
        # New own rows refused at the row limit (max_rows / max_bytes): keys of refused
        # pulls, or adaptive promotions skipped. A process metric, not checkpointed.
        self.capacity_refusals = 0
        self.replay = ReplayGuard()  # push idempotency (client_id, sequence): server/replay.py
        # Change feed (``changes``): this incarnation's id, and the version each follower
        # asked from last (follower -> (since_version, monotonic time)): a checkpoint's
        # trim keeps the deletions they still need for FOLLOWER_TTL_S.
        self.epoch = uuid.uuid4().hex
        self._followers: dict[str, tuple[int, float]] = {}
        self._trimmed_upto = 0  # deletions at or before it may be gone from the log

    # ---------------------------------------------------------------- API
    def pull(
        self,
        keys: object,
        train: bool = True,
        mask: object | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows of ``keys`` (any integer shape, flattened): float32 (n, dim).

        train=True creates rows (dynamic), counts sightings (admission,
        promotion) and stamps metadata; train=False only reads, and keys
        without a row read the default value. ``mask`` (adaptive only, bool
        (n,)): True promotes the key now, False keeps it where it is.
        ``out``: a writable float32 (n, dim) array to write the rows into
        (e.g. the shard's answer buffer); it is returned.
        """
        k = as_keys(keys)
        m = self._as_mask(mask, k.shape[0])
        if out is None:
            out = np.empty((k.shape[0], self.dim), dtype=np.float32)
        elif out.shape != (k.shape[0], self.dim) or out.dtype != np.float32:
            raise ValueError(
                f"out must be float32 {(k.shape[0], self.dim)}, got {out.dtype} {out.shape}"
            )
        with self._lock.write() if train else self._lock.read():  # inference pulls share it
            if train:
                self.version += 1
            self._pull(k, bool(train), m, out)
            self._count("pulled_rows", k.shape[0])
            return out

    def push(
        self,
        keys: object,
        grads: object,
        step: int | None = None,
        client_id: str = "",
        sequence: int = 0,
    ) -> PushResult:
        """Apply the optimizer to the rows of ``keys`` with ``grads`` float32 (n, dim).

        Gradients of duplicate keys (and of keys sharing a row) are summed
        first. Keys with no row are dropped and counted. A request with a bad
        shape or a NaN/Inf gradient raises InvalidArgument and changes nothing.
        client_id, sequence: push idempotency (server/replay.py; ``ReplayGuard.check``
        them first): a pair this table applied before changes nothing and returns
        ``replayed=True``; the check and the mark happen under the table's lock, so
        a snapshot holds exactly the pairs whose pushes its rows hold.
        """
        k = as_keys(keys)
        g = as_grads(grads, k.shape[0], self.dim, self.name)
        if step is not None and (not isinstance(step, int | np.integer) or step < 0):
            raise InvalidArgument(
                f"table {self.name!r}: step must be an integer >= 0, got {step!r}"
            )
        with self._lock.write():
            if not client_id:
                return self._push_locked(k, g, step)
            res = self.replay.apply_once(client_id, sequence, lambda: self._push_locked(k, g, step))
            return PushResult(0, 0, replayed=True) if res is None else res

    def _push_locked(self, k: np.ndarray, g: np.ndarray, step: int | None) -> PushResult:
        if step is None:
            s = self._auto_step
        else:
            s = int(step)
        self._auto_step = max(self._auto_step, s + 1)
        self.step = max(self.step, s)
        self.version += 1
        res = self._push(k, g, s)
        self.counters["pushed_rows"] += res.applied
        return res

    def prune(self, threshold: float, norm: Norm | str = Norm.L2) -> PruneResult:
        """Delete own rows whose norm is below ``threshold`` (OptEmbed-style) and compact.

        Shared rows (static parts, qr parts) are never deleted. Returns rows
        deleted and bytes returned.
        """
        nm = _as_norm(norm)
        if not (isinstance(threshold, int | float) and np.isfinite(threshold) and threshold >= 0):
            raise InvalidArgument(
                f"prune threshold must be a finite number >= 0, got {threshold!r}"
            )
        with self._lock.write():
            before = self._sizes()[0]
            rows = self._prune(float(threshold), nm)
            self.counters["pruned_rows"] += rows
            return PruneResult(rows=rows, bytes=before - self._sizes()[0])

    def narrow(self, dim: int) -> NarrowResult:
        """Keep the first ``dim`` columns of every row and of its optimizer slots; free the rest.

        OptEmbed's last step (``embps.client.optembed``): a table trained as a supernet
        of dims keeps the dim its search found. Kinds: dynamic, static and adaptive (all
        their rows: own and shared), qr with the mult or add combiner (a combined row's
        first ``dim`` columns come from the parts' first ``dim`` columns). The config's
        dim becomes ``dim`` (DescribeTables, checkpoints and pulls follow); keys,
        metadata and row counts do not change. ``dim == self.dim`` changes nothing.

        Every row changes: the table's version moves past every row's, the deletion log
        restarts (an incremental snapshot over an older version is refused: take a full
        one), and the change feed gets a new epoch (followers resync). Bad requests
        change nothing: a dim outside [1, dim] is InvalidArgument, a qr table with the
        concat combiner (its parts are the row's halves) is FailedPrecondition.

        LIMITATIONS. One lock hold for the whole table (a copy of every row, like
        ``prune``'s compaction): a rare, admin-time call. A replica following this
        table keeps the old dim until it is started again on the narrowed table.
        """
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer):
            raise InvalidArgument(
                f"table {self.name!r}: narrow dim must be an integer, got {dim!r}"
            )
        if not 1 <= int(dim) <= self.dim:
            raise InvalidArgument(
                f"table {self.name!r}: narrow dim must be in [1, {self.dim}] (the table's dim), "
                f"got {int(dim)}"
            )
        d = int(dim)
        cfg = self.config
        if cfg.kind == TableKind.QR and cfg.qr_combiner == Combiner.CONCAT:
            raise FailedPrecondition(
                f"table {self.name!r} is qr with the concat combiner: its rows are the two "
                "parts' halves, so the first columns of a row are not the first columns of "
                "its parts; narrow a dynamic, static, adaptive or qr mult/add table"
            )
        with self._lock.write():
            old = self.dim
            if d == old:
                return NarrowResult(old_dim=old, dim=d, bytes=0)
            before = self._sizes()[0]
            blocks = list(self._blocks().values())
            part: DynamicPart | None = getattr(self, "part", None)
            if part is not None:
                blocks.append(part.block)
            for blk in blocks:
                blk.narrow(d)
            if isinstance(self, QRTable):
                self.part_dim = d
            self.config = dataclasses.replace(cfg, dim=d)
            self.dim = d
            if isinstance(self, _DynamicBase):
                self.row_limit = row_limit(self.config)
            self.version += 1
            for blk in blocks:
                blk.version[:] = self.version
            self._deleted, self._deleted_keys = [], 0
            self._deleted_floor = self.version
            self.epoch = uuid.uuid4().hex
            return NarrowResult(old_dim=old, dim=d, bytes=before - self._sizes()[0])

    @property
    def evicts(self) -> bool:
        """Whether ``evict`` can remove anything: the table has own rows and sets
        ``steps_to_live`` or ``l2_evict_threshold``."""
        return False

    def evict(self, page_rows: int = EVICT_PAGE_ROWS) -> EvictResult:
        """Run steps-to-live and L2-threshold eviction now, over every own row.

        HOW IT WORKS. The sweep walks the row arena in pages of ``page_rows`` rows:
        each page is judged and its victims deleted under the table's lock, which is
        released between pages, so pulls and pushes wait at most one page (measured in
        docs/benchmarks.md, "Eviction"). A row is judged against the table's step at
        the moment its page is swept. Deleted keys go to the deletion log, so the next
        incremental checkpoint carries them; in an adaptive table an evicted key is
        demoted (it reads its static row again).

        LIMITATIONS. Between pages the table may change: a row created behind the
        cursor is new (nothing to evict); a prune's compaction moves rows to lower
        numbers, so rows it moves from ahead of the cursor to behind it wait for the
        next sweep. Rows are never judged twice in one sweep.

        Returns the rows evicted by each reason and the bytes of those rows (their
        values, slots, metadata and key, returned to the free list for new keys; the
        arena itself does not shrink: ``prune`` compacts).
        """
        if not isinstance(page_rows, int) or page_rows < 1:
            raise ValueError(f"page_rows must be an integer >= 1, got {page_rows!r}")
        t0 = time.monotonic()
        by_steps = by_l2 = 0
        if self.evicts:
            start = 0
            while start >= 0:
                # A page may double the free list: allocate and touch the new one before
                # taking the lock (a 4M-row copy-and-fault took 60 ms under it).
                spare = self._free_list_spare(page_rows)
                with self._lock.write():
                    n_steps, n_l2, start = self._evict_page(start, page_rows, spare)
                    self.counters["evictions_steps_to_live"] += n_steps
                    self.counters["evictions_l2"] += n_l2
                    self.counters["evictions"] += n_steps + n_l2
                by_steps += n_steps
                by_l2 += n_l2
                self._lock.let_waiters_in()  # pulls and pushes go between pages
        rows = by_steps + by_l2
        return EvictResult(
            table=self.name,
            rows=rows,
            bytes=rows * (self.config.row_bytes + 8),
            steps_to_live_rows=by_steps,
            l2_rows=by_l2,
            seconds=time.monotonic() - t0,
        )

    def erase(self, keys: object) -> int:
        """Delete the own rows of ``keys`` (dynamic parts only); returns how many were deleted."""
        k = as_keys(keys)
        with self._lock.write():
            return self._erase(k)

    def frequencies(self, keys: object) -> np.ndarray:
        """Training sightings of each key: int64 (n,), in the keys' order. Read only.

        A key with an own (dynamic) row reads the row's count (``freq``: training
        pulls of the key since its row was created, plus, in an adaptive table, the
        sketch's count at promotion); any other key reads the table's count-min
        sketch estimate (adaptive tables, dynamic tables with admission), never below
        its true count of sightings; 0 where the table keeps no sketch (static and qr
        tables, dynamic tables without admission: a key without a row was never
        pulled for training, or its row was deleted).
        """
        k = as_keys(keys)
        with self._lock.read():
            return self._frequencies(k)

    def stats(self) -> TableStats:
        """Sizes and counters, taken under the lock (shared)."""
        with self._lock.read():
            total, dyn_bytes, st_bytes, keys, st_rows, lf = self._sizes()
            with self._count_lock:
                counters = dict(self.counters)
            return TableStats(
                name=self.name, keys=keys, dynamic_rows=keys, static_rows=st_rows, bytes=total,
                dynamic_bytes=dyn_bytes, static_bytes=st_bytes, load_factor=lf, step=self.step,
                **counters,
            )  # fmt: skip

    def memory_bytes(self) -> int:
        """Bytes of every array the table owns."""
        with self._lock.read():
            return self._sizes()[0]

    # ---------------------------------------------------------------- snapshots
    def snapshot(self, since_version: int | None = None, copy: CopyRows | None = None) -> Snapshot:
        """A consistent copy of the table, taken under its lock.

        since_version=None: everything. since_version=v: only rows changed
        after version v, plus the keys deleted after v (an increment to apply
        on top of a snapshot of version v).
        copy: makes each array's private copy, ``copy(name, src, rows)`` ->
        ``src[rows]`` (``src.copy()`` when rows is None), called under the lock;
        the checkpoint writer passes one that streams each copied chunk to disk
        while the rest is still being copied (default: ``copy_rows``).
        """
        cp = copy_rows if copy is None else copy
        with self._lock.read():
            if since_version is not None and since_version < self._deleted_floor:
                raise ValueError(
                    f"table {self.name!r}: the deletion log since version {since_version} was "
                    "dropped (it grew past its bound); take a full snapshot"
                )
            if since_version is None:
                self._track_deleted = True
            arrays: dict[str, np.ndarray] = {}
            deleted = None
            for pname, blk in self._blocks().items():
                rows = None
                if since_version is not None:
                    rows = np.flatnonzero(blk.version > since_version).astype(np.int64)
                    arrays[f"{pname}.rows"] = rows
                for f in BLOCK_FIELDS:
                    a = getattr(blk, f)
                    arrays[f"{pname}.{f}"] = cp(f"{pname}.{f}", a, rows)
            part: DynamicPart | None = getattr(self, "part", None)
            if part is not None:
                live = part.live_rows()
                if since_version is not None:
                    live = live[part.block.version[live] > since_version]
                if live.shape[0] == int(part.meta[hm.M_NEXT_ROW]):
                    # Live rows are the dense prefix [0, k): slice copies, no gathers.
                    k = live.shape[0]
                    keys = part.row_keys[:k]
                    sent = int(part.meta[hm.M_SENTINEL_ROW])
                    if sent >= 0:
                        keys = keys.copy()
                        keys[sent] = hm.EMPTY
                    arrays["dynamic.keys"] = cp("dynamic.keys", keys, None)
                    for f in BLOCK_FIELDS:
                        arrays[f"dynamic.{f}"] = cp(
                            f"dynamic.{f}", getattr(part.block, f)[:k], None
                        )
                else:
                    arrays["dynamic.keys"] = cp("dynamic.keys", part.keys_of(live), None)
                    for f in BLOCK_FIELDS:
                        arrays[f"dynamic.{f}"] = cp(f"dynamic.{f}", getattr(part.block, f), live)
            sketch: FrequencySketch | None = getattr(self, "sketch", None)
            if sketch is not None:
                arrays["sketch.counters"] = cp("sketch.counters", sketch.counters, None)
            if since_version is not None:
                logged = [k for v, k in self._deleted if v > since_version]
                deleted = np.concatenate(logged) if logged else np.empty(0, dtype=np.int64)
            arrays.update(self.replay.export())  # the pushes these rows hold, whole
            state = {"step": self.step, "auto_step": self._auto_step, "version": self.version}
            with self._count_lock:
                state.update(self.counters)
            return Snapshot(self.config, arrays, state, since_version, deleted)

    def prepare_adopt(self, keys: np.ndarray) -> RowIndex | None:
        """Build the hash map that ``load(snap, adopt=True, index=...)`` of a full snapshot
        whose ``dynamic.keys`` are ``keys`` (int64 (k,)) will use, before the rest of the
        snapshot is there: a restore builds it while the large arrays are still being read.

        None where the load would not use one (no own rows, a part that is not empty,
        fewer than 16 keys, keys that are not an adoptable int64 (k,) array). The table's
        rows do not change (it may keep smaller empty buckets until the load); a repeated
        key is reported by the load, which refuses the snapshot.
        """
        part: DynamicPart | None = getattr(self, "part", None)
        if (
            part is None
            or keys.dtype != np.int64
            or keys.ndim != 1
            or keys.shape[0] < 16
            or not _adoptable(keys)
        ):
            return None
        with self._lock.write():
            if part.size != 0:
                return None
            return part.build_index(keys)

    def load(self, snap: Snapshot, adopt: bool = False, index: RowIndex | None = None) -> None:
        """Apply a snapshot: a full one onto this fresh table, or an increment on top.

        adopt=True lets the table take the snapshot's arrays instead of copying
        them where it can (a full snapshot into an empty part): the caller must
        not use the snapshot afterwards (restore from disk does this).
        index: the hash map ``prepare_adopt(snap.arrays["dynamic.keys"])`` built
        for an adopting load (ignored otherwise).
        Raises ValueError naming the array when a shape or dtype does not fit
        this table's config (a corrupt or foreign snapshot); nothing is
        changed in that case.
        """
        own = [a for n, a in snap.arrays.items() if n.startswith("dynamic.")]
        adopt_own = adopt and "dynamic.keys" in snap.arrays and all(_adoptable(a) for a in own)
        self._check_snapshot(snap, distinct=not adopt_own)  # else adopt_rows checks them
        replay = None
        if REPLAY_ARRAYS[0] in snap.arrays:
            replay = ReplayGuard()
            try:
                replay.load(snap.arrays)
            except (KeyError, ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"snapshot arrays replay.* of table {self.name!r}: {e}") from None
        with self._lock.write():
            part: DynamicPart | None = getattr(self, "part", None)
            self._check_fits(snap)
            if snap.deleted is not None and part is not None and snap.deleted.shape[0]:
                part.erase_keys(snap.deleted)
            if part is not None and "dynamic.keys" in snap.arrays:
                keys = snap.arrays["dynamic.keys"]
                fields_ = {f: snap.arrays[f"dynamic.{f}"] for f in BLOCK_FIELDS}
                if adopt_own and part.size == 0:
                    try:
                        part.adopt_rows(keys, fields_, index)  # first: a repeat changes nothing
                    except ValueError as e:
                        raise ValueError(
                            f"snapshot array dynamic.keys of table {self.name!r} has {e}"
                        ) from None
                else:
                    if adopt_own:
                        self._check_distinct(keys)
                    part.upsert_rows(keys, fields_)
            for pname, blk in self._blocks().items():
                if f"{pname}.values" not in snap.arrays:
                    continue
                rows = snap.arrays.get(f"{pname}.rows")
                for f in BLOCK_FIELDS:
                    a = snap.arrays[f"{pname}.{f}"]
                    if rows is None and adopt and _adoptable(a):
                        setattr(blk, f, a)
                    elif rows is None:
                        getattr(blk, f)[...] = a
                    else:
                        getattr(blk, f)[rows] = a
            sketch: FrequencySketch | None = getattr(self, "sketch", None)
            if sketch is not None and "sketch.counters" in snap.arrays:
                sketch.counters[...] = snap.arrays["sketch.counters"]
            self.step = int(snap.state["step"])
            self._auto_step = int(snap.state["auto_step"])
            self.version = max(self.version, int(snap.state["version"]))
            for name in self.counters:
                self.counters[name] = int(snap.state.get(name, 0))
            if replay is not None:
                self.replay = replay

    def _check_fits(self, snap: Snapshot) -> None:
        """ValueError (before any change) if ``snap`` would leave more own rows than ``row_limit``."""
        limit: int | None = getattr(self, "row_limit", None)
        part: DynamicPart | None = getattr(self, "part", None)
        keys = snap.arrays.get("dynamic.keys")
        if part is None or limit is None or keys is None:
            return
        present = part.find(keys) >= 0
        size = part.size
        if snap.deleted is not None and snap.deleted.shape[0]:  # erased before the upsert
            size -= int((part.find(unique_keys(snap.deleted)) >= 0).sum())
            present &= ~np.isin(keys, snap.deleted)
        if size + int((~present).sum()) > limit:
            raise ValueError(
                f"table {self.name!r} would hold {size + int((~present).sum())} own rows, over its "
                f"limit of {limit} (max_rows={self.config.max_rows}, max_bytes={self.config.max_bytes})"
            )

    def feed_parts(self) -> list[DynamicPart | Block]:
        """The storage parts a change feed pages through, in order: a ``DynamicPart``
        (own rows, by key) or a ``Block`` (shared rows, by number)."""
        return []

    def changes(
        self,
        since_version: int,
        cursor: int = 0,
        max_rows: int = 1 << 16,
        epoch: str = "",
        follower: str = "",
    ) -> FeedPage:
        """One page of what changed after ``since_version``: rows (values only) and, on
        the first page (cursor 0), the keys deleted. Read only; the shared lock is held
        for one page: at most FEED_SCAN_ROWS rows scanned and ``max_rows`` returned.

        A follower runs rounds: cursor 0 with its version (0 and epoch "" for everything),
        then each answer's ``next_cursor`` until it is 0; the first page's ``version`` is
        its next round's since_version. Rows changed during a round behind its cursor
        come in the next round; deletions are applied before rows, so a key deleted and
        created again ends present. ``resync`` asks the follower to start over: another
        epoch, or deletions it would need were dropped (the log passed its bound, or a
        checkpoint trimmed them after the follower was away FOLLOWER_TTL_S).
        """
        if since_version < 0 or cursor < 0 or max_rows < 1:
            raise InvalidArgument(
                f"table {self.name!r}: since_version and cursor must be >= 0 and max_rows "
                f">= 1, got {since_version}, {cursor}, {max_rows}"
            )
        first = cursor == 0
        with self._lock.write() if first and since_version == 0 else self._lock.read():
            if first and since_version == 0:
                self._track_deleted = True  # deletions from here on are kept for the feed
            if follower:
                with self._count_lock:
                    self._followers[follower] = (since_version, time.monotonic())
            if since_version and (
                epoch != self.epoch
                or not self._track_deleted
                or since_version < self._deleted_floor
                or since_version > self.version
                or since_version < self._trimmed_upto
            ):
                return FeedPage(self.epoch, self.version, self.step, resync=True)
            parts = self.feed_parts()
            part, row = divmod(cursor, FEED_CURSOR_PART)
            deleted = None
            if first:
                logged = [k for v, k in self._deleted if v > since_version] if since_version else []
                deleted = np.concatenate(logged) if logged else np.empty(0, np.int64)
            if part >= len(parts):
                return FeedPage(self.epoch, self.version, self.step, deleted=deleted)
            store = parts[part]
            if isinstance(store, DynamicPart):
                live, top = store.live_rows_in(row, row + FEED_SCAN_ROWS)
                block = store.block
            else:
                block, top = store, store.rows
                live = np.arange(row, min(row + FEED_SCAN_ROWS, top), dtype=np.int64)
            sel = live[block.version[live] > since_version]
            nxt = min(row + FEED_SCAN_ROWS, top)
            if sel.shape[0] > max_rows:
                sel = sel[:max_rows]
                nxt = int(sel[-1]) + 1
            if nxt >= top:
                part, nxt = part + 1, 0
            next_cursor = part * FEED_CURSOR_PART + nxt if part < len(parts) else 0
            return FeedPage(
                self.epoch, self.version, self.step, part=int(divmod(cursor, FEED_CURSOR_PART)[0]),
                keys=store.keys_of(sel) if isinstance(store, DynamicPart) else None,
                rows=sel, values=block.values[sel], deleted=deleted,
                next_cursor=next_cursor,
            )  # fmt: skip

    def trim_deleted(self, upto_version: int) -> None:
        """Forget deletions at or before ``upto_version`` (a checkpoint of it is durable),
        except those a change-feed follower seen in the last FOLLOWER_TTL_S still needs."""
        with self._lock.write():
            now = time.monotonic()
            live = [v for v, t in self._followers.values() if now - t < FOLLOWER_TTL_S]
            upto_version = min([upto_version, *live])
            self._trimmed_upto = max(self._trimmed_upto, upto_version)
            self._deleted = [(v, k) for v, k in self._deleted if v > upto_version]
            self._deleted_keys = sum(int(k.shape[0]) for _, k in self._deleted)

    def _log_bytes(self) -> int:
        return sum(int(k.nbytes) for _, k in self._deleted)

    def _check_distinct(self, keys: np.ndarray) -> None:
        """ValueError if ``keys`` (a snapshot's ``dynamic.keys``) holds a key twice."""
        if unique_keys(keys).shape[0] != keys.shape[0]:
            raise ValueError(
                f"snapshot array dynamic.keys of table {self.name!r} has duplicate keys"
            )

    def _check_snapshot(self, snap: Snapshot, distinct: bool = True) -> None:
        """Every part present in ``snap`` must be complete and fit this table's shapes.

        distinct=False leaves the check that ``dynamic.keys`` has no repeats to the caller
        (``DynamicPart.adopt_rows`` finds them while it builds the hash map).
        """
        if snap.config != self.config:
            raise ValueError(f"snapshot of table {snap.config.name!r} has a different config")
        parts: dict[str, Block] = dict(self._blocks())
        part: DynamicPart | None = getattr(self, "part", None)
        if part is not None:
            parts["dynamic"] = part.block
        known = {f"{p}.{f}" for p in parts for f in BLOCK_FIELDS}
        known |= {f"{p}.rows" for p in parts} | {"dynamic.keys", "sketch.counters"}
        known |= set(REPLAY_ARRAYS)
        unknown = set(snap.arrays) - known
        if unknown:
            raise ValueError(
                f"snapshot of table {self.name!r} has unknown arrays {sorted(unknown)}"
            )
        for pname, blk in parts.items():
            names = [f"{pname}.{f}" for f in BLOCK_FIELDS]
            if pname == "dynamic":
                names.append("dynamic.keys")
            present = [n for n in names if n in snap.arrays]
            if not present:
                continue
            if len(present) != len(names):
                missing = sorted(set(names) - set(present))
                raise ValueError(f"snapshot of table {self.name!r} lacks arrays {missing}")
            rows = snap.arrays.get(f"{pname}.rows")
            if pname == "dynamic":
                n = snap.arrays["dynamic.keys"].shape[0]
            else:
                n = blk.rows if rows is None else rows.shape[0]
            if rows is not None and rows.shape[0] and (rows.min() < 0 or rows.max() >= blk.rows):
                raise ValueError(
                    f"snapshot array {pname}.rows of table {self.name!r} is out of range"
                )
            for f in (*BLOCK_FIELDS, "keys"):
                a = snap.arrays.get(f"{pname}.{f}")
                if a is None:
                    continue
                want = getattr(blk, f) if f != "keys" else np.empty(0, dtype=np.int64)
                if a.shape != (n, *want.shape[1:]) or a.dtype != want.dtype:
                    raise ValueError(
                        f"snapshot array {pname}.{f} of table {self.name!r} has shape {a.shape} "
                        f"dtype {a.dtype}; expected {(n, *want.shape[1:])} {want.dtype}"
                    )
            if pname == "dynamic" and distinct:
                self._check_distinct(snap.arrays["dynamic.keys"])
        sk: FrequencySketch | None = getattr(self, "sketch", None)
        if "sketch.counters" in snap.arrays:
            a = snap.arrays["sketch.counters"]
            if sk is None or a.shape != sk.counters.shape or a.dtype != sk.counters.dtype:
                raise ValueError(
                    f"snapshot array sketch.counters of table {self.name!r} has the wrong shape"
                )

    # ---------------------------------------------------------------- hooks
    def _blocks(self) -> dict[str, Block]:
        """Shared blocks by part name (static, quotient, remainder)."""
        return {}

    def _pull(
        self, keys: np.ndarray, train: bool, mask: np.ndarray | None, out: np.ndarray
    ) -> None:
        """Write the rows of ``keys`` into ``out`` float32 (n, dim)."""
        raise NotImplementedError

    def _push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> PushResult:
        raise NotImplementedError

    def _prune(self, threshold: float, norm: Norm) -> int:
        return 0

    def _evict_page(
        self, start: int, n: int, spare: np.ndarray | None = None
    ) -> tuple[int, int, int]:
        """Evict among own rows [start, start + n): (by steps, by l2, next start or -1).
        spare: a pre-allocated free list for the rows it frees (``_free_list_spare``)."""
        return 0, 0, -1

    def _free_list_spare(self, more: int) -> np.ndarray | None:
        """A touched int64 array long enough for the free list after ``more`` rows are
        freed, if it would have to grow (read without the lock: a hint only)."""
        return None

    def _erase(self, keys: np.ndarray) -> int:
        return 0

    def _frequencies(self, keys: np.ndarray) -> np.ndarray:
        """Counts of ``keys`` (int64 (n,)): the own row's freq, else the sketch's estimate, else 0."""
        out = np.zeros(keys.shape[0], dtype=np.int64)
        part: DynamicPart | None = getattr(self, "part", None)
        rows = part.find(keys) if part is not None else np.full(keys.shape[0], -1, np.int64)
        own = rows >= 0
        if part is not None:
            out[own] = part.block.freq[rows[own]]
        sketch: FrequencySketch | None = getattr(self, "sketch", None)
        rest = np.flatnonzero(~own)
        if sketch is not None and rest.shape[0]:
            out[rest] = sketch.estimate(keys[rest])
        return out

    def _sizes(self) -> tuple[int, int, int, int, int, float]:
        """(total bytes, dynamic bytes, static bytes, keys with own rows, shared rows, load factor)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers
    def _count(self, name: str, n: int) -> None:
        """counters[name] += n, safe beside other readers (inference pulls share the lock)."""
        with self._count_lock:
            self.counters[name] += n

    def check_mask(self, mask: object | None, n: int) -> np.ndarray | None:
        """A promotion mask for ``n`` keys as bool (n,), None for none; InvalidArgument
        if the table is not adaptive or the mask is not bool of n entries."""
        return self._as_mask(mask, n)

    def _as_mask(self, mask: object | None, n: int) -> np.ndarray | None:
        if mask is None:
            return None
        if self.config.kind != TableKind.ADAPTIVE:
            raise InvalidArgument(
                f"table {self.name!r} is {self.config.kind.value}: a promotion mask applies to adaptive tables only"
            )
        m = np.asarray(mask)
        if m.dtype != np.bool_ or m.reshape(-1).shape[0] != n:
            raise InvalidArgument(
                f"mask must be a bool array with one entry per key ({n}), got {m.dtype} {m.shape}"
            )
        return np.ascontiguousarray(m.reshape(-1))

    def _touch(self, block: Block, rows: np.ndarray) -> None:
        """Stamp a training sighting of ``rows`` (int64 (n,), -1 skipped) in ``block``."""
        touch_rows(block.freq, block.last_step, block.version, rows, self.step, self.version)

    def _apply(self, block: Block, rows: np.ndarray, grads: np.ndarray, step: int) -> int:
        """Sum grads per row, run the optimizer, stamp metadata. Returns rows updated."""
        urows, ugrads = dedup_sum(rows, grads)
        opt, values, slots = self.config.optimizer, block.values, block.slots
        run_in_pieces(  # distinct rows: pieces never touch the same row
            urows.shape[0],
            lambda a, b: apply_optimizer(opt, values, slots, urows[a:b], ugrads[a:b], step + 1),
        )
        block.last_step[urows] = step
        block.version[urows] = self.version
        return int(urows.shape[0])


class _DynamicBase(Table):
    """Shared logic of tables with a dynamic part: capacity, eviction, pruning."""

    part: DynamicPart

    def __init__(self, config: TableConfig) -> None:
        super().__init__(config)
        self.row_limit = row_limit(config)  # min(max_rows, rows within max_bytes); None: none

    def _make_room(self, new: int, protect: np.ndarray, partial: bool = False) -> int:
        """Make room for ``new`` more keys under the row limit, evicting by LFU/LRU if allowed.

        Returns how many of the new keys fit: all of them, or raises
        ResourceExhausted before any change; with ``partial`` it never raises
        and may return fewer (down to 0): the caller keeps the rest without rows.
        protect: int64 rows not to evict (keys of the current batch).
        """
        cfg = self.config
        limit = self.row_limit
        size = self.part.size
        if limit is None or size + new <= limit:
            return new
        over = size + new - limit
        if cfg.max_rows and cfg.max_rows == limit:
            why, knob = f"max_rows={cfg.max_rows}", "max_rows"
        else:
            why, knob = f"max_bytes={cfg.max_bytes} holds {limit} rows", "max_bytes"
        cand = np.empty(0, dtype=np.int64)
        if cfg.eviction != Eviction.NONE:
            cand = np.setdiff1d(self.part.live_rows(), protect, assume_unique=False)
        evict = min(over, int(cand.shape[0]))
        if evict < over and not partial:
            self.capacity_refusals += new
            if cfg.eviction == Eviction.NONE:
                msg = (f" is full ({size} of {limit} rows, {why}) and {new} new keys need "
                       f"rows; raise {knob}, set eviction to lfu or lru, or prune")  # fmt: skip
            elif new > limit:
                msg = (f": one request brings {new} new keys but the table holds at most "
                       f"{limit} rows ({why}); send smaller batches or raise {knob}")  # fmt: skip
            else:
                msg = (f": cannot free {over} rows under {why}: the current request uses "
                       "them; send smaller batches")  # fmt: skip
            raise ResourceExhausted(f"table {self.name!r}{msg}")
        if evict:
            score = (
                self.part.block.freq if cfg.eviction == Eviction.LFU else self.part.block.last_step
            )[cand]
            victims = cand[_smallest(score, self.part.keys_of(cand), evict)]
            self._drop_rows(victims)
            self.counters["evictions"] += int(victims.shape[0])
            self.counters["evictions_capacity"] += int(victims.shape[0])
        fit = new - (over - evict)
        self.capacity_refusals += new - fit
        return fit

    def _make_room_or_undo(
        self,
        new: int,
        protect: np.ndarray,
        undo: tuple[np.ndarray, np.ndarray] | None,
        partial: bool = False,
    ) -> int:
        """``_make_room``; on refusal take back this request's sketch sightings first."""
        try:
            return self._make_room(new, protect, partial)
        except ResourceExhausted:
            if undo is not None:
                self.sketch.undo(undo)  # type: ignore[attr-defined]
            raise

    def _drop_rows(self, rows: np.ndarray, spare: np.ndarray | None = None) -> None:
        keys = self.part.keys_of(rows)
        self.part.erase_keys(keys, spare)
        self._log_deleted(keys)

    def _log_deleted(self, keys: np.ndarray) -> None:
        if not keys.shape[0]:
            return
        self.version += 1
        if not self._track_deleted:
            return
        # Under max_bytes the log has one entry per row reserved (row_limit), no more.
        bound = self.row_limit if self.config.max_bytes else max(DELETED_LOG_MAX, self.part.size)
        if self._deleted_keys + keys.shape[0] > bound:
            self._deleted, self._deleted_keys = [], 0
            self._deleted_floor = self.version
            return
        self._deleted.append((self.version, keys.copy()))
        self._deleted_keys += int(keys.shape[0])

    @property
    def evicts(self) -> bool:
        return bool(self.config.steps_to_live or self.config.l2_evict_threshold > 0)

    def _free_list_spare(self, more: int) -> np.ndarray | None:
        grow = self.part.free_list_growth(more)
        if not grow:
            return None
        spare = np.empty(grow, np.int64)
        spare.fill(-1)  # touch every page here (np.zeros would map them lazily)
        return spare

    def _evict_page(
        self, start: int, n: int, spare: np.ndarray | None = None
    ) -> tuple[int, int, int]:
        cfg = self.config
        live, top = self.part.live_rows_in(start, start + n)
        by_steps = np.zeros(live.shape[0], dtype=np.bool_)
        if cfg.steps_to_live:
            by_steps = self.part.block.last_step[live] + int(cfg.steps_to_live) < self.step
        by_l2 = np.zeros(live.shape[0], dtype=np.bool_)
        if cfg.l2_evict_threshold > 0:
            by_l2 = ~by_steps & (
                row_norms(self.part.block.values, live, 0) < cfg.l2_evict_threshold
            )
        victims = live[by_steps | by_l2]
        if victims.shape[0]:
            self._drop_rows(victims, spare)
        nxt = start + n if start + n < top else -1
        return int(by_steps.sum()), int(by_l2.sum()), nxt

    def _prune(self, threshold: float, norm: Norm) -> int:
        live = self.part.live_rows()
        victims = live[row_norms(self.part.block.values, live, _NORM_CODE[norm]) < threshold]
        if victims.shape[0]:
            self._drop_rows(victims)
            self.part.compact()
        return int(victims.shape[0])

    def _erase(self, keys: np.ndarray) -> int:
        rows = self.part.erase_keys(keys)
        self._log_deleted(keys[rows >= 0])
        return int((rows >= 0).sum())


class DynamicTable(_DynamicBase):
    """Collision-free rows created on a training pull; optional admission and eviction."""

    def __init__(self, config: TableConfig) -> None:
        super().__init__(config)
        self.part = DynamicPart(config.dim, self.n_slots, config.initial_capacity, self.row_limit)
        self.sketch: FrequencySketch | None = None
        if config.admission_threshold > 1:
            self.sketch = FrequencySketch(config.sketch_width or SKETCH_DEFAULT_WIDTH,
                                          config.sketch_depth or SKETCH_DEFAULT_DEPTH)  # fmt: skip

    def _pull(
        self, keys: np.ndarray, train: bool, mask: np.ndarray | None, out: np.ndarray
    ) -> None:
        part = self.part
        rows = part.find(keys)
        if train:
            miss = np.flatnonzero(rows < 0)
            if miss.shape[0]:
                cand = keys[miss]
                rejected = 0
                undo = None
                if self.sketch is not None:
                    est, undo = self.sketch.add_undoable(cand)
                    admit = est >= self.config.admission_threshold
                    rejected = int((~admit).sum())
                    cand = cand[admit]
                if cand.shape[0]:
                    new_keys = unique_keys(cand)
                    self._make_room_or_undo(new_keys.shape[0], rows[rows >= 0], undo)
                    new_rows, inserted = part.insert(new_keys)
                    part.block.init(
                        new_rows[inserted], new_keys[inserted], self.config, self.config.seed
                    )
                    self.version += 1
                    part.block.version[new_rows] = self.version
                    rows[miss] = part.find(keys[miss])
                self.counters["admissions_rejected"] += rejected
            self._touch(part.block, rows)
        gather_rows(part.block.values, rows, np.float32(self.config.default_value), out)

    def _push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> PushResult:
        rows = self.part.find(keys)
        found = int((rows >= 0).sum())
        self._apply(self.part.block, rows, grads, step)
        return PushResult(applied=found, dropped=keys.shape[0] - found)

    def feed_parts(self) -> list[DynamicPart | Block]:
        return [self.part]

    def _sizes(self) -> tuple[int, int, int, int, int, float]:
        dyn = self.part.nbytes + (self.sketch.nbytes if self.sketch is not None else 0)
        dyn += self._log_bytes()
        return dyn, dyn, 0, self.part.size, 0, self.part.load_factor


class StaticTable(Table):
    """``hash_bucket_size`` shared rows; row = h(key) % B (the hashing trick)."""

    def __init__(self, config: TableConfig) -> None:
        super().__init__(config)
        b = config.hash_bucket_size
        self.block = Block(b, config.dim, self.n_slots)
        self.block.init(
            np.arange(b, dtype=np.int64), np.arange(b, dtype=np.int64), config, config.seed
        )

    def _blocks(self) -> dict[str, Block]:
        return {"static": self.block}

    def rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Shared row of each key: int64 (n,)."""
        return static_rows_nb(keys, self.config.hash_bucket_size, self.config.seed)

    def _pull(
        self, keys: np.ndarray, train: bool, mask: np.ndarray | None, out: np.ndarray
    ) -> None:
        rows = self.rows_of(keys)
        if train:
            self._touch(self.block, rows)
        gather_rows(self.block.values, rows, np.float32(0), out)

    def _push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> PushResult:
        self._apply(self.block, self.rows_of(keys), grads, step)
        return PushResult(applied=keys.shape[0], dropped=0)

    def feed_parts(self) -> list[DynamicPart | Block]:
        return [self.block]

    def _sizes(self) -> tuple[int, int, int, int, int, float]:
        b = self.block.nbytes
        return b, 0, b, 0, self.block.rows, 0.0


class AdaptiveTable(_DynamicBase):
    """Static part for rare keys, dynamic rows for frequent ones (Adaptive Embedding).

    A training sighting of a key in the static part counts in the sketch; at
    ``promote_threshold`` (or when the mask says so) the key gets a dynamic row
    initialised from its static row, optimizer slots included. Eviction and
    pruning demote keys back to the static part.
    """

    def __init__(self, config: TableConfig) -> None:
        super().__init__(config)
        b = config.hash_bucket_size
        self.static = Block(b, config.dim, self.n_slots)
        self.static.init(
            np.arange(b, dtype=np.int64), np.arange(b, dtype=np.int64), config, config.seed
        )
        self.part = DynamicPart(config.dim, self.n_slots, config.initial_capacity, self.row_limit)
        self.sketch = FrequencySketch(config.sketch_width or SKETCH_DEFAULT_WIDTH,
                                      config.sketch_depth or SKETCH_DEFAULT_DEPTH)  # fmt: skip

    def _blocks(self) -> dict[str, Block]:
        return {"static": self.static}

    def static_rows_of(self, keys: np.ndarray) -> np.ndarray:
        """Static-part row of each key: int64 (n,)."""
        return static_rows_nb(keys, self.config.hash_bucket_size, self.config.seed)

    def _pull(
        self, keys: np.ndarray, train: bool, mask: np.ndarray | None, out: np.ndarray
    ) -> None:
        part = self.part
        rows = part.find(keys)
        if train:
            had_row = rows  # rows of the keys that had one before this pull
            miss = np.flatnonzero(rows < 0)
            if miss.shape[0]:
                cand = keys[miss]
                counts, undo = self.sketch.add_undoable(cand)
                promote = (
                    mask[miss] if mask is not None else counts >= self.config.promote_threshold
                )
                new_keys = unique_keys(cand[promote])
                if new_keys.shape[0]:
                    # Under max_bytes a full table keeps training the keys that do not
                    # fit on their static rows (hottest promoted first) rather than
                    # failing the pull; max_rows alone keeps refusing the batch.
                    fit = self._make_room_or_undo(
                        new_keys.shape[0], rows[rows >= 0], undo, partial=self.config.max_bytes > 0
                    )
                    new_keys = self._hottest(new_keys, fit)
                if new_keys.shape[0]:
                    new_rows, inserted = part.insert(new_keys)
                    self._promote(new_rows[inserted], new_keys[inserted])
                    had_row = rows.copy()
                    rows[miss] = part.find(keys[miss])
            # A key promoted by this pull starts from the sketch's count, which already
            # has this pull's sightings in it: only keys that had a row count it here.
            self._touch(part.block, had_row)
        gather_rows(part.block.values, rows, np.float32(0), out)
        st = np.flatnonzero(rows < 0)
        if st.shape[0]:
            srows = self.static_rows_of(keys[st])
            if train:
                self._touch(self.static, srows)
            sout = np.empty((st.shape[0], self.dim), dtype=np.float32)
            gather_rows(self.static.values, srows, np.float32(0), sout)
            out[st] = sout
        self._count("pulled_static", int(st.shape[0]))
        self._count("pulled_dynamic", keys.shape[0] - int(st.shape[0]))

    def _hottest(self, keys: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` keys (of distinct, ascending int64 keys) with the largest sketch counts,
        ties by the smaller key; ascending."""
        if k >= keys.shape[0]:
            return keys
        if k <= 0:
            return keys[:0]
        return keys[_smallest(-self.sketch.estimate(keys), keys, k)]

    def _promote(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """New dynamic rows start as a copy of the key's static row: values, slots, frequency."""
        src = self.static_rows_of(keys)
        blk = self.part.block
        blk.values[rows] = self.static.values[src]
        blk.slots[rows] = self.static.slots[src]
        blk.freq[rows] = self.sketch.estimate(keys)
        blk.last_step[rows] = self.step
        self.version += 1
        blk.version[rows] = self.version
        self.counters["promotions"] += int(rows.shape[0])

    def _push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> PushResult:
        rows = self.part.find(keys)
        dyn = rows >= 0
        self._apply(self.part.block, rows, grads, step)
        st = np.flatnonzero(~dyn)
        if st.shape[0]:
            self._apply(self.static, self.static_rows_of(keys[st]), grads[st], step)
        return PushResult(applied=keys.shape[0], dropped=0)

    def feed_parts(self) -> list[DynamicPart | Block]:
        return [self.part, self.static]

    def _sizes(self) -> tuple[int, int, int, int, int, float]:
        dyn = self.part.nbytes + self.sketch.nbytes + self._log_bytes()
        st = self.static.nbytes
        return dyn + st, dyn, st, self.part.size, self.static.rows, self.part.load_factor


class QRTable(Table):
    """Quotient-remainder table: h = key mod (Q*m); row = combine(Q[h // m], R[h % m]).

    Keys in [0, Q*m) get distinct (quotient, remainder) pairs. Gradients:
    mult: dQ = g * R[r], dR = g * Q[q]; add: dQ = dR = g; concat: the halves of g.
    """

    def __init__(self, config: TableConfig) -> None:
        super().__init__(config)
        self.m = config.qr_remainder_buckets
        self.q = config.qr_quotient_buckets
        self.part_dim = config.dim // 2 if config.qr_combiner == Combiner.CONCAT else config.dim
        self.quotient = Block(self.q, self.part_dim, self.n_slots)
        self.remainder = Block(self.m, self.part_dim, self.n_slots)
        self.quotient.init(
            np.arange(self.q, dtype=np.int64),
            np.arange(self.q, dtype=np.int64),
            config,
            config.seed,
        )
        self.remainder.init(np.arange(self.m, dtype=np.int64), np.arange(self.m, dtype=np.int64),
                            config, config.seed + 1)  # fmt: skip

    def _blocks(self) -> dict[str, Block]:
        return {"quotient": self.quotient, "remainder": self.remainder}

    def parts_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quotient rows, remainder rows), each int64 (n,)."""
        h = np.mod(keys, np.int64(self.q * self.m))
        return h // self.m, h % self.m

    def _pull(
        self, keys: np.ndarray, train: bool, mask: np.ndarray | None, out: np.ndarray
    ) -> None:
        qr, rr = self.parts_of(keys)
        if train:
            self._touch(self.quotient, qr)
            self._touch(self.remainder, rr)
        vq = self.quotient.values[qr]
        vr = self.remainder.values[rr]
        comb = self.config.qr_combiner
        if comb == Combiner.MULT:
            np.multiply(vq, vr, out=out)
        elif comb == Combiner.ADD:
            np.add(vq, vr, out=out)
        else:
            out[:, : self.part_dim] = vq
            out[:, self.part_dim :] = vr

    def _push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> PushResult:
        qr, rr = self.parts_of(keys)
        comb = self.config.qr_combiner
        if comb == Combiner.MULT:
            gq = grads * self.remainder.values[rr]
            gr = grads * self.quotient.values[qr]
        elif comb == Combiner.ADD:
            gq = gr = grads
        else:
            gq = np.ascontiguousarray(grads[:, : self.part_dim])
            gr = np.ascontiguousarray(grads[:, self.part_dim :])
        self._apply(self.quotient, qr, gq, step)
        self._apply(self.remainder, rr, gr, step)
        return PushResult(applied=keys.shape[0], dropped=0)

    def feed_parts(self) -> list[DynamicPart | Block]:
        return [self.quotient, self.remainder]

    def _sizes(self) -> tuple[int, int, int, int, int, float]:
        st = self.quotient.nbytes + self.remainder.nbytes
        return st, 0, st, 0, self.q + self.m, 0.0


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------

TABLE_CLASSES: dict[TableKind, type[Table]] = {
    TableKind.DYNAMIC: DynamicTable,
    TableKind.STATIC: StaticTable,
    TableKind.ADAPTIVE: AdaptiveTable,
    TableKind.QR: QRTable,
}


def make_table(config: TableConfig) -> Table:
    """A new, empty table of ``config.kind``.

    Raises ResourceExhausted, allocating nothing, when the arrays the table
    needs at creation (``create_bytes``) exceed this machine's memory, and
    when an allocation fails: a config is never an out-of-memory kill.
    """
    need, have = create_bytes(config), _physical_memory()
    if need > have:
        raise ResourceExhausted(
            f"table {config.name!r} needs {need} bytes at creation, more than this machine's "
            f"{have} bytes of memory; lower hash_bucket_size, the qr buckets, sketch_width or "
            "initial_capacity (or set max_bytes)"
        )
    try:
        return TABLE_CLASSES[config.kind](config)
    except MemoryError as e:
        raise ResourceExhausted(
            f"table {config.name!r}: its {need} bytes could not be allocated ({e}); "
            "make it smaller or free memory on the shard"
        ) from None


def create_bytes(config: TableConfig) -> int:
    """Bytes a new table of ``config`` allocates: its fixed parts and its first arena."""
    need = config.fixed_bytes
    if config.kind in (TableKind.DYNAMIC, TableKind.ADAPTIVE):
        rows = max(int(config.initial_capacity), 16)
        limit = row_limit(config)
        if limit is not None:
            rows = min(rows, limit)
        need += rows * (config.row_bytes + 8) + 16 * (hm.capacity_for(rows) - hm.MIN_CAPACITY)
    return need


def _physical_memory() -> int:
    """Bytes of RAM of this machine (2**63 where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 2**63


def copy_rows(name: str, src: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """``src[rows]`` (int64 row indices), or ``src.copy()`` when rows is None: a private copy.

    The default ``copy`` of ``Table.snapshot``; ``name`` (the snapshot array's name) is unused.
    """
    return src.copy() if rows is None else src[rows]


def _adoptable(a: np.ndarray) -> bool:
    """An array a table may keep as its own storage: writable, C-contiguous, owning or base-owned."""
    return bool(a.flags.c_contiguous and a.flags.writeable)


def _as_norm(norm: Norm | str) -> Norm:
    try:
        return Norm(norm)
    except ValueError:
        raise InvalidArgument(f"unknown norm {norm!r}; use l2, l1 or linf") from None


def _smallest(score: np.ndarray, tiebreak: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest scores, ties broken by the smaller ``tiebreak`` (the key).

    Deterministic and independent of row layout, so a restored table evicts
    exactly what the original would. int64 (k,).
    """
    if k >= score.shape[0]:
        return np.arange(score.shape[0], dtype=np.int64)
    kth = np.partition(score, k - 1)[k - 1]
    below = np.flatnonzero(score < kth)
    ties = np.flatnonzero(score == kth)
    ties = ties[np.argsort(tiebreak[ties], kind="stable")][: k - below.shape[0]]
    return np.sort(np.concatenate([below, ties])).astype(np.int64)
