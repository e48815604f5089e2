"""Array files of a checkpoint: .npy written with fsync and a CRC-32, read back in pieces on parallel threads (direct I/O where it pays), each piece checksummed."""

from __future__ import annotations

import errno
import io
import math
import os
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from embps.server.durability.crc import _CRC_POOL_LOCK, _RunningCrc, crc32_combine
from embps.server.durability.manifest import CheckpointError, Progress

_CHUNK = 1 << 24  # bytes per write (and per copy step of a streamed snapshot)
_READ_CHUNK = 1 << 25  # bytes per piece read (and checksummed) by one reader thread
T = TypeVar("T")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
