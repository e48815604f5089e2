"""Checkpoints on disk: crash-safe writes, verified reads, incremental chains, resharding.

LAYOUT
======
    <root>/<step>/shard-<i>-of-<n>/
        manifest.json                 format, step, shard, tables, files, checksums
        <table>/<part>.<field>.npy    one array per file (NumPy .npy, no pickle)

``<step>`` is a decimal integer directory. A shard directory is written as a
whole or not at all: arrays and the manifest go into a hidden temporary
directory beside it, every file is fsynced, the directory is renamed into
place and its parent fsynced. A crash or kill -9 at any moment leaves either
the old state or the new one; directories whose names start with "." are
never read. A checkpoint of step s is complete when all n shard directories
exist.

Manifest (format_version 1)::

    {"format": "embps-checkpoint", "format_version": 1, "step": 12, "shard": 0,
     "num_shards": 2, "kind": "full" | "incremental", "base_step": null | 10,
     "tables": [{"config": {...TableConfig.to_dict()...}, "state": {...},
                 "full": true, "base_version": null, "version": 57,
                 "arrays": {"dynamic.keys": {"file": "t/dynamic.keys.npy",
                            "dtype": "<i8", "shape": [n], "crc32": "1a2b3c4d"}, ...}}]}

An incremental checkpoint holds, per table, the rows changed since the
previous checkpoint (``base_step``) and the keys deleted since then; a table
created after the base is written whole (``"full": true``). Restoring step s
loads the chain from the last full entry of each table up to s, in order.

Reading verifies every file's CRC-32 before use and refuses (``CheckpointError``,
naming the file) a missing, truncated or corrupt file; arrays are parsed from
the .npy header with object dtypes rejected, so loading never executes data.
Files are read in pieces on parallel threads, each piece checksummed by its
reader and the CRCs combined (``crc32_combine``), large uncached files with
direct I/O (see "Reading" below). A restore onto the same shard count builds a
table's hash map from its keys, read first, while the large arrays are still
arriving; the table gets its rows only after every file passed its check.

Resharding (N -> M): own rows (dynamic parts) go to the shard that owns their
key under M. Shared blocks (static and qr parts, which are per shard) are
copied when N == M and averaged over the N old shards otherwise; sketches are
summed (count-min sketches of disjoint key sets add up to a valid sketch).
"""

from __future__ import annotations

import errno
import functools
import io
import json
import logging
import math
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from embps.protos.config import TableConfig
from embps.protos.routing import shard_of
from embps.server.metrics import ShardMetrics
from embps.server.periodic import Periodic
from embps.server.tables import (
    BLOCK_FIELDS,
    CopyRows,
    RowIndex,
    Snapshot,
    Table,
    copy_rows,
    make_table,
)

log = logging.getLogger("embps.server")

FORMAT = "embps-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 24  # bytes per write (and per copy step of a streamed snapshot)
_READ_CHUNK = 1 << 25  # bytes per piece read (and checksummed) by one reader thread
T = TypeVar("T")


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file."""


@dataclass(frozen=True)
class ShardCheckpoint:
    """Where one shard's checkpoint of one step lives."""

    root: Path
    step: int
    shard: int
    num_shards: int

    @property
    def path(self) -> Path:
        """The shard's directory."""
        return self.root / str(self.step) / shard_dir_name(self.shard, self.num_shards)


def shard_dir_name(shard: int, num_shards: int) -> str:
    """``shard-<i>-of-<n>``."""
    return f"shard-{shard}-of-{num_shards}"


# --------------------------------------------------------------------------
# Array files
# --------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RunningCrc:
    """CRC-32 of a stream of chunks, computed on a worker thread beside the caller's I/O.

    ``zlib.crc32`` and file reads and writes release the GIL, so checksumming
    chunk i overlaps the write (or read) of chunk i + 1: a checkpoint streams at
    disk speed instead of disk time + CRC time. Chunks are folded in the order
    they are added (one worker, FIFO).
    """

    def __init__(self, start: int = 0) -> None:
        self._crc = start
        self._last: Future[None] | None = None

    def add(self, chunk: memoryview) -> None:
        """Fold ``chunk`` in (asynchronously for big chunks); keep it unchanged until ``hex``."""
        if len(chunk) < _INLINE_CRC_BYTES and self._last is None:
            self._crc = zlib.crc32(chunk, self._crc)
        else:
            self._last = _crc_pool().submit(self._fold, chunk)

    def _fold(self, chunk: memoryview) -> None:
        self._crc = zlib.crc32(chunk, self._crc)

    def hex(self) -> str:
        """The CRC-32 of everything added, as 8 hex digits (waits for the worker)."""
        if self._last is not None:
            self._last.result()
        return f"{self._crc & 0xFFFFFFFF:08x}"


# CRC-32 of a concatenation from the CRCs of its parts (zlib's crc32_combine, which
# Python's zlib module does not expose). The CRC register of A + B is crc(A) times
# x^(8 len(B)) plus crc(B), in GF(2)[x] modulo the CRC-32 polynomial; zlib (1.2.12 on)
# multiplies polynomials (``multmodp``) where older versions multiplied 32x32 GF(2)
# matrices: the same values, fewer operations. Bit order is reflected, as in CRC-32
# itself: bit 31 of a register is the coefficient of x^0.

_CRC_POLY = 0xEDB88320  # the CRC-32 (IEEE 802.3) polynomial, reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial; ``a`` must not be 0."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


def _x2n_table() -> tuple[int, ...]:
    """x^(2^k) modulo the polynomial for k = 0..31 (the powers repeat with period 32)."""
    p, out = 1 << 30, [1 << 30]  # x^1
    for _ in range(31):
        p = _multmodp(p, p)
        out.append(p)
    return tuple(out)


_X2N = _x2n_table()


@functools.lru_cache(maxsize=256)
def _zeros_operator(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the polynomial: what appending ``nbytes`` bytes multiplies a
    CRC register by (cached: a read combines many pieces of one length)."""
    p, k = 1 << 31, 3  # x^0; 8 * nbytes = nbytes * 2^3
    while nbytes:
        if nbytes & 1:
            p = _multmodp(_X2N[k & 31], p)
        nbytes >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)`` and
    ``len2 = len(b)`` (bytes, >= 0), without the data: checksums of pieces computed apart
    (on several threads) combine into the CRC-32 of the whole file."""
    if len2 < 0:
        raise ValueError(f"len2 must be >= 0, got {len2}")
    return _multmodp(_zeros_operator(len2), crc1 & 0xFFFFFFFF) ^ (crc2 & 0xFFFFFFFF)


_CRC_POOL: ThreadPoolExecutor | None = None
_CRC_POOL_LOCK = threading.Lock()
_INLINE_CRC_BYTES = 1 << 20


def _crc_pool() -> ThreadPoolExecutor:
    global _CRC_POOL
    with _CRC_POOL_LOCK:
        if _CRC_POOL is None:
            _CRC_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embps-crc")
        return _CRC_POOL


_IO_THREADS = 4  # files of one table written (or read) at once: a disk takes parallel streams
_IO_POOL: ThreadPoolExecutor | None = None


def _io_pool() -> ThreadPoolExecutor:
    global _IO_POOL
    with _CRC_POOL_LOCK:
        if _IO_POOL is None:
            _IO_POOL = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="embps-io")
        return _IO_POOL


def _in_parallel(jobs: list[Callable[[], T]]) -> list[T]:
    """Run file jobs on the I/O pool; their results in order. Waits for every job before
    raising the first failure, so no job outlives the caller's cleanup."""
    if len(jobs) <= 1:
        return [job() for job in jobs]
    futs = [_io_pool().submit(job) for job in jobs]
    wait(futs)
    return [f.result() for f in futs]  # raises the first failure


def write_array(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy, fsync it, and return the CRC-32 (hex) of the file's bytes."""
    return _write_npy(path, np.ascontiguousarray(arr))


def _write_npy(path: Path, arr: np.ndarray, ready: Callable[[int], int] | None = None) -> str:
    """``write_array`` of a C-contiguous ``arr``; ``ready(off)`` (if given) blocks until more
    than ``off`` bytes of ``arr`` hold their final contents and returns how many do: the file
    is written while the array is still being filled (``_StreamingCopy``)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    header = head.getvalue()
    data = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b"")  # type: ignore[arg-type]
    crc = _RunningCrc(zlib.crc32(header))
    try:
        with open(path, "wb") as f:
            f.write(header)
            off, total = 0, len(data)
            while off < total:
                end = total if ready is None else ready(off)
                while off < end:
                    chunk = data[off : min(end, off + _CHUNK)]
                    crc.add(chunk)
                    f.write(chunk)
                    off += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:  # write, flush and fsync errors (disk full) name no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return crc.hex()


def read_array(path: Path, crc32: str) -> np.ndarray:
    """Read a .npy file written by ``write_array``, verifying its CRC-32 first.

    Raises CheckpointError naming the file when it is missing, truncated,
    corrupt or holds an object dtype.
    """
    return _read_arrays([_FileSpec(path, crc32)])[0]


# --------------------------------------------------------------------------
# Reading: pieces on parallel threads, direct I/O, CRC-32 per piece
# --------------------------------------------------------------------------
#
# HOW IT WORKS. Every file of a checkpoint entry is opened and given its final
# buffer at once, then split into _READ_CHUNK pieces; the read pool (_READ_THREADS
# threads) reads each piece with ``os.preadv`` straight into that buffer and
# checksums it (``zlib.crc32`` releases the GIL: the checksums run on both cores,
# beside the reads still in flight). The caller's thread folds the per-piece
# CRCs in file order with ``crc32_combine`` (the same CRC-32 as one pass over the
# file: the format is unchanged) and checks each file as soon as its last piece
# is in, while later files are still being read.
#
# Direct I/O. A file of _DIRECT_MIN_BYTES or more whose middle page is not in
# the page cache is read with O_DIRECT: the disk writes into the buffer, with no
# page-cache copy to allocate, fill and copy out (on the benchmark VM, a buffered
# read of 1.6 GB cost 0.25 to 4 s of CPU, nearly all of it in the kernel). A file
# already cached (a restore right after a checkpoint on the same node) is read
# through the cache, which is faster then. Filesystems without O_DIRECT (tmpfs
# on older kernels) and a read the kernel refuses (EINVAL: alignment) fall back
# to ordinary reads of the same bytes.


_READ_THREADS = 16  # pieces in flight: the disk (a VM's virtio queue) serves them in parallel
_DIRECT_MIN_BYTES = 1 << 22  # smaller files are read through the page cache
_DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: multiples of this
_READ_POOL: ThreadPoolExecutor | None = None


def _read_pool() -> ThreadPoolExecutor:
    global _READ_POOL
    with _CRC_POOL_LOCK:
        if _READ_POOL is None:
            _READ_POOL = ThreadPoolExecutor(
                max_workers=_READ_THREADS, thread_name_prefix="embps-read"
            )
        return _READ_POOL


@dataclass(frozen=True)
class _FileSpec:
    """A file to read: its CRC-32 (hex) and, from a manifest, the array it must hold."""

    path: Path
    crc32: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    @property
    def array_bytes(self) -> int | None:
        """Bytes of the array the manifest promises (None: no manifest)."""
        if self.dtype is None or self.shape is None:
            return None
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)


class _OpenFile:
    """One file being read: its descriptors, size and final buffer (uint8, >= size bytes)."""

    def __init__(self, spec: _FileSpec) -> None:
        self.spec = spec
        self.fd = os.open(spec.path, os.O_RDONLY)
        self.dfd: int | None = None  # an O_DIRECT descriptor when the file is read directly
        try:
            self.size = os.fstat(self.fd).st_size
            if self.size >= _DIRECT_MIN_BYTES and not _page_cached(self.fd, self.size):
                self.dfd = _open_direct(spec.path)
            if self.dfd is None:
                self.buf = np.empty(self.size, dtype=np.uint8)  # every byte is read below
            else:  # whole blocks, at a block-aligned address
                span = -(-self.size // _DIRECT_ALIGN) * _DIRECT_ALIGN
                raw = np.empty(span + _DIRECT_ALIGN, dtype=np.uint8)
                lead = -raw.ctypes.data % _DIRECT_ALIGN
                self.buf = raw[lead : lead + span]
        except BaseException:
            self.close()
            raise

    @property
    def direct(self) -> bool:
        """Whether the file is read with O_DIRECT."""
        return self.dfd is not None

    def read_piece(self, lo: int, hi: int) -> tuple[int, int]:
        """Read bytes [lo, hi) into the buffer and checksum them; returns (bytes read, their
        CRC-32). Fewer bytes only at the end of the file (one truncated while being read).
        One read call per piece: 4 MiB calls, each checksummed at once, were 10% slower."""
        view = memoryview(self.buf)  # type: ignore[arg-type]
        got = lo
        direct = self.dfd is not None
        while got < hi:
            if direct:
                end = min(len(self.buf), -(-hi // _DIRECT_ALIGN) * _DIRECT_ALIGN)  # whole blocks
                try:
                    n = os.preadv(self.dfd, [view[got:end]], got)  # type: ignore[arg-type]
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    direct = False  # refused (alignment): the rest through the page cache
                    continue
            else:
                n = os.preadv(self.fd, [view[got:hi]], got)
            if n <= 0:
                break
            got = min(got + n, hi)
        return got - lo, zlib.crc32(view[lo:got])

    def close(self) -> None:
        """Close the descriptors (once; the buffer stays)."""
        for fd in (self.fd, self.dfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd, self.dfd = -1, None


def _page_cached(fd: int, size: int) -> bool:
    """Whether the page in the middle of the file is in the page cache (a non-blocking 1-byte
    read works there). The middle, not the header that a tool may have read alone; a miss
    may start readahead of the pages around it, so ask once per read."""
    try:
        os.preadv(fd, [bytearray(1)], size // 2, os.RWF_NOWAIT)
    except (OSError, AttributeError):  # EAGAIN: not cached; or no RWF_NOWAIT here
        return False
    return True


def _open_direct(path: Path) -> int | None:
    """An O_DIRECT descriptor of ``path``, or None where the filesystem has no direct I/O."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None


def _read_arrays(
    specs: list[_FileSpec],
    progress: Progress | None = None,
    on_read: Callable[[int, np.ndarray], None] | None = None,
) -> list[np.ndarray]:
    """Read and verify several .npy files at once; their arrays, in the order of ``specs``.

    Every byte is CRC-checked before the file's array is handed out. progress(nbytes):
    called (in this thread) as array bytes arrive, in file order. on_read(i, array): called
    (in this thread) as soon as file i is read and verified, while later files are still
    being read. Raises CheckpointError naming the file (missing, truncated, corrupt, not a
    plain array, not what its manifest entry says); no read outlives the call.
    """
    files: list[_OpenFile] = []
    pieces: list[list[Future[tuple[int, int]]]] = []
    pool = _read_pool()
    try:
        for spec in specs:
            try:
                f = _OpenFile(spec)
            except OSError as e:
                raise CheckpointError(f"cannot read checkpoint file {spec.path}: {e}") from e
            files.append(f)
            want = spec.array_bytes
            if want is not None and f.size < want:
                raise CheckpointError(
                    f"checkpoint file {spec.path} is truncated ({f.size} bytes; its array "
                    f"alone is {want} bytes)"
                )
            pieces.append(
                [
                    pool.submit(f.read_piece, lo, min(f.size, lo + _READ_CHUNK))
                    for lo in range(0, f.size, _READ_CHUNK)
                ]
            )
        out = []
        for i, (f, futs) in enumerate(zip(files, pieces, strict=True)):
            crc, got, reported = 0, 0, 0
            for fut in futs:
                try:
                    n, piece_crc = fut.result()
                except OSError as e:
                    raise CheckpointError(f"cannot read checkpoint file {f.spec.path}: {e}") from e
                crc = crc32_combine(crc, piece_crc, n)
                got += n
                if progress is not None and f.spec.array_bytes is not None:
                    now = min(got, f.spec.array_bytes)
                    progress(now - reported)
                    reported = now
            arr = _parse_verified(f, got, crc)
            if on_read is not None:
                on_read(i, arr)
            out.append(arr)
        return out
    finally:
        wait([fut for futs in pieces for fut in futs])
        for f in files:
            f.close()


def _parse_verified(f: _OpenFile, got: int, crc: int) -> np.ndarray:
    """The array of a file read whole (``got`` bytes, CRC-32 ``crc``): CheckpointError unless
    the CRC matches, the header is a plain .npy 1.0 header and the array fits the manifest."""
    path = f.spec.path
    if got != f.size:
        raise CheckpointError(f"checkpoint file {path} is truncated (read {got} of {f.size} bytes)")
    have = f"{crc & 0xFFFFFFFF:08x}"
    if have != f.spec.crc32:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: CRC-32 {have} != {f.spec.crc32} "
            "in the manifest; restore an older checkpoint"
        )
    try:
        bio = io.BytesIO(memoryview(f.buf)[: min(got, 65536)])  # type: ignore[arg-type]
        major, _minor = np.lib.format.read_magic(bio)
        if major != 1:
            raise ValueError(f"npy format version {major} (expected 1)")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(bio)
        if dtype.hasobject or fortran:
            raise ValueError("object or Fortran-ordered arrays are not allowed")
        count = int(np.prod(shape)) if shape else 1
        arr = np.frombuffer(f.buf[:got], dtype=dtype, count=count, offset=bio.tell())
    except ValueError as e:
        raise CheckpointError(f"checkpoint file {path} is not a valid array: {e}") from e
    arr = arr.reshape(shape)
    if f.spec.dtype is not None and (
        arr.dtype.str != f.spec.dtype or arr.shape != tuple(f.spec.shape or ())
    ):
        raise CheckpointError(f"checkpoint file {path} does not match its manifest entry")
    return arr


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
    soon as its copy starts; the copy fills the private array in ``_CHUNK``
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
        step = max(1, _CHUNK // max(row_bytes, 1))
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
                        partial(write_array, tmp / rel, arrays[n])
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


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


def list_steps(root: Path | str) -> list[int]:
    """Steps under ``root`` with at least one complete shard directory, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if (
            d.is_dir()
            and d.name.isdigit()
            and any((s / MANIFEST).is_file() for s in d.iterdir() if not s.name.startswith("."))
        ):
            steps.append(int(d.name))
    return sorted(steps)


def shard_count_at(root: Path | str, step: int) -> int:
    """The shard count N of the complete checkpoint at ``step``; CheckpointError if incomplete."""
    d = Path(root) / str(step)
    counts = set()
    for s in d.iterdir() if d.is_dir() else []:
        parts = s.name.split("-")
        if (
            len(parts) == 4
            and parts[0] == "shard"
            and parts[2] == "of"
            and (s / MANIFEST).is_file()
        ):
            counts.add(int(parts[3]))
    if len(counts) != 1:
        raise CheckpointError(
            f"checkpoint {d} has no complete shard set (found shard counts {sorted(counts)})"
        )
    n = counts.pop()
    missing = [i for i in range(n) if not (d / shard_dir_name(i, n) / MANIFEST).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {d} is incomplete: shards {missing} of {n} are missing")
    return n


def is_private(root: Path | str, shard: int, num_shards: int) -> bool:
    """Whether ``root`` holds this shard's checkpoints only: no step under it has another
    shard's directory. A Kubernetes StatefulSet gives each pod a volume of its own
    (ReadWriteOnce), so there a checkpoint is never complete in one directory: each shard
    restores, and numbers its next checkpoint, from its own."""
    own = shard_dir_name(shard, num_shards)
    for step in list_steps(root):
        for s in (Path(root) / str(step)).iterdir():
            if s.name.startswith("shard-") and s.name != own:
                return False
    return True


def latest_step(
    root: Path | str, shard: int | None = None, num_shards: int | None = None
) -> int | None:
    """The newest step whose every shard directory is present, or None.

    With ``shard`` and ``num_shards``, on a private volume (``is_private``): the newest
    step with this shard's own complete directory. LIMITATIONS: shards on private volumes
    agree on steps only by checkpointing together (the wall-clock period, the same
    Checkpoint call); a shard that missed a checkpoint numbers its next one lower, and a
    restore then loads each shard's newest, which may be of different moments.
    """
    if shard is not None and num_shards is not None and is_private(root, shard, num_shards):
        own = shard_dir_name(shard, num_shards)
        for step in reversed(list_steps(root)):
            if (Path(root) / str(step) / own / MANIFEST).is_file():
                return step
        return None
    for step in reversed(list_steps(root)):
        try:
            shard_count_at(root, step)
        except CheckpointError:
            continue
        return step
    return None


def resolve(spec: str, root: Path | str | None = None) -> tuple[Path, int]:
    """``latest`` (needs ``root``) or a path ``<root>/<step>`` -> (root, step)."""
    if spec == "latest":
        if root is None:
            raise CheckpointError(
                "--restore latest needs a checkpoint directory (--checkpoint-dir)"
            )
        step = latest_step(root)
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {root}")
        return Path(root), step
    p = Path(spec)
    if p.name.startswith("shard-"):
        p = p.parent
    if not p.name.isdigit():
        raise CheckpointError(f"{spec} is not a checkpoint step directory (<dir>/<step>)")
    return p.parent, int(p.name)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The parsed, checked manifest of a shard directory."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint manifest {mpath}: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath} is not an embps checkpoint of format version {FORMAT_VERSION} "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    return manifest


Progress = Callable[[int], None]  # called with the bytes of each array file read


def _entry_config(path: Path, entry: dict) -> TableConfig:
    """The table config of a manifest entry; CheckpointError naming the manifest if it is bad."""
    try:
        return TableConfig.from_dict(entry["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path / MANIFEST}: bad config for table {entry['config'].get('name')!r}: {e}"
        ) from e


OnRead = Callable[[str, np.ndarray], None]  # (array name, array read and verified)


def _load_entry(
    path: Path, entry: dict, progress: Progress | None = None, on_read: OnRead | None = None
) -> Snapshot:
    """Read and verify one manifest entry's arrays (all files at once); its snapshot.

    on_read(name, array): called as soon as each array is read and verified, while the
    others are still being read; ``dynamic.keys`` is read first (1% of a table's bytes),
    so a restore can build the hash map from it while the large arrays arrive.
    """
    config = _entry_config(path, entry)
    metas = entry["arrays"]
    names = sorted(metas, key=lambda n: n != "dynamic.keys")  # stable: the keys first
    specs = [
        _FileSpec(
            path / metas[n]["file"],
            metas[n]["crc32"],
            metas[n]["dtype"],
            tuple(int(d) for d in metas[n]["shape"]),
        )
        for n in names
    ]
    loaded = _read_arrays(
        specs, progress, None if on_read is None else lambda i, arr: on_read(names[i], arr)
    )
    by_name = dict(zip(names, loaded, strict=True))
    arrays = {n: by_name[n] for n in metas}  # manifest order
    deleted = arrays.pop("deleted.keys", None)
    return Snapshot(config, arrays, dict(entry["state"]), entry["base_version"], deleted)


def chain_entries(
    root: Path, step: int, shard: int, num_shards: int
) -> dict[str, list[tuple[Path, dict]]]:
    """Per table (of the manifest at ``step``), the (shard directory, manifest entry) pairs
    from its last full entry to ``step``, oldest first. Reads manifests only.

    Raises CheckpointError when a base is missing, lacks a table, or was overwritten
    after the increment was taken (its table version differs from the increment's base).
    """
    path = ShardCheckpoint(root, step, shard, num_shards).path
    manifest = read_manifest(path)
    chains: dict[str, list[tuple[Path, dict]]] = {}
    want: dict[str, int | None] = {e["config"]["name"]: None for e in manifest["tables"]}
    cur_path, cur = path, manifest
    while True:
        entries = {e["config"]["name"]: e for e in cur["tables"]}
        for name, version in list(want.items()):
            entry = entries.get(name)
            if entry is None:
                raise CheckpointError(
                    f"{cur_path / MANIFEST} lacks table {name!r}, which a later increment "
                    "builds on; restore an older full checkpoint"
                )
            if version is not None and int(entry["version"]) != version:
                raise CheckpointError(
                    f"{cur_path / MANIFEST}: table {name!r} is at version {entry['version']} but "
                    f"the increment over it was taken over version {version}: this step was "
                    f"written again after the increment; restore step {cur['step']} instead"
                )
            chains.setdefault(name, []).insert(0, (cur_path, entry))
            if entry["full"]:
                del want[name]
            else:
                want[name] = int(entry["base_version"])
        if not want:
            return chains
        base = cur.get("base_step")
        if base is None:
            raise CheckpointError(
                f"{cur_path / MANIFEST}: incremental tables {sorted(want)} have no base checkpoint"
            )
        base_path = ShardCheckpoint(root, int(base), shard, num_shards).path
        if not (base_path / MANIFEST).is_file():
            raise CheckpointError(
                f"base checkpoint {base_path} of {cur_path} is missing; "
                "the increment cannot be restored"
            )
        cur_path, cur = base_path, read_manifest(base_path)


def _entry_bytes(entry: dict) -> int:
    return sum(
        np.dtype(m["dtype"]).itemsize * math.prod(m["shape"]) for m in entry["arrays"].values()
    )


def load_chain(
    root: Path, step: int, shard: int, num_shards: int, progress: Progress | None = None
) -> dict[str, list[Snapshot]]:
    """Per table (of the manifest at ``step``), its snapshots from the last full one to ``step``."""
    return {
        name: [_load_entry(path, entry, progress) for path, entry in chain]
        for name, chain in chain_entries(root, step, shard, num_shards).items()
    }


def restore_tables(
    root: Path | str,
    step: int,
    shard: int,
    num_shards: int,
    progress: Callable[[float], None] | None = None,
) -> tuple[list[Table], dict]:
    """Rebuild shard ``shard`` of ``num_shards`` from the checkpoint at ``step``.

    The checkpoint may have any shard count N (resharding when N != num_shards).
    progress: called with the fraction (0..1) of the array bytes read so far.
    Returns the tables and a summary (``old_shards``, ``tables``, ``keys``, ``bytes``).
    """
    root = Path(root)
    try:
        old_n = shard_count_at(root, step)
    except CheckpointError:
        own = root / str(step) / shard_dir_name(shard, num_shards) / MANIFEST
        if not (is_private(root, shard, num_shards) and own.is_file()):
            raise
        old_n = num_shards  # a private volume: this shard's own directory is the checkpoint
    tables: dict[str, Table] = {}
    block_sums: dict[str, dict[str, np.ndarray]] = {}
    states: dict[str, dict[str, int]] = {}
    sources = [shard] if old_n == num_shards else list(range(old_n))
    plans = {old: chain_entries(root, step, old, old_n) for old in sources}
    total = sum(_entry_bytes(e) for p in plans.values() for c in p.values() for _, e in c)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(min(done / total, 1.0) if total else 1.0)

    for old in sources:
        for name, entries in plans[old].items():
            config = _entry_config(*entries[-1])
            if old_n == num_shards:  # one source shard: every table is new here
                made, chain, index = _read_chain_indexed(config, entries, advance)
                tables[name] = made
                for i, snap in enumerate(chain):
                    _load(made, snap, entries, index if i == 0 else None)
                continue
            table = tables.get(name)
            if table is None:
                table = tables[name] = make_table(config)
            elif table.config != config:
                raise CheckpointError(
                    f"table {name!r} has different configs on different shards of {root / str(step)}"
                )
            chain = [_load_entry(path, entry, advance) for path, entry in entries]
            scratch = make_table(chain[-1].config)  # materialise the old shard's shared blocks
            for snap in chain:
                _load(scratch, _without_dynamic(snap), entries)
                _load(table, _only_owned(snap, shard, num_shards), entries)
            full = scratch.snapshot()
            sums = block_sums.setdefault(name, {})
            for key, arr in full.arrays.items():
                if key.startswith(("dynamic.", "replay.")):
                    continue  # own rows are in place; replay windows do not survive a reshard
                if key == "sketch.counters":
                    acc = sums.get(key, np.zeros(arr.shape, dtype=np.uint64))
                    sums[key] = acc + arr.astype(np.uint64)
                elif key.split(".")[1] in ("values", "slots"):
                    sums[key] = sums.get(key, 0) + arr.astype(np.float64)
                else:
                    sums[key] = np.maximum(sums.get(key, arr), arr)
            st = states.setdefault(name, {})
            for k, v in chain[-1].state.items():
                st[k] = max(st.get(k, 0), int(v))
    for name, sums in block_sums.items():
        table = tables[name]
        merged = table.snapshot()
        for key, acc in sums.items():
            if key == "sketch.counters":
                merged.arrays[key] = np.minimum(acc, np.iinfo(np.uint32).max).astype(np.uint32)
            elif key.split(".")[1] in ("values", "slots"):
                merged.arrays[key] = (acc / len(sources)).astype(np.float32)
            else:
                merged.arrays[key] = acc
        for key in [k for k in merged.arrays if k.startswith(("dynamic.", "replay."))]:
            del merged.arrays[key]  # the own rows are already in place
        # Per-shard counters do not survive a reshard; steps and versions take the maximum.
        merged.state = {
            k: v for k, v in states[name].items() if k in ("step", "auto_step", "version")
        }
        table.load(merged)
    if progress is not None:
        progress(1.0)
    out = [tables[n] for n in sorted(tables)]
    stats = [t.stats() for t in out]
    summary = {
        "old_shards": old_n,
        "tables": len(out),
        "keys": sum(s.keys for s in stats),
        "bytes": sum(s.bytes for s in stats),
    }
    return out, summary


def _read_chain_indexed(
    config: TableConfig, entries: list[tuple[Path, dict]], progress: Progress
) -> tuple[Table, list[Snapshot], RowIndex | None]:
    """A new table of ``config`` and its chain, read and verified (``_load_entry`` of each
    entry), for a restore onto the same shard count. The table is made on the I/O pool
    while the files are read; once the first (full) entry's ``dynamic.keys`` are read and
    verified, their hash map is built there too (``Table.prepare_adopt``), while the large
    arrays are still arriving. Returns the table, the snapshots and that map (None if there
    is none) for ``Table.load(chain[0], adopt=True, index=...)``. Nothing is published
    here: the table gets its rows in ``load``, after every file of the chain passed its
    CRC check."""
    pool = _io_pool()
    made = pool.submit(make_table, config)
    building: list[Future[RowIndex | None]] = []

    def prepare(keys: np.ndarray) -> RowIndex | None:
        return made.result().prepare_adopt(keys)

    def on_read(name: str, arr: np.ndarray) -> None:
        if name == "dynamic.keys":
            building.append(pool.submit(prepare, arr))

    try:
        chain = [
            _load_entry(path, entry, progress, on_read if i == 0 and entry["full"] else None)
            for i, (path, entry) in enumerate(entries)
        ]
    finally:
        wait(building)  # nothing outlives a failed read
        wait([made])
    return made.result(), chain, building[0].result() if building else None


def _load(
    table: Table,
    snap: Snapshot,
    entries: list[tuple[Path, dict]],
    index: RowIndex | None = None,
) -> None:
    """``table.load(snap, adopt=True, index=index)``; a snapshot that does not fit is a
    CheckpointError naming the files."""
    part = getattr(table, "part", None)
    cap = table.config.max_rows
    keys = snap.arrays.get("dynamic.keys")
    if part is not None and cap and keys is not None and keys.shape[0]:
        size = part.size
        present = part.find(keys) >= 0
        if snap.deleted is not None and snap.deleted.shape[0]:  # erased before the upsert
            size -= int((part.find(snap.deleted) >= 0).sum())
            present &= ~np.isin(keys, snap.deleted)
        if size + int((~present).sum()) > cap:
            raise CheckpointError(
                f"table {table.name!r}: this shard would hold more than its max_rows={cap} own "
                f"rows (max_rows is per shard; the checkpoint {entries[-1][0]} has more on "
                "fewer shards): restore onto more shards, or raise max_rows"
            )
    try:
        # Fresh from disk, used once: the table may keep its arrays.
        table.load(snap, adopt=True, index=index)
    except ValueError as e:
        where = ", ".join(sorted({str(p / MANIFEST) for p, _ in entries}))
        raise CheckpointError(f"checkpoint {where} does not fit table {table.name!r}: {e}") from e


def _only_owned(snap: Snapshot, shard: int, num_shards: int) -> Snapshot:
    """The snapshot's own rows owned by ``shard`` under ``num_shards``; shared blocks dropped."""
    arrays: dict[str, np.ndarray] = {}
    if "dynamic.keys" in snap.arrays:
        mine = shard_of(snap.arrays["dynamic.keys"], num_shards) == shard
        arrays["dynamic.keys"] = snap.arrays["dynamic.keys"][mine]
        for f in BLOCK_FIELDS:
            arrays[f"dynamic.{f}"] = snap.arrays[f"dynamic.{f}"][mine]
    deleted = snap.deleted
    if deleted is not None:
        deleted = deleted[shard_of(deleted, num_shards) == shard]
    return _partial(snap, arrays, deleted)


def _without_dynamic(snap: Snapshot) -> Snapshot:
    """The snapshot's shared blocks and sketch only."""
    arrays = {k: v for k, v in snap.arrays.items() if not k.startswith(("dynamic.", "replay."))}
    return _partial(snap, arrays, None)


def _partial(snap: Snapshot, arrays: dict[str, np.ndarray], deleted: np.ndarray | None) -> Snapshot:
    return Snapshot(
        snap.config,
        arrays,
        snap.state,
        snap.base_version if snap.base_version is not None else -1,
        deleted,
    )


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
