"""Block: the dense arrays of a table's rows (values, optimizer slots, per-row metadata) and their byte accounting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embps.protos.config import (
    TableConfig,
)
from embps.server.kernels.optim import fill_slots, init_rows
from embps.server.optimizers import INIT_CODES, initial_slot_values

ROW_GROWTH = 1.5


@dataclass
class RowIndex:
    """The hash map of a full snapshot's own keys, built before the rest of it is loaded
    (``Table.prepare_adopt``; used by ``Table.load(..., index=...)``).

    keys: int64 (k,), the snapshot's ``dynamic.keys`` (row i holds keys[i]); buckets, meta:
    the map (``hashmap``); distinct: False when a key repeats (the load is refused);
    taken: the buckets are the empty ones the part had (the part keeps the smallest).
    """

    keys: np.ndarray
    buckets: np.ndarray
    meta: np.ndarray
    distinct: bool
    taken: bool


def unique_keys(keys: np.ndarray) -> np.ndarray:
    """Distinct keys, ascending: int64 (m,). Sort-based: numpy 2's hash-based np.unique is
    several times slower on int64 batches of this size."""
    if keys.shape[0] < 2:
        return keys.copy()
    s = np.sort(keys)
    keep = np.empty(s.shape[0], dtype=np.bool_)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _adoptable(a: np.ndarray) -> bool:
    """An array a table may keep as its own storage: writable, C-contiguous, owning or base-owned."""
    return bool(a.flags.c_contiguous and a.flags.writeable)


BLOCK_FIELDS = ("values", "slots", "freq", "last_step", "version")

# copy(name, src, rows) -> a private copy of src[rows] (all of src when rows is None)
CopyRows = Callable[[str, np.ndarray, "np.ndarray | None"], np.ndarray]


class Block:
    """Dense rows with optimizer slots and per-row metadata.

    values: float32 (rows, dim); slots: float32 (rows, n_slots * dim);
    freq, last_step, version: int64 (rows,).
    """

    def __init__(self, rows: int, dim: int, n_slots: int) -> None:
        self.dim = dim
        self.n_slots = n_slots
        self.values = np.zeros((rows, dim), dtype=np.float32)
        self.slots = np.zeros((rows, n_slots * dim), dtype=np.float32)
        self.freq = np.zeros(rows, dtype=np.int64)
        self.last_step = np.zeros(rows, dtype=np.int64)
        self.version = np.zeros(rows, dtype=np.int64)

    @property
    def rows(self) -> int:
        """Row capacity."""
        return int(self.values.shape[0])

    @property
    def row_bytes(self) -> int:
        """Bytes one row costs in this block."""
        return 4 * self.dim * (1 + self.n_slots) + 24

    @property
    def nbytes(self) -> int:
        """Bytes of every array of the block."""
        return sum(
            int(a.nbytes)
            for a in (self.values, self.slots, self.freq, self.last_step, self.version)
        )

    def resize(self, rows: int) -> None:
        """Grow or shrink to ``rows`` rows, keeping the prefix."""
        keep = min(rows, self.rows)
        for name in ("values", "slots", "freq", "last_step", "version"):
            old = getattr(self, name)
            new = np.zeros((rows, *old.shape[1:]), dtype=old.dtype)
            new[:keep] = old[:keep]
            setattr(self, name, new)

    def take(self, rows: np.ndarray) -> Block:
        """A new block holding copies of ``rows`` (int64 (k,)) in that order."""
        out = Block(0, self.dim, self.n_slots)
        out.values = self.values[rows]
        out.slots = self.slots[rows]
        out.freq = self.freq[rows]
        out.last_step = self.last_step[rows]
        out.version = self.version[rows]
        return out

    def narrow(self, dim: int) -> None:
        """Keep the first ``dim`` columns of every row and of each of its optimizer slots
        (slot s of a row is columns [s * self.dim, (s + 1) * self.dim) of ``slots``); the
        old arrays are released (new, smaller ones replace them)."""
        rows = self.rows
        self.values = np.ascontiguousarray(self.values[:, :dim])
        slots = self.slots.reshape(rows, self.n_slots, self.dim)[:, :, :dim]
        self.slots = np.ascontiguousarray(slots).reshape(rows, self.n_slots * dim)
        self.dim = dim

    def init(self, rows: np.ndarray, keys: np.ndarray, cfg: TableConfig, seed: int) -> None:
        """Fresh rows: values from the initializer (seeded by key), slots at their initial values."""
        ini = cfg.initializer
        init_rows(self.values, rows, keys, INIT_CODES[ini.kind], ini.a, ini.b, seed)
        if self.n_slots:
            fill_slots(
                self.slots,
                rows,
                self.dim,
                np.asarray(initial_slot_values(cfg.optimizer), dtype=np.float64),
            )
        self.freq[rows] = 0
        self.last_step[rows] = 0
        self.version[rows] = 0
