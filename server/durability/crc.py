"""CRC-32 for checkpoint files: a running CRC computed on a worker thread beside the caller's I/O, and crc32_combine (the CRC of a concatenation from its parts' CRCs, which Python's zlib does not expose)."""

from __future__ import annotations

import functools
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor


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
