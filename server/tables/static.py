"""Static tables: ``hash_bucket_size`` shared rows, row = h(key) % B (the hashing trick)."""

from __future__ import annotations

import numpy as np

from embps.protos.config import (
    TableConfig,
)
from embps.server.tables.base import PushResult, Table
from embps.server.tables.block import TRAINING, Block, Storage
from embps.server.tables.part import DynamicPart


class StaticTable(Table):
    """``hash_bucket_size`` shared rows; row = h(key) % B (the hashing trick)."""

    def __init__(self, config: TableConfig, storage: Storage = TRAINING) -> None:
        super().__init__(config, storage)
        b = config.hash_bucket_size
        self.block = Block(b, config.dim, self.n_slots, storage)
        self.block.init(
            np.arange(b, dtype=np.int64), np.arange(b, dtype=np.int64), config, config.seed
        )

    def _blocks(self) -> dict[str, Block]:
        return {"static": self.block}

    def _pull(
        self, keys: np.ndarray, train: bool, mask: np.ndarray | None, out: np.ndarray
    ) -> None:
        rows = self.static_rows_of(keys)
        if train:
            self._touch(self.block, rows)
        self.block.gather(rows, 0.0, out)

    def _push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> PushResult:
        self._apply(self.block, self.static_rows_of(keys), grads, step)
        return PushResult(applied=keys.shape[0], dropped=0)

    def feed_parts(self) -> list[DynamicPart | Block]:
        return [self.block]

    def _sizes(self) -> tuple[int, int, int, int, int, float]:
        b = self.block.nbytes
        return b, 0, b, 0, self.block.rows, 0.0
