"""Dedup and routing of one batch of keys in a single pass (numba kernels).

The client's half of DESIGN.md's data flow, "dedup (keep the inverse), route by
``mix64(key) % n_shards``", without a sort: an open-addressing table sized for
the batch finds each key's first occurrence, and a stable counting sort groups
the distinct keys by owning shard. Each shard gets its distinct keys in the
order of their first occurrence in the batch, so a batch of distinct keys going
to one shard is sent as it is (no gather on the way back either).

Kernels are pure ``@njit(nogil=True, cache=True)`` functions over arrays, as the
server's are. ``dedup_route`` is exactly ``embps.protos.routing.shard_of`` for
routing (tests check it against numpy).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from embps.protos.routing import _C1, _C2, _GOLDEN  # the one definition of mix64's constants

_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)


@nb.njit(nogil=True, cache=True, inline="always")
def _mix64(key):  # pragma: no cover - compiled
    """splitmix64 finalizer, bit for bit ``routing.mix64`` of one key."""
    z = np.uint64(key) + _GOLDEN
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


@nb.njit(nogil=True, cache=True)
def dedup_route(keys, num_shards):  # pragma: no cover - compiled
    """Distinct keys grouped by shard, for int64 ``keys`` (n,) and ``num_shards`` >= 1.

    Returns (uniq int64 (u,), where int64 (n,), first int64 (u,), bounds int64
    (num_shards + 1,)): shard s owns ``uniq[bounds[s]:bounds[s + 1]]``, in the
    order of their first occurrence in ``keys``; ``uniq[where[i]] == keys[i]``;
    ``keys[first[j]] == uniq[j]`` and ``first[j]`` is the smallest such index.
    """
    n = keys.shape[0]
    uniq = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)
    where = np.empty(n, dtype=np.int64)
    bounds = np.zeros(num_shards + 1, dtype=np.int64)
    u = _dedup_route_into(keys, 0, n, num_shards, uniq, where, first, bounds)
    return uniq[:u], where, first[:u], bounds


@nb.njit(nogil=True, cache=True)
def dedup_route_groups(keys, offsets, num_shards):  # pragma: no cover - compiled
    """``dedup_route`` of G groups of keys in one call: group g is
    ``keys[offsets[g]:offsets[g + 1]]`` (int64 keys (n,), offsets int64 (G + 1,)).

    Returns (uniq int64 (n,), where int64 (n,), first int64 (n,), counts int64 (G,),
    bounds int64 (G, num_shards + 1)): group g's distinct keys are
    ``uniq[offsets[g]:offsets[g] + counts[g]]`` (``first`` likewise, indices within the
    group), its ``where`` is ``where[offsets[g]:offsets[g + 1]]`` and its shard bounds
    ``bounds[g]``: exactly what ``dedup_route`` returns for the group alone.
    """
    n = keys.shape[0]
    groups = offsets.shape[0] - 1
    uniq = np.empty(n, dtype=np.int64)
    first = np.empty(n, dtype=np.int64)
    where = np.empty(n, dtype=np.int64)
    counts = np.zeros(groups, dtype=np.int64)
    bounds = np.zeros((groups, num_shards + 1), dtype=np.int64)
    for g in range(groups):
        counts[g] = _dedup_route_into(
            keys, offsets[g], offsets[g + 1], num_shards, uniq, where, first, bounds[g]
        )
    return uniq, where, first, counts, bounds


@nb.njit(nogil=True, cache=True)
def _dedup_route_into(keys, lo, hi, num_shards, uniq, where, first, bounds):  # pragma: no cover
    """Dedup and route ``keys[lo:hi]``, writing the group's results at offset ``lo`` of
    ``uniq``, ``where`` and ``first`` (positions and indices relative to the group) and its
    shard bounds into ``bounds`` (num_shards + 1,, zeros on entry). Returns u, the
    group's distinct keys."""
    n = hi - lo
    cap = 16
    while cap < 2 * n:
        cap *= 2
    mask = np.uint64(cap - 1)
    slot = np.full(cap, -1, dtype=np.int64)  # index into the group's uniq, or -1
    owner = np.empty(n, dtype=np.int64)
    shards = np.uint64(num_shards)
    u = 0
    for i in range(n):
        k = keys[lo + i]
        h = _mix64(k)
        j = np.int64((h >> _S32) & mask)  # high bits: the routing uses h % num_shards
        while True:
            s = slot[j]
            if s < 0:
                slot[j] = u
                uniq[lo + u] = k
                first[lo + u] = i
                o = np.int64(h % shards)
                owner[u] = o
                bounds[o + 1] += 1
                where[lo + i] = u
                u += 1
                break
            if uniq[lo + s] == k:
                where[lo + i] = s
                break
            j = (j + 1) & (cap - 1)
    if num_shards == 1:
        return u
    for s in range(num_shards):
        bounds[s + 1] += bounds[s]
    cursor = bounds[:-1].copy()
    pos = np.empty(u, dtype=np.int64)
    for q in range(u):
        o = owner[q]
        pos[q] = cursor[o]
        cursor[o] += 1
    out = np.empty(u, dtype=np.int64)
    out_first = np.empty(u, dtype=np.int64)
    for q in range(u):
        out[pos[q]] = uniq[lo + q]
        out_first[pos[q]] = first[lo + q]
    uniq[lo : lo + u] = out
    first[lo : lo + u] = out_first
    for i in range(n):
        where[lo + i] = pos[where[lo + i]]
    return u


@nb.njit(nogil=True, cache=True)
def sum_rows(where, grads, u):  # pragma: no cover - compiled
    """Rows of ``grads`` float32 (n, dim) summed by ``where`` int64 (n,) into float32 (u, dim).

    Row w is ((0 + g_first) + g_second) + ... in float32, in batch order: what a
    shard's ``dedup_sum`` computes (the zero start turns -0.0 into 0.0 as there).
    """
    n, dim = grads.shape
    out = np.zeros((u, dim), dtype=np.float32)
    for i in range(n):
        w = where[i]
        for d in range(dim):
            out[w, d] += grads[i, d]
    return out
