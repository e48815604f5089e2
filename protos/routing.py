"""Key routing: which shard owns a key. One function, shared by client and server.

``shard_of(keys, n) = mix64(key) % n`` where mix64 is the splitmix64 finalizer.
The shard tables hash keys with a different function (``embps.server.hashmap``),
so keys that share a shard do not share bucket bits.
"""

from __future__ import annotations

import numpy as np

_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of int64 keys (n,) -> uint64 (n,). Bijective, well mixed."""
    z = keys.astype(np.int64, copy=False).view(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _C1
    z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def shard_of(keys: np.ndarray, num_shards: int) -> np.ndarray:
    """Owning shard of each key: int64 (n,) -> int64 (n,) in [0, num_shards)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return np.zeros(keys.shape[0], dtype=np.int64)
    return (mix64(keys) % np.uint64(num_shards)).astype(np.int64)
