"""``embps bench checkpoint``: checkpoint write and restore throughput beside numpy, in one run.

What runs (one shard, one table; every contender on the same arrays, the same disk):

  write    ``Checkpointer.checkpoint(step, incremental=False)``: the table's
           consistent snapshot (a copy under its lock, each large array written
           while it is being copied), one .npy per array with its CRC-32, fsync
           of every file and directory, the atomic rename, beside ``numpy.save``
           of the same arrays (the snapshot's: values, slots, metadata, keys)
           into open files in the same directory, each followed by ``fsync``,
           then the directory's: the same durability, no CRC, no copy, no rename.
  restore  ``restore_tables`` (every file read in pieces on parallel threads,
           uncached files with direct I/O, every byte CRC-checked, the hash map
           built from the keys while the large files are still being read, then
           ``Table.load``) beside ``numpy.load(allow_pickle=False)`` of the numpy
           files. Before every read both sets of files are dropped from the page
           cache (``posix_fadvise(DONTNEED)`` on clean, fsynced files), so both
           read from the disk.

Also timed, not compared (the breakdown line): the snapshot alone, and
reading + verifying the files alone (``load_chain``, cold), so the report shows
which part of a checkpoint or restore costs what.

Throughput is array bytes / seconds (GB/s, 1e9 bytes). Every measurement is
the best of ``--reps`` rounds, after an untimed warm-up round (the first touch
of fresh memory is several times slower on a VM); each round runs the
contenders in turn, in alternating order, after ``sync``. The table is dynamic, dim 64, float32, Adam (two slots):
800 bytes per row with key and metadata; ROWS rows (``--quick``: QUICK_ROWS).
``--dir`` picks the disk (default: the system's temporary directory).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from embps.client.bench.report import machine_line, table, write_json
from embps.protos.config import Adam, TableConfig
from embps.server.durability import Checkpointer, load_chain, restore_tables
from embps.server.tables import make_table

ROWS = 2_000_000
QUICK_ROWS = 500_000
DIM = 64
REPS = 3
QUICK_REPS = 2
BATCH = 250_000
SEED = 20240611
TARGET = 0.8  # both ratios: ours / numpy


def _progress(what: str) -> None:
    print(f"  .. {what}", file=sys.stderr, flush=True)


def _drop_cache(paths: list[Path]) -> None:
    """Evict the (clean) pages of ``paths`` from the page cache, so the next read hits the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_table(rows: int, seed: int = SEED) -> Any:
    """A dynamic dim-64 Adam table with ``rows`` trained rows (values and slots non-trivial)."""
    cfg = TableConfig(
        "bench", dim=DIM, optimizer=Adam(lr=0.01), initial_capacity=rows, seed=seed % 1000
    )
    table = make_table(cfg)
    rng = np.random.default_rng(seed)
    keys = rng.permutation(np.arange(rows, dtype=np.int64) * 7919 + 13)
    for lo in range(0, rows, BATCH):
        k = keys[lo : lo + BATCH]
        table.pull(k)
        table.push(k, rng.standard_normal((k.shape[0], DIM), dtype=np.float32), step=0)
    return table


def _np_save(arrays: dict[str, np.ndarray], d: Path) -> list[Path]:
    d.mkdir(parents=True)
    paths = []
    for name, arr in arrays.items():
        p = d / f"{name}.npy"
        with open(p, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        paths.append(p)
    _fsync_dir(d)
    return paths


def measure(rows: int, reps: int, quick: bool, base_dir: str | None = None) -> dict[str, Any]:
    """Run every measurement; returns the flat result object (see the module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="embps-bench-ckpt-", dir=base_dir))
    r: dict[str, Any] = {"rows": rows, "dim": DIM, "reps": reps, "quick": quick, "dir": str(work)}
    try:
        _progress(f"build a {rows:,}-row table")
        table = build_table(rows)
        arrays = dict(table.snapshot().arrays)
        nbytes = sum(int(a.nbytes) for a in arrays.values())
        r["gb"] = nbytes / 1e9
        write_s, save_s, restore_s, load_s = [], [], [], []
        snap_s: list[float] = []
        read_s: list[float] = []
        for rep in range(-1, reps):  # round -1 warms up (memory first touched, disk awake)
            _progress("warm-up round" if rep < 0 else f"round {rep + 1} of {reps}")
            root = work / f"ckpt-{rep}"
            npdir = work / f"np-{rep}"
            ck = Checkpointer(root, 0, 1, lambda: [table])
            order = ("ours", "numpy") if rep % 2 == 0 else ("numpy", "ours")
            for who in order:
                gc.collect()
                os.sync()  # nothing of the previous contender left to write back
                t0 = time.perf_counter()
                if who == "ours":
                    res = ck.checkpoint(1, incremental=False)
                    write_s.append(time.perf_counter() - t0)
                    assert res.bytes == nbytes, (res.bytes, nbytes)
                else:
                    np_paths = _np_save(arrays, npdir)
                    save_s.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            snap = table.snapshot()  # part of "write"; timed apart for the breakdown
            snap_s.append(time.perf_counter() - t0)
            del snap
            ck_paths = sorted(p for p in root.rglob("*.npy"))
            _drop_cache(ck_paths)
            gc.collect()
            t0 = time.perf_counter()
            chain = load_chain(root, 1, 0, 1)  # part of "restore": read and verify only
            read_s.append(time.perf_counter() - t0)
            del chain
            for who in reversed(order):
                _drop_cache(ck_paths + np_paths)
                gc.collect()
                t0 = time.perf_counter()
                if who == "ours":
                    tables, _ = restore_tables(root, 1, 0, 1)
                    restore_s.append(time.perf_counter() - t0)
                    assert tables[0].stats().keys == rows
                    del tables
                else:
                    loaded = [np.load(p, allow_pickle=False) for p in np_paths]
                    load_s.append(time.perf_counter() - t0)
                    del loaded
            shutil.rmtree(root)
            shutil.rmtree(npdir)
            os.sync()
        del write_s[0], save_s[0], restore_s[0], load_s[0], snap_s[0], read_s[0]  # warm-up
        r["write_gb_s"] = nbytes / min(write_s) / 1e9
        r["npsave_gb_s"] = nbytes / min(save_s) / 1e9
        r["restore_gb_s"] = nbytes / min(restore_s) / 1e9
        r["npload_gb_s"] = nbytes / min(load_s) / 1e9
        r["snapshot_gb_s"] = nbytes / min(snap_s) / 1e9
        r["read_verify_gb_s"] = nbytes / min(read_s) / 1e9
        r["read_verify_vs_npload"] = r["read_verify_gb_s"] / r["npload_gb_s"]
        r["write_vs_npsave"] = r["write_gb_s"] / r["npsave_gb_s"]
        r["restore_vs_npload"] = r["restore_gb_s"] / r["npload_gb_s"]
        r["target"] = TARGET
        r["targets_met"] = int(r["write_vs_npsave"] >= TARGET) + int(
            r["restore_vs_npload"] >= TARGET
        )
        r["targets_total"] = 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return r


def report(r: dict[str, Any]) -> str:
    """The readable table: each measurement beside its baseline, the ratio and the target."""
    head = ("measurement", "ours GB/s", "baseline", "GB/s", "ratio", "target", "met")
    rows = [
        ("checkpoint write", "write_gb_s", "np.save+fsync", "npsave_gb_s", "write_vs_npsave"),
        ("restore", "restore_gb_s", "np.load", "npload_gb_s", "restore_vs_npload"),
    ]
    lines = [head] + [
        (
            what,
            f"{r[ours]:.2f}",
            base,
            f"{r[b]:.2f}",
            f"{r[ratio]:.2f}x",
            f">= {TARGET}x",
            "yes" if r[ratio] >= TARGET else "NO",
        )
        for what, ours, base, b, ratio in rows
    ]

    return "\n".join(
        [
            f"embps bench checkpoint{' --quick' if r['quick'] else ''}: one dynamic table, "
            f"{r['rows']:,} rows, dim {DIM} fp32, Adam ({r['gb']:.2f} GB of arrays), "
            f"best of {r['reps']}, cold reads",
            machine_line(f"; disk of {r['dir']}"),
            "",
            *table(lines[0], lines[1:], right=set()),
            "",
            f"breakdown (not compared): the snapshot (copy under the table lock) alone "
            f"{r['snapshot_gb_s']:.2f} GB/s; reading and CRC-checking the files alone "
            f"{r['read_verify_gb_s']:.2f} GB/s ({r['read_verify_vs_npload']:.2f}x np.load), "
            "the rest of a restore builds the table",
            f"targets met: {r['targets_met']} of {r['targets_total']}",
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps bench checkpoint``."""
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_ROWS:,} rows instead of {ROWS:,}"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON object")
    parser.add_argument("--dir", help="directory on the disk to measure (default: the temp dir)")
    parser.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)  # tests: tiny runs
    parser.add_argument("--reps", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the report, write the JSON if asked. Returns 0."""
    rows = args.rows or (QUICK_ROWS if args.quick else ROWS)
    reps = args.reps or (QUICK_REPS if args.quick else REPS)
    if rows < 1 or reps < 1:
        raise SystemExit("--rows and --reps must be >= 1")
    t0 = time.perf_counter()
    r = measure(rows, reps, bool(args.quick), args.dir)
    print(report(r))
    print(f"(run took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        write_json(args.json, r)
    return 0
