"""``embps bench soak``: several clients push exact gradients for M minutes; nothing lost, nothing doubled.

What runs:

  PS        ``embps serve --shards 2`` on loopback, any free ports (``embps.client.demo.job.
            LocalPS``), or an existing cluster (``--addresses``). One fresh table
            ``soak-<hex>``: dynamic, dim DIM, SGD(lr=1.0), initializer zeros, default
            value 0. The table is dropped at the end.
  clients   CLIENTS worker processes (multiprocessing, spawn), each with its own
            ``PSClient``. Until the deadline each one loops: draw BATCH keys from a
            bounded Zipf(s) over [0, KEYS) (seed + worker id: the hot keys overlap
            across workers; duplicates inside a batch stay), ``pull(train=True)`` them
            (this creates the rows), then ``push`` a gradient of exactly 1.0 per
            occurrence (PSClient sums duplicates: a key drawn 3 times gets -3); every
            READ_EVERY steps also a read-only ``pull(train=False)`` of another batch.
            Every call's latency is recorded; a push is counted (per key, locally)
            only once it was acknowledged.

Exactness. With SGD(lr=1) on rows that start at zero, every element of a row is
minus the number of acknowledged pushes of its key: an integer, and float32 holds
every integer below 2**24 (and every sum of them) exactly. So a worker stops
drawing a key once its own count of it reaches (2**24 - 1) // CLIENTS (reported as
saturated keys; only long soaks of a steep Zipf get there): the total stays exact.

Checks:

  during the soak  every row a worker reads (both kinds of pull) must be -m * ones
                   with m an integer >= the worker's own acknowledged pushes of that
                   key: no torn row, nothing fractional, none of its own updates missing.
  at the end       the workers' counts are summed; every key pushed is pulled
                   (train=False) and every element must equal -count (a larger value:
                   updates lost; a smaller one: updates doubled). The table's rows
                   (``Stats`` keys) must equal the number of distinct keys pushed (no row
                   that no push explains), and its ``pushed_rows`` counter the rows the
                   clients' acknowledged pushes applied.

A push whose outcome is unknown (``PushOutcomeUnknownError``) leaves its keys
inexact: they are only checked against bounds (-(count + unknown) <= row <= -count),
and the run reports the error. A push refused everywhere changed nothing, but its
training pull created rows: the row count then has a range instead of one value.
Any error, failed check or mismatch: exit code 1. Throughput and latency are
reported for information (there is no baseline: the soak is a correctness check
under load; ``embps bench service`` measures throughput beside its baselines).

Example::

    embps bench soak --minutes 1 --json soak.json
    embps bench soak --addresses 10.0.0.5:50051,10.0.0.6:50051 --clients 8 --minutes 30
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import queue
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from embps.client.bench.report import fmt_num, machine_line, table, write_json
from embps.client.exceptions import EmbpsError, PushOutcomeUnknownError
from embps.client.ps_client import PSClient
from embps.protos.config import SGD, Initializer, InitKind, TableConfig, TableKind

NUM_SHARDS = 2  # of the local PS
CLIENTS = 4
BATCH = 4096  # keys per step (duplicates included)
KEYS = 1_000_000  # key space [0, KEYS)
ZIPF = 1.05  # exponent s: P(key k) ~ 1 / (k + 1)**s
DIM = 8
READ_EVERY = 4  # a read-only pull every this many steps (0: none)
SEED = 20240611
EXACT_LIMIT = 1 << 24  # float32 holds every integer below it
RPC_TIMEOUT_S = 60.0  # per call: a busy 2-core machine must not turn into errors
START_TIMEOUT_S = 90.0  # shard processes and spawned workers import numpy, grpc, numba
STOP_JOIN_S = 10.0  # a worker's exit after it sent its result
VERIFY_CHUNK = 1 << 16  # keys per verification pull
OPS = ("pull_train", "push", "pull")  # latency series, in report order
EXAMPLES = 5  # mismatches quoted in the report


# --------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakConfig:
    """One soak: how long, how many clients and what they draw."""

    seconds: float = 60.0
    clients: int = CLIENTS
    batch: int = BATCH
    keys: int = KEYS
    zipf: float = ZIPF
    dim: int = DIM
    read_every: int = READ_EVERY
    seed: int = SEED
    exact_limit: int = EXACT_LIMIT  # counts per key stay below it (lower only in tests)

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"the soak needs a positive duration, got {self.seconds} s")
        for name in ("clients", "batch", "keys", "dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {v!r}")
        if self.keys > 1 << 27:
            raise ValueError(f"--keys must be <= {1 << 27} (workers count pushes per key)")
        if not self.zipf >= 0:
            raise ValueError(f"--zipf must be >= 0 (0: uniform), got {self.zipf}")
        if self.read_every < 0:
            raise ValueError(f"--read-every must be >= 0, got {self.read_every}")

    @property
    def cap(self) -> int:
        """Pushes of one key one worker may make: the sum over workers stays < 2**24."""
        return (self.exact_limit - 1) // self.clients


@dataclass
class WorkerResult:
    """What one worker did. Key arrays are sparse: int64 keys (u,) with int64 counts (u,)."""

    worker: int
    seconds: float = 0.0
    pushes: int = 0  # acknowledged push calls
    pulls_train: int = 0
    pulls_read: int = 0
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))  # op -> rows
    applied: int = 0  # sum of PushResult.applied (distinct keys that reached a row)
    dropped: int = 0  # sum of PushResult.dropped (keys without a row: must stay 0)
    unknown_pushes: int = 0
    pushed_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    pushed_counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    unknown_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    unknown_counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    orphan_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    saturated_keys: int = 0
    rows_read_checked: int = 0
    bad_reads: int = 0  # rows read that were torn, fractional or behind its own pushes
    bad_read_examples: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # status code name -> calls
    error_examples: list[str] = field(default_factory=list)
    latency: dict[str, np.ndarray] = field(default_factory=dict)  # op -> seconds float64


@dataclass
class Totals:
    """The workers' counts summed, dense over the key space: int64 (keys,) each."""

    counts: np.ndarray  # acknowledged pushes per key
    unknown: np.ndarray  # occurrences in pushes whose outcome is unknown
    orphan: np.ndarray  # bool: pulled with train=True, but no push acknowledged for it then

    @classmethod
    def of(cls, results: Sequence[WorkerResult], keys: int) -> Totals:
        counts = np.zeros(keys, dtype=np.int64)
        unknown = np.zeros(keys, dtype=np.int64)
        orphan = np.zeros(keys, dtype=np.bool_)
        for r in results:
            np.add.at(counts, r.pushed_keys, r.pushed_counts)
            np.add.at(unknown, r.unknown_keys, r.unknown_counts)
            orphan[r.orphan_keys] = True
        return cls(counts, unknown, orphan)


@dataclass
class Verification:
    """The end-of-soak check of every pushed key and of the table's counters."""

    verified_keys: int = 0  # keys checked exactly: row == -count
    mismatched_rows: int = 0  # of those, rows with any element != -count
    lost_rows: int = 0  # rows above -count (updates missing)
    doubled_rows: int = 0  # rows below -count (updates applied twice)
    torn_rows: int = 0  # rows whose elements differ
    lost_updates: int = 0
    doubled_updates: int = 0
    bounded_keys: int = 0  # keys of pushes with an unknown outcome: bounds checked
    out_of_bounds_rows: int = 0
    table_rows: int = 0  # Stats keys, summed over shards
    expected_rows_min: int = 0
    expected_rows_max: int = 0
    server_pushed_rows: int = 0  # Stats pushed_rows, summed over shards
    max_count: int = 0  # acknowledged pushes of the hottest key (exact below 2**24)
    examples: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------


def zipf_cdf(keys: int, s: float) -> np.ndarray:
    """float64 (keys,): cumulative P(key <= k) with P(k) ~ 1 / (k + 1)**s; the last is 1."""
    w = np.arange(1, keys + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    cdf[-1] = 1.0
    return cdf


def draw(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """int64 (n,) keys in [0, cdf.size), Zipf-distributed, duplicates kept."""
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, cdf.shape[0] - 1).astype(np.int64)


def check_rows(keys: np.ndarray, rows: np.ndarray, own: np.ndarray) -> np.ndarray:
    """bool (n,): rows read that cannot be right.

    keys int64 (n,), rows float32 (n, dim), own int64 (key space,) = this worker's
    acknowledged pushes per key. A right row is -m * ones, m an integer >= own[key]:
    the worker's own pushes are in, and the others' came in whole.
    """
    first = rows[:, 0]
    torn = (rows != first[:, None]).any(axis=1)
    fractional = first != np.floor(first)
    behind = first > -own[keys].astype(np.float64)
    bad: np.ndarray = torn | fractional | behind
    return bad


# --------------------------------------------------------------------------
# One worker process
# --------------------------------------------------------------------------


class Worker:
    """The loop of one client: pull (train) -> push 1.0 per occurrence -> sometimes a read."""

    def __init__(self, wid: int, ps: PSClient, table_name: str, cfg: SoakConfig) -> None:
        self.ps = ps
        self.table = table_name
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, wid])
        self.cdf = zipf_cdf(cfg.keys, cfg.zipf)
        self.counts = np.zeros(cfg.keys, dtype=np.int64)
        self.unknown = np.zeros(cfg.keys, dtype=np.int64)
        self.orphan = np.zeros(cfg.keys, dtype=np.bool_)
        self.saturated = np.zeros(cfg.keys, dtype=np.bool_)
        self.ones = np.ones((cfg.batch, cfg.dim), dtype=np.float32)
        self.lat: dict[str, list[float]] = {op: [] for op in OPS}
        self.errors: Counter[str] = Counter()
        self.res = WorkerResult(worker=wid)

    def run(self) -> WorkerResult:
        """Loop until ``cfg.seconds`` have passed (the last step may run over); the result."""
        cfg, res = self.cfg, self.res
        t0 = time.monotonic()
        deadline = t0 + cfg.seconds
        step = 0
        while time.monotonic() < deadline:
            self.step()
            step += 1
            if cfg.read_every and step % cfg.read_every == 0:
                self.read()
        res.seconds = time.monotonic() - t0
        res.pushed_keys = np.flatnonzero(self.counts)
        res.pushed_counts = self.counts[res.pushed_keys]
        res.unknown_keys = np.flatnonzero(self.unknown)
        res.unknown_counts = self.unknown[res.unknown_keys]
        res.orphan_keys = np.flatnonzero(self.orphan)
        res.saturated_keys = int(self.saturated.sum())
        res.errors = dict(self.errors)
        res.latency = {op: np.asarray(v, dtype=np.float64) for op, v in self.lat.items()}
        return res

    def step(self) -> None:
        """One training step: pull (train=True) a Zipf batch, push 1.0 per occurrence."""
        res = self.res
        keys = draw(self.rng, self.cdf, self.cfg.batch)
        if res.saturated_keys:
            keys = keys[~self.saturated[keys]]
        uniq, where, occ = np.unique(keys, return_inverse=True, return_counts=True)
        over = self.counts[uniq] + self.unknown[uniq] + occ > self.cfg.cap
        if over.any():  # this push would take a key past its share of 2**24: never again
            self.saturated[uniq[over]] = True
            res.saturated_keys = int(self.saturated.sum())
            keys, uniq, occ = keys[~over[where.reshape(-1)]], uniq[~over], occ[~over]
        if keys.shape[0] == 0:
            return
        rows = self._timed("pull_train", lambda: self.ps.pull(self.table, keys, train=True))
        if rows is None:
            self.orphan[uniq] = True  # a failed training pull may have created rows
            return
        res.pulls_train += 1
        self._check(keys, rows, "pull_train")
        t = time.perf_counter()
        try:
            r = self.ps.push(self.table, keys, self.ones[: keys.shape[0]])
        except PushOutcomeUnknownError as e:
            self._error(e, "push")
            res.unknown_pushes += 1
            self.unknown[uniq] += occ  # applied on some shards, maybe on others
        except EmbpsError as e:
            self._error(e, "push")
            self.orphan[uniq] = True  # refused: nothing changed, but the pull made rows
        else:
            self.lat["push"].append(time.perf_counter() - t)
            res.pushes += 1
            res.rows["push"] += keys.shape[0]
            res.applied += r.applied
            res.dropped += r.dropped
            self.counts[uniq] += occ

    def read(self) -> None:
        """A read-only pull of another Zipf batch; its rows are checked too."""
        keys = draw(self.rng, self.cdf, self.cfg.batch)
        rows = self._timed("pull", lambda: self.ps.pull(self.table, keys, train=False))
        if rows is not None:
            self.res.pulls_read += 1
            self._check(keys, rows, "pull")

    def _timed(self, op: str, call: Callable[[], np.ndarray]) -> np.ndarray | None:
        """Run a pull, record its latency; None (and the error counted) if it failed."""
        t = time.perf_counter()
        try:
            rows = call()
        except EmbpsError as e:
            self._error(e, op)
            return None
        self.lat[op].append(time.perf_counter() - t)
        return rows

    def _check(self, keys: np.ndarray, rows: np.ndarray, op: str) -> None:
        """Count the rows a pull returned and check them (``check_rows``)."""
        res = self.res
        res.rows[op] += rows.shape[0]
        res.rows_read_checked += rows.shape[0]
        bad = check_rows(keys, rows, self.counts)
        if bad.any():
            res.bad_reads += int(bad.sum())
            for i in np.flatnonzero(bad)[: EXAMPLES - len(res.bad_read_examples)]:
                res.bad_read_examples.append(
                    f"worker {res.worker} read key {keys[i]}: {rows[i].tolist()}, its own "
                    f"acknowledged pushes {self.counts[keys[i]]}"
                )

    def _error(self, e: EmbpsError, op: str) -> None:
        code = e.code.name if e.code is not None else "CLIENT"
        name = f"{code} (outcome unknown)" if isinstance(e, PushOutcomeUnknownError) else code
        self.errors[name] += 1
        if len(self.res.error_examples) < EXAMPLES:
            self.res.error_examples.append(f"worker {self.res.worker} {op}: {e}")


def _worker_main(
    wid: int,
    addresses: list[str],
    table_name: str,
    cfg: SoakConfig,
    ready: Queue[tuple[int, str]],
    go: Event,
    results: Queue[tuple[int, WorkerResult | None, str]],
) -> None:  # pragma: no cover - runs in a spawned process (covered by the soak tests)
    """Entry point of a worker process: connect, say ready, wait for go, loop, send the result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the workers
    started = False
    try:
        with PSClient(addresses, timeout=RPC_TIMEOUT_S) as ps:
            ps.wait_ready(START_TIMEOUT_S)
            ps.pull(table_name, np.zeros(1, np.int64), train=False)  # connect; creates nothing
            w = Worker(wid, ps, table_name, cfg)
            ready.put((wid, ""))
            started = True
            if not go.wait(START_TIMEOUT_S):
                return  # the parent gave up on the other workers
            results.put((wid, w.run(), ""))
    except BaseException:
        if started:
            results.put((wid, None, traceback.format_exc()))
        else:
            ready.put((wid, traceback.format_exc()))


# --------------------------------------------------------------------------
# The soak
# --------------------------------------------------------------------------


def run_workers(
    addresses: list[str], table_name: str, cfg: SoakConfig
) -> tuple[list[WorkerResult], float]:
    """Start the worker processes, release them together, collect their results.

    Returns (results in worker order, seconds from the release to the last result).
    RuntimeError if a worker fails to start, crashes, or overruns by more than two
    RPC timeouts.
    """
    ctx = mp.get_context("spawn")
    ready: Queue[tuple[int, str]] = ctx.Queue()
    results: Queue[tuple[int, WorkerResult | None, str]] = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(target=_worker_main, args=(w, addresses, table_name, cfg, ready, go, results),
                    name=f"embps-soak-{w}", daemon=True)
        for w in range(cfg.clients)
    ]  # fmt: skip
    for p in procs:
        p.start()
    try:
        _collect(ready, procs, time.monotonic() + START_TIMEOUT_S, "start")
        go.set()
        t0 = time.monotonic()
        got = _collect(results, procs, t0 + cfg.seconds + 2 * RPC_TIMEOUT_S + 30, "finish")
        wall = time.monotonic() - t0
        for p in procs:
            p.join(timeout=STOP_JOIN_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=STOP_JOIN_S)
    return [got[w][0] for w in range(cfg.clients)], wall


def _collect(q: Queue[Any], procs: list[Any], deadline: float, what: str) -> dict[int, Any]:
    """One message per worker from ``q`` (worker id, *payload, error text); raises on an error."""
    got: dict[int, Any] = {}
    while len(got) < len(procs):
        try:
            msg = q.get(timeout=0.5)
        except queue.Empty:
            dead = [p.name for i, p in enumerate(procs) if i not in got and p.exitcode is not None]
            if dead:
                raise RuntimeError(f"soak workers {dead} exited before they could {what}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"soak workers {sorted(set(range(len(procs))) - set(got))} did not {what} "
                    "in time"
                ) from None
            continue
        wid, *payload, err = msg
        if err:
            raise RuntimeError(f"soak worker {wid} failed to {what}:\n{err}")
        got[wid] = payload
    return got


def soak_table_config(name: str, dim: int) -> TableConfig:
    """The soak's table: dynamic, SGD(lr=1), rows start at 0 and missing keys read 0."""
    return TableConfig(
        name,
        dim=dim,
        kind=TableKind.DYNAMIC,
        optimizer=SGD(lr=1.0),
        initializer=Initializer(kind=InitKind.ZEROS, a=0.0, b=0.0),
        default_value=0.0,
    )


def verify(ps: PSClient, table_name: str, totals: Totals) -> Verification:
    """Pull every pushed key (train=False) and compare with the summed counts; read Stats.

    Exact keys (no unknown push): every element must be -count. Keys with an
    unknown push: -(count + unknown) <= row <= -count, integral, elements equal.
    """
    v = Verification()
    counts, unknown = totals.counts, totals.unknown
    exact = np.flatnonzero((counts > 0) & (unknown == 0))
    bounded = np.flatnonzero(unknown > 0)
    v.verified_keys, v.bounded_keys = int(exact.shape[0]), int(bounded.shape[0])
    v.max_count = int(counts.max(initial=0))
    for a in range(0, exact.shape[0], VERIFY_CHUNK):
        keys = exact[a : a + VERIFY_CHUNK]
        rows = ps.pull(table_name, keys, train=False)
        want = -counts[keys].astype(np.float64)
        first = rows[:, 0].astype(np.float64)
        torn = (rows != rows[:, :1]).any(axis=1)
        wrong = torn | (first != want)
        lost = ~torn & (first > want)
        doubled = ~torn & (first < want)
        v.mismatched_rows += int(wrong.sum())
        v.torn_rows += int(torn.sum())
        v.lost_rows += int(lost.sum())
        v.doubled_rows += int(doubled.sum())
        v.lost_updates += int((first - want)[lost].sum())
        v.doubled_updates += int((want - first)[doubled].sum())
        for i in np.flatnonzero(wrong)[: EXAMPLES - len(v.examples)]:
            v.examples.append(
                f"key {keys[i]}: row {rows[i].tolist()}, acknowledged pushes {counts[keys[i]]}"
            )
    for a in range(0, bounded.shape[0], VERIFY_CHUNK):
        keys = bounded[a : a + VERIFY_CHUNK]
        rows = ps.pull(table_name, keys, train=False)
        first = rows[:, 0].astype(np.float64)
        hi = -counts[keys].astype(np.float64)
        lo = hi - unknown[keys]
        bad = (rows != rows[:, :1]).any(axis=1) | (first != np.floor(first))
        bad |= (first < lo) | (first > hi)
        v.out_of_bounds_rows += int(bad.sum())
        for i in np.flatnonzero(bad)[: EXAMPLES - len(v.examples)]:
            v.examples.append(
                f"key {keys[i]}: row {rows[i].tolist()}, acknowledged pushes {counts[keys[i]]} "
                f"+ up to {unknown[keys[i]]} of unknown outcome"
            )
    pushed = (counts > 0) | (unknown > 0)
    v.expected_rows_min = int(pushed.sum())
    v.expected_rows_max = v.expected_rows_min + int((totals.orphan & ~pushed).sum())
    for s in ps.stats(table_name):
        t = s.tables[table_name]
        v.table_rows += int(t["keys"])
        v.server_pushed_rows += int(t["pushed_rows"])
    return v


def soak(
    addresses: list[str],
    cfg: SoakConfig,
    *,
    before_verify: Callable[[PSClient, str, Totals], None] | None = None,
) -> dict[str, Any]:
    """Create a fresh table, run the workers, verify, drop the table; the flat results.

    before_verify: called with (client, table name, totals) after the workers
    stopped and before the check (tests use it to change a row behind the soak's back).
    """
    name = f"soak-{secrets.token_hex(4)}"
    with PSClient(addresses, timeout=RPC_TIMEOUT_S) as ps:
        ps.wait_ready(START_TIMEOUT_S)
        ps.create_table(soak_table_config(name, cfg.dim))
        try:
            _progress(
                f"{cfg.clients} clients x {cfg.seconds:g} s on table {name!r} "
                f"({len(addresses)} shards)"
            )
            results, wall = run_workers(list(addresses), name, cfg)
            totals = Totals.of(results, cfg.keys)
            if before_verify is not None:
                before_verify(ps, name, totals)
            _progress(f"verify {int((totals.counts > 0).sum()):,} keys")
            t = time.perf_counter()
            v = verify(ps, name, totals)
            verify_s = time.perf_counter() - t
        finally:
            with contextlib.suppress(EmbpsError):
                ps.drop_table(name)
    return summarize(cfg, len(addresses), results, wall, v, verify_s)


def summarize(
    cfg: SoakConfig,
    shards: int,
    results: list[WorkerResult],
    wall: float,
    v: Verification,
    verify_s: float,
) -> dict[str, Any]:
    """The flat JSON object: configuration, throughput, latency, errors, checks, failures."""
    secs = max([r.seconds for r in results] + [1e-9])
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    lat = {op: np.concatenate([r.latency[op] for r in results]) for op in OPS}
    rows = {op: sum(r.rows[op] for r in results) for op in OPS}
    pct = {
        q: {op: float(np.percentile(x, q) * 1e3) if x.size else None for op, x in lat.items()}
        for q in (50, 99)
    }
    out: dict[str, Any] = {
        "minutes": cfg.seconds / 60,
        "clients": cfg.clients,
        "shards": shards,
        "batch": cfg.batch,
        "keys": cfg.keys,
        "zipf": cfg.zipf,
        "dim": cfg.dim,
        "read_every": cfg.read_every,
        "seed": cfg.seed,
        "seconds": secs,
        "wall_seconds": wall,
        "verify_seconds": verify_s,
        "pushes": sum(r.pushes for r in results),
        "pulls": sum(r.pulls_train + r.pulls_read for r in results),
        "pulls_train": sum(r.pulls_train for r in results),
        "pulls_read": sum(r.pulls_read for r in results),
        "per_client_pushes": [r.pushes for r in results],
        "rows": rows,
        "rows_pushed": rows["push"],
        "rows_pulled": rows["pull_train"] + rows["pull"],
        "push_rows_s": rows["push"] / secs,
        "pull_rows_s": (rows["pull_train"] + rows["pull"]) / secs,
        "calls": {op: int(x.size) for op, x in lat.items()},
        "p50_ms": pct[50],
        "p99_ms": pct[99],
        "errors": dict(sorted(errors.items())),
        "error_examples": [e for r in results for e in r.error_examples][:EXAMPLES],
        "unknown_pushes": sum(r.unknown_pushes for r in results),
        "applied_rows": sum(r.applied for r in results),
        "dropped_rows": sum(r.dropped for r in results),
        "saturated_keys": max([r.saturated_keys for r in results] + [0]),
        "reads_checked": sum(r.rows_read_checked for r in results),
        "bad_reads": sum(r.bad_reads for r in results),
        "bad_read_examples": [e for r in results for e in r.bad_read_examples][:EXAMPLES],
        "verified_keys": v.verified_keys,
        "mismatched_rows": v.mismatched_rows,
        "lost_rows": v.lost_rows,
        "doubled_rows": v.doubled_rows,
        "torn_rows": v.torn_rows,
        "lost_updates": v.lost_updates,
        "doubled_updates": v.doubled_updates,
        "bounded_keys": v.bounded_keys,
        "out_of_bounds_rows": v.out_of_bounds_rows,
        "table_rows": v.table_rows,
        "expected_rows_min": v.expected_rows_min,
        "expected_rows_max": v.expected_rows_max,
        "server_pushed_rows": v.server_pushed_rows,
        "max_count": v.max_count,
        "mismatch_examples": v.examples,
    }
    out["failures"] = failures(out)
    out["ok"] = not out["failures"]
    return out


def failures(r: dict[str, Any]) -> list[str]:
    """Why the soak failed (empty: it passed)."""
    f: list[str] = []
    if r["mismatched_rows"]:
        f.append(
            f"{r['mismatched_rows']} rows differ from -(acknowledged pushes): {r['lost_rows']} "
            f"lost {r['lost_updates']} updates, {r['doubled_rows']} got {r['doubled_updates']} "
            f"too many, {r['torn_rows']} torn"
        )
    if r["out_of_bounds_rows"]:
        f.append(f"{r['out_of_bounds_rows']} rows of unknown-outcome pushes are out of bounds")
    if not r["expected_rows_min"] <= r["table_rows"] <= r["expected_rows_max"]:
        want = (
            f"{r['expected_rows_min']:,}"
            if r["expected_rows_min"] == r["expected_rows_max"]
            else f"{r['expected_rows_min']:,}..{r['expected_rows_max']:,}"
        )
        f.append(f"the table holds {r['table_rows']:,} rows; the pushes explain {want}")
    if not r["unknown_pushes"] and r["server_pushed_rows"] != r["applied_rows"]:
        f.append(
            f"the shards counted {r['server_pushed_rows']:,} pushed rows; the clients' "
            f"acknowledged pushes applied {r['applied_rows']:,}"
        )
    if r["dropped_rows"]:
        f.append(f"{r['dropped_rows']} pushed keys had no row (dropped)")
    if r["bad_reads"]:
        f.append(f"{r['bad_reads']} rows read during the soak were torn, fractional or stale")
    if r["errors"]:
        f.append(f"{sum(r['errors'].values())} calls failed: {r['errors']}")
    idle = [i for i, n in enumerate(r["per_client_pushes"]) if n == 0]
    if idle:
        f.append(f"clients {idle} had no push acknowledged")
    if r.get("ps_exit_code") not in (None, 0):
        f.append(f"embps serve exited with code {r['ps_exit_code']} after SIGTERM")
    return f


def _progress(what: str) -> None:
    print(f"  .. {what}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

_OP_NAMES = {
    "pull_train": "pull, train=True (creates rows)",
    "push": "push, gradient 1.0 per occurrence",
    "pull": "pull, train=False",
}


def report(r: dict[str, Any]) -> str:
    """The readable report: throughput and latency per op, errors, what was verified, verdict."""
    head = ("op", "calls", "calls/s", "k rows/s", "p50 ms", "p99 ms")
    body = []
    for op in OPS:
        p50, p99 = r["p50_ms"][op], r["p99_ms"][op]
        body.append(
            (
                _OP_NAMES[op],
                f"{r['calls'][op]:,}",
                fmt_num(r["calls"][op] / r["seconds"]),
                fmt_num(r["rows"][op] / r["seconds"] / 1e3),
                "-" if p50 is None else f"{p50:.1f}",
                "-" if p99 is None else f"{p99:.1f}",
            )
        )
    where = r.get("ps", f"{r['shards']} shards")
    title = (
        f"embps bench soak: {r['clients']} client processes x {r['minutes']:g} min against {where}; "
        f"batches of {r['batch']:,} Zipf({r['zipf']:g}) keys over [0, {r['keys']:,}), dim "
        f"{r['dim']}; table: dynamic, SGD(lr=1), zeros"
    )
    errors = ", ".join(f"{k}: {n}" for k, n in r["errors"].items()) or "none"
    verdict = (
        "PASS: nothing lost, nothing doubled"
        if r["ok"]
        else "FAILED:\n" + "\n".join(f"  - {f}" for f in r["failures"])
    )
    lines = [
        title,
        machine_line(f", grpcio {grpc.__version__}"),
        "",
        *table(head, body, right={1, 2, 3, 4, 5}),
        "",
        f"pushes acknowledged: {r['pushes']:,} (per client: "
        f"{', '.join(f'{n:,}' for n in r['per_client_pushes'])}), {r['rows_pushed']:,} key "
        f"occurrences; {r['rows_pushed'] / r['seconds'] / 1e3:.1f} k rows/s pushed, "
        f"{r['rows_pulled'] / r['seconds'] / 1e3:.1f} k rows/s pulled over {r['seconds']:.1f} s",
        f"errors: {errors}",
        *(f"  {e}" for e in r["error_examples"]),
        f"reads checked during the soak: {r['reads_checked']:,} rows, {r['bad_reads']} torn, "
        "fractional or missing the reader's own pushes",
        *(f"  {e}" for e in r["bad_read_examples"]),
        f"verified: {r['verified_keys']:,} keys, every element == -(acknowledged pushes): "
        f"{r['mismatched_rows']} mismatched rows ({r['lost_rows']} lost, {r['doubled_rows']} "
        f"doubled, {r['torn_rows']} torn); {r['bounded_keys']} keys of unknown-outcome pushes "
        f"({r['out_of_bounds_rows']} out of bounds)",
        *(f"  {e}" for e in r["mismatch_examples"]),
        f"table rows: {r['table_rows']:,} (distinct keys pushed: {r['expected_rows_min']:,}); "
        f"shards' pushed_rows {r['server_pushed_rows']:,}, applied by acknowledged pushes "
        f"{r['applied_rows']:,}; hottest key {r['max_count']:,} pushes (exact below 2**24), "
        f"saturated keys {r['saturated_keys']}; verification took "
        f"{r['verify_seconds']:.1f} s",
        verdict,
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps bench soak``."""
    parser.add_argument("--minutes", type=float, default=1.0, help="soak duration (default 1)")
    parser.add_argument(
        "--clients", type=int, default=CLIENTS, help=f"worker processes (default {CLIENTS})"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=BATCH,
        help=f"keys per push, duplicates included (default {BATCH})",
    )
    parser.add_argument(
        "--keys", type=int, default=KEYS, help=f"key space [0, KEYS) (default {KEYS:,})"
    )
    parser.add_argument(
        "--zipf",
        type=float,
        default=ZIPF,
        help=f"Zipf exponent of the keys, 0: uniform (default {ZIPF})",
    )
    parser.add_argument("--dim", type=int, default=DIM, help=f"row width (default {DIM})")
    parser.add_argument(
        "--read-every",
        type=int,
        default=READ_EVERY,
        help=f"a read-only pull every N steps per client, 0: none (default {READ_EVERY})",
    )
    parser.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    parser.add_argument(
        "--addresses",
        help="soak an existing PS: shard addresses in shard-id order, comma-separated "
        f"(default: start embps serve --shards {NUM_SHARDS} on loopback)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON object")


def run(args: argparse.Namespace) -> int:
    """Run the soak, print the report, write the JSON if asked. 0: passed; 1: any failure."""
    try:
        cfg = SoakConfig(
            seconds=args.minutes * 60, clients=args.clients, batch=args.batch, keys=args.keys,
            zipf=args.zipf, dim=args.dim, read_every=args.read_every, seed=args.seed,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"embps bench soak: {e}") from None
    hook = getattr(args, "before_verify", None)  # tests: change rows behind the soak's back
    t0 = time.perf_counter()
    if args.addresses:
        addresses = [a.strip() for a in args.addresses.split(",") if a.strip()]
        r = soak(addresses, cfg, before_verify=hook)
        r["ps"] = f"{len(addresses)} shards at {', '.join(addresses)}"
    else:
        from embps.client.demo.localps import LocalPS  # the parent only: workers never start a PS

        with tempfile.TemporaryDirectory(prefix="embps-soak-") as tmp:
            log = Path(tmp) / "serve.log"
            with LocalPS(NUM_SHARDS, log) as local:
                _progress(f"start embps serve --shards {NUM_SHARDS} (log {log})")
                local.start()
                try:
                    r = soak(local.addresses, cfg, before_verify=hook)
                except Exception:
                    print(f"embps serve log (tail):\n{local.log_tail()}", file=sys.stderr)
                    raise
                r["ps_exit_code"] = local.stop()
                r["ps"] = f"a local embps serve --shards {NUM_SHARDS}"
        r["failures"] = failures(r)
        r["ok"] = not r["failures"]
    print(report(r))
    print(f"(run took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        write_json(args.json, r)
    return 0 if r["ok"] else 1
