"""Experiment: how long a pull waits while a 10M-row table is swept for eviction.

An eviction sweep (``Table.evict``) pages through the row arena and holds the
table's lock for one page at a time (``EVICT_PAGE_ROWS`` rows), so pulls go on
between pages. The baseline, in the same run, is a sweep of the same table in one
page (the lock held for the whole sweep: what the shard did before paging).

Two dynamic tables of ROWS rows each, dim 16, SGD, steps_to_live=5: every row is
created at step 0, half are pushed at step 10 (so the other half is past its
steps-to-live). One thread pulls 1024 random keys of the kept half for training (the
write lock, like a trainer; pulls stamp the rows, so only kept keys are pulled) in a loop; the main thread sweeps. Reported per mode: the sweep's
time, rows evicted, pulls finished during it, and the latency of those pulls
(median, p99, max: the longest stall), beside pulls with no sweep running.

Run from the repository root:
    .venv/bin/python docs/experiments/evict_stall.py [--rows N]
(results: docs/benchmarks.md, "Eviction").
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from embps.protos.config import SGD, TableConfig
from embps.server.tables import EVICT_PAGE_ROWS, make_table

DIM, BATCH, BUILD = 16, 1024, 1 << 20


def build(rows: int):
    t = make_table(TableConfig("t", DIM, optimizer=SGD(lr=0.01), steps_to_live=5,
                               initial_capacity=rows))  # fmt: skip
    keys = np.arange(rows, dtype=np.int64) * 7919 + 13
    for i in range(0, rows, BUILD):
        t.pull(keys[i : i + BUILD])
    kept = keys[::2]
    for i in range(0, kept.size, BUILD):
        part = kept[i : i + BUILD]
        t.push(part, np.zeros((part.size, DIM), np.float32), step=10)
    return t, kept


def pull_latencies(t, keys: np.ndarray, stop: threading.Event, out: list[float]) -> None:
    rng = np.random.default_rng(1)
    while not stop.is_set():
        batch = keys[rng.integers(0, keys.size, BATCH)]
        t0 = time.perf_counter()
        t.pull(batch)
        out.append(time.perf_counter() - t0)


def run(t, keys: np.ndarray, page_rows: int | None) -> dict[str, float]:
    lat: list[float] = []
    stop = threading.Event()
    th = threading.Thread(target=pull_latencies, args=(t, keys, stop, lat))
    th.start()
    time.sleep(0.5)  # pulls in flight before the sweep
    lat.clear()
    t0 = time.perf_counter()
    if page_rows is None:
        time.sleep(2.0)
        rows = 0
    else:
        rows = t.evict(page_rows=page_rows).rows
    took = time.perf_counter() - t0
    stop.set()
    th.join()
    a = np.array(lat) * 1e3
    return {"sweep_s": took, "rows": rows, "pulls": a.size, "p50_ms": float(np.median(a)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    paged, keys = build(args.rows)
    whole, _ = build(args.rows)
    print(f"built 2 tables of {args.rows} rows in {time.perf_counter() - t0:.1f}s")
    modes = [
        ("no sweep (pulls alone)", paged, None),
        (f"paged sweep ({EVICT_PAGE_ROWS} rows a page)", paged, EVICT_PAGE_ROWS),
        ("one-page sweep (baseline)", whole, 1 << 40),
    ]
    res = {}
    for name, t, page in modes:
        res[name] = r = run(t, keys, page)
        print(f"{name:36s} sweep {r['sweep_s']:6.2f}s  evicted {r['rows']:>9d}  "
              f"pulls {r['pulls']:>5d}  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
              f"max {r['max_ms']:8.2f} ms")  # fmt: skip
    p, w = res[modes[1][0]], res[modes[2][0]]
    print(f"longest pull stall: paged {p['max_ms']:.1f} ms vs one page {w['max_ms']:.1f} ms "
          f"({w['max_ms'] / p['max_ms']:.0f}x shorter)")  # fmt: skip


if __name__ == "__main__":
    main()
