"""Optimizer and initializer kernels (pure @njit): the update of each optimizer over unique rows, the summing of duplicate keys' gradients, and the deterministic initializers.

Every optimizer kernel updates the rows named in ``rows`` (unique; the caller
dedups with ``dedup_sum`` first, so duplicate keys in a push are summed) and
the slots stored beside them:

    values: float32 (cap, dim)           the embedding rows
    slots:  float32 (cap, n_slots * dim) slot s of row r is slots[r, s*dim:(s+1)*dim]
    rows:   int64 (m,)                   unique row indices
    grads:  float32 (m, dim)             summed gradient of each row

Formulas (arithmetic in float64, stored as float32):
  SGD      w -= lr * g
  Adagrad  a += g^2; w -= lr * g / (sqrt(a) + eps)                    (torch.optim.Adagrad)
  Adam     m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
           w -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)     (lazy: only pushed rows;
           torch.optim.SparseAdam / TF LazyAdam)
  FTRL     n' = n + g^2; z += g - (sqrt(n') - sqrt(n))/alpha * w; n = n';
           w = 0 if |z| <= l1 else (sign(z) l1 - z) / ((beta + sqrt(n))/alpha + 2 l2)
           (TensorFlow Ftrl, learning_rate_power = -0.5)

Initializers are deterministic per (seed, key, column): a restart or a reshard creates
the same row for a key."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from embps.protos.routing import GOLDEN
from embps.protos.routing import fmix64_one as fmix64
from embps.server.kernels.rows import AHEAD, prefetch_row

# --------------------------------------------------------------------------
# Duplicate handling
# --------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def dedup_sum(rows, grads):
    """Sum the gradients of equal rows; drop rows < 0.

    rows: int64 (n,), grads: float32 (n, dim) ->
    (urows: int64 (m,) in first-seen order, ugrads: float32 (m, dim)), views of
    arrays sized for n. Row p is ((0 + g_first) + g_second) + ... in float32.
    """
    n = rows.shape[0]
    dim = grads.shape[1]
    cap = 16
    while cap < 2 * n:
        cap *= 2
    mask = cap - 1
    tkeys = np.full(cap, -1, dtype=np.int64)
    tpos = np.empty(cap, dtype=np.int64)
    urows = np.empty(n, dtype=np.int64)
    ugrads = np.empty((n, dim), dtype=np.float32)
    zero = np.float32(0.0)
    m = 0
    for i in range(n):
        r = rows[i]
        if r < 0:
            continue
        j = np.int64(fmix64(np.uint64(r)) & np.uint64(mask))
        while True:
            if tkeys[j] == r:
                p = tpos[j]
                for d in range(dim):
                    ugrads[p, d] += grads[i, d]
                break
            if tkeys[j] == -1:
                tkeys[j] = r
                tpos[j] = m
                urows[m] = r
                for d in range(dim):  # 0 + g, as a zero start would (-0.0 becomes 0.0)
                    ugrads[m, d] = zero + grads[i, d]
                m += 1
                break
            j = (j + 1) & mask
    return urows[:m], ugrads[:m]


# --------------------------------------------------------------------------
# Optimizer kernels
# --------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def sgd_update(values, rows, grads, lr):
    """w -= lr * g for each (row, grad)."""
    dim = values.shape[1]
    nrows = rows.shape[0]
    for i in range(nrows):
        if i + AHEAD < nrows:
            prefetch_row(values, rows[i + AHEAD])
        r = rows[i]
        for d in range(dim):
            values[r, d] = values[r, d] - lr * grads[i, d]


@njit(nogil=True, cache=True)
def adagrad_update(values, slots, rows, grads, lr, eps):
    """Adagrad; slot 0 is the squared-gradient accumulator."""
    dim = values.shape[1]
    nrows = rows.shape[0]
    for i in range(nrows):
        if i + AHEAD < nrows:
            prefetch_row(values, rows[i + AHEAD])
            prefetch_row(slots, rows[i + AHEAD])
        r = rows[i]
        for d in range(dim):
            g = np.float64(grads[i, d])
            a = np.float32(slots[r, d] + g * g)
            slots[r, d] = a
            values[r, d] = values[r, d] - lr * g / (math.sqrt(a) + eps)


@njit(nogil=True, cache=True)
def adam_update(values, slots, rows, grads, lr, beta1, beta2, eps, t):
    """Lazy Adam at step t >= 1; slot 0 = m, slot 1 = v."""
    dim = values.shape[1]
    step = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
    nrows = rows.shape[0]
    for i in range(nrows):
        if i + AHEAD < nrows:
            prefetch_row(values, rows[i + AHEAD])
            prefetch_row(slots, rows[i + AHEAD])
        r = rows[i]
        for d in range(dim):
            g = np.float64(grads[i, d])
            m = np.float32(beta1 * slots[r, d] + (1.0 - beta1) * g)
            v = np.float32(beta2 * slots[r, dim + d] + (1.0 - beta2) * g * g)
            slots[r, d] = m
            slots[r, dim + d] = v
            values[r, d] = values[r, d] - step * m / (math.sqrt(v) + eps)


@njit(nogil=True, cache=True)
def ftrl_update(values, slots, rows, grads, alpha, beta, l1, l2):
    """FTRL-Proximal; slot 0 = n (accumulator), slot 1 = z (linear)."""
    dim = values.shape[1]
    nrows = rows.shape[0]
    for i in range(nrows):
        if i + AHEAD < nrows:
            prefetch_row(values, rows[i + AHEAD])
            prefetch_row(slots, rows[i + AHEAD])
        r = rows[i]
        for d in range(dim):
            g = np.float64(grads[i, d])
            n = np.float64(slots[r, d])
            n_new = n + g * g
            z = (
                np.float64(slots[r, dim + d])
                + g
                - (math.sqrt(n_new) - math.sqrt(n)) / alpha * values[r, d]
            )
            slots[r, d] = n_new
            slots[r, dim + d] = z
            if abs(z) <= l1:
                values[r, d] = 0.0
            else:
                sign = 1.0 if z > 0 else -1.0
                quad = (beta + math.sqrt(n_new)) / alpha + 2.0 * l2
                values[r, d] = (sign * l1 - z) / quad


# --------------------------------------------------------------------------
# Initializers: deterministic per (seed, key, column)
# --------------------------------------------------------------------------

_SECOND = np.uint64(0xD6E8FEB86659FD93)
_TWO_PI = 2.0 * math.pi


@njit(nogil=True, cache=True, inline="always")
def _unit(h):
    """uint64 -> float64 in [0, 1)."""
    return np.float64(h >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(nogil=True, cache=True)
def init_rows(values, rows, keys, kind, a, b, seed):
    """values[rows[i]] <- the initial row of keys[i] (same key + seed: same row, always).

    values: float32 (cap, dim), rows: int64 (n,), keys: int64 (n,), kind: INIT_CODES value.
    Element d of a row is a function of (seed, key, d) alone: a counter-based hash.
    """
    dim = values.shape[1]
    s = fmix64(np.uint64(seed) ^ np.uint64(0x5851F42D4C957F2D))
    if kind <= 1:
        v = 0.0 if kind == 0 else a
        for i in range(rows.shape[0]):
            r = rows[i]
            for d in range(dim):
                values[r, d] = v
        return
    for i in range(rows.shape[0]):
        r = rows[i]
        base = fmix64(np.uint64(keys[i]) ^ s)
        if kind == 2:
            for d in range(dim):
                values[r, d] = a + (b - a) * _unit(fmix64(base + np.uint64(d + 1) * GOLDEN))
        else:
            for d in range(dim):
                h = fmix64(base + np.uint64(d + 1) * GOLDEN)
                u = _unit(h)
                u2 = _unit(fmix64(h ^ _SECOND))
                values[r, d] = a + b * math.sqrt(-2.0 * math.log(1.0 - u)) * math.cos(_TWO_PI * u2)


@njit(nogil=True, cache=True)
def fill_slots(slots, rows, dim, init):
    """slots[rows[i], s*dim:(s+1)*dim] <- init[s] for every slot s. init: float64 (n_slots,)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for s in range(init.shape[0]):
            v = init[s]
            for d in range(dim):
                slots[r, s * dim + d] = v
