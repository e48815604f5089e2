"""Eviction sweeps of one shard: steps-to-live and L2-threshold eviction, by trigger.

A table's ``steps_to_live`` and ``l2_evict_threshold`` act through three triggers,
the ones PSes users know (DeepRec evicts at save; TFRA and Monolith on a timer):

- ``checkpoint``: before each table is copied into a checkpoint (every checkpoint:
  the Checkpoint RPC, ``--checkpoint-every``, the exit checkpoint);
- ``periodic``: every ``--evict-every`` seconds (default 60; 0: off), at multiples of
  it on the wall clock;
- ``rpc``: the admin ``Evict`` call (``PSClient.evict``).

Capacity evictions (lfu/lru at ``max_rows`` / ``max_bytes``) are not sweeps: they
happen inside the pull that needs the room, and are counted with reason
``capacity``. Each sweep pages through the table (``Table.evict``), so a large
table's sweep never holds its lock for long.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from embps.server.metrics import ShardMetrics
from embps.server.periodic import Periodic
from embps.server.tables import EvictResult, Table

log = logging.getLogger("embps.server")

TRIGGERS = ("checkpoint", "periodic", "rpc")


class Evictor:
    """Runs eviction sweeps over a shard's tables and records them in its metrics.

    One sweep per table at a time: a sweep for a table already being swept by
    another trigger waits for it (the second finds little left to do).
    """

    def __init__(
        self, shard: int, tables: Callable[[], list[Table]], metrics: ShardMetrics | None = None
    ) -> None:
        self.shard = shard
        self._tables = tables
        self._metrics = metrics
        self._lock = threading.Lock()
        self._periodic: Periodic | None = None

    def sweep(self, tables: list[Table] | None = None, trigger: str = "rpc") -> list[EvictResult]:
        """Evict in ``tables`` (None: every table of the shard), in order; one result each."""
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown eviction trigger {trigger!r}; use one of {TRIGGERS}")
        out = []
        with self._lock:
            for table in self._tables() if tables is None else tables:
                res = table.evict()
                if self._metrics is not None and table.evicts:
                    self._metrics.eviction_sweep_done(trigger, res.seconds)
                if res.rows:
                    log.info(
                        "shard %d: %s eviction in table %r: %d rows (%d steps_to_live, %d l2), "
                        "%.1f MB, %.3fs",
                        self.shard, trigger, res.table, res.rows, res.steps_to_live_rows,
                        res.l2_rows, res.bytes / 1e6, res.seconds,
                    )  # fmt: skip
                out.append(res)
        return out

    def before_checkpoint(self, table: Table) -> None:
        """The checkpointer's hook: sweep ``table`` just before it is copied."""
        self.sweep([table], "checkpoint")

    def start_periodic(self, every_s: float) -> None:
        """Sweep every table every ``every_s`` seconds until ``stop_periodic``."""
        if self._periodic is None:
            self._periodic = Periodic(
                f"embps-evict-{self.shard}", every_s, lambda: self.sweep(trigger="periodic")
            )

    def stop_periodic(self) -> None:
        """Stop periodic sweeps; waits for one in progress."""
        if self._periodic is not None:
            self._periodic.stop()
            self._periodic = None
