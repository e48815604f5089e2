"""``embps bench serving``: replica shards beside the training shards they follow.

A 2-shard training PS (``embps serve --shards 2``) under a steady training load (a
thread pushing Adagrad gradients of ``--push-keys`` keys as fast as it can), and one
replica per shard (``embps serve --replica-of``, reading the feed every ``POLL_S``).
Each training shard reserves rows for its keys and a tenth more (``initial_capacity``),
so its bytes per key are what it holds, not a reserve. Measured in one run:

  pulls       inference pulls (``train=False``) of ``--batch`` Zipf keys: on the
              replicas, beside the same pulls on the training shards, interleaved
              rounds, best round each (rows/s);
  memory      bytes per key of the replicas' table (no optimizer slots, no per-row
              training metadata) with float32, float16 and int8 rows
              (``--replica-dtype``: one replica group each, started after the load)
              beside the training shards' (``stats()``: every array each holds);
              and the int8 replicas' inference pulls beside the training shards';
  lag         the replicas' ``lag_seconds`` (Stats), sampled while the load runs:
              p50 and p99.

JSON keys (flat): ``replica_pull_rows_s``, ``training_pull_rows_s``, ``pull_ratio``,
``replica_bytes_per_key_fp32``, ``training_bytes_per_key``, ``bytes_ratio_fp32``,
``replica_bytes_per_key_fp16``, ``replica_bytes_per_key_int8``, ``bytes_ratio_int8``,
``int8_pull_rows_s``, ``lag_p50_s``, ``lag_p99_s``, ``push_rows_s`` (the load),
``keys``, ``dim``.

Targets (issue "Serving replicas"): lag p99 <= 2 s at the stated load; replica pulls >=
training-shard pulls; int8 replica bytes per key <= 0.35x the training shard's (dim 16,
Adagrad).

Example::

    embps bench serving --quick --json bench-results/serving.json
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from embps.client.bench.report import machine_line, table, write_json
from embps.client.demo.localps import LocalPS
from embps.client.ps_client import PSClient

NUM_SHARDS = 2
DIM = 16


# How often the replicas read the feed. A key pushed many times between two rounds is
# applied once per round, so a longer poll costs the replicas less work under a training
# load (every key of the table changes many times a second here) and adds that much lag.
POLL_S = "0.5"


def _progress(what: str) -> None:
    print(f"  .. {what}", flush=True)


def fill(train: list[str], args: argparse.Namespace) -> None:
    """Create table "t" on the training shards and give each of its keys a row (before any
    replica starts, so every replica group bootstraps the same full table)."""
    from embps.protos.config import Adagrad, TableConfig

    keys = np.arange(args.keys, dtype=np.int64)
    with PSClient(train, timeout=60) as ps:
        # each shard reserves rows for its own keys and a tenth more (initial_capacity is
        # per shard): the training shard's bytes per key are not inflated by a reserve
        per_shard = args.keys // NUM_SHARDS * 11 // 10
        ps.create_table(
            TableConfig("t", DIM, optimizer=Adagrad(lr=0.05), initial_capacity=per_shard)
        )
        for a in range(0, keys.size, 1 << 16):
            ps.pull("t", keys[a : a + (1 << 16)])


def measure(train: list[str], replicas: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The measurements against running training shards and their replicas."""
    rng = np.random.default_rng(0)
    keys = np.arange(args.keys, dtype=np.int64)
    with PSClient(train, timeout=60) as ps, PSClient(replicas, timeout=60) as rep:
        _progress("waiting for the replicas' first sync")
        _synced(rep, keys.size)
        stop = threading.Event()
        pushed = [0]

        def load() -> None:
            r = np.random.default_rng(1)
            with PSClient(train, timeout=60) as p:
                step = 0
                while not stop.is_set():
                    k = r.integers(0, keys.size, args.push_keys)
                    p.push("t", k, np.full((k.size, DIM), 0.01, np.float32), step=step)
                    pushed[0] += k.size
                    step += 1

        loader = threading.Thread(target=load, daemon=True)
        t_load = time.monotonic()
        loader.start()
        lags: list[float] = []
        batches = [rng.zipf(1.2, args.batch) % keys.size for _ in range(8)]
        best = {"replica": 0.0, "training": 0.0}
        try:
            for _ in range(args.rounds):
                _pull_round(rep, ps, batches, best)
                lags += _lags(rep)
            end = time.monotonic() + args.lag_seconds
            while time.monotonic() < end:
                lags += _lags(rep)
                time.sleep(0.1)
        finally:
            stop.set()
            loader.join(timeout=60)
        load_s = time.monotonic() - t_load
        tr = [s.tables["t"] for s in ps.stats("t")]
        rp = [s.tables["t"] for s in rep.stats("t")]
    lag = np.array(lags) if lags else np.zeros(1)
    train_bpk = sum(t["bytes"] for t in tr) / max(1, sum(t["keys"] for t in tr))
    rep_bpk = sum(t["bytes"] for t in rp) / max(1, sum(t["keys"] for t in rp))
    return {
        "keys": int(keys.size),
        "dim": DIM,
        "replica_pull_rows_s": best["replica"],
        "training_pull_rows_s": best["training"],
        "pull_ratio": best["replica"] / best["training"],
        "replica_bytes_per_key_fp32": rep_bpk,
        "training_bytes_per_key": train_bpk,
        "bytes_ratio_fp32": rep_bpk / train_bpk,
        "lag_p50_s": float(np.percentile(lag, 50)),
        "lag_p99_s": float(np.percentile(lag, 99)),
        "push_rows_s": pushed[0] / load_s,
    }


def _synced(rep: PSClient, n: int) -> None:
    """Wait until the replicas hold table "t"'s ``n`` keys (RuntimeError after 120 s)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if sum(s.tables.get("t", {}).get("keys", 0) for s in rep.stats()) == n:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the replicas did not sync {n} keys in 120 s")


def measure_dtype(
    train: list[str], replicas: list[str], args: argparse.Namespace, pulls: bool
) -> dict[str, float]:
    """Bytes per key of a replica group (synced, no load) and, with ``pulls``, its
    inference pull rows/s beside the training shards' (interleaved rounds, best each)."""
    rng = np.random.default_rng(2)
    batches = [rng.zipf(1.2, args.batch) % args.keys for _ in range(8)]
    with PSClient(train, timeout=60) as ps, PSClient(replicas, timeout=60) as rep:
        _synced(rep, args.keys)
        rp = [s.tables["t"] for s in rep.stats("t")]
        out = {"bytes_per_key": sum(t["bytes"] for t in rp) / max(1, sum(t["keys"] for t in rp))}
        if pulls:
            best = {"replica": 0.0, "training": 0.0}
            for _ in range(args.rounds):
                _pull_round(rep, ps, batches, best)
            out["pull_rows_s"], out["training_pull_rows_s"] = best["replica"], best["training"]
    return out


def _pull_round(
    rep: PSClient, ps: PSClient, batches: list[np.ndarray], best: dict[str, float]
) -> None:
    """One round of inference pulls of ``batches`` on the replicas, then the same on the
    training shards; ``best`` keeps each side's best rows/s."""
    for name, client in (("replica", rep), ("training", ps)):
        t0 = time.perf_counter()
        for b in batches:
            client.pull("t", b, train=False)
        rate = sum(b.size for b in batches) / (time.perf_counter() - t0)
        best[name] = max(best[name], rate)


def _lags(rep: PSClient) -> list[float]:
    from embps.v1 import embps_pb2 as pb

    out = []
    for s in range(rep.num_shards):
        (resp,) = rep._call_all("Stats", [(s, pb.StatsRequest())])
        out.append(float(resp.lag_seconds))
    return out


def report(r: dict[str, Any]) -> str:
    rows = [
        ["inference pull rows/s", f"{r['replica_pull_rows_s'] / 1e6:.2f}M",
         f"{r['training_pull_rows_s'] / 1e6:.2f}M", f"{r['pull_ratio']:.2f}x", ">= 1x",
         "yes" if r["pull_ratio"] >= 1 else "no"],
        ["bytes per key (fp32 rows)", f"{r['replica_bytes_per_key_fp32']:.0f}",
         f"{r['training_bytes_per_key']:.0f}", f"{r['bytes_ratio_fp32']:.2f}x", "", ""],
        ["bytes per key (fp16 rows)", f"{r['replica_bytes_per_key_fp16']:.0f}",
         f"{r['training_bytes_per_key']:.0f}", f"{r['bytes_ratio_fp16']:.2f}x", "", ""],
        ["bytes per key (int8 rows)", f"{r['replica_bytes_per_key_int8']:.0f}",
         f"{r['training_bytes_per_key']:.0f}", f"{r['bytes_ratio_int8']:.2f}x", "<= 0.35x",
         "yes" if r["bytes_ratio_int8"] <= 0.35 else "no"],
        ["int8 inference pull rows/s (no load)", f"{r['int8_pull_rows_s'] / 1e6:.2f}M",
         f"{r['int8_training_pull_rows_s'] / 1e6:.2f}M", f"{r['int8_pull_ratio']:.2f}x", "",
         ""],
        ["lag p50 / p99 (s)", f"{r['lag_p50_s']:.3f} / {r['lag_p99_s']:.3f}", "", "",
         "p99 <= 2 s", "yes" if r["lag_p99_s"] <= 2.0 else "no"],
    ]  # fmt: skip
    head = ["", "replicas", "training shards", "ratio", "target", "met"]
    lines = [
        f"embps bench serving: {r['keys']:,} keys of dim {r['dim']} (Adagrad) on "
        f"{NUM_SHARDS} training shards, one replica each; a training load of "
        f"{r['push_rows_s'] / 1e6:.2f}M pushed rows/s during the pulls and lag samples",
        machine_line(),
        "",
        *table(head, rows, right={1, 2, 3}),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps bench serving``."""
    parser.add_argument("--quick", action="store_true", help="fewer keys and rounds")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Start the training PS and its replicas, measure, report."""
    args.keys = 50_000 if args.quick else 1_000_000
    args.batch = 4096 if args.quick else 16384
    args.push_keys = 4096
    args.rounds = 3 if args.quick else 6
    args.lag_seconds = 2.0 if args.quick else 10.0
    with (
        tempfile.TemporaryDirectory(prefix="embps-serving-") as tmp,
        LocalPS(NUM_SHARDS, Path(tmp) / "train.log", ["--evict-every", "0"]) as trainer,
    ):
        _progress(f"start embps serve --shards {NUM_SHARDS} (training)")
        trainer.start()
        fill(trainer.addresses, args)
        follow = ["--replica-of", ",".join(trainer.addresses), "--replica-poll-seconds", POLL_S]
        with LocalPS(NUM_SHARDS, Path(tmp) / "replicas.log", follow) as replicas:
            _progress(f"start embps serve --shards {NUM_SHARDS} --replica-of ...")
            replicas.start()
            r = measure(trainer.addresses, replicas.addresses, args)
        for dtype, key in (("float16", "fp16"), ("int8", "int8")):
            log = Path(tmp) / f"replicas-{dtype}.log"
            with LocalPS(NUM_SHARDS, log, [*follow, "--replica-dtype", dtype]) as group:
                _progress(f"start embps serve --shards {NUM_SHARDS} --replica-dtype {dtype} ...")
                group.start()
                m = measure_dtype(trainer.addresses, group.addresses, args, key == "int8")
            r[f"replica_bytes_per_key_{key}"] = m["bytes_per_key"]
            r[f"bytes_ratio_{key}"] = m["bytes_per_key"] / r["training_bytes_per_key"]
            if key == "int8":
                r["int8_pull_rows_s"] = m["pull_rows_s"]
                r["int8_training_pull_rows_s"] = m["training_pull_rows_s"]
                r["int8_pull_ratio"] = m["pull_rows_s"] / m["training_pull_rows_s"]
    print(report(r))
    if args.json:
        write_json(args.json, r)
    return 0
