"""``embps demo``: train a CTR model against a local 2-shard PS and write a report.

What one run does, in order:

1. starts ``embps serve --shards 2`` on loopback (any free ports) as a child
   process and waits for both shards' ready lines;
2. creates one adaptive table per categorical field of the synthetic click log
   (``embps.client.data.SyntheticCTR``): a static part sized for the ids
   expected to stay rare, own (dynamic) rows for ids seen ``promote_threshold``
   times, a count-min sketch sized for the ids a shard sees, Adagrad;
3. trains a DLRM (``embps.client.demo.models``) whose embeddings are one
   ``RemoteEmbeddingCollection`` (a table per field, every table in one request
   per shard per step), pipelined: ``staleness=1`` and a prefetch of the next
   batch's rows (carrying the previous step's push) while the current one
   computes. A short window in the middle of training runs synchronously
   (``staleness=0``, no prefetch): the baseline the pipelined throughput is
   compared with, in the same run;
4. evaluates AUC and logloss on held-out data (the batches that follow the
   training ones in time) beside the planted model's optimum and beside a
   trivial baseline (predict the training click rate);
5. reads per-table memory from ``PSClient.stats()`` (sampled during training
   too), checkpoints the tables if the server can (``--checkpoint-dir``), stops
   the PS with SIGTERM and checks that it exits 0;
6. writes ``report.md``, ``loss.png``, ``memory.png``, ``summary.json`` and
   the PS log to the output folder (default ``./demo-report-<timestamp>/``).

Budgets on 2 CPU cores: the default run under 3 minutes, ``--quick`` under one
(process start and numba compilation included); a time cap stops training early
(and says so) on a slower machine. Nothing but loopback is used. PyTorch and
matplotlib are imported only when a run needs them, so the planning and report
helpers here import without them.

Example::

    embps demo --quick --out /tmp/demo
    python -m embps.client.demo.job --quick      # the same, without the console script
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from embps.client.data import SyntheticCTR, auc, logloss
from embps.client.demo.localps import START_TIMEOUT_S, LocalPS, checkpoint_setup, serve_flags
from embps.client.ps_client import PSClient
from embps.protos.config import Adagrad, TableConfig, TableKind

if TYPE_CHECKING:
    from embps.client.demo.report import DemoResult

NUM_SHARDS = 2


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Everything one run depends on (written into the report and summary.json)."""

    quick: bool
    seed: int
    steps: int  # training batches
    batch_size: int
    eval_samples: int  # held-out samples of the final evaluation
    curve_samples: int  # held-out samples of each evaluation during training
    evals: int  # evaluations during training (the final one included)
    dim: int  # embedding width (every table) = bottom MLP output
    bottom: tuple[int, ...]
    top: tuple[int, ...]
    concat_embeddings: bool  # DLRM: the embeddings also go to the top MLP
    dense_lr: float  # torch Adam on the MLPs
    emb_lr: float  # server-side Adagrad on the tables
    staleness: int
    sync_steps: int  # synchronous baseline window in the middle of training
    stats_every: int  # steps between two memory samples
    max_train_seconds: float  # safety cap: stop training early past it (reported)
    bucket_fraction: float  # static rows (all shards) = ids expected to stay rare * this
    promote_threshold: int

    @property
    def train_samples(self) -> int:
        return self.steps * self.batch_size


def config_for(args: argparse.Namespace) -> DemoConfig:
    """The preset (quick or full) with the command line's overrides applied."""
    quick = bool(args.quick)
    steps = args.steps if args.steps is not None else (200 if quick else 1100)
    return DemoConfig(
        quick=quick,
        seed=args.seed,
        steps=steps,
        batch_size=args.batch_size if args.batch_size is not None else 8192,
        eval_samples=100_000 if quick else 400_000,
        curve_samples=16_384 if quick else 32_768,
        evals=6 if quick else 12,
        dim=16,
        bottom=(32,),
        top=(64, 32),
        concat_embeddings=True,
        dense_lr=2e-3,
        emb_lr=0.05,
        staleness=args.staleness,
        sync_steps=0 if args.staleness == 0 else max(8, steps // 25),
        stats_every=max(1, steps // 60),
        max_train_seconds=30.0 if quick else 130.0,
        bucket_fraction=0.125,
        promote_threshold=8,
    )


# --------------------------------------------------------------------------
# A local PS: `embps serve --shards N` as a child process
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------


class Progress:
    """A progress bar: redrawn in place with ``\\r`` on a TTY, periodic lines otherwise.

    ``update(step, samples_per_s, loss)`` after each step (1-based ``step``).
    """

    def __init__(self, total: int, stream: IO[str], lines: int = 10) -> None:
        self.total = total
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.every = max(1, total // lines)
        self._last_draw = 0.0
        self._t0 = time.monotonic()

    def update(self, step: int, samples_per_s: float, loss: float, note: str = "") -> None:
        now = time.monotonic()
        done = step >= self.total
        if self.tty:
            if not done and now - self._last_draw < 0.1:
                return
            width = 24
            filled = int(width * step / self.total)
            bar = "#" * filled + "-" * (width - filled)
            line = (
                f"\rtrain [{bar}] {step}/{self.total}  {samples_per_s / 1e3:6.1f}k samples/s  "
                f"loss {loss:.4f}  {now - self._t0:5.1f}s {note}"
            )
            self.stream.write(line.ljust(100))
            if done:
                self.stream.write("\n")
        elif step % self.every == 0 or done:
            self.stream.write(
                f"train step {step}/{self.total}: {samples_per_s / 1e3:.1f}k samples/s, "
                f"loss {loss:.4f}, {now - self._t0:.1f}s {note}".rstrip()
                + "\n"
            )
        self.stream.flush()
        self._last_draw = now

    def finish(self) -> None:
        """End a bar that stopped early (time budget): move to a new line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------
# Tables, planned from the data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldPlan:
    """One categorical field, its expected ids over training and its adaptive table."""

    field: int
    vocab: int
    zipf: float
    expected_ids: int  # distinct ids expected in the training samples (Zipf + fresh)
    expected_promoted: int  # of those, seen >= promote_threshold times
    config: TableConfig

    @property
    def table(self) -> str:
        return self.config.name


def _poisson_at_least(lam: np.ndarray, k: int) -> np.ndarray:
    """P(Poisson(lam) >= k), elementwise: float64 (n,) -> float64 (n,)."""
    term = np.exp(-lam)
    cdf = term.copy()
    for i in range(1, k):
        term *= lam / i
        cdf += term
    return np.clip(1.0 - cdf, 0.0, 1.0)


def expected_ids(data: Any, field_index: int, n: int, threshold: int) -> tuple[float, float]:
    """(distinct ids, ids seen >= threshold times) expected in samples 0..n-1 of one field.

    Zipf ids: each rank r is seen Poisson(n (1 - new_id_rate) pmf(r)) times. Fresh ids:
    ``n * fresh_per_sample`` of them, each seen Poisson(new_id_reuse) times.
    """
    vocab = data.vocab_sizes[field_index]
    lam_scale = n * (1.0 - data.new_id_rate)
    seen = promoted = 0.0
    chunk = 1 << 20
    for lo in range(1, vocab + 1, chunk):
        ranks = np.arange(lo, min(vocab, lo + chunk - 1) + 1, dtype=np.int64)
        lam = lam_scale * data.rank_pmf(field_index, ranks)
        seen += float(-np.expm1(-lam).sum())
        promoted += float(_poisson_at_least(lam, threshold).sum())
    if data.new_id_rate > 0:
        fresh = n * data.fresh_per_sample
        reuse = np.array([data.new_id_reuse], dtype=np.float64)
        seen += fresh * float(-np.expm1(-reuse)[0])
        promoted += fresh * float(_poisson_at_least(reuse, threshold)[0])
    return seen, promoted


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(max(x, 1.0) / multiple) * multiple)


def plan_tables(data: Any, cfg: DemoConfig, num_shards: int) -> list[FieldPlan]:
    """One adaptive table per field, sized for the ids the training run will meet.

    * promote_threshold T: an id seen T times gets its own row (cfg.promote_threshold).
    * hash_bucket_size (per shard): the ids expected to stay rare (seen < T times)
      share the static part, about ``1 / bucket_fraction`` ids per row; at least 64
      rows, at most 2^16, a multiple of 64.
    * sketch_width (per shard, a power of two): at least half the distinct ids a
      shard sees (the sketch's conservative update keeps over-counts, which would
      promote rare ids, small at that load); 2^10..2^17 counters of each of 4 rows.
    """
    plans = []
    for f in range(data.num_fields):
        seen, promoted = expected_ids(data, f, cfg.train_samples, cfg.promote_threshold)
        rare = max(seen - promoted, 0.0)
        buckets = min(max(_round_up(rare * cfg.bucket_fraction / num_shards, 64), 64), 1 << 16)
        width = 1 << int(np.clip(math.ceil(math.log2(max(seen / num_shards / 2, 1))), 10, 17))
        table = TableConfig(
            f"field_{f}",
            cfg.dim,
            kind=TableKind.ADAPTIVE,
            optimizer=Adagrad(lr=cfg.emb_lr),
            seed=cfg.seed,
            hash_bucket_size=buckets,
            promote_threshold=cfg.promote_threshold,
            sketch_width=width,
        )
        plans.append(
            FieldPlan(
                f, data.vocab_sizes[f], data.zipf_exponents[f], round(seen), round(promoted), table
            )
        )
    return plans


# --------------------------------------------------------------------------
# Memory (from PSClient.stats)
# --------------------------------------------------------------------------

_SUMMED = (
    "keys", "dynamic_rows", "static_rows", "bytes", "dynamic_bytes", "static_bytes",
    "promotions", "admissions_rejected", "evictions", "pulled_rows", "pushed_rows",
    "pulled_static", "pulled_dynamic",
)  # fmt: skip


def table_memory(ps: PSClient) -> dict[str, dict[str, int]]:
    """Per table, the stats fields summed over shards (rows, bytes, promotions, ...)."""
    out: dict[str, dict[str, int]] = {}
    for shard in ps.stats():
        for name, t in shard.tables.items():
            agg = out.setdefault(name, dict.fromkeys(_SUMMED, 0))
            for k in _SUMMED:
                agg[k] += int(t.get(k, 0))
    return dict(sorted(out.items()))


@dataclass
class MemorySample:
    step: int
    seconds: float  # since training started
    tables: dict[str, dict[str, int]]


# --------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------


@dataclass
class EvalPoint:
    step: int
    samples: int
    seconds: float  # since training started
    auc: float
    logloss: float


@dataclass
class TrainLog:
    """What the training loop measured, step by step."""

    losses: list[float] = field(default_factory=list)  # per step: the batch's mean log loss
    step_seconds: list[float] = field(default_factory=list)  # per step, evals and stats excluded
    ended_at: list[float] = field(default_factory=list)  # per step: seconds since training began
    synchronous: list[bool] = field(default_factory=list)  # per step: the baseline window?
    evals: list[EvalPoint] = field(default_factory=list)
    memory: list[MemorySample] = field(default_factory=list)
    wall_seconds: float = 0.0  # the whole loop, evals and stats included
    stopped_early: bool = False
    clicks: float = 0.0  # sum of training labels
    samples: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def base_ctr(self) -> float:
        return self.clicks / max(self.samples, 1)

    def rate(self, lo: int, hi: int, batch_size: int, sync: bool) -> float:
        """Samples per second over steps [lo, hi) run in that mode (0.0 if none)."""
        secs = [
            s
            for s, m in zip(self.step_seconds[lo:hi], self.synchronous[lo:hi], strict=True)
            if m == sync
        ]
        return len(secs) * batch_size / sum(secs) if secs and sum(secs) > 0 else 0.0


class _BatchThread:
    """Generates the training batches on a background thread, a few ahead of the loop."""

    def __init__(self, batches: Iterator[Any], depth: int = 4) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(batches,), name="embps-demo-data", daemon=True
        )
        self._thread.start()

    def _run(self, batches: Iterator[Any]) -> None:
        try:
            for b in batches:
                if not self._put(b):
                    return
        except BaseException as e:  # handed to the consumer
            self._put(e)

    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless the consumer closed first; False if it did."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def predict(model: Any, sparse: np.ndarray, dense: np.ndarray, chunk: int = 16_384) -> np.ndarray:
    """Click probabilities of samples (inference pulls, ``train=False``): float64 (n,).

    sparse: int64 (n, F), dense: float32 (n, D). Pipelined like training when the
    embeddings can prefetch: chunk i+1's rows are pulled while chunk i computes.
    """
    import torch

    n = sparse.shape[0]
    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    can_prefetch = all(getattr(e, "staleness", 0) >= 1 for e in model.embeddings)
    out = np.empty(n, dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if can_prefetch and bounds:
                model.prefetch(sparse[bounds[0][0] : bounds[0][1]])
            for i, (lo, hi) in enumerate(bounds):
                logits = model(torch.from_numpy(sparse[lo:hi]), torch.from_numpy(dense[lo:hi]))
                if can_prefetch and i + 1 < len(bounds):
                    model.prefetch(sparse[bounds[i + 1][0] : bounds[i + 1][1]])
                out[lo:hi] = torch.sigmoid(logits).double().numpy()
    finally:
        model.train(was_training)
    return out


def _use_embeddings(model: Any, embeddings: list[Any], step: int) -> None:
    """Swap the model's embedding modules (same PS tables, another pipelining mode)."""
    from torch import nn

    for e in embeddings:
        e.step = step
        e.train(model.training)
    model.embeddings = nn.ModuleList(embeddings)


def train(
    cfg: DemoConfig,
    data: Any,
    model: Any,
    pipelined: list[Any],
    synchronous: list[Any],
    ps: PSClient,
    curve: Any,
    progress: Progress,
    extra_loss: Callable[[], Any] | None = None,
    start_step: int = 0,
    optimizer: Any = None,
) -> TrainLog:
    """Train ``model`` on ``cfg.steps`` batches; evaluate on ``curve`` and sample memory as it goes.

    extra_loss: a term added to each step's loss (e.g. ``OptEmbedMask.regularization``);
    the logged losses stay the log loss. start_step: the first batch (training goes on
    where an earlier call stopped: batches ``start_step ..``, the embeddings' step
    counters from there); optimizer: the dense part's optimizer to go on with (None: a
    new Adam at ``cfg.dense_lr``).

    Pipelined steps (staleness >= 1) pull the next batch's rows while the current
    batch's backward runs; steps ``[steps/2, steps/2 + sync_steps)`` use the
    synchronous embeddings instead (the throughput baseline).
    """
    import torch

    log = TrainLog()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt = (
        optimizer
        if optimizer is not None
        else torch.optim.Adam(model.parameters(), lr=cfg.dense_lr)
    )
    sync_lo = cfg.steps // 2 if cfg.sync_steps and cfg.staleness else cfg.steps
    sync_hi = min(cfg.steps, sync_lo + cfg.sync_steps)
    eval_at = {max(1, round(k * cfg.steps / cfg.evals)) for k in range(1, cfg.evals + 1)}
    eval_at = {min(s, sync_hi) if sync_lo < s < sync_hi else s for s in eval_at}

    def is_sync(step: int) -> bool:
        return sync_lo <= step < sync_hi

    def prefetch_next(step: int) -> bool:
        """Pull step+1's rows during step? Not across a mode switch or an evaluation."""
        pipelined_now = cfg.staleness > 0 and not is_sync(step)
        return pipelined_now and not is_sync(step + 1) and (step + 1) not in eval_at

    t0 = time.monotonic()

    def evaluate(step: int) -> None:
        p = predict(model, curve.sparse, curve.dense)
        log.evals.append(
            EvalPoint(
                step,
                step * cfg.batch_size,
                time.monotonic() - t0,
                auc(curve.labels, p),
                logloss(curve.labels, p),
            )
        )

    def sample_memory(step: int) -> None:
        log.memory.append(MemorySample(step, time.monotonic() - t0, table_memory(ps)))

    sample_memory(0)
    evaluate(0)
    _use_embeddings(model, synchronous if is_sync(0) else pipelined, start_step)
    batches = _BatchThread(
        data.batches(cfg.batch_size, cfg.steps, start=start_step * cfg.batch_size)
    )
    try:
        batch = batches.get()
        if not is_sync(0) and cfg.staleness:
            model.prefetch(batch.sparse)
        for step in range(cfg.steps):
            ts = time.monotonic()
            if step == sync_lo or (step == sync_hi and step > sync_lo):
                model.flush()
                _use_embeddings(
                    model, synchronous if is_sync(step) else pipelined, start_step + step
                )
            logits = model(torch.from_numpy(batch.sparse), torch.from_numpy(batch.dense))
            labels = torch.from_numpy(batch.labels)
            nxt = batches.get() if step + 1 < cfg.steps else None
            if nxt is not None and prefetch_next(step):
                model.prefetch(nxt.sparse)  # overlaps this step's backward and push
            loss = loss_fn(logits, labels)
            opt.zero_grad(set_to_none=True)
            (loss if extra_loss is None else loss + extra_loss()).backward()  # pushes rows' grads
            opt.step()
            log.losses.append(float(loss.detach()))
            log.clicks += float(batch.labels.sum())
            log.samples += len(batch.labels)
            log.synchronous.append(is_sync(step))
            log.step_seconds.append(time.monotonic() - ts)
            log.ended_at.append(time.monotonic() - t0)
            done = step + 1
            if done in eval_at:
                evaluate(done)
            if done % cfg.stats_every == 0 or done == cfg.steps:
                sample_memory(done)
            recent = slice(max(0, step - 19), step + 1)
            rate = len(log.step_seconds[recent]) * cfg.batch_size / sum(log.step_seconds[recent])
            progress.update(done, rate, log.losses[-1], "(synchronous)" if is_sync(step) else "")
            if nxt is None:
                break
            if time.monotonic() - t0 > cfg.max_train_seconds:
                log.stopped_early = True
                progress.finish()
                model.flush()
                if log.evals[-1].step != done:
                    evaluate(done)
                if log.memory[-1].step != done:
                    sample_memory(done)
                break
            batch = nxt
        model.flush()
    finally:
        batches.close()
    log.wall_seconds = time.monotonic() - t0
    return log


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``embps demo`` flags."""
    parser.add_argument("--quick", action="store_true",
                        help="a shorter run (under a minute on 2 cores)")  # fmt: skip
    parser.add_argument("--out", metavar="DIR", help="report folder "
                        "(default ./demo-report-<timestamp>/)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="training batches (default 1100; --quick 200)")
    parser.add_argument("--batch-size", type=int, help="samples per batch (default 8192)")
    parser.add_argument("--staleness", type=int, default=1, choices=(0, 1, 2),
                        help="pipelining of the embeddings (default 1: async push + prefetch; "
                        "0: synchronous)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="data and table seed (default 0)")


class _Phases:
    """Wall-clock seconds per named phase, in order."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.seconds: dict[str, float] = {}
        self._last = self.t0

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = now - self._last
        self._last = now


def _say(msg: str) -> None:
    print(msg, flush=True)


def _model_description(cfg: DemoConfig, num_fields: int, num_dense: int) -> str:
    bottom = "->".join(map(str, (num_dense, *cfg.bottom, cfg.dim)))
    top = "->".join(map(str, (*cfg.top, 1)))
    extra = " + the embeddings" if cfg.concat_embeddings else ""
    return (
        f"DLRM: RemoteEmbeddingCollection of {num_fields} tables (dim {cfg.dim}), "
        f"bottom MLP {bottom}, "
        f"{(num_fields + 1) * num_fields // 2} pairwise dot products{extra}, top MLP ->{top}"
    )


def _session(
    res: DemoResult, ps: PSClient, heldout: Any, ckpt_dir: Path | None, phases: _Phases
) -> bool:
    """Tables, training, evaluation, memory and checkpoint against a running PS.

    Fills ``res``; returns False if the checkpoint failed (everything else raises).
    """
    import torch

    from embps.client.demo.models import DLRM
    from embps.client.demo.report import mb
    from embps.client.exceptions import EmbpsError
    from embps.client.torch import FieldColumns, RemoteEmbeddingCollection, RemoteTableConfig

    cfg, data, plans = res.cfg, res.data, res.plans
    for plan in plans:
        ps.create_table(plan.config)
    # One collection (a table per field, feature = table name) fed by the (B, F) id
    # columns; the synchronous baseline is a second collection over the same tables.
    tables = [RemoteTableConfig(p.table, [p.table]) for p in plans]
    pipelined = [FieldColumns(RemoteEmbeddingCollection(ps, tables, staleness=cfg.staleness))]
    synchronous = [FieldColumns(RemoteEmbeddingCollection(ps, tables))] if cfg.sync_steps else []
    torch.manual_seed(cfg.seed)
    model = DLRM(pipelined, data.num_dense, cfg.dim, cfg.bottom, cfg.top, cfg.concat_embeddings,
                 num_fields=len(plans))  # fmt: skip
    res.dense_params = sum(p.numel() for p in model.parameters())
    res.model_desc = _model_description(cfg, len(plans), data.num_dense)
    _say(f"tables: {len(plans)} adaptive, dim {cfg.dim}, Adagrad; model: {res.model_desc}")
    curve = heldout.slice(0, cfg.curve_samples)
    try:
        res.log = train(
            cfg, data, model, pipelined, synchronous, ps, curve, Progress(cfg.steps, sys.stdout)
        )
        phases.mark("train")
        probs = predict(model, heldout.sparse, heldout.dense)
    except BaseException:
        for e in (*pipelined, *synchronous):  # do not mask the error with a push error
            with contextlib.suppress(Exception):
                e.close()
        raise
    for e in (*pipelined, *synchronous):
        e.close()  # re-raises a failed asynchronous push
    y, ctr = heldout.labels, res.log.base_ctr
    res.metrics = {
        "model": {"auc": auc(y, probs), "logloss": logloss(y, probs)},
        "optimum": {"auc": auc(y, heldout.probs), "logloss": logloss(y, heldout.probs)},
        "baseline": {"ctr": ctr, "auc": 0.5, "logloss": logloss(y, np.full(len(y), ctr))},
    }
    m, o, b = res.metrics["model"], res.metrics["optimum"], res.metrics["baseline"]
    _say(
        f"held-out AUC     {m['auc']:.4f}   optimum {o['auc']:.4f} (gap {o['auc'] - m['auc']:.4f})"
        f"   base-CTR baseline {b['auc']:.4f}"
    )
    _say(
        f"held-out logloss {m['logloss']:.4f}   optimum {o['logloss']:.4f} "
        f"(gap {m['logloss'] - o['logloss']:.4f})   base-CTR baseline {b['logloss']:.4f}"
    )
    phases.mark("evaluate")
    res.memory = table_memory(ps)
    for name, t in res.memory.items():
        _say(
            f"memory {name}: {t['static_rows']:,} static + {t['keys']:,} own rows, "
            f"{mb(t['bytes'])} ({t['promotions']:,} promotions)"
        )
    if ckpt_dir is None:
        _say(f"checkpoint: {res.checkpoint_note}")
        return True
    res.checkpoint_dir = str(ckpt_dir)
    try:
        written = ps.checkpoint(res.log.steps)
    except EmbpsError as e:
        res.checkpoint_note = f"FAILED: {e}"
        _say(f"checkpoint: {res.checkpoint_note}")
        return False
    finally:
        phases.mark("checkpoint")
    res.checkpoint = [asdict(c) for c in written]
    total = sum(c.bytes for c in written)
    slowest = max(c.seconds for c in written)
    _say(f"checkpoint: step {res.log.steps} -> {ckpt_dir} ({mb(total)}, {slowest:.2f} s)")
    return True


def run(args: argparse.Namespace) -> int:
    from embps.client.demo.report import DemoResult, plot_memory, plot_training, write_report

    """``embps demo``: 0 when everything ran and the PS stopped cleanly, 1 otherwise."""
    import torch

    cfg = config_for(args)
    if cfg.steps < 2 or cfg.batch_size < 1:
        print("embps demo: --steps must be >= 2 and --batch-size >= 1", file=sys.stderr)
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"demo-report-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    phases = _Phases()
    _say(f"embps demo ({'quick' if cfg.quick else 'full'}): report in {out}")

    # `embps serve --help` imports the server (seconds): overlap it with the data setup
    flags: dict[str, set[str]] = {}
    probe = threading.Thread(target=lambda: flags.setdefault("serve", serve_flags()), daemon=True)
    probe.start()
    data = SyntheticCTR(seed=cfg.seed)
    plans = plan_tables(data, cfg, NUM_SHARDS)
    heldout = data.generate(cfg.train_samples, cfg.eval_samples)
    res = DemoResult(cfg, data, plans, heldout_start=cfg.train_samples)
    vocab = ", ".join(f"{p.vocab:,}" for p in plans)
    _say(
        f"data: {len(plans)} fields (vocabularies {vocab}), {data.num_dense} dense; "
        f"{cfg.steps} x {cfg.batch_size} training samples"
    )
    probe.join(timeout=START_TIMEOUT_S)
    ckpt_dir, extra, res.checkpoint_note = checkpoint_setup(
        flags.get("serve", set()), hasattr(PSClient, "checkpoint"), out / "checkpoints"
    )
    phases.mark("setup")

    threads = torch.get_num_threads()
    torch.set_num_threads(res.torch_threads)  # 2 cores: the trainer and 2 shards share them
    ok = False
    try:
        with LocalPS(NUM_SHARDS, out / "serve.log", extra) as local:
            res.shards = local.start()
            res.supervisor_pid = local.pid
            _say(
                "ps: "
                + ", ".join(f"shard {s.shard_id} {s.address} pid {s.pid}" for s in res.shards)
            )
            phases.mark("ps start")
            with PSClient(local.addresses, timeout=60.0) as ps:
                ps.wait_ready(timeout=30.0)
                ok = _session(res, ps, heldout, ckpt_dir, phases)
            res.exit_code = local.stop()
            res.shards_left = local.alive_shards()
            phases.mark("ps stop")
            left = f", shard processes still alive: {res.shards_left}" if res.shards_left else ""
            _say(f"ps: stopped (SIGTERM), exit code {res.exit_code}{left}")
    except KeyboardInterrupt:
        print("\nembps demo: interrupted; the PS was stopped", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"embps demo: FAILED; the PS log is {out / 'serve.log'}", file=sys.stderr)
        ok = False
    finally:
        torch.set_num_threads(threads)
    ok = ok and res.exit_code == 0 and not res.shards_left
    if res.metrics:
        res.phases = {**phases.seconds, "total": time.monotonic() - phases.t0}
        plot_training(out / "loss.png", res)
        plot_memory(out / "memory.png", res)
        report = write_report(out, res)
        total = time.monotonic() - phases.t0
        _say(f"report: {report} (+ loss.png, memory.png, summary.json); {total:.1f} s in all")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m embps.client.demo.job``: the same flags as ``embps demo``."""
    parser = argparse.ArgumentParser(prog="embps demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
