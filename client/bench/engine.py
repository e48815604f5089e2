"""``embps bench engine``: the hash map and the table beside their baselines, in one run.

What runs (single thread, every contender on the same keys and batches):

  lookup         our ``hashmap.find`` beside pandas' khash (``Int64HashTable.lookup``),
                 numba's ``typed.Dict`` (``d.get`` in an @njit loop, as a numba user
                 would write it) and a Python ``dict`` (``map(d.get, keys.tolist())``);
                 batches of BATCH keys drawn uniformly and from Zipf(ZIPF_A).
  insert         all N keys into an empty map in batches of BATCH: our
                 ``find_or_insert`` beside khash's ``map_keys_to_values`` (row numbers
                 as values), both sized for N up front; then both without a size hint
                 (the growth path: our caller rehashes into 2x buckets and resumes the
                 batch). Creating the map is part of the timed work for every contender.
  lookup+gather  ``table.pull(batch, train=False)`` on a dynamic dim-32 fp32 Adagrad
                 table of N keys (find + copy of each row) beside ``np.take(dense, idx,
                 axis=0)`` of as many rows from a dense (N, 32) float32 array: the
                 memory-bound limit of a gather.
  bytes_per_key  ``table.stats().bytes / keys`` beside the raw payload (8-byte key +
                 32 fp32 values + 32 fp32 Adagrad accumulators = 264 bytes).

Keys are N distinct int64 spread over the whole int64 range (a splitmix64
bijection of a counter; its constants differ from the map's own hash). Zipf
ranks come from ``numpy``'s zipf sampler, redrawn when above N (a truncated
Zipf: clipping instead would pile the whole tail, about a fifth of the draws,
onto one key), and map to keys through a fixed random permutation, so hot keys
are scattered over the map and the arena.

Every measurement is the best of ``--reps`` rounds, after a warm-up that
compiles every numba function; each round runs all contenders of a measurement
in turn, so a busy moment of the shared machine hits them alike. The run prints each number beside its baseline,
the ratio and whether the project's target is met; ``--json`` writes a flat
object of the same numbers.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from numba import njit, typed, types

from embps.client.bench.report import (
    Target,
    best_interleaved,
    fmt_num,
    fmt_ratio,
    machine_line,
    table,
    target_cells,
    write_json,
)
from embps.protos.config import TableKind
from embps.protos.routing import GOLDEN, mix64_inplace
from embps.server.kernels import hashmap as hm

FULL_KEYS = 10_000_000
QUICK_KEYS = 2_000_000
BATCH = 1_000_000
ZIPF_A = 1.1
DIM = 32
RAW_BYTES_PER_KEY = 8 + DIM * 4 + DIM * 4  # key + fp32 values + one fp32 Adagrad slot
REPS = 5
SEED = 20240611


TARGETS: tuple[Target, ...] = (
    Target("lookup_vs_khash", 2.5),
    Target("lookup_vs_typed_dict", 6.0),
    Target("insert_vs_khash", 2.0),
    Target("gather_vs_dense", 0.6),
    Target("bytes_per_key_vs_raw", 1.3, at_most=True),
)


# --------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------


def make_keys(n: int, seed: int) -> np.ndarray:
    """n distinct int64 keys spread over the int64 range, never hashmap.EMPTY: int64 (n,).

    splitmix64 of ``base + i * golden`` is a bijection of i (odd multiplier, then
    an invertible mix), so the keys are distinct without a sort or a set.
    """
    base = np.uint64(np.random.default_rng(seed).integers(0, 2**63, dtype=np.uint64))
    x = mix64_inplace(np.arange(n + 1, dtype=np.uint64) * GOLDEN + base)
    keys = x.view(np.int64)
    return np.ascontiguousarray(keys[keys != hm.EMPTY][:n])


def zipf_ranks(n: int, size: int, a: float, rng: np.random.Generator) -> np.ndarray:
    """0-based ranks in [0, n) from a Zipf(a) truncated at n (draws above n redrawn): int64 (size,)."""
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        r = rng.zipf(a, size=2 * (size - filled))
        r = r[r <= n][: size - filled]
        out[filled : filled + r.shape[0]] = r - 1
        filled += r.shape[0]
    return out


@dataclass(frozen=True)
class Workload:
    """N keys and two query batches (int64 (batch,)) with each query's position in ``keys``."""

    keys: np.ndarray
    uniform: np.ndarray
    zipf: np.ndarray
    idx_uniform: np.ndarray
    idx_zipf: np.ndarray


def make_workload(n: int, batch: int, a: float, seed: int) -> Workload:
    """N keys, a uniform batch and a Zipf(a) batch (hot keys scattered by a fixed permutation)."""
    rng = np.random.default_rng(seed + 1)
    keys = make_keys(n, seed)
    idx_uniform = rng.integers(0, n, size=batch, dtype=np.int64)
    perm = rng.permutation(n).astype(np.int64)
    idx_zipf = perm[zipf_ranks(n, batch, a, rng)]
    return Workload(keys, keys[idx_uniform], keys[idx_zipf], idx_uniform, idx_zipf)


def batches(n: int, batch: int) -> list[tuple[int, int]]:
    """[start, stop) bounds of consecutive batches covering range(n)."""
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def mops(n: int, seconds: float) -> float:
    """Millions of items per second."""
    return n / seconds / 1e6


# --------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------


class OurMap:
    """Drives the hashmap kernels directly, as ``tables.DynamicPart`` does (no value arena).

    hint: keys to size the buckets for up front; 0 starts at MIN_CAPACITY and grows.
    """

    def __init__(self, hint: int) -> None:
        cap = hm.capacity_for(hint)
        self.buckets = hm.new_buckets(cap)
        # Rows are just numbers here: with a hint they stop at N; without one the
        # allocator never stops, so only the load factor makes the caller grow.
        self.meta = hm.new_meta(cap, hint if hint else 2**62)
        self.free = np.empty(0, dtype=np.int64)

    def insert(self, keys: np.ndarray) -> np.ndarray:
        """find_or_insert with rehash-and-resume: rows int64 (n,)."""
        n = keys.shape[0]
        rows = np.empty(n, dtype=np.int64)
        inserted = np.zeros(n, dtype=np.bool_)
        start = 0
        while True:
            start = hm.find_or_insert(
                self.buckets, self.meta, self.free, keys, start, rows, inserted
            )
            if start == n:
                return rows
            cap = self.buckets.shape[0]  # twice the bucket count
            grown = hm.new_buckets(cap)
            hm.rehash(self.buckets, grown)
            self.buckets = grown
            self.meta[hm.M_GROW_AT] = hm.grow_limit(cap)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, -1 where absent: int64 (n,)."""
        rows = np.empty(keys.shape[0], dtype=np.int64)
        hm.find(self.buckets, self.meta, keys, rows)
        return rows


@njit(cache=True)
def typed_dict_insert(d, keys, first_row):
    """d[keys[i]] = first_row + i for each key of int64 (n,)."""
    for i in range(keys.shape[0]):
        d[keys[i]] = first_row + i


@njit(cache=True)
def typed_dict_find(d, keys):
    """d.get(key, -1) of each key of int64 (n,) -> int64 (n,)."""
    out = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        out[i] = d.get(keys[i], -1)
    return out


def pydict_find(d: dict[int, int], keys: np.ndarray) -> np.ndarray:
    """Python dict lookup of a numpy batch, -1 where absent: int64 (n,)."""
    it = map(d.get, keys.tolist(), itertools.repeat(-1))
    return np.fromiter(it, dtype=np.int64, count=keys.shape[0])


def make_bench_table(n: int) -> Any:
    """An empty dynamic dim-32 Adagrad table with room for n rows."""
    from embps.protos.config import Adagrad, TableConfig
    from embps.server.tables import make_table

    cfg = TableConfig(
        "bench", dim=DIM, kind=TableKind.DYNAMIC, optimizer=Adagrad(lr=0.1), initial_capacity=n
    )
    return make_table(cfg)


class Builders:
    """Build all N keys into each contender, in batches; keeps the last map built."""

    def __init__(self, keys: np.ndarray, batch: int) -> None:
        from pandas._libs.hashtable import Int64HashTable  # dev dependency: import when run

        self.khash_cls = Int64HashTable
        self.keys = keys
        self.n = keys.shape[0]
        self.rows = np.arange(self.n, dtype=np.int64)
        self.spans = batches(self.n, batch)
        self.built: dict[str, Any] = {}

    def ours(self, hint: bool) -> None:
        m = OurMap(self.n if hint else 0)
        for s, e in self.spans:
            m.insert(self.keys[s:e])
        self.built["ours" if hint else "ours_nohint"] = m

    def khash(self, hint: bool) -> None:
        h = self.khash_cls(self.n) if hint else self.khash_cls()
        for s, e in self.spans:
            h.map_keys_to_values(self.keys[s:e], self.rows[s:e])
        self.built["khash" if hint else "khash_nohint"] = h

    def typed_dict(self) -> None:
        d = typed.Dict.empty(types.int64, types.int64, n_keys=self.n)
        for s, e in self.spans:
            typed_dict_insert(d, self.keys[s:e], s)
        self.built["typed_dict"] = d


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def warm_up() -> None:
    """Compile (or load from numba's cache) every numba function the benchmark times."""
    keys = make_keys(64, 0)
    m = OurMap(0)
    m.insert(keys)
    m.find(keys)
    d = typed.Dict.empty(types.int64, types.int64, n_keys=64)
    typed_dict_insert(d, keys, 0)
    typed_dict_find(d, keys)
    t = make_bench_table(64)
    t.pull(keys, train=True)
    t.pull(keys, train=False)


def bench_maps(w: Workload, batch: int, reps: int, out: dict[str, Any]) -> None:
    """Insert (hint / no hint) and lookup (uniform / Zipf) of every hash map."""
    n = w.keys.shape[0]
    b = Builders(w.keys, batch)
    _progress(f"insert {n:,} keys (x{reps})")
    t = best_interleaved(
        reps,
        {
            "insert": partial(b.ours, hint=True),
            "khash_insert": partial(b.khash, hint=True),
            "typed_dict_insert": b.typed_dict,
            "insert_nohint": partial(b.ours, hint=False),
            "khash_insert_nohint": partial(b.khash, hint=False),
        },
    )
    out.update({f"{name}_mkeys_s": mops(n, s) for name, s in t.items()})
    ours, khash, tdict = b.built["ours"], b.built["khash"], b.built["typed_dict"]
    b.built.clear()
    _progress("build the Python dict (not timed)")
    pyd = dict(zip(w.keys.tolist(), range(n), strict=True))
    for dist, q in (("", w.uniform), ("_zipf", w.zipf)):
        _progress(f"lookup {q.shape[0]:,} keys, {'Zipf' if dist else 'uniform'} (x{reps})")
        expect = ours.find(q)
        assert (expect >= 0).all(), "every query key was inserted"
        for got in (khash.lookup(q), typed_dict_find(tdict, q), pydict_find(pyd, q)):
            assert np.array_equal(got, expect), "every map returns the same rows"
        t = best_interleaved(
            reps,
            {
                "lookup": partial(ours.find, q),
                "khash_lookup": partial(khash.lookup, q),
                "typed_dict_lookup": partial(typed_dict_find, tdict, q),
                "pydict_lookup": partial(pydict_find, pyd, q),
            },
        )
        out.update({f"{name}{dist}_mkeys_s": mops(q.shape[0], s) for name, s in t.items()})


def bench_table(w: Workload, batch: int, reps: int, out: dict[str, Any]) -> None:
    """table.pull(train=False) beside a dense np.take, and the table's bytes per key."""
    keys, n = w.keys, w.keys.shape[0]
    _progress(f"fill the table with {n:,} keys (one run)")
    table = make_bench_table(n)
    t0 = time.perf_counter()
    for s, e in batches(n, batch):
        table.pull(keys[s:e], train=True)
    out["table_insert_mkeys_s"] = mops(n, time.perf_counter() - t0)
    st = table.stats()
    assert st.keys == n, f"the table holds {st.keys} keys, expected {n}"
    out["bytes_per_key"] = st.bytes / st.keys
    dense = np.random.default_rng(0).random((n, DIM), dtype=np.float32)
    for dist, q, idx in (("", w.uniform, w.idx_uniform), ("_zipf", w.zipf, w.idx_zipf)):
        _progress(f"lookup+gather {q.shape[0]:,} rows, {'Zipf' if dist else 'uniform'} (x{reps})")
        got = table.pull(q, train=False)
        assert got.shape == (q.shape[0], DIM) and got.dtype == np.float32
        t = best_interleaved(
            reps,
            {
                "gather": partial(table.pull, q, train=False),
                "dense_gather": partial(np.take, dense, idx, axis=0),
            },
        )
        out.update({f"{name}{dist}_mrows_s": mops(q.shape[0], s) for name, s in t.items()})


def add_ratios(r: dict[str, Any]) -> None:
    """Ours / baseline for every pair (bytes: ours / raw payload, lower is better)."""
    for dist in ("", "_zipf"):
        look = r[f"lookup{dist}_mkeys_s"]
        r[f"lookup{dist}_vs_khash"] = look / r[f"khash_lookup{dist}_mkeys_s"]
        r[f"lookup{dist}_vs_typed_dict"] = look / r[f"typed_dict_lookup{dist}_mkeys_s"]
        r[f"lookup{dist}_vs_pydict"] = look / r[f"pydict_lookup{dist}_mkeys_s"]
        r[f"gather{dist}_vs_dense"] = r[f"gather{dist}_mrows_s"] / r[f"dense_gather{dist}_mrows_s"]
    r["insert_vs_khash"] = r["insert_mkeys_s"] / r["khash_insert_mkeys_s"]
    r["insert_vs_typed_dict"] = r["insert_mkeys_s"] / r["typed_dict_insert_mkeys_s"]
    r["insert_nohint_vs_khash"] = r["insert_nohint_mkeys_s"] / r["khash_insert_nohint_mkeys_s"]
    r["raw_bytes_per_key"] = RAW_BYTES_PER_KEY
    r["bytes_per_key_vs_raw"] = r["bytes_per_key"] / RAW_BYTES_PER_KEY
    r["targets_met"] = sum(t.met(r[t.ratio]) for t in TARGETS)
    r["targets_total"] = len(TARGETS)


def measure(n: int, batch: int, reps: int, quick: bool, seed: int = SEED) -> dict[str, Any]:
    """Run every measurement; returns the flat result object (see the module docstring)."""
    batch = min(batch, n)
    r: dict[str, Any] = {"keys": n, "batch": batch, "zipf_a": ZIPF_A, "quick": quick, "reps": reps}
    _progress("compile (numba) and make the keys")
    warm_up()
    w = make_workload(n, batch, ZIPF_A, seed)
    bench_maps(w, batch, reps, r)
    gc.collect()
    bench_table(w, batch, reps, r)
    add_ratios(r)
    return r


def _progress(what: str) -> None:
    print(f"  .. {what}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

# (measurement, our JSON key, [(baseline name, baseline JSON key, ratio JSON key), ...])
_Line = tuple[str, str, list[tuple[str, str, str]]]
_LOOKUP_BASELINES = (("khash", "khash"), ("typed.Dict", "typed_dict"), ("dict", "pydict"))


def _lines() -> list[_Line]:
    """What the report shows, row by row."""
    dists = (("", "uniform"), ("_zipf", f"Zipf({ZIPF_A:g})"))
    lines: list[_Line] = []
    for d, label in dists:
        base = [
            (name, f"{k}_lookup{d}_mkeys_s", f"lookup{d}_vs_{k}") for name, k in _LOOKUP_BASELINES
        ]
        lines.append((f"lookup, {label} (M keys/s)", f"lookup{d}_mkeys_s", base))
    insert = [
        ("khash", "khash_insert_mkeys_s", "insert_vs_khash"),
        ("typed.Dict", "typed_dict_insert_mkeys_s", "insert_vs_typed_dict"),
    ]
    lines.append(("insert, size hint (M keys/s)", "insert_mkeys_s", insert))
    nohint = [("khash", "khash_insert_nohint_mkeys_s", "insert_nohint_vs_khash")]
    lines.append(("insert, no hint (M keys/s)", "insert_nohint_mkeys_s", nohint))
    for d, label in dists:
        dense = [("np.take", f"dense_gather{d}_mrows_s", f"gather{d}_vs_dense")]
        lines.append((f"lookup+gather, {label} (M rows/s)", f"gather{d}_mrows_s", dense))
    raw = [("raw payload", "raw_bytes_per_key", "bytes_per_key_vs_raw")]
    lines.append(("bytes per key", "bytes_per_key", raw))
    return lines


def report(r: dict[str, Any]) -> str:
    """The readable table: each measurement beside its baseline, the ratio and the target."""
    targets = {t.ratio: t for t in TARGETS}
    head = ("measurement", "ours", "baseline", "", "ratio", "target", "met")
    rows: list[tuple[str, ...]] = []
    for what, ours, bases in _lines():
        for i, (name, base, ratio) in enumerate(bases):
            t = targets.get(ratio)
            rows.append(
                (
                    what if i == 0 else "",
                    fmt_num(r[ours]) if i == 0 else "",
                    name,
                    fmt_num(r[base]),
                    fmt_ratio(r[ratio]),
                    *target_cells(t, r[ratio]),
                )
            )

    title = (
        f"embps bench engine{' --quick' if r['quick'] else ''}: {r['keys']:,} keys, "
        f"query batches of {r['batch']:,}, best of {r['reps']}, single thread; "
        f"table: dynamic, dim {DIM} fp32, Adagrad"
    )
    machine = machine_line()
    return "\n".join(
        [
            title,
            machine,
            "",
            *table(head, rows, right={1, 3, 4}),
            "",
            f"not compared: filling the table by training pulls (new rows initialised), "
            f"{fmt_num(r['table_insert_mkeys_s'])} M keys/s, one run",
            f"targets met: {r['targets_met']} of {r['targets_total']}",
        ]
    )


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps bench engine``."""
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_KEYS:,} keys instead of {FULL_KEYS:,}"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON object")
    parser.add_argument("--keys", type=int, default=0, help=argparse.SUPPRESS)  # tests: tiny runs
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=REPS, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the report, write the JSON if asked. Returns 0 (2: no pandas)."""
    n = args.keys or (QUICK_KEYS if args.quick else FULL_KEYS)
    if n < 1 or args.batch < 1 or args.reps < 1:
        raise SystemExit("--keys, --batch and --reps must be >= 1")
    if importlib.util.find_spec("pandas") is None:
        msg = "embps bench engine needs pandas for the khash baseline: pip install -e '.[dev]'"
        print(msg, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    r = measure(n, args.batch, args.reps, bool(args.quick))
    print(report(r))
    print(f"(run took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        write_json(args.json, r)
    return 0
