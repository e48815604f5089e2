"""Block: the dense arrays of a table's rows (values, optimizer slots, per-row metadata) and their byte accounting."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embps.protos.config import TableConfig
from embps.server.kernels.optim import fill_slots, init_rows
from embps.server.kernels.rows import gather, gather_u8, quantize_u8
from embps.server.optimizers import INIT_CODES, initial_slot_values
from embps.server.parallel import run_in_pieces

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


ROW_DTYPES = ("float32", "float16", "int8")
_VALUE_DTYPE = {"float32": np.float32, "float16": np.float16, "int8": np.uint8}
_META_FIELDS = ("freq", "last_step", "version")


@dataclass(frozen=True)
class Storage:
    """How a table stores its rows.

    dtype  of the values: "float32" (training: the optimizers write them), "float16", or
           "int8" (uint8 codes with a float32 scale and offset per row, as FBGEMM's
           rowwise int8 inference tables): for serving replicas, which only read rows
           and receive them whole (``Block.set_values``).
    meta   whether rows keep their training metadata (freq, last_step, version): a
           replica does not (it neither counts, ages nor versions rows).
    """

    dtype: str = "float32"
    meta: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ROW_DTYPES:
            raise ValueError(f"row dtype {self.dtype!r}: use one of {', '.join(ROW_DTYPES)}")


TRAINING = Storage()


def gather_rows(
    values: np.ndarray,  # float32 (cap, dim)
    rows: np.ndarray,  # int64 (n,), -1: no row
    default: np.float32,
    out: np.ndarray,  # float32 (n, dim)
) -> None:
    """``kernels.rows.gather`` (out[i] <- values[rows[i]], default where rows[i] < 0), a
    large batch in pieces on helper threads (server/parallel.py)."""
    run_in_pieces(rows.shape[0], lambda a, b: gather(values, rows[a:b], default, out[a:b]))


class Block:
    """Dense rows with optimizer slots and per-row metadata.

    values: float32 (rows, dim) (float16, or uint8 codes with scale and offset float32
    (rows,), under a serving ``Storage``); slots: float32 (rows, n_slots * dim);
    freq, last_step, version: int64 (rows,) (empty without ``storage.meta``).

    Reads go through ``gather`` and ``decode``, writes of whole rows through
    ``set_values``; the optimizers, initializers and the change feed use ``values``
    directly and need float32 rows (a training table's).
    """

    def __init__(self, rows: int, dim: int, n_slots: int, storage: Storage = TRAINING) -> None:
        self.dim = dim
        self.n_slots = n_slots
        self.storage = storage
        self.values = np.zeros((rows, dim), dtype=_VALUE_DTYPE[storage.dtype])
        self.slots = np.zeros((rows, n_slots * dim), dtype=np.float32)
        meta_rows = rows if storage.meta else 0
        self.freq = np.zeros(meta_rows, dtype=np.int64)
        self.last_step = np.zeros(meta_rows, dtype=np.int64)
        self.version = np.zeros(meta_rows, dtype=np.int64)
        quant_rows = rows if storage.dtype == "int8" else 0
        self.qscale = np.ones(quant_rows, dtype=np.float32)
        self.qoffset = np.zeros(quant_rows, dtype=np.float32)

    def _row_fields(self) -> tuple[str, ...]:
        """The arrays with one entry per row (the others are empty)."""
        names: tuple[str, ...] = ("values", "slots")
        if self.storage.meta:
            names += _META_FIELDS
        if self.storage.dtype == "int8":
            names += ("qscale", "qoffset")
        return names

    @property
    def rows(self) -> int:
        """Row capacity."""
        return int(self.values.shape[0])

    @property
    def row_bytes(self) -> int:
        """Bytes one row costs in this block."""
        quant = 8 if self.storage.dtype == "int8" else 0
        meta = 24 if self.storage.meta else 0
        return self.values.itemsize * self.dim + 4 * self.dim * self.n_slots + meta + quant

    @property
    def nbytes(self) -> int:
        """Bytes of every array of the block."""
        return sum(
            int(getattr(self, a).nbytes)
            for a in ("values", "slots", *_META_FIELDS, "qscale", "qoffset")
        )

    def resize(self, rows: int) -> None:
        """Grow or shrink to ``rows`` rows, keeping the prefix."""
        keep = min(rows, self.rows)
        for name in self._row_fields():
            old = getattr(self, name)
            new = np.zeros((rows, *old.shape[1:]), dtype=old.dtype)
            new[:keep] = old[:keep]
            setattr(self, name, new)

    def take(self, rows: np.ndarray) -> Block:
        """A new block holding copies of ``rows`` (int64 (k,)) in that order."""
        out = Block(0, self.dim, self.n_slots, self.storage)
        for name in self._row_fields():
            setattr(out, name, getattr(self, name)[rows])
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

    # ---------------------------------------------------------------- rows as float32
    def gather(
        self,
        rows: np.ndarray,  # int64 (n,), -1: no row
        default: float,
        out: np.ndarray,  # float32 (n, dim)
    ) -> None:
        """out[i] <- row rows[i] as float32, or ``default`` where rows[i] < 0."""
        dtype = self.storage.dtype
        if dtype == "float32":
            gather_rows(self.values, rows, np.float32(default), out)
        elif dtype == "int8":
            gather_u8(self.values, self.qscale, self.qoffset, rows, np.float32(default), out)
        else:
            have = rows >= 0
            out[~have] = default
            out[have] = self.values[rows[have]]

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (int64 (n,), all >= 0) as float32 (n, dim)."""
        if self.storage.dtype == "float32":
            return self.values[rows]
        out = np.empty((rows.shape[0], self.dim), dtype=np.float32)
        self.gather(rows, 0.0, out)
        return out

    def set_values(
        self,
        rows: np.ndarray,  # int64 (k,)
        values: np.ndarray,  # float32 (k, dim)
    ) -> None:
        """Store whole rows, converted to this block's dtype (int8: per-row scale and offset)."""
        dtype = self.storage.dtype
        if dtype == "int8":
            vals = np.ascontiguousarray(values, dtype=np.float32)
            quantize_u8(vals, self.values, self.qscale, self.qoffset, rows)
        else:
            self.values[rows] = values

    def zero_meta(self, rows: np.ndarray) -> None:
        """Training metadata of ``rows`` back to zero (no-op without metadata)."""
        if self.storage.meta:
            self.freq[rows] = 0
            self.last_step[rows] = 0
            self.version[rows] = 0

    def init(self, rows: np.ndarray, keys: np.ndarray, cfg: TableConfig, seed: int) -> None:
        """Fresh rows: values from the initializer (seeded by key), slots at their initial values."""
        ini = cfg.initializer
        code = INIT_CODES[ini.kind]
        if self.storage.dtype == "float32":
            init_rows(self.values, rows, keys, code, ini.a, ini.b, seed)
        else:  # the float32 rows a training table starts with, then converted
            for a in range(0, rows.shape[0], 1 << 16):
                k = keys[a : a + (1 << 16)]
                tmp = np.zeros((k.shape[0], self.dim), dtype=np.float32)
                init_rows(tmp, np.arange(k.shape[0], dtype=np.int64), k, code, ini.a, ini.b, seed)
                self.set_values(rows[a : a + (1 << 16)], tmp)
        if self.n_slots:
            fill_slots(
                self.slots,
                rows,
                self.dim,
                np.asarray(initial_slot_values(cfg.optimizer), dtype=np.float64),
            )
        self.zero_meta(rows)
