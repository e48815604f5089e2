"""Key hashes: which shard owns a key, which static row a key shares, and the client's
dedup + route pass. The one home of embps's key hashing, shared by client and server.

  routing      ``shard_of(keys, n) = mix64(key) % n``, mix64 the splitmix64 finalizer.
               Client and server must agree bit for bit: the client sends a key to the
               shard that ``shard_of`` names and the shard checks it
               (``first_misrouted``), and checkpoints reshard with it.
  static rows  ``static_rows(keys, buckets, seed) = fmix64(key ^ fmix64(seed ^ STATIC_SEED))
               % buckets``: the shared row of a key in a static (hashed) table. The server's
               tables, ``embps export`` and the serving reader (``embps.client.serving``)
               must agree, or an exported model answers other rows.
  dedup        ``dedup_route``: distinct keys of a batch grouped by owning shard in one
               pass without a sort (the client's half of DESIGN.md's data flow).

Each hash comes as twins: numpy over arrays (``mix64``, ``fmix64``, ``static_rows``) and
``@njit`` over one value (``mix64_one``, ``fmix64_one``), for kernels; a unit test holds
the twins equal. The shard tables hash keys into buckets with fmix64 and a seed of their
own (``embps.server.kernels.hashmap``), so keys that share a shard do not share bucket
bits.

DEDUP. An open-addressing table sized for the batch finds each key's first occurrence,
and a stable counting sort groups the distinct keys by owning shard. Each shard gets its
distinct keys in the order of their first occurrence in the batch, so a batch of distinct
keys going to one shard is sent as it is (no gather on the way back either). The table
probes with the high 32 bits of mix64, the routing uses ``mix64 % n``: independent bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# splitmix64's finalizer (Steele, Lea, Flood 2014) and murmur3's fmix64
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SPLITMIX_C1 = np.uint64(0xBF58476D1CE4E5B9)
SPLITMIX_C2 = np.uint64(0x94D049BB133111EB)
FMIX_C1 = np.uint64(0xFF51AFD7ED558CCD)
FMIX_C2 = np.uint64(0xC4CEB9FE1A85EC53)
STATIC_SEED = np.uint64(0x94D049BB133111EB)  # xor'ed into a static table's seed
_M64 = (1 << 64) - 1
_S27 = np.uint64(27)
_S30 = np.uint64(30)
_S31 = np.uint64(31)
_S32 = np.uint64(32)
_S33 = np.uint64(33)


# --------------------------------------------------------------------------
# splitmix64 (routing)
# --------------------------------------------------------------------------


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of int64 keys (n,) -> uint64 (n,). Bijective, well mixed."""
    z = keys.astype(np.int64, copy=False).view(np.uint64) + GOLDEN
    z = (z ^ (z >> _S30)) * SPLITMIX_C1
    z = (z ^ (z >> _S27)) * SPLITMIX_C2
    return z ^ (z >> _S31)


def mix64_inplace(z: np.ndarray) -> np.ndarray:
    """The finalizer's mixing steps (no golden increment), in place on uint64 (...) -> z.
    For counter-based generators (``embps.client.data``): ``mix64(k) ==
    mix64_inplace(k.view(uint64) + GOLDEN)``."""
    t = z >> _S30
    z ^= t
    z *= SPLITMIX_C1
    np.right_shift(z, _S27, out=t)
    z ^= t
    z *= SPLITMIX_C2
    np.right_shift(z, _S31, out=t)
    z ^= t
    return z


def mix64_int(x: int) -> int:
    """``mix64_inplace`` of one Python int (wrapping to 64 bits): int -> int."""
    z = x & _M64
    z = ((z ^ (z >> 30)) * int(SPLITMIX_C1)) & _M64
    z = ((z ^ (z >> 27)) * int(SPLITMIX_C2)) & _M64
    return z ^ (z >> 31)


@njit(nogil=True, cache=True, inline="always")
def mix64_one(key):  # pragma: no cover - compiled
    """``mix64`` of one int64 key -> uint64, bit for bit."""
    z = np.uint64(key) + GOLDEN
    z = (z ^ (z >> _S30)) * SPLITMIX_C1
    z = (z ^ (z >> _S27)) * SPLITMIX_C2
    return z ^ (z >> _S31)


def shard_of(keys: np.ndarray, num_shards: int) -> np.ndarray:
    """Owning shard of each key: int64 (n,) -> int64 (n,) in [0, num_shards)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return np.zeros(keys.shape[0], dtype=np.int64)
    return (mix64(keys) % np.uint64(num_shards)).astype(np.int64)


@njit(nogil=True, cache=True)
def first_misrouted(keys, num_shards, shard):  # pragma: no cover - compiled
    """Index of the first of ``keys`` int64 (n,) that ``shard`` does not own, or -1.

    One pass without temporaries: ~5x faster than ``shard_of``'s numpy form, so a
    shard verifies ownership at a fraction of a pull's cost.
    """
    n = np.uint64(num_shards)
    me = np.uint64(shard)
    for i in range(keys.shape[0]):
        if mix64_one(keys[i]) % n != me:
            return i
    return -1


# --------------------------------------------------------------------------
# fmix64 (static rows; the shard tables' bucket hash)
# --------------------------------------------------------------------------


def fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer over uint64 (n,) (wrapping arithmetic) -> uint64 (n,)."""
    x = x ^ (x >> _S33)
    x = x * FMIX_C1
    x = x ^ (x >> _S33)
    x = x * FMIX_C2
    return x ^ (x >> _S33)


@njit(nogil=True, cache=True, inline="always")
def fmix64_one(x):  # pragma: no cover - compiled
    """``fmix64`` of one uint64: a bijection mixing every input bit into every output bit."""
    x ^= x >> _S33
    x *= FMIX_C1
    x ^= x >> _S33
    x *= FMIX_C2
    x ^= x >> _S33
    return x


def static_rows(keys: np.ndarray, buckets: int, seed: int) -> np.ndarray:
    """Shared row of each key in a static part: int64 (n,) -> int64 (n,) in [0, buckets)."""
    s = fmix64(np.array([seed], dtype=np.uint64) ^ STATIC_SEED)
    h = fmix64(keys.astype(np.int64, copy=False).view(np.uint64) ^ s)
    return (h % np.uint64(buckets)).astype(np.int64)


@njit(nogil=True, cache=True)
def static_rows_nb(keys, buckets, seed):  # pragma: no cover - compiled
    """``static_rows`` as a kernel (no temporaries): int64 (n,) -> int64 (n,)."""
    out = np.empty(keys.shape[0], dtype=np.int64)
    s = fmix64_one(np.uint64(seed) ^ STATIC_SEED)
    b = np.uint64(buckets)
    for i in range(keys.shape[0]):
        out[i] = np.int64(fmix64_one(np.uint64(keys[i]) ^ s) % b)
    return out


# --------------------------------------------------------------------------
# dedup + route (the client's pass over a batch)
# --------------------------------------------------------------------------


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
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
        h = mix64_one(k)
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


@njit(nogil=True, cache=True)
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
