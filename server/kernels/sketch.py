"""Bounded-memory frequency sketch: count-min with conservative update.

``depth`` rows of ``width`` uint32 counters (width a power of two). A key's
count is the minimum of its ``depth`` counters: never below the true count,
above it only through collisions (probability falls with width). Conservative
update raises only the counters equal to that minimum, which keeps the error
far below plain count-min. Memory is ``4 * depth * width`` bytes, whatever the
number of keys. Counters saturate at 2**32 - 1. The default width and depth are
``TableConfig``'s (``SKETCH_DEFAULT_*`` in protos/config.py, for sketch_width and
sketch_depth 0), defined there once.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from embps.protos.routing import fmix64_one as fmix64

_ROW_SEED = np.uint64(0xA0761D6478BD642F)
_SAT = np.uint32(0xFFFFFFFF)


@njit(nogil=True, cache=True, inline="always")
def _col(key, d, mask):
    return np.int64(fmix64(np.uint64(key) ^ (np.uint64(d + 1) * _ROW_SEED)) & mask)


@njit(nogil=True, cache=True)
def sketch_add(counters, keys, out):
    """Count one sighting of each key (in order) and write its new estimate.

    counters: uint32 (depth, width), keys: int64 (n,), out: int64 (n,).
    """
    depth, width = counters.shape
    mask = np.uint64(width - 1)
    for i in range(keys.shape[0]):
        k = keys[i]
        lo = _SAT
        for d in range(depth):
            c = counters[d, _col(k, d, mask)]
            if c < lo:
                lo = c
        if lo < _SAT:
            lo += np.uint32(1)
        for d in range(depth):
            j = _col(k, d, mask)
            if counters[d, j] < lo:
                counters[d, j] = lo
        out[i] = lo


@njit(nogil=True, cache=True)
def sketch_estimate(counters, keys, out):
    """Estimated count of each key, no update. out: int64 (n,)."""
    depth, width = counters.shape
    mask = np.uint64(width - 1)
    for i in range(keys.shape[0]):
        k = keys[i]
        lo = _SAT
        for d in range(depth):
            c = counters[d, _col(k, d, mask)]
            if c < lo:
                lo = c
        out[i] = lo


@njit(nogil=True, cache=True)
def sketch_cols(counters, keys):
    """Counter column of each key in each row: int64 (depth, n)."""
    depth, width = counters.shape
    mask = np.uint64(width - 1)
    out = np.empty((depth, keys.shape[0]), dtype=np.int64)
    for d in range(depth):
        for i in range(keys.shape[0]):
            out[d, i] = _col(keys[i], d, mask)
    return out
