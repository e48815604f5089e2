"""Row kernels (pure @njit): gathers into a response buffer, row norms, and the touch of a row's training metadata."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from embps.server.kernels.hashmap import copy_row, prefetch_item

# --------------------------------------------------------------------------
# Gathers and norms
# --------------------------------------------------------------------------


AHEAD = 4  # rows prefetched ahead by the row kernels (measured on gather: 4 beat 2, 8 and 16)


@njit(nogil=True, cache=True, inline="always")
def prefetch_row(arr, r):  # pragma: no cover - compiled
    """Prefetch every 64-byte line of row ``r`` of a 2-D float32 array."""
    for d in range(0, arr.shape[1], 16):  # 16 float32 = one 64-byte line
        prefetch_item(arr, r, d)  # type: ignore[call-arg]


@njit(nogil=True, cache=True)
def gather(values, rows, default, out):
    """out[i] <- values[rows[i]], or ``default`` where rows[i] < 0.

    values: float32 (cap, dim), rows: int64 (n,), out: float32 (n, dim). The row
    ``AHEAD`` rows on is prefetched: rows are scattered over the arena, so each
    one is a few independent cache misses.
    """
    n = rows.shape[0]
    dim = values.shape[1]
    for i in range(n):
        if i + AHEAD < n and rows[i + AHEAD] >= 0:
            prefetch_row(values, rows[i + AHEAD])
        r = rows[i]
        if r < 0:
            for d in range(dim):
                out[i, d] = default
        else:
            copy_row(out, i, values, r)  # type: ignore[call-arg]


@njit(nogil=True, cache=True)
def row_norms(values, rows, kind):
    """Norm of values[rows[i]]: kind 0 = L2, 1 = L1, 2 = Linf. -> float64 (n,)."""
    n = rows.shape[0]
    dim = values.shape[1]
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        r = rows[i]
        acc = 0.0
        for d in range(dim):
            x = abs(np.float64(values[r, d]))
            if kind == 0:
                acc += x * x
            elif kind == 1:
                acc += x
            elif x > acc:
                acc = x
        out[i] = math.sqrt(acc) if kind == 0 else acc
    return out


@njit(nogil=True, cache=True)
def touch_rows(freq, last_step, version, rows, step, ver):
    """A training sighting: freq[r] += 1, last_step[r] = step, version[r] = ver, for rows r >= 0.

    rows: int64 (n,). The version stamp puts the changed metadata into the next
    incremental checkpoint.
    """
    for i in range(rows.shape[0]):
        r = rows[i]
        if r >= 0:
            freq[r] += 1
            last_step[r] = step
            version[r] = ver


@njit(nogil=True, cache=True)
def all_finite(bits: np.ndarray) -> bool:  # pragma: no cover - compiled
    """True when no float32 (given as its uint32 bits (n,)) is NaN or Inf (exponent all ones).

    One pass, no temporary array (``np.isfinite(x).all()`` allocates n bools).
    """
    bad = np.uint32(0)
    for i in range(bits.shape[0]):
        bad |= np.uint32((bits[i] & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
    return bad == 0


@njit(nogil=True, cache=True)
def gather_u8(codes, scale, offset, rows, default, out):  # pragma: no cover - compiled
    """out[i] <- codes[rows[i]] * scale[rows[i]] + offset[rows[i]], or ``default`` where
    rows[i] < 0: rows stored as uint8 codes with a per-row scale and offset.

    codes: uint8 (cap, dim), scale, offset: float32 (cap,), rows: int64 (n,),
    out: float32 (n, dim).
    """
    dim = codes.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        if r < 0:
            for d in range(dim):
                out[i, d] = default
        else:
            s = scale[r]
            o = offset[r]
            for d in range(dim):
                out[i, d] = np.float32(codes[r, d]) * s + o


@njit(nogil=True, cache=True)
def quantize_u8(values, codes, scale, offset, rows):  # pragma: no cover - compiled
    """Row i of ``values`` float32 (k, dim) into row rows[i] of ``codes`` uint8 (cap, dim):
    scale = (max - min) / 255 and offset = min of the row (scale 1 for a constant row), code
    = round((v - offset) / scale). Decoding is off by at most scale / 2 per element."""
    dim = values.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        lo = values[i, 0]
        hi = values[i, 0]
        for d in range(1, dim):
            v = values[i, d]
            lo = min(lo, v)
            hi = max(hi, v)
        s = (hi - lo) / np.float32(255.0)
        if s == 0:
            s = np.float32(1.0)
        scale[r] = s
        offset[r] = lo
        for d in range(dim):
            q = np.float32(np.rint((values[i, d] - lo) / s))
            codes[r, d] = np.uint8(min(max(q, np.float32(0.0)), np.float32(255.0)))
