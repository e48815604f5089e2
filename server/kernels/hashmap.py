"""Open-addressing int64 -> row hash-map kernels (numba, pure functions over arrays).

DESIGN
======
Layout. One map is two arrays owned by the caller (``tables.DynamicPart``):

    buckets: int64 (2 * cap,)   interleaved pairs [key, row] for cap buckets
    meta:  int64 (META_LEN,)  size, sentinel row, grow limit, row allocator

``cap`` is a power of two (stored as the array length; ``mask = cap - 1``). A key
and its row share one 16-byte pair, so a probe touches one cache line, not two.

Hash. ``slot_hash(key)`` is the murmur3 fmix64 finalizer of ``key ^ SLOT_SEED``.
It is deliberately *different* from the routing hash (``embps.protos.routing``):
all keys on one shard share ``route(key) % n_shards``; if the table reused that
hash, their low bits would be equal and every probe would collide.

Probe sequence. Linear probing: ``j, j+1, j+2, ... (mod cap)``. Short, cache
friendly runs; batch kernels prefetch the home bucket of key ``i + PREFETCH``
while probing key ``i``, so the memory latency of a batch overlaps.

Sentinel. ``EMPTY = INT64_MIN`` marks a free bucket. A user may send that very
value as a key: it is never stored in ``buckets``; its row lives in
``meta[M_SENTINEL_ROW]`` (-1 when absent). Every kernel checks for it first.

Deletion. Backward-shift deletion (no tombstones): after emptying bucket ``i``,
walk the run forward; an entry at ``j`` whose home bucket ``h`` does not lie
cyclically in ``(i, j]`` moves back into ``i``, and ``i = j``. Lookups stay
correct and probe lengths never degrade with churn.

Load factor. The caller grows (``rehash`` into 2x buckets) before ``size``
would pass ``meta[M_GROW_AT] = floor(cap * MAX_LOAD)``. ``find_or_insert`` never
grows: it stops *before* the insert that would pass the limit (or when the row
allocator is out of rows) and returns how many keys it finished, so the caller
grows and resumes the same batch from there (a resize in the middle of a batch).

Rows. Rows index the caller's value arena and are stable across rehashes.
New rows come from a free-list stack (rows freed by ``erase``), else from a
bump pointer ``meta[M_NEXT_ROW] < meta[M_ROW_CAP]``.

Invariants (checked by the tests against a dict model):
  * every stored key appears once; ``EMPTY`` never appears as a stored key;
  * an entry is reachable from its home bucket without crossing an empty one;
  * ``size <= grow_at < cap``: there is always an empty bucket, so probes end;
  * live rows, free-list rows and ``[next_row, row_cap)`` partition the arena.

Limits. Kernels are not thread-safe: the owning table serialises calls with
its lock (kernels release the GIL, so other tables proceed in parallel).
``export_page`` cursors are only valid while the map is not rehashed. Kernels
raise nothing: misses are ``-1`` entries, stops are returned counts.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from embps.protos.routing import fmix64_one

# --------------------------------------------------------------------------
# Types and constants
# --------------------------------------------------------------------------

EMPTY = np.int64(np.iinfo(np.int64).min)
MAX_LOAD = 0.75
MIN_CAPACITY = 16
PREFETCH = 24  # keys ahead; measured best at 10M keys (24 beat 12 by 7-30%)

M_SIZE = 0  # keys stored in buckets (the sentinel key is not counted here)
M_SENTINEL_ROW = 1  # row of the key EMPTY, -1 when absent
M_GROW_AT = 2  # the largest size allowed before the caller must rehash
M_NEXT_ROW = 3  # bump pointer into the row arena
M_ROW_CAP = 4  # rows in the arena
M_FREE_TOP = 5  # rows on the free-list stack
META_LEN = 6

_SLOT_SEED = np.uint64(0x2545F4914F6CDD1D)


# --------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------


def _emit_prefetch(builder: ir.IRBuilder, ptr: ir.Value) -> None:
    """Emit llvm.prefetch(ptr, read, high locality, data cache)."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(
        fn,
        [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)],
    )


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to load ``arr[idx]`` into cache (llvm.prefetch, read, high locality)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        _emit_prefetch(builder, ptr)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch_item(typingctx, arr, i, j):
    """Hint the CPU to load ``arr[i, j]`` of a 2-D array into cache (any layout)."""
    sig = types.void(arr, i, j)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(
            context, builder, aryty, ary, [args[1], args[2]], wraparound=False
        )
        _emit_prefetch(builder, ptr)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_row(typingctx, dst, di, src, si):
    """memcpy row ``src[si]`` into ``dst[di]`` (2-D C-contiguous arrays of one dtype and width)."""
    sig = types.void(dst, di, src, si)

    def codegen(context, builder, signature, args):
        dty, _, sty, _ = signature.args
        d = context.make_array(dty)(context, builder, args[0])
        s_ = context.make_array(sty)(context, builder, args[2])
        zero = context.get_constant(types.intp, 0)
        dp = cgutils.get_item_pointer(context, builder, dty, d, [args[1], zero], wraparound=False)
        sp = cgutils.get_item_pointer(context, builder, sty, s_, [args[3], zero], wraparound=False)
        ncols = cgutils.unpack_tuple(builder, d.shape, 2)[1]
        itemsize = context.get_constant(
            types.intp, context.get_abi_sizeof(context.get_data_type(dty.dtype))
        )
        cgutils.raw_memcpy(builder, dp, sp, builder.mul(ncols, itemsize), 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def slot_hash(key: np.int64) -> np.uint64:
    """Bucket hash of a key (see DESIGN: independent of the routing hash)."""
    return fmix64_one(np.uint64(key) ^ _SLOT_SEED)


@njit(nogil=True, cache=True, inline="always")
def _alloc_row(meta, free_list):
    """Pop a free row, else bump; -1 when the arena is full."""
    top = meta[M_FREE_TOP]
    if top > 0:
        meta[M_FREE_TOP] = top - 1
        return free_list[top - 1]
    nxt = meta[M_NEXT_ROW]
    if nxt < meta[M_ROW_CAP]:
        meta[M_NEXT_ROW] = nxt + 1
        return nxt
    return np.int64(-1)


# --------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------


def grow_limit(cap: int) -> int:
    """Largest ``size`` allowed in ``cap`` buckets before a rehash is due."""
    return min(int(cap * MAX_LOAD), cap - 1)


def capacity_for(n_keys: int) -> int:
    """Smallest power-of-two bucket count that holds ``n_keys`` under MAX_LOAD."""
    cap = MIN_CAPACITY
    while grow_limit(cap) < n_keys:
        cap *= 2
    return cap


def new_buckets(cap: int) -> np.ndarray:
    """Empty bucket array: int64 (2 * cap,), every key EMPTY."""
    assert cap >= MIN_CAPACITY and cap & (cap - 1) == 0, "capacity must be a power of two"
    buckets = np.empty(2 * cap, dtype=np.int64)
    buckets[0::2] = EMPTY
    buckets[1::2] = -1
    return buckets


def new_meta(cap: int, row_cap: int) -> np.ndarray:
    """Fresh map state for ``cap`` buckets and an arena of ``row_cap`` rows."""
    meta = np.zeros(META_LEN, dtype=np.int64)
    meta[M_SENTINEL_ROW] = -1
    meta[M_GROW_AT] = grow_limit(cap)
    meta[M_ROW_CAP] = row_cap
    return meta


@njit(nogil=True, cache=True)
def find(buckets, meta, keys, rows_out):
    """Look keys up; no writes to the map.

    buckets: int64 (2*cap,), meta: int64 (META_LEN,), keys: int64 (n,),
    rows_out: int64 (n,) <- row of each key, -1 where absent.
    Returns the number of keys found.
    """
    n = keys.shape[0]
    mask = np.uint64(buckets.shape[0] // 2 - 1)
    found = 0
    for i in range(n):
        if i + PREFETCH < n:
            _prefetch(buckets, np.int64(slot_hash(keys[i + PREFETCH]) & mask) * 2)  # type: ignore[call-arg]
        k = keys[i]
        if k == EMPTY:
            r = meta[M_SENTINEL_ROW]
        else:
            j = np.int64(slot_hash(k) & mask)
            while True:
                sk = buckets[2 * j]
                if sk == k:
                    r = buckets[2 * j + 1]
                    break
                if sk == EMPTY:
                    r = -1
                    break
                j = (j + 1) & np.int64(mask)
        rows_out[i] = r
        if r >= 0:
            found += 1
    return found


@njit(nogil=True, cache=True)
def find_or_insert(buckets, meta, free_list, keys, start, rows_out, inserted_out):
    """Find each key, inserting the missing ones with a newly allocated row.

    buckets: int64 (2*cap,), meta: int64 (META_LEN,), free_list: int64 (>= free_top,),
    keys: int64 (n,), start: first index to process,
    rows_out: int64 (n,) <- row of each key, inserted_out: bool (n,) <- True where
    this call created the key (a duplicate later in the batch reads False).
    Returns the index of the first key *not* processed: ``n`` when done; less
    when the next insert would pass ``meta[M_GROW_AT]`` or the arena has no free
    row. The caller grows and calls again with ``start`` set to that index.
    """
    n = keys.shape[0]
    umask = np.uint64(buckets.shape[0] // 2 - 1)
    mask = np.int64(umask)
    for i in range(start, n):
        if i + PREFETCH < n:
            _prefetch(buckets, np.int64(slot_hash(keys[i + PREFETCH]) & umask) * 2)  # type: ignore[call-arg]
        k = keys[i]
        if k == EMPTY:
            r = meta[M_SENTINEL_ROW]
            if r >= 0:
                rows_out[i] = r
                inserted_out[i] = False
                continue
            r = _alloc_row(meta, free_list)
            if r < 0:
                return i
            meta[M_SENTINEL_ROW] = r
            rows_out[i] = r
            inserted_out[i] = True
            continue
        j = np.int64(slot_hash(k) & umask)
        while True:
            sk = buckets[2 * j]
            if sk == k:
                rows_out[i] = buckets[2 * j + 1]
                inserted_out[i] = False
                break
            if sk == EMPTY:
                if meta[M_SIZE] >= meta[M_GROW_AT]:
                    return i
                r = _alloc_row(meta, free_list)
                if r < 0:
                    return i
                buckets[2 * j] = k
                buckets[2 * j + 1] = r
                meta[M_SIZE] += 1
                rows_out[i] = r
                inserted_out[i] = True
                break
            j = (j + 1) & mask
    return n


@njit(nogil=True, cache=True)
def erase(buckets, meta, free_list, keys, rows_out):
    """Delete keys (backward-shift deletion) and push their rows on the free list.

    free_list must have room for ``free_top + n`` rows. rows_out: int64 (n,) <- the
    freed row of each key, -1 where the key was absent (or already erased earlier
    in this batch). Returns the number of keys erased.
    """
    n = keys.shape[0]
    cap = buckets.shape[0] // 2
    umask = np.uint64(cap - 1)
    mask = np.int64(umask)
    erased = 0
    for i in range(n):
        k = keys[i]
        rows_out[i] = -1
        if k == EMPTY:
            r = meta[M_SENTINEL_ROW]
            if r >= 0:
                meta[M_SENTINEL_ROW] = -1
                free_list[meta[M_FREE_TOP]] = r
                meta[M_FREE_TOP] += 1
                rows_out[i] = r
                erased += 1
            continue
        j = np.int64(slot_hash(k) & umask)
        while True:
            sk = buckets[2 * j]
            if sk == EMPTY:
                j = np.int64(-1)
                break
            if sk == k:
                break
            j = (j + 1) & mask
        if j < 0:
            continue
        r = buckets[2 * j + 1]
        rows_out[i] = r
        free_list[meta[M_FREE_TOP]] = r
        meta[M_FREE_TOP] += 1
        meta[M_SIZE] -= 1
        erased += 1
        # Backward shift: pull later entries of the run into the hole at `hole`.
        hole = j
        j = (j + 1) & mask
        while True:
            sk = buckets[2 * j]
            if sk == EMPTY:
                break
            home = np.int64(slot_hash(sk) & umask)
            # Entry at j may move to hole iff its home is not cyclically in (hole, j].
            if hole <= j:
                stays = hole < home <= j
            else:
                stays = home > hole or home <= j
            if not stays:
                buckets[2 * hole] = sk
                buckets[2 * hole + 1] = buckets[2 * j + 1]
                hole = j
            j = (j + 1) & mask
        buckets[2 * hole] = EMPTY
        buckets[2 * hole + 1] = -1
    return erased


@njit(nogil=True, cache=True)
def rehash(old_buckets, new_buckets_):
    """Insert every entry of old_buckets into the empty new_buckets_ (power-of-two, larger).

    Returns the number of entries moved. The sentinel key is not in buckets and needs
    no move; rows are unchanged.
    """
    old_cap = old_buckets.shape[0] // 2
    umask = np.uint64(new_buckets_.shape[0] // 2 - 1)
    mask = np.int64(umask)
    moved = 0
    for i in range(old_cap):
        k = old_buckets[2 * i]
        if k == EMPTY:
            continue
        j = np.int64(slot_hash(k) & umask)
        while new_buckets_[2 * j] != EMPTY:
            j = (j + 1) & mask
        new_buckets_[2 * j] = k
        new_buckets_[2 * j + 1] = old_buckets[2 * i + 1]
        moved += 1
    return moved


@njit(nogil=True, cache=True)
def export_page(buckets, meta, cursor, keys_out, rows_out):
    """Copy up to ``len(keys_out)`` entries, starting at ``cursor``, into the outputs.

    Cursor protocol (Redis SCAN style): start with 0; each call returns
    ``(count, next_cursor)``; ``next_cursor == 0`` means the walk is complete.
    The page must hold at least one entry; an empty page returns ``(0, -1)``.
    Cursor 0 emits the sentinel key first (if present); cursor c > 0 resumes at
    bucket c - 1. Work per call is bounded by the page size plus the empty
    buckets skipped. Valid only while the map is not rehashed.
    """
    page = keys_out.shape[0]
    cap = buckets.shape[0] // 2
    if page == 0:
        return 0, -1  # no progress is possible: -1 is not a cursor, so no walk ends by mistake
    count = 0
    b = 0
    if cursor == 0:
        r = meta[M_SENTINEL_ROW]
        if r >= 0:
            keys_out[0] = EMPTY
            rows_out[0] = r
            count = 1
    else:
        b = cursor - 1
    while b < cap:
        k = buckets[2 * b]
        if k != EMPTY:
            if count == page:
                return count, b + 1
            keys_out[count] = k
            rows_out[count] = buckets[2 * b + 1]
            count += 1
        b += 1
    return count, 0
