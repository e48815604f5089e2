"""What a sharded cluster must compute, written with in-process Engines (no gRPC).

``ShardedModel(n)`` holds one ``Engine`` per shard and applies the client's
documented semantics with plain numpy:

* pull: dedup the batch; each shard gets its distinct keys in the order of
  their first occurrence in the batch; a key's mask is the OR over its
  duplicates; rows go back by the inverse.
* push: gradients of duplicate keys summed in batch order (float32); every
  shard gets one push per call, an empty one if it owns none of the keys.

With n = 1 this is exactly one in-process Engine fed deduplicated batches.
"""

from __future__ import annotations

import numpy as np

from embps.protos.config import TableConfig
from embps.protos.routing import shard_of
from embps.server.engine import Engine


class ShardedModel:
    """n in-process engines routed like PSClient routes."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.engines = [Engine() for _ in range(n)]

    def create(self, cfg: TableConfig) -> None:
        for e in self.engines:
            e.create_table(cfg)

    def _split(self, keys: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = np.asarray(keys, dtype=np.int64).reshape(-1)
        uniq, index, inverse = np.unique(k, return_index=True, return_inverse=True)
        order = np.argsort(index)  # first-occurrence order
        pos = np.empty_like(order)
        pos[order] = np.arange(order.shape[0])
        return uniq[order], pos[inverse.reshape(-1)], shard_of(uniq[order], self.n)

    def pull(
        self, name: str, keys: object, train: bool = True, mask: object | None = None
    ) -> np.ndarray:
        """float32 (n, dim) in the order of ``keys`` (flattened)."""
        uniq, inverse, owner = self._split(keys)
        dim = self.engines[0].table(name).dim
        umask = None
        if mask is not None:
            umask = np.zeros(uniq.shape[0], dtype=bool)
            np.logical_or.at(umask, inverse, np.asarray(mask, dtype=bool).reshape(-1))
        out = np.zeros((uniq.shape[0], dim), dtype=np.float32)
        for s, engine in enumerate(self.engines):
            sel = owner == s
            if sel.any():
                m = None if umask is None else umask[sel]
                out[sel] = engine.table(name).pull(uniq[sel], train=train, mask=m)
        return out[inverse]

    def push(
        self, name: str, keys: object, grads: np.ndarray, step: int | None = None
    ) -> tuple[int, int]:
        """(applied, dropped) summed over shards."""
        uniq, inverse, owner = self._split(keys)
        g = np.asarray(grads, dtype=np.float32)
        g = g.reshape(inverse.shape[0], g.shape[-1])
        ug = np.zeros((uniq.shape[0], g.shape[1]), dtype=np.float32)
        np.add.at(ug, inverse, g)
        applied = dropped = 0
        for s, engine in enumerate(self.engines):
            sel = owner == s
            r = engine.table(name).push(uniq[sel], ug[sel], step=step)
            applied += r.applied
            dropped += r.dropped
        return applied, dropped

    def prune(self, name: str, threshold: float, norm: str = "l2") -> tuple[int, int]:
        """(rows, bytes) freed, summed over shards."""
        rows = nbytes = 0
        for e in self.engines:
            r = e.table(name).prune(threshold, norm)
            rows += r.rows
            nbytes += r.bytes
        return rows, nbytes

    def stats(self, name: str) -> list[dict[str, object]]:
        """Per-shard stats of one table."""
        return [e.table(name).stats().as_dict() for e in self.engines]
