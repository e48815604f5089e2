"""What every table kind shares: the ``Table`` base class (locking, steps, versions, pulls, pushes, snapshots, the change feed), its results, the validation at its boundary, and ``row_limit``."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from embps.protos.config import (
    Combiner,
    Norm,
    TableConfig,
    TableKind,
)
from embps.protos.routing import static_rows_nb
from embps.server.errors import FailedPrecondition, InvalidArgument
from embps.server.kernels import hashmap as hm
from embps.server.kernels.optim import dedup_sum
from embps.server.kernels.rows import all_finite, touch_rows
from embps.server.optimizers import apply_optimizer
from embps.server.parallel import run_in_pieces
from embps.server.replay import REPLAY_ARRAYS, ReplayGuard
from embps.server.rwlock import RWLock
from embps.server.tables.block import (
    BLOCK_FIELDS,
    TRAINING,
    Block,
    CopyRows,
    RowIndex,
    Storage,
    _adoptable,
    unique_keys,
)
from embps.server.tables.part import DynamicPart
from embps.server.tables.sketch import FrequencySketch

DELETED_LOG_MAX = 1 << 20  # keys kept for incremental snapshots (or the table size, if larger)
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


@dataclass
class Snapshot:
    """A consistent copy of one table: its config, named arrays and scalar state.

    Array names are ``<part>.<field>``: part ``dynamic`` (rows of own keys, with
    ``dynamic.keys``), ``static``, ``quotient``, ``remainder`` (whole blocks, or
    only the rows in ``<part>.rows`` for an incremental snapshot), and
    ``sketch.counters``. ``deleted`` holds keys deleted since ``base_version``
    (incremental snapshots only). ``epoch``: the table's incarnation when the snapshot was
    taken (the change feed's; a replica bootstrapped from this snapshot follows on from
    ``version`` when the training table is still in that epoch). Every array is a private
    copy.
    """

    config: TableConfig
    arrays: dict[str, np.ndarray]
    state: dict[str, int]
    base_version: int | None = None
    deleted: np.ndarray | None = None
    epoch: str = ""

    @property
    def version(self) -> int:
        """The table version this snapshot shows."""
        return int(self.state["version"])


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


# --------------------------------------------------------------------------
# Validation (at the boundary, before any lock)
# --------------------------------------------------------------------------


def as_keys(keys: object) -> np.ndarray:
    """Any integer array of any shape -> contiguous int64 (n,). InvalidArgument otherwise."""
    arr = np.asarray(keys)
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise InvalidArgument(f"keys must be an integer array, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 2**63:
        raise InvalidArgument("keys must fit in int64; got uint64 values >= 2**63")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


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

    def __init__(self, config: TableConfig, storage: Storage = TRAINING) -> None:
        self.config = config
        self.storage = storage  # how rows are stored (a serving replica's differ)
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
        keys: object,  # integers, any shape: n keys
        train: bool = True,
        mask: object | None = None,  # bool (n,): True promotes (adaptive tables)
        out: np.ndarray | None = None,  # float32 (n, dim) to fill, else a new array
    ) -> np.ndarray:  # float32 (n, dim)
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
        keys: object,  # integers, any shape: n keys
        grads: object,  # float (n, dim) or keys.shape + (dim,)
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
            self.config = dataclasses.replace(cfg, dim=d)
            self.dim = d
            self._narrowed()
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

    def erase(self, keys: object) -> int:  # keys: integers (n,)
        """Delete the own rows of ``keys`` (dynamic parts only); returns how many were deleted."""
        k = as_keys(keys)
        with self._lock.write():
            return self._erase(k)

    def frequencies(self, keys: object) -> np.ndarray:  # keys: integers (n,) -> int64 (n,)
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
            return Snapshot(self.config, arrays, state, since_version, deleted, self.epoch)

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
            with self._count_lock:  # a follower away FOLLOWER_TTL_S is forgotten
                self._followers = {
                    f: (v, t) for f, (v, t) in self._followers.items() if now - t < FOLLOWER_TTL_S
                }
                live = [v for v, _ in self._followers.values()]
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

    def static_rows_of(
        self,
        keys: np.ndarray,  # int64 (n,)
    ) -> np.ndarray:  # int64 (n,) in [0, hash_bucket_size)
        """The shared (static-part) row of each key: ``routing.static_rows`` with this
        table's ``hash_bucket_size`` and seed (static and adaptive tables)."""
        return static_rows_nb(keys, self.config.hash_bucket_size, self.config.seed)

    def _narrowed(self) -> None:
        """Kind-specific state that follows ``self.dim`` after a narrow (none here)."""

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
