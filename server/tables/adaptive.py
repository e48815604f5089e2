"""Adaptive tables (Adaptive Embedding): a static part for rare keys, own rows for frequent ones, a count-min sketch deciding which."""

from __future__ import annotations

import numpy as np

from embps.protos.config import (
    SKETCH_DEFAULT_DEPTH,
    SKETCH_DEFAULT_WIDTH,
    TableConfig,
)
from embps.server.tables.base import PushResult, _smallest
from embps.server.tables.block import TRAINING, Block, Storage, unique_keys
from embps.server.tables.dynamic import _DynamicBase
from embps.server.tables.part import DynamicPart
from embps.server.tables.sketch import FrequencySketch


class AdaptiveTable(_DynamicBase):
    """Static part for rare keys, dynamic rows for frequent ones (Adaptive Embedding).

    A training sighting of a key in the static part counts in the sketch; at
    ``promote_threshold`` (or when the mask says so) the key gets a dynamic row
    initialised from its static row, optimizer slots included. Eviction and
    pruning demote keys back to the static part.
    """

    def __init__(self, config: TableConfig, storage: Storage = TRAINING) -> None:
        super().__init__(config, storage)
        b = config.hash_bucket_size
        self.static = Block(b, config.dim, self.n_slots, storage)
        self.static.init(
            np.arange(b, dtype=np.int64), np.arange(b, dtype=np.int64), config, config.seed
        )
        self.part = DynamicPart(
            config.dim, self.n_slots, config.initial_capacity, self.row_limit, storage
        )
        self.sketch = FrequencySketch(config.sketch_width or SKETCH_DEFAULT_WIDTH,
                                      config.sketch_depth or SKETCH_DEFAULT_DEPTH)  # fmt: skip

    def _blocks(self) -> dict[str, Block]:
        return {"static": self.static}

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
        part.block.gather(rows, 0.0, out)
        st = np.flatnonzero(rows < 0)
        if st.shape[0]:
            srows = self.static_rows_of(keys[st])
            if train:
                self._touch(self.static, srows)
            sout = np.empty((st.shape[0], self.dim), dtype=np.float32)
            self.static.gather(srows, 0.0, sout)
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
