"""Plain-Python reference models of the storage engine, for the unit tests.

The models say *what* the engine must compute, with dicts and per-row numpy
arrays instead of hash maps and arenas. They reuse the engine's deterministic
pieces only where those define what a value *is*:

  * initial rows: ``kernels.optim.init_rows`` run on a scratch array (the
    initializer's distribution is its definition);
  * static rows: ``routing.static_rows`` (the hashing trick's hash is its definition).

Everything else is written out here: the optimizer formulas (float64, state
stored as float32 between steps), the duplicate summing, the count-min sketch
(a pure-Python count-min with conservative update using the same hash as
``server/kernels/sketch.py``; ``test_hashmap`` checks the hash against the kernel), the
row allocator of a dynamic part (hashmap DESIGN "Rows": a LIFO free list of
erased rows, else a bump pointer; compaction renumbers live rows 0..k-1 in row
order), eviction (LFU/LRU: smallest score, ties by the smaller key), admission,
promotion and demotion.

A model method that must fail raises the engine's exception *before* changing
anything: the tests hold the engine to the same rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from embps.protos.config import (
    FTRL,
    SGD,
    SKETCH_DEFAULT_DEPTH,
    SKETCH_DEFAULT_WIDTH,
    Adagrad,
    Adam,
    Combiner,
    Eviction,
    Norm,
    OptimizerConfig,
    TableConfig,
    TableKind,
)
from embps.protos.routing import static_rows
from embps.server.errors import ResourceExhausted
from embps.server.kernels import hashmap as hm
from embps.server.kernels.optim import init_rows
from embps.server.optimizers import INIT_CODES

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
M64 = (1 << 64) - 1
# Copies of the engine's hash seeds (server/kernels/hashmap.py, server/kernels/sketch.py);
# test_hashmap checks that the pure-Python hashes below equal the kernels'.
SLOT_SEED = 0x2545F4914F6CDD1D
SKETCH_ROW_SEED = 0xA0761D6478BD642F
SKETCH_SAT = 0xFFFFFFFF
DEFAULT_SKETCH_WIDTH = SKETCH_DEFAULT_WIDTH
DEFAULT_SKETCH_DEPTH = SKETCH_DEFAULT_DEPTH

COUNTERS = (
    "promotions",
    "admissions_rejected",
    "evictions",
    "pruned_rows",
    "pulled_rows",
    "pushed_rows",
    "pulled_static",
    "pulled_dynamic",
    "evictions_steps_to_live",
    "evictions_l2",
    "evictions_capacity",
)


# --------------------------------------------------------------------------
# Hashes (pure Python, uint64 arithmetic modulo 2**64)
# --------------------------------------------------------------------------


def fmix64(x: int) -> int:
    """murmur3's 64-bit finalizer on a Python int taken modulo 2**64."""
    x &= M64
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & M64
    x ^= x >> 33
    return x


def slot_hash(key: int) -> int:
    """Home-bucket hash of a key in the hash map (before masking)."""
    return fmix64((key & M64) ^ SLOT_SEED)


def home_bucket(key: int, cap: int) -> int:
    """Bucket where the probe for ``key`` starts in a map of ``cap`` buckets."""
    return slot_hash(key) & (cap - 1)


# --------------------------------------------------------------------------
# Hash-map invariants (checked on the kernels' arrays)
# --------------------------------------------------------------------------


def check_map(buckets: np.ndarray, meta: np.ndarray, free: np.ndarray) -> dict[int, int]:
    """Assert the hashmap DESIGN invariants; return the map's contents {key: row}.

    * every stored key appears once; EMPTY buckets carry row -1;
    * an entry is reachable from its home bucket without crossing an empty bucket;
    * size == stored keys, size <= grow_at < cap;
    * live rows, free-list rows and [next_row, row_cap) partition [0, row_cap).
    """
    cap = buckets.shape[0] // 2
    keys = buckets[0::2]
    rows = buckets[1::2]
    empty = keys == hm.EMPTY
    assert (rows[empty] == -1).all(), "an empty bucket holds a row"
    stored = {int(k): int(r) for k, r in zip(keys[~empty], rows[~empty], strict=True)}
    assert len(stored) == int((~empty).sum()), "a key is stored twice"
    assert int(meta[hm.M_SIZE]) == len(stored), "meta size differs from the stored keys"
    assert int(meta[hm.M_SIZE]) <= int(meta[hm.M_GROW_AT]) < cap
    for j in np.flatnonzero(~empty):
        h = home_bucket(int(keys[j]), cap)
        b = h
        while b != j:
            assert not empty[b], f"key {int(keys[j])} at {j} unreachable from home {h}"
            b = (b + 1) & (cap - 1)
    contents = dict(stored)
    sent = int(meta[hm.M_SENTINEL_ROW])
    if sent >= 0:
        contents[INT64_MIN] = sent
    row_cap = int(meta[hm.M_ROW_CAP])
    next_row = int(meta[hm.M_NEXT_ROW])
    top = int(meta[hm.M_FREE_TOP])
    parts = [*contents.values(), *(int(r) for r in free[:top]), *range(next_row, row_cap)]
    assert sorted(parts) == list(range(row_cap)), "rows do not partition the arena"
    return contents


# --------------------------------------------------------------------------
# Count-min sketch (conservative update), pure Python
# --------------------------------------------------------------------------


class CountMin:
    """The count-min sketch of ``server/kernels/sketch.py``, with sparse dict counters."""

    def __init__(self, width: int, depth: int) -> None:
        self.width = width
        self.depth = depth
        self.cells: dict[tuple[int, int], int] = {}

    def copy(self) -> CountMin:
        out = CountMin(self.width, self.depth)
        out.cells = dict(self.cells)
        return out

    def _cells(self, key: int) -> list[tuple[int, int]]:
        return [
            (d, fmix64((key & M64) ^ (((d + 1) * SKETCH_ROW_SEED) & M64)) & (self.width - 1))
            for d in range(self.depth)
        ]

    def estimate(self, key: int) -> int:
        return min(self.cells.get(c, 0) for c in self._cells(key))

    def add(self, key: int) -> int:
        """Count one sighting; return the new estimate."""
        cells = self._cells(key)
        lo = min(self.cells.get(c, 0) for c in cells)
        lo = min(lo + 1, SKETCH_SAT)
        for c in cells:
            if self.cells.get(c, 0) < lo:
                self.cells[c] = lo
        return lo

    def dense(self) -> np.ndarray:
        """Counters as the engine stores them: uint32 (depth, width)."""
        out = np.zeros((self.depth, self.width), dtype=np.uint32)
        for (d, j), v in self.cells.items():
            out[d, j] = v
        return out


# --------------------------------------------------------------------------
# Optimizers: the formulas of server/kernels/optim.py, float64, state stored as float32
# --------------------------------------------------------------------------


def n_slots(opt: OptimizerConfig) -> int:
    """Slot vectors per row: SGD 0, Adagrad 1 (accumulator), Adam 2 (m, v), FTRL 2 (n, z)."""
    return {SGD: 0, Adagrad: 1, Adam: 2, FTRL: 2}[type(opt)]


def initial_slots(opt: OptimizerConfig, dim: int) -> np.ndarray:
    """Slots of a new row: float32 (n_slots * dim,)."""
    if isinstance(opt, Adagrad):
        init: tuple[float, ...] = (opt.initial_accumulator_value,)
    elif isinstance(opt, FTRL):
        init = (opt.initial_accumulator_value, 0.0)
    elif isinstance(opt, Adam):
        init = (0.0, 0.0)
    else:
        init = ()
    return np.repeat(np.asarray(init, dtype=np.float32), dim)


def optimizer_step(
    opt: OptimizerConfig, w: np.ndarray, slots: np.ndarray, g: np.ndarray, t: int
) -> tuple[np.ndarray, np.ndarray]:
    """One update of one row: (w float32 (d,), slots float32 (s*d,), g float32 (d,), t >= 1).

    Returns the new (w, slots), float32. Adam's t is the push's 0-based step + 1.
    """
    d = w.shape[0]
    w64 = w.astype(np.float64)
    g64 = g.astype(np.float64)
    if isinstance(opt, SGD):
        return (w64 - opt.lr * g64).astype(np.float32), slots.copy()
    if isinstance(opt, Adagrad):
        acc = (slots.astype(np.float64) + g64 * g64).astype(np.float32)
        w_new = w64 - opt.lr * g64 / (np.sqrt(acc.astype(np.float64)) + opt.eps)
        return w_new.astype(np.float32), acc
    if isinstance(opt, Adam):
        m = (opt.beta1 * slots[:d].astype(np.float64) + (1 - opt.beta1) * g64).astype(np.float32)
        v = (opt.beta2 * slots[d:].astype(np.float64) + (1 - opt.beta2) * g64 * g64).astype(
            np.float32
        )
        step = opt.lr * math.sqrt(1 - opt.beta2**t) / (1 - opt.beta1**t)
        w_new = w64 - step * m.astype(np.float64) / (np.sqrt(v.astype(np.float64)) + opt.eps)
        return w_new.astype(np.float32), np.concatenate([m, v])
    # FTRL-Proximal, TensorFlow's Ftrl with learning_rate_power = -0.5:
    #   accum_new = accum + g^2
    #   linear += g - (accum_new^0.5 - accum^0.5) / lr * w
    #   quadratic = (beta + accum_new^0.5) / lr + 2 * l2
    #   w = (sign(linear) * l1 - linear) / quadratic if |linear| > l1 else 0
    n = slots[:d].astype(np.float64)
    z = slots[d:].astype(np.float64)
    n_new = n + g64 * g64
    z = z + g64 - (np.sqrt(n_new) - np.sqrt(n)) / opt.alpha * w64
    quad = (opt.beta + np.sqrt(n_new)) / opt.alpha + 2 * opt.l2
    w_new = np.where(np.abs(z) <= opt.l1, 0.0, (np.sign(z) * opt.l1 - z) / quad)
    return w_new.astype(np.float32), np.concatenate([n_new, z]).astype(np.float32)


def sum_by(ids: list[int], grads: np.ndarray) -> dict[int, np.ndarray]:
    """Gradients summed per id (float32, in arrival order), ids in first-seen order."""
    out: dict[int, np.ndarray] = {}
    for i, r in enumerate(ids):
        if r in out:
            out[r] = out[r] + grads[i]
        else:
            out[r] = grads[i].astype(np.float32).copy()
    return out


def initial_values(cfg: TableConfig, keys: list[int], seed: int, dim: int) -> np.ndarray:
    """Initial rows of ``keys`` by the table's initializer: float32 (len(keys), dim)."""
    out = np.zeros((len(keys), dim), dtype=np.float32)
    if keys:
        ini = cfg.initializer
        k = np.asarray(keys, dtype=np.int64)
        init_rows(
            out, np.arange(len(keys), dtype=np.int64), k, INIT_CODES[ini.kind], ini.a, ini.b, seed
        )
    return out


def norm_of(v: np.ndarray, norm: Norm) -> float:
    x = np.abs(v.astype(np.float64))
    if norm == Norm.L2:
        return float(math.sqrt(float((x * x).sum())))
    if norm == Norm.L1:
        return float(x.sum())
    return float(x.max()) if x.size else 0.0


# --------------------------------------------------------------------------
# Storage parts
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RefRow:
    values: np.ndarray  # float32 (dim,)
    slots: np.ndarray  # float32 (n_slots * dim,)
    freq: int = 0
    last_step: int = 0


class RefBlock:
    """Shared rows (static part, qr parts): numpy arrays indexed by row."""

    def __init__(self, cfg: TableConfig, rows: int, dim: int, seed: int) -> None:
        self.values = initial_values(cfg, list(range(rows)), seed, dim)
        self.slots = np.tile(initial_slots(cfg.optimizer, dim), (rows, 1))

    def apply(self, opt: OptimizerConfig, rows: list[int], grads: np.ndarray, t: int) -> None:
        for r, g in sum_by(rows, grads).items():
            self.values[r], self.slots[r] = optimizer_step(opt, self.values[r], self.slots[r], g, t)


class RefDynamicPart:
    """A dynamic part: {key: row} plus the row allocator's state."""

    def __init__(self) -> None:
        self.row_of: dict[int, int] = {}
        self.data: dict[int, RefRow] = {}  # row -> contents
        self.key_at: dict[int, int] = {}  # row -> key
        self.free: list[int] = []
        self.next_row = 0

    @property
    def size(self) -> int:
        return len(self.row_of)

    def insert(self, key: int, row: RefRow) -> None:
        if self.free:
            r = self.free.pop()
        else:
            r = self.next_row
            self.next_row += 1
        self.row_of[key] = r
        self.key_at[r] = key
        self.data[r] = row

    def erase(self, key: int) -> bool:
        r = self.row_of.pop(key, None)
        if r is None:
            return False
        del self.key_at[r]
        del self.data[r]
        self.free.append(r)
        return True

    def live_rows(self) -> list[int]:
        return sorted(self.data)

    def drop_rows(self, rows: list[int]) -> None:
        """Erase the keys of ``rows`` in ascending row order (the engine's order)."""
        for r in sorted(rows):
            self.erase(self.key_at[r])

    def compact(self) -> None:
        live = self.live_rows()
        keys = [self.key_at[r] for r in live]
        data = [self.data[r] for r in live]
        self.row_of = {k: i for i, k in enumerate(keys)}
        self.key_at = dict(enumerate(keys))
        self.data = dict(enumerate(data))
        self.free = []
        self.next_row = len(keys)


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


class RefTable:
    """Shared behaviour: steps, counters, push bookkeeping."""

    def __init__(self, cfg: TableConfig) -> None:
        self.cfg = cfg
        self.opt = cfg.optimizer
        self.dim = cfg.dim
        self.step = 0
        self.auto_step = 0
        self.counters = dict.fromkeys(COUNTERS, 0)

    def pull(
        self, keys: list[int], train: bool = True, mask: list[bool] | None = None
    ) -> np.ndarray:
        out = self._pull(keys, train, mask)
        self.counters["pulled_rows"] += len(keys)
        return out

    def push(self, keys: list[int], grads: np.ndarray, step: int | None = None) -> tuple[int, int]:
        """Returns (applied, dropped)."""
        s = self.auto_step if step is None else step
        self.auto_step = max(self.auto_step, s + 1)
        self.step = max(self.step, s)
        applied, dropped = self._push(keys, grads, s)
        self.counters["pushed_rows"] += applied
        return applied, dropped

    def erase(self, keys: list[int]) -> int:
        return 0

    def evict(self) -> int:
        return 0

    def prune(self, threshold: float, norm: Norm) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        """The TableStats fields the model predicts."""
        keys, static = self._sizes()
        return {
            "keys": keys,
            "dynamic_rows": keys,
            "static_rows": static,
            "step": self.step,
            **self.counters,
        }

    def _pull(self, keys: list[int], train: bool, mask: list[bool] | None) -> np.ndarray:
        raise NotImplementedError

    def _push(self, keys: list[int], grads: np.ndarray, step: int) -> tuple[int, int]:
        raise NotImplementedError

    def _sizes(self) -> tuple[int, int]:
        raise NotImplementedError


class RefDynamicBase(RefTable):
    """Capacity, eviction and pruning of a dynamic part."""

    part: RefDynamicPart

    def _victims(self, new: int, protect: set[int]) -> list[int]:
        """Rows to evict so that ``new`` more keys fit; raises before any change."""
        cfg = self.cfg
        if not cfg.max_rows or self.part.size + new <= cfg.max_rows:
            return []
        over = self.part.size + new - cfg.max_rows
        if cfg.eviction == Eviction.NONE or new > cfg.max_rows:
            raise ResourceExhausted("full")
        cand = [r for r in self.part.live_rows() if r not in protect]
        if len(cand) < over:
            raise ResourceExhausted("full")
        lfu = cfg.eviction == Eviction.LFU

        def score(r: int) -> tuple[int, int]:
            row = self.part.data[r]
            return (row.freq if lfu else row.last_step, self.part.key_at[r])

        return sorted(sorted(cand, key=score)[:over])

    def _touch(self, keys: list[int]) -> None:
        for k in keys:
            r = self.part.row_of.get(k)
            if r is not None:
                row = self.part.data[r]
                row.freq += 1
                row.last_step = self.step

    def erase(self, keys: list[int]) -> int:
        return sum(self.part.erase(k) for k in keys)

    def evict(self) -> int:
        cfg = self.cfg
        dead = []
        by_steps = 0
        for r in self.part.live_rows():
            row = self.part.data[r]
            if cfg.steps_to_live and row.last_step + cfg.steps_to_live < self.step:
                dead.append(r)
                by_steps += 1
            elif (
                cfg.l2_evict_threshold > 0 and norm_of(row.values, Norm.L2) < cfg.l2_evict_threshold
            ):
                dead.append(r)
        self.part.drop_rows(dead)
        self.counters["evictions"] += len(dead)
        self.counters["evictions_steps_to_live"] += by_steps
        self.counters["evictions_l2"] += len(dead) - by_steps
        return len(dead)

    def prune(self, threshold: float, norm: Norm) -> int:
        live = self.part.live_rows()
        victims = [r for r in live if norm_of(self.part.data[r].values, norm) < threshold]
        if victims:
            self.part.drop_rows(victims)
            self.part.compact()
        self.counters["pruned_rows"] += len(victims)
        return len(victims)

    def _push_dynamic(self, keys: list[int], grads: np.ndarray, step: int) -> list[int]:
        """Apply grads to keys with a dynamic row; return the indices of the others."""
        rows = [self.part.row_of.get(k, -1) for k in keys]
        idx = [i for i, r in enumerate(rows) if r >= 0]
        summed = sum_by([rows[i] for i in idx], grads[idx])
        for r, g in summed.items():
            row = self.part.data[r]
            row.values, row.slots = optimizer_step(self.opt, row.values, row.slots, g, step + 1)
            row.last_step = step
        return [i for i, r in enumerate(rows) if r < 0]


class RefDynamic(RefDynamicBase):
    def __init__(self, cfg: TableConfig) -> None:
        super().__init__(cfg)
        self.part = RefDynamicPart()
        self.sketch = (
            CountMin(DEFAULT_SKETCH_WIDTH, DEFAULT_SKETCH_DEPTH)
            if cfg.admission_threshold > 1
            else None
        )

    def _pull(self, keys: list[int], train: bool, mask: list[bool] | None) -> np.ndarray:
        part = self.part
        if train:
            miss = [k for k in keys if k not in part.row_of]
            sketch = self.sketch.copy() if self.sketch is not None else None
            rejected = 0
            admitted = []
            for k in miss:
                if sketch is not None and sketch.add(k) < self.cfg.admission_threshold:
                    rejected += 1
                else:
                    admitted.append(k)
            new_keys = sorted(set(admitted))
            protect = {part.row_of[k] for k in keys if k in part.row_of}
            victims = self._victims(len(new_keys), protect)
            # Nothing raised: commit.
            self.sketch = sketch
            self.counters["admissions_rejected"] += rejected
            part.drop_rows(victims)
            self.counters["evictions"] += len(victims)
            self.counters["evictions_capacity"] += len(victims)
            init = initial_values(self.cfg, new_keys, self.cfg.seed, self.dim)
            for k, v in zip(new_keys, init, strict=True):
                part.insert(k, RefRow(v.copy(), initial_slots(self.opt, self.dim)))
            self._touch(keys)
        default = np.full(self.dim, self.cfg.default_value, dtype=np.float32)
        return _stack(
            [part.data[part.row_of[k]].values if k in part.row_of else default for k in keys],
            self.dim,
        )

    def _push(self, keys: list[int], grads: np.ndarray, step: int) -> tuple[int, int]:
        rest = self._push_dynamic(keys, grads, step)
        return len(keys) - len(rest), len(rest)

    def _sizes(self) -> tuple[int, int]:
        return self.part.size, 0


class RefStatic(RefTable):
    def __init__(self, cfg: TableConfig) -> None:
        super().__init__(cfg)
        self.block = RefBlock(cfg, cfg.hash_bucket_size, cfg.dim, cfg.seed)

    def rows_of(self, keys: list[int]) -> list[int]:
        k = np.asarray(keys, dtype=np.int64)
        return [int(r) for r in static_rows(k, self.cfg.hash_bucket_size, self.cfg.seed)]

    def _pull(self, keys: list[int], train: bool, mask: list[bool] | None) -> np.ndarray:
        return _stack([self.block.values[r] for r in self.rows_of(keys)], self.dim)

    def _push(self, keys: list[int], grads: np.ndarray, step: int) -> tuple[int, int]:
        self.block.apply(self.opt, self.rows_of(keys), grads, step + 1)
        return len(keys), 0

    def _sizes(self) -> tuple[int, int]:
        return 0, self.cfg.hash_bucket_size


class RefAdaptive(RefDynamicBase):
    def __init__(self, cfg: TableConfig) -> None:
        super().__init__(cfg)
        self.static = RefBlock(cfg, cfg.hash_bucket_size, cfg.dim, cfg.seed)
        self.part = RefDynamicPart()
        self.sketch = CountMin(
            cfg.sketch_width or DEFAULT_SKETCH_WIDTH, cfg.sketch_depth or DEFAULT_SKETCH_DEPTH
        )

    def static_row(self, key: int) -> int:
        k = np.asarray([key], dtype=np.int64)
        return int(static_rows(k, self.cfg.hash_bucket_size, self.cfg.seed)[0])

    def _pull(self, keys: list[int], train: bool, mask: list[bool] | None) -> np.ndarray:
        part = self.part
        if train:
            sketch = self.sketch.copy()
            cand = []
            for i, k in enumerate(keys):
                if k in part.row_of:
                    continue
                count = sketch.add(k)
                if mask[i] if mask is not None else count >= self.cfg.promote_threshold:
                    cand.append(k)
            new_keys = sorted(set(cand))
            protect = {part.row_of[k] for k in keys if k in part.row_of}
            victims = self._victims(len(new_keys), protect)
            self.sketch = sketch
            part.drop_rows(victims)
            self.counters["evictions"] += len(victims)
            self.counters["evictions_capacity"] += len(victims)
            for k in new_keys:
                s = self.static_row(k)
                row = RefRow(
                    self.static.values[s].copy(),
                    self.static.slots[s].copy(),
                    freq=sketch.estimate(k),
                    last_step=self.step,
                )
                part.insert(k, row)
            self.counters["promotions"] += len(new_keys)
            # a promoted key's freq is the sketch's count, this pull's sightings included
            promoted = set(new_keys)
            self._touch([k for k in keys if k not in promoted])
        dyn = [k in part.row_of for k in keys]
        self.counters["pulled_dynamic"] += sum(dyn)
        self.counters["pulled_static"] += len(keys) - sum(dyn)
        return _stack(
            [
                part.data[part.row_of[k]].values if d else self.static.values[self.static_row(k)]
                for k, d in zip(keys, dyn, strict=True)
            ],
            self.dim,
        )

    def _push(self, keys: list[int], grads: np.ndarray, step: int) -> tuple[int, int]:
        rest = self._push_dynamic(keys, grads, step)
        self.static.apply(self.opt, [self.static_row(keys[i]) for i in rest], grads[rest], step + 1)
        return len(keys), 0

    def _sizes(self) -> tuple[int, int]:
        return self.part.size, self.cfg.hash_bucket_size


class RefQR(RefTable):
    def __init__(self, cfg: TableConfig) -> None:
        super().__init__(cfg)
        self.q = cfg.qr_quotient_buckets
        self.m = cfg.qr_remainder_buckets
        self.part_dim = cfg.dim // 2 if cfg.qr_combiner == Combiner.CONCAT else cfg.dim
        self.quotient = RefBlock(cfg, self.q, self.part_dim, cfg.seed)
        self.remainder = RefBlock(cfg, self.m, self.part_dim, cfg.seed + 1)

    def parts(self, key: int) -> tuple[int, int]:
        """(quotient row, remainder row) of h = key mod (Q*m)."""
        h = key % (self.q * self.m)  # Python's % is non-negative for a positive modulus
        return h // self.m, h % self.m

    def _pull(self, keys: list[int], train: bool, mask: list[bool] | None) -> np.ndarray:
        rows = []
        for k in keys:
            q, r = self.parts(k)
            vq, vr = self.quotient.values[q], self.remainder.values[r]
            if self.cfg.qr_combiner == Combiner.MULT:
                rows.append(vq * vr)
            elif self.cfg.qr_combiner == Combiner.ADD:
                rows.append(vq + vr)
            else:
                rows.append(np.concatenate([vq, vr]))
        return _stack(rows, self.dim)

    def _push(self, keys: list[int], grads: np.ndarray, step: int) -> tuple[int, int]:
        qs = [self.parts(k)[0] for k in keys]
        rs = [self.parts(k)[1] for k in keys]
        comb = self.cfg.qr_combiner
        if comb == Combiner.MULT:  # d(q*r)/dq = r, d(q*r)/dr = q, both at the old values
            gq = grads * self.remainder.values[rs].reshape(len(keys), self.part_dim)
            gr = grads * self.quotient.values[qs].reshape(len(keys), self.part_dim)
        elif comb == Combiner.ADD:
            gq = gr = grads
        else:
            gq, gr = grads[:, : self.part_dim], grads[:, self.part_dim :]
        self.quotient.apply(self.opt, qs, gq, step + 1)
        self.remainder.apply(self.opt, rs, gr, step + 1)
        return len(keys), 0

    def _sizes(self) -> tuple[int, int]:
        return 0, self.q + self.m


def make_reference(cfg: TableConfig) -> RefTable:
    """The reference model of a table of ``cfg.kind``."""
    return {
        TableKind.DYNAMIC: RefDynamic,
        TableKind.STATIC: RefStatic,
        TableKind.ADAPTIVE: RefAdaptive,
        TableKind.QR: RefQR,
    }[cfg.kind](cfg)


def _stack(rows: list[np.ndarray], dim: int) -> np.ndarray:
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


# --------------------------------------------------------------------------
# Memory: every array reachable from a table object
# --------------------------------------------------------------------------


def reachable_nbytes(obj: object, skip: tuple[str, ...] = ()) -> int:
    """Sum of ``nbytes`` of every distinct numpy array reachable from ``obj``'s attributes.

    Follows the attributes of engine objects (classes from ``embps.server``), and
    lists, tuples and dicts among them; each array is counted once. Attributes
    named in ``skip`` are not followed.
    """
    seen: set[int] = set()
    total = 0
    stack: list[object] = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            base = o if o.base is None else o.base
            if isinstance(base, np.ndarray) and base is not o:
                stack.append(base)
                continue
            total += int(o.nbytes)
        elif isinstance(o, list | tuple):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif type(o).__module__.startswith("embps.server") and hasattr(o, "__dict__"):
            stack.extend(v for k, v in vars(o).items() if k not in skip)
    return total
