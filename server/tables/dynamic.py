"""Dynamic tables: a collision-free row per admitted key (``DynamicPart``: hash map + growable Block + free list), with admission, eviction and pruning (``_DynamicBase``, shared with adaptive tables)."""

from __future__ import annotations

import numpy as np

from embps.protos.config import (
    SKETCH_DEFAULT_DEPTH,
    SKETCH_DEFAULT_WIDTH,
    Eviction,
    Norm,
    TableConfig,
)
from embps.server.errors import ResourceExhausted
from embps.server.kernels.rows import row_norms
from embps.server.tables.base import (
    _NORM_CODE,
    DELETED_LOG_MAX,
    PushResult,
    Table,
    _smallest,
    row_limit,
    unique_keys,
)
from embps.server.tables.block import TRAINING, Block, Storage
from embps.server.tables.part import DynamicPart
from embps.server.tables.sketch import FrequencySketch


class _DynamicBase(Table):
    """Shared logic of tables with a dynamic part: capacity, eviction, pruning."""

    part: DynamicPart

    def _narrowed(self) -> None:
        self.row_limit = row_limit(self.config)

    def __init__(self, config: TableConfig, storage: Storage = TRAINING) -> None:
        super().__init__(config, storage)
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

    def __init__(self, config: TableConfig, storage: Storage = TRAINING) -> None:
        super().__init__(config, storage)
        self.part = DynamicPart(
            config.dim, self.n_slots, config.initial_capacity, self.row_limit, storage
        )
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
        part.block.gather(rows, self.config.default_value, out)

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
