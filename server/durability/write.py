"""Writing one shard's checkpoint: a table's snapshot streamed to its files (copy and write overlap), the manifest last, the directory renamed into place."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from embps.server.durability import arrayio
from embps.server.durability.arrayio import (
    _fsync_dir,
    _in_parallel,
    _io_pool,
    _write_npy,
)
from embps.server.durability.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    ShardCheckpoint,
)
from embps.server.tables import (
    CopyRows,
    Snapshot,
    copy_rows,
)

# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


_STREAM_MIN_BYTES = 1 << 22  # smaller arrays are copied whole, then written


class _Stream:
    """One array being copied under a table lock, chunk by chunk, while an I/O thread
    writes the chunks already copied (``_write_npy`` with ``ready=self.wait``)."""

    def __init__(self, dst: np.ndarray) -> None:
        self.dst = dst
        self._ready = 0  # bytes of dst that hold their final contents
        self._aborted = False
        self._cond = threading.Condition()

    def publish(self, nbytes: int) -> None:
        """The first ``nbytes`` bytes of dst are final."""
        with self._cond:
            self._ready = nbytes
            self._cond.notify_all()

    def abort(self) -> None:
        """The copy failed: the writer stops (its file is never used)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def wait(self, off: int) -> int:
        """Block until more than ``off`` bytes are final; returns how many are."""
        with self._cond:
            while self._ready <= off and not self._aborted:
                self._cond.wait()
            if self._ready <= off:
                raise CheckpointError("the snapshot copy was interrupted")
            return self._ready


class _StreamingCopy:
    """The ``copy`` a checkpoint passes to ``Table.snapshot`` (``tables.CopyRows``).

    HOW IT WORKS. A snapshot copies every array under the table's lock, so
    that values, slots and metadata are one moment of the table. Copying all
    of them and only then writing the files makes a checkpoint take copy time
    + write time. Here each large array's file is opened on the I/O pool as
    soon as its copy starts; the copy fills the private array in ``arrayio._CHUNK``
    pieces and publishes each, and the writer writes (and checksums) every
    piece once it is final. Copy and write overlap: a checkpoint takes about
    max(copy, write), and the lock is held exactly as long as before (the copy
    never waits for the disk). Every byte written is a byte of the private
    copy, so the snapshot stays consistent while pushes continue.
    """

    def __init__(self, tdir: Path) -> None:
        self.tdir = tdir
        self.streams: dict[str, tuple[np.ndarray, Future[str]]] = {}  # name -> (copy, crc32)
        self._live: list[_Stream] = []

    def __call__(self, name: str, src: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        n = src.shape[0] if rows is None else int(rows.shape[0])
        row_bytes = src.dtype.itemsize * math.prod(src.shape[1:])
        if n * row_bytes < _STREAM_MIN_BYTES or name in self.streams:
            return copy_rows(name, src, rows)  # written with the others after the snapshot
        dst = np.empty((n, *src.shape[1:]), dtype=src.dtype)
        stream = _Stream(dst)
        self._live.append(stream)
        self.streams[name] = (
            dst,
            _io_pool().submit(_write_npy, self.tdir / f"{name}.npy", dst, stream.wait),
        )
        step = max(1, arrayio._CHUNK // max(row_bytes, 1))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            if rows is None:
                dst[lo:hi] = src[lo:hi]
            else:  # mode="clip": rows are valid, and "raise" would buffer the output
                np.take(src, rows[lo:hi], axis=0, out=dst[lo:hi], mode="clip")
            stream.publish(hi * row_bytes)
        return dst

    def finish(self) -> None:
        """Stop every writer still waiting for a copy that will not come (the snapshot
        failed) and wait for all writers to end."""
        for st in self._live:
            st.abort()
        wait([fut for _, fut in self.streams.values()])


@dataclass(frozen=True)
class SnapshotSource:
    """A table's snapshot still to be taken: ``take(copy)`` calls ``Table.snapshot(..., copy=copy)``
    so that ``write_shard`` writes the arrays while they are being copied."""

    name: str
    take: Callable[[CopyRows], Snapshot]


def write_shard(
    snapshots: Iterable[Snapshot | SnapshotSource],
    ck: ShardCheckpoint,
    base_step: int | None = None,
) -> Path:
    """Write one shard's checkpoint atomically; returns its directory.

    snapshots: one per table, full ones (``base_version is None``) or
    increments over the checkpoint at ``base_step``; a ``SnapshotSource`` is
    taken here, its large arrays written while they are copied.
    """
    final = ck.path
    step_dir = final.parent
    step_dir.mkdir(parents=True, exist_ok=True)
    tmp = step_dir / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        tables = []
        for item in snapshots:
            name = item.name if isinstance(item, SnapshotSource) else item.config.name
            tdir = tmp / name
            tdir.mkdir()
            copier = _StreamingCopy(tdir)
            try:
                snap = item.take(copier) if isinstance(item, SnapshotSource) else item
            except BaseException:
                copier.finish()
                raise
            assert snap.config.name == name, (snap.config.name, name)
            arrays = dict(snap.arrays)
            if snap.deleted is not None:
                arrays["deleted.keys"] = snap.deleted
            names = sorted(arrays)
            rels = [f"{name}/{n}.npy" for n in names]
            streamed = {n: fut for n, (dst, fut) in copier.streams.items() if arrays.get(n) is dst}
            try:
                written = _in_parallel(
                    [
                        partial(arrayio.write_array, tmp / rel, arrays[n])
                        for n, rel in zip(names, rels, strict=True)
                        if n not in streamed
                    ]
                )
            finally:
                copier.finish()  # every copy is complete: the writers just run to their end
            for n in set(copier.streams) - set(streamed):  # a copy the snapshot did not keep
                (tdir / f"{n}.npy").unlink(missing_ok=True)
            crc_of = dict(zip([n for n in names if n not in streamed], written, strict=True))
            crc_of.update({n: fut.result() for n, fut in streamed.items()})
            crcs = [crc_of[n] for n in names]
            files = {
                name: {
                    "file": rel,
                    "dtype": arrays[name].dtype.str,
                    "shape": list(arrays[name].shape),
                    "crc32": crc,
                }
                for name, rel, crc in zip(names, rels, crcs, strict=True)
            }
            _fsync_dir(tdir)
            tables.append(
                {
                    "config": snap.config.to_dict(),
                    "state": snap.state,
                    "full": snap.base_version is None,
                    "base_version": snap.base_version,
                    "version": snap.version,
                    "epoch": snap.epoch,
                    "arrays": files,
                }
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": ck.step,
            "shard": ck.shard,
            "num_shards": ck.num_shards,
            "kind": "full" if all(t["full"] for t in tables) else "incremental",
            "base_step": base_step,
            "created_unix": time.time(),
            "tables": tables,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = step_dir / f".old-{final.name}-{time.monotonic_ns()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(step_dir)
        _fsync_dir(ck.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
