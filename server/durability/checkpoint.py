"""One shard's checkpoints: the ``Checkpointer`` (policy: full or incremental, the chain
base, the periodic thread, the exit checkpoint) and its result. The format and the
guarantees are in this package's docstring (``embps.server.durability``)."""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from embps.server.durability.manifest import (
    MANIFEST,
    CheckpointError,
    ShardCheckpoint,
    latest_step,
    list_steps,
    read_manifest,
)
from embps.server.durability.write import SnapshotSource, write_shard
from embps.server.metrics import ShardMetrics
from embps.server.periodic import Periodic
from embps.server.tables import (
    CopyRows,
    Snapshot,
    Table,
)

log = logging.getLogger("embps.server")


# --------------------------------------------------------------------------
# Array files
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# One shard's checkpoints: policy, chain base, periodic thread
# --------------------------------------------------------------------------


class CheckpointConflict(CheckpointError):
    """A checkpoint that would break an existing chain (overwriting the base of an increment)."""


@dataclass(frozen=True)
class CheckpointResult:
    """What one shard's checkpoint wrote.

    kind: "full" or "incremental" (over ``base_step``); bytes: array bytes written.
    """

    step: int
    shard: int
    num_shards: int
    path: Path
    kind: str
    base_step: int | None
    tables: int
    bytes: int
    seconds: float


class Checkpointer:
    """Writes one shard's checkpoints under ``root``, one at a time, full or incremental.

    HOW IT WORKS. Each table is snapshotted under its own lock (values, slots and
    metadata consistent with each other; pushes to other tables go on) and
    written before the next table is copied, so the extra memory is one table's
    copy. After a checkpoint is durable, the checkpointer remembers per table
    the version it showed and the table object itself: the next incremental
    checkpoint asks each table for the rows changed and keys deleted since that
    version (``Table.snapshot(since_version=v)``) and lets the table forget its
    deletion log up to v. A table created (or dropped and created again) since
    then, or one whose deletion log overflowed, is written whole.

    POLICY. ``full_every`` K >= 2: every K-th checkpoint is full, the others
    incremental; 0 or 1: always full. A call may ask for a kind; an increment
    needs a base of a lower step written by this process, else it is full.

    EVICTION. ``before_snapshot(table)`` runs just before each table is copied: the
    shard passes its eviction sweep (DeepRec evicts at save), so a checkpoint never
    holds rows past steps_to_live or under l2_evict_threshold, and the keys evicted
    reach the increment as deletions.

    STEPS of automatic checkpoints (periodic, on exit) are the newest complete
    step under ``root`` plus one: shards that checkpoint together (the same
    period boundary, the same SIGTERM) agree on it without talking.

    Failures (disk full, a file where a directory belongs) raise, are logged
    and counted in ``embps_checkpoint_failures_total``; the previous checkpoint
    stays as it was and the next increment still builds on it.
    """

    def __init__(
        self,
        root: Path | str,
        shard: int,
        num_shards: int,
        tables: Callable[[], list[Table]],
        full_every: int = 0,
        metrics: ShardMetrics | None = None,
        before_snapshot: Callable[[Table], object] | None = None,
    ) -> None:
        if full_every < 0:
            raise ValueError(f"full_every must be >= 0, got {full_every}")
        self.root = Path(root)
        self.shard = shard
        self.num_shards = num_shards
        self.full_every = full_every
        self._tables = tables
        self._metrics = metrics
        self._before_snapshot = before_snapshot
        self._lock = threading.Lock()
        self._base_step: int | None = None
        self._base: dict[str, tuple[Table, int]] = {}
        self._since_full = 0
        self._periodic: Periodic | None = None

    # ---------------------------------------------------------------- API
    def checkpoint(self, step: int, incremental: bool | None = None) -> CheckpointResult:
        """Write ``<root>/<step>/shard-<i>-of-<n>/``; returns what was written.

        incremental: None follows the policy; True writes an increment if there
        is a base to build on (else a full checkpoint); False writes a full one.
        Raises OSError (disk), CheckpointConflict (the step is the base of a
        later increment) or ValueError (a negative step); the failure is logged
        and counted.
        """
        with self._lock:
            t0 = time.monotonic()
            try:
                res = self._write(step, incremental, t0)
            except Exception as e:
                if self._metrics is not None:
                    self._metrics.checkpoint_failures.inc()
                log.error(
                    "shard %d: checkpoint of step %s into %s failed: %s: %s (the previous "
                    "checkpoint is intact)",
                    self.shard,
                    step,
                    self.root,
                    type(e).__name__,
                    e,
                )
                raise
            if self._metrics is not None:
                self._metrics.checkpoint_done(res.kind, res.seconds)
            over = f" over step {res.base_step}" if res.kind == "incremental" else ""
            log.info(
                "shard %d: %s checkpoint%s written to %s: %d tables, %.1f MB in %.2fs",
                self.shard,
                res.kind,
                over,
                res.path,
                res.tables,
                res.bytes / 1e6,
                res.seconds,
            )
            return res

    def next_auto_step(self) -> int:
        """Step of an automatic checkpoint: the newest complete step under root (on a
        private volume: this shard's newest), plus one."""
        latest = latest_step(self.root, self.shard, self.num_shards)
        return 0 if latest is None else latest + 1

    def start_periodic(self, every_s: float) -> None:
        """Checkpoint every ``every_s`` seconds, at multiples of it on the wall clock
        (so every shard of a cluster fires together), until ``stop_periodic``."""
        if self._periodic is not None:
            return
        self._periodic = Periodic(
            f"embps-checkpoint-{self.shard}",
            every_s,
            lambda: self.checkpoint(self.next_auto_step()),  # logged and counted there
        )

    def stop_periodic(self) -> None:
        """Stop the periodic thread; waits for a checkpoint it is writing."""
        if self._periodic is not None:
            self._periodic.stop()
            self._periodic = None

    # ---------------------------------------------------------------- internals
    def _write(self, step: int, incremental: bool | None, t0: float) -> CheckpointResult:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be an integer >= 0, got {step!r}")
        ck = ShardCheckpoint(self.root, step, self.shard, self.num_shards)
        if (ck.path / MANIFEST).is_file():
            self._check_not_a_base(step)
        self._remove_stale(ck)
        if incremental is None:
            incremental = self.full_every > 1 and self._since_full < self.full_every - 1
        base_step = self._base_step
        inc = bool(incremental) and base_step is not None and step > base_step
        written: dict[str, tuple[Table, int]] = {}
        nbytes = 0
        increments = 0

        def take(table: Table, copy: CopyRows) -> Snapshot:
            nonlocal nbytes, increments
            if self._before_snapshot is not None:  # the shard's eviction sweep
                self._before_snapshot(table)
            snap = None
            base = self._base.get(table.name) if inc else None
            if base is not None and base[0] is table:
                try:
                    snap = table.snapshot(since_version=base[1], copy=copy)
                    increments += 1
                except ValueError as e:  # raised before anything is copied
                    log.info("shard %d: %s; writing it whole", self.shard, e)
            if snap is None:
                snap = table.snapshot(copy=copy)
            written[table.name] = (table, snap.version)
            nbytes += sum(int(a.nbytes) for a in snap.arrays.values())
            nbytes += int(snap.deleted.nbytes) if snap.deleted is not None else 0
            return snap

        def snapshots() -> Iterator[SnapshotSource]:
            for table in self._tables():
                yield SnapshotSource(table.name, partial(take, table))

        path = write_shard(snapshots(), ck, base_step=base_step if inc else None)
        for table, version in written.values():
            table.trim_deleted(version)
        kind = "incremental" if increments else "full"
        self._base, self._base_step = written, step
        self._since_full = self._since_full + 1 if increments else 0
        return CheckpointResult(
            step=step,
            shard=self.shard,
            num_shards=self.num_shards,
            path=path,
            kind=kind,
            base_step=base_step if increments else None,
            tables=len(written),
            bytes=nbytes,
            seconds=time.monotonic() - t0,
        )

    def _remove_stale(self, ck: ShardCheckpoint) -> None:
        """Delete what a killed writer of this shard left in the step directory (``.tmp-*``,
        ``.old-*``): under this lock no other writer of the shard can be running."""
        step_dir = ck.path.parent
        if not step_dir.is_dir():
            return
        for prefix in (".tmp-", ".old-"):
            for d in step_dir.glob(f"{prefix}{ck.path.name}-*"):
                log.info("shard %d: removing %s, left by an interrupted checkpoint", self.shard, d)
                shutil.rmtree(d, ignore_errors=True)

    def _check_not_a_base(self, step: int) -> None:
        """Refuse to overwrite a step that a later increment of this shard builds on."""
        for other in list_steps(self.root):
            if other <= step:
                continue
            path = ShardCheckpoint(self.root, other, self.shard, self.num_shards).path
            if not (path / MANIFEST).is_file():
                continue
            try:
                base = read_manifest(path).get("base_step")
            except CheckpointError:
                continue
            if base == step:
                raise CheckpointConflict(
                    f"step {step} is the base of the incremental checkpoint {path}; writing it "
                    "again would break that chain: checkpoint a new step"
                )


def is_disk_full(err: OSError) -> bool:
    """True for ENOSPC / EDQUOT: the checkpoint did not fit on the disk."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)
