"""Experiment: inference pulls while a checkpoint snapshot of the same table is copied.

A table's lock is a readers-writer lock (server/rwlock.py): the snapshot's copy
holds it shared, so inference pulls (train=False) of the same table go on. The
baseline, in the same run, is the lock held exclusively by every call (what the
tables did before: ``RWLock.read`` swapped for ``RWLock.write``).

One thread pulls 1024 random keys with train=False in a loop; the main thread
takes a full snapshot (``Table.snapshot()``: copies of every array; one untimed
snapshot first) of a dynamic table of ROWS rows, dim 64, Adagrad. Reported per mode: the snapshot's time, the
pulls finished while it ran, and the latency of the pulls that overlapped it.

Run from the repository root:
    .venv/bin/python docs/experiments/inference_during_snapshot.py [--rows N]
(results: docs/benchmarks.md, "Inference during a snapshot").
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from embps.protos.config import Adagrad, TableConfig
from embps.server import rwlock
from embps.server.tables import make_table

DIM, BATCH = 64, 1024


def measure(rows: int, exclusive: bool) -> dict[str, float]:
    """One snapshot beside a thread of inference pulls; its numbers."""
    shared = rwlock.RWLock.read
    if exclusive:
        rwlock.RWLock.read = rwlock.RWLock.write  # type: ignore[method-assign]
    try:
        table = make_table(
            TableConfig("t", dim=DIM, optimizer=Adagrad(lr=0.05), initial_capacity=rows)
        )
        keys = np.arange(rows, dtype=np.int64)
        for a in range(0, rows, 1 << 16):
            table.pull(keys[a : a + (1 << 16)])
        table.snapshot()  # warm-up: the first copies of a process fault their pages in
        rng = np.random.default_rng(0)
        stop, started = threading.Event(), threading.Event()
        times: list[tuple[float, float]] = []

        def reader() -> None:
            while not stop.is_set():
                batch = rng.choice(keys, BATCH)
                t0 = time.perf_counter()
                table.pull(batch, train=False)
                times.append((t0, time.perf_counter()))
                started.set()

        th = threading.Thread(target=reader)
        th.start()
        started.wait()
        time.sleep(0.2)
        s0 = time.perf_counter()
        table.snapshot()
        s1 = time.perf_counter()
        time.sleep(0.2)
        stop.set()
        th.join()
    finally:
        rwlock.RWLock.read = shared  # type: ignore[method-assign]
    lat = np.array([b - a for a, b in times if b > s0 and a < s1]) * 1e3  # overlapping it
    return {
        "snapshot_s": s1 - s0,
        "pulls_during": float(sum(1 for a, b in times if a >= s0 and b <= s1)),
        "median_pull_ms": float(np.median(lat)) if lat.size else 0.0,
        "p99_pull_ms": float(np.percentile(lat, 99)) if lat.size else 0.0,
        "longest_pull_ms": float(lat.max()) if lat.size else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    print(f"dynamic table, {args.rows:,} rows, dim {DIM}, Adagrad; inference pulls of {BATCH} keys")
    res = {mode: measure(args.rows, mode == "exclusive") for mode in ("exclusive", "shared")}
    for mode, r in res.items():
        print(
            f"{mode:9s} lock: snapshot {r['snapshot_s']:.2f} s, {r['pulls_during']:.0f} pulls "
            f"finished during it; pulls overlapping it: median {r['median_pull_ms']:.1f} ms, "
            f"p99 {r['p99_pull_ms']:.1f} ms, longest {r['longest_pull_ms']:.1f} ms"
        )
    ratio = res["exclusive"]["longest_pull_ms"] / max(res["shared"]["longest_pull_ms"], 1e-9)
    print(f"longest pull, exclusive / shared: {ratio:.1f}x")


if __name__ == "__main__":
    main()
