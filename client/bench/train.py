"""``embps bench train``: training samples/s of a 26-field model through a 2-shard PS beside local torch.

The layout is the one CTR models train with: a table per categorical field, as
DLRM trains Criteo. Every contender trains its own copy of one model on the same
pre-generated batches, for each batch size in turn (128, 1024 and 8192); only
where the embedding rows live changes.

Workload. ``SyntheticCTR`` with Criteo's shape: 26 categorical fields whose
vocabularies are Criteo Kaggle's (``CRITEO_VOCAB``: 3 .. 10^7 distinct values)
capped at 10^6 for this machine's memory (``VOCAB_CAP``, like DLRM's
``--max-ind-range``: a field's vocabulary is ``min(Criteo's, cap)``), Zipf
exponents ``SyntheticCTR``'s defaults (0.6 .. 1.2, cycled), 13 dense features.
Model: the demo's DLRM sizes (``embps.client.demo.models``, dim 16, bottom MLP
13->32->16, top MLP ->64->32->1, the embeddings concatenated to the top MLP's
input), torch ``Adam`` (lr 2e-3) on the MLPs, Adagrad (lr 0.05) on the rows.

Contenders, per batch size B:

  local       ``torch.nn.Embedding(sparse=True)`` per field + ``torch.optim.Adagrad``
              on the sparse gradients: the baseline. Each id has its own row (the ids
              are mapped to rows 0..n-1 once, before timing: a vocabulary of every id
              in the pre-generated batches, like a preprocessed dataset), and each row
              starts as the PS gives it on its first pull (``initial_rows``: the PS
              table's initializer, seeded by key), so both start from the same model.
  sync        the PS: a dynamic table per field on ``embps serve --shards 2`` (a child
              process on loopback, the demo's ``LocalPS``), each id its own row, the
              same initializer and Adagrad on the server; ``ps_embeddings(...,
              staleness=0)``: every pull sees every push.
  pipelined   the same with ``staleness`` (default 1): pushes on background threads,
              the next batch's rows prefetched while the current batch's backward runs.

``ps_embeddings`` builds the PS side of both: one ``RemoteEmbeddingCollection`` over
every table (through ``FieldColumns``), so a step sends one request per shard whatever
the number of tables (one ``RemoteEmbedding`` per table sent a pull and a push per table
to each shard: 4 x 26 = 104 RPCs with 2 shards). RPCs per step are counted by the client
(``PSClient.rpcs_sent``) where it counts them, else from the shards'
``embps_requests_total`` (every method; no other client calls them during the
bench): the RPCs sent in the timed rounds over their steps, the rounds' ends
included (see ``rpc_targets``).

Timing. Each contender first trains ``warm-up`` steps (not timed: numba and torch
warm-up, the first rows created). Then ``rounds`` rounds; in each, every contender
trains the next ``steps`` batches in turn (the same batches for all), so a busy
moment of the shared machine hits all of them alike. A round runs from the first
pull (or prefetch) to the last push acknowledged (``flush``), with garbage
collection paused; a contender's rate is its best round. Data generation is
outside every timing. Torch runs ``--threads`` threads (default 1: on a 2-core
machine the two shard processes need the other core).

Profile. For the PS contenders, per timed step: the trainer's wall time in
forward (including waiting for the rows), in the prefetch call, in backward
(including pushing, or handing the gradients to the push threads) and in the
optimizer; the trainer process's CPU (all its threads) and each shard's CPU
(``/proc``). After the rounds, the parts of one step alone on one batch
(``step_parts``): unique + inverse, the pulls and the pushes of every table one
after another, and where the client has them the multi-table calls (``pull_many``,
``push_many``, ``push_pull``), torch with the rows in hand, a local step.

Targets (the issue "One round trip per shard per training step"): RPCs per step ==
shards (with an allowance for each round's two ends, ``rpc_targets``); pipelined >=
0.7x local at B = 1024 and >= 0.33x at 128; synchronous >= 0.5x at 1024.

JSON (one flat object): ``fields``, ``batch_sizes``, ``vocab_sizes``; per batch size B
``local_B_samples_s``, ``sync_B_samples_s``, ``pipelined_B_samples_s``,
``sync_B_ratio``, ``pipelined_B_ratio`` (vs local in the same run),
``rpcs_per_step_B`` (the larger of the two modes'); per contender and B
``<contender>_B_loss_first`` / ``_loss_last`` (its first step's loss; its last
round's mean), per PS mode ``<mode>_B_rpcs_per_step`` and ``<mode>_B_profile_ms``;
``parts_B_ms``, ``server_tables_B`` (per mode: keys, rows pulled and pushed, bytes),
``vocab_rows_B``; ``targets_met``, ``targets_total``, ``rpcs_counted_by``; the
configuration.

Example::

    embps bench train --quick --json bench-results/train.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embps.client.bench.report import (
    Target,
    fmt_ratio,
    machine_line,
    table,
    target_cells,
    write_json,
)
from embps.client.data import SyntheticCTR
from embps.client.demo import job as demo
from embps.client.demo import localps
from embps.client.demo import report as demo_report
from embps.client.ps_client import PSClient
from embps.protos.config import Adagrad, TableConfig, TableKind

NUM_SHARDS = 2
NUM_DENSE = 13  # Criteo's I1..I13
# Distinct values of Criteo Kaggle's C1..C26 (TorchRec's / DLRM's counts for that dataset).
CRITEO_VOCAB = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
VOCAB_CAP = 10**6
BATCH_SIZES = (128, 1024, 8192)
QUICK_BATCH_SIZES = (128, 1024)
FULL = {"warmup": 5, "steps": 20, "rounds": 4}
QUICK = {"warmup": 2, "steps": 5, "rounds": 2}
MODES = ("sync", "pipelined")  # the PS contenders; "local" is the baseline
TARGETS: tuple[Target, ...] = (
    Target("pipelined_1024_ratio", 0.7),
    Target("pipelined_128_ratio", 0.33),
    Target("sync_1024_ratio", 0.5),
)
RPC_COUNTER = "rpcs_sent"  # PSClient's count of the RPCs it sent, where it has one


def vocab_sizes(cap: int = VOCAB_CAP) -> tuple[int, ...]:
    """Each field's vocabulary: Criteo's, capped at ``cap``."""
    return tuple(min(v, cap) for v in CRITEO_VOCAB)


def rpc_targets(batch_sizes: tuple[int, ...], steps: int) -> tuple[Target, ...]:
    """One RPC per shard per step, for every batch size run: ``rpcs_per_step_B <= shards
    * (1 + 2 / steps)``. The allowance is the round's two ends, where a fused call has
    nothing to fuse with: its first pull has no push to carry, and its last pushes go
    alone (a pipelined step with no next batch to prefetch, the closing flush); in
    training that goes on, they would ride on pulls. Up to two RPCs per shard per round
    of ``steps`` steps; rounding slack 1e-9."""
    bound = NUM_SHARDS * (1 + 2 / steps) + 1e-9
    return tuple(Target(f"rpcs_per_step_{b}", bound, at_most=True) for b in batch_sizes)


# --------------------------------------------------------------------------
# Workload and tables
# --------------------------------------------------------------------------


@dataclass
class Workload:
    """Pre-generated batches (every contender trains on these, in this order).

    sparse: int64 (N, B, F) field-tagged ids; local_ids: int64 (N, B, F) the same ids
    as rows of the local tables; dense: float32 (N, B, D); labels: float32 (N, B);
    keys: per field, int64 (vocab_f,) the ids of the local table's rows, ascending.
    """

    sparse: np.ndarray
    local_ids: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    keys: list[np.ndarray]

    @property
    def num_batches(self) -> int:
        return int(self.sparse.shape[0])

    @property
    def vocab(self) -> list[int]:
        """Rows of each field's local table (distinct ids over all batches)."""
        return [int(k.shape[0]) for k in self.keys]


def make_workload(data: SyntheticCTR, batch_size: int, num_batches: int) -> Workload:
    """``num_batches`` batches from sample 0 on, and their ids mapped to local rows."""
    block = data.generate(0, batch_size * num_batches)
    f, d = data.num_fields, data.num_dense
    sparse = block.sparse.reshape(num_batches, batch_size, f)
    local = np.empty_like(sparse)
    keys = []
    for j in range(f):
        uniq, inverse = np.unique(sparse[:, :, j], return_inverse=True)
        local[:, :, j] = inverse.reshape(num_batches, batch_size)
        keys.append(uniq)
    return Workload(
        np.ascontiguousarray(sparse),
        local,
        np.ascontiguousarray(block.dense.reshape(num_batches, batch_size, d)),
        np.ascontiguousarray(block.labels.reshape(num_batches, batch_size)),
        keys,
    )


def field_tables(cfg: demo.DemoConfig, work: Workload, prefix: str) -> list[TableConfig]:
    """A dynamic table per field, each id its own row, as the local model has.

    dim ``cfg.dim``, ``Adagrad(lr=cfg.emb_lr)``, the default initializer (uniform
    -0.05..0.05), seed ``cfg.seed``; ``initial_capacity``: the field's distinct ids
    on one shard with some margin, so no table grows during the timed rounds (the
    local tables are allocated up front too).
    """
    return [
        TableConfig(
            f"{prefix}_field_{f}",
            cfg.dim,
            kind=TableKind.DYNAMIC,
            optimizer=Adagrad(lr=cfg.emb_lr),
            seed=cfg.seed,
            initial_capacity=int(1.25 * v / NUM_SHARDS) + 64,
        )
        for f, v in enumerate(work.vocab)
    ]


def initial_rows(config: TableConfig, keys: np.ndarray) -> np.ndarray:
    """The rows a dynamic table of ``config`` gives ``keys`` on their first pull.

    keys: int64 (n,) -> float32 (n, dim). The server's own initializer kernel, seeded
    by (table seed, key): a local model built from these starts exactly where the PS
    starts (``test_bench_train`` checks it against real pulls).
    """
    from embps.server.kernels.optim import init_rows
    from embps.server.optimizers import INIT_CODES

    keys = np.ascontiguousarray(keys, dtype=np.int64)
    out = np.empty((keys.shape[0], config.dim), dtype=np.float32)
    ini = config.initializer
    rows = np.arange(keys.shape[0], dtype=np.int64)
    init_rows(out, rows, keys, INIT_CODES[ini.kind], ini.a, ini.b, config.seed)
    return out


# --------------------------------------------------------------------------
# Counting RPCs
# --------------------------------------------------------------------------


def rpc_counter(ps: PSClient, shards: list[localps.ShardInfo]) -> tuple[str, Callable[[], float]]:
    """(source, a function returning the RPCs sent so far).

    ``PSClient.rpcs_sent`` where the client counts them ("client"); else the shards'
    ``embps_requests_total`` summed over every method and table ("shards": only this
    client calls them while the bench runs).
    """
    if getattr(ps, RPC_COUNTER, None) is not None:
        return "client", lambda: float(getattr(ps, RPC_COUNTER))
    urls = [f"http://127.0.0.1:{s.metrics_port}/metrics" for s in shards]
    return "shards", lambda: sum(_requests_total(u) for u in urls)


def _requests_total(url: str) -> float:
    """The sum of every ``embps_requests_total`` sample a shard's metrics page shows."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("embps_requests_total{")
    )


# --------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------


@dataclass
class StepProfile:
    """Wall seconds of the trainer's main thread per part of a step, summed over steps,
    the CPU seconds of the trainer process and of each shard, and the RPCs sent, over
    the same steps."""

    steps: int = 0
    forward: float = 0.0
    prefetch: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    wall: float = 0.0
    trainer_cpu: float = 0.0
    shard_cpu: list[float] = field(default_factory=list)
    rpcs: float = 0.0

    def per_step_ms(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        out: dict[str, Any] = {
            k: 1e3 * getattr(self, k) / n
            for k in ("forward", "prefetch", "backward", "optimizer", "wall", "trainer_cpu")
        }
        out["shard_cpu"] = [1e3 * c / n for c in self.shard_cpu]
        return out


class Contender:
    """One model + optimizers training on the workload, a segment of batches at a time.

    rpcs: the RPC counter (``rpc_counter``) for a PS contender, read around each timed
    segment (outside its timing); None for a local one.
    """

    def __init__(
        self,
        name: str,
        model: Any,
        optimizers: list[Any],
        ids: np.ndarray,
        work: Workload,
        prefetch: bool,
        shard_pids: list[int] | None = None,
        rpcs: Callable[[], float] | None = None,
    ) -> None:
        import torch

        self.name = name
        self.model = model
        self.optimizers = optimizers
        self.ids = ids
        self.work = work
        self.prefetch = prefetch  # hand the model the next batch's ids before each backward
        self.shard_pids = shard_pids or []
        self.rpcs = rpcs
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        self.loss_first: float | None = None  # its very first step's loss
        self.round_losses: list[list[float]] = []  # per timed round, each step's loss
        self.seconds: list[float] = []  # per timed round
        self.profile = StepProfile(shard_cpu=[0.0] * len(self.shard_pids))

    def train(self, lo: int, hi: int, timed: bool) -> float:
        """Train on batches [lo, hi); wall seconds from the first pull to the last push.

        timed: a round (its time, losses and profile are recorded); else warm-up or
        a part timed alone, whose losses count nowhere (but the first step's).
        """
        import torch

        losses = []
        parts = np.zeros(4)
        rpcs0 = self.rpcs() if timed and self.rpcs is not None else 0.0
        gc.collect()
        gc.disable()
        try:
            cpu0, shards0 = _process_cpu(), [_pid_cpu(p) for p in self.shard_pids]
            t0 = time.perf_counter()
            if self.prefetch:
                self.model.prefetch(self.ids[lo])
            for i in range(lo, hi):
                a = time.perf_counter()
                logits = self.model(
                    torch.from_numpy(self.ids[i]), torch.from_numpy(self.work.dense[i])
                )
                b = time.perf_counter()
                if self.prefetch and i + 1 < hi:
                    self.model.prefetch(self.ids[i + 1])  # overlaps this step's backward
                c = time.perf_counter()
                loss = self.loss_fn(logits, torch.from_numpy(self.work.labels[i]))
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()  # PS: the rows' gradients are pushed (or queued) here
                d = time.perf_counter()
                for opt in self.optimizers:
                    opt.step()
                parts += (b - a, c - b, d - c, time.perf_counter() - d)
                losses.append(loss.detach())
            flush = getattr(self.model, "flush", None)
            if flush is not None:
                flush()
            seconds = time.perf_counter() - t0
            cpu1, shards1 = _process_cpu(), [_pid_cpu(p) for p in self.shard_pids]
        finally:
            gc.enable()
        if self.loss_first is None and losses:
            self.loss_first = float(losses[0])
        if timed:
            self.round_losses.append([float(x) for x in losses])
            self.seconds.append(seconds)
            p = self.profile
            p.steps += hi - lo
            p.forward += parts[0]
            p.prefetch += parts[1]
            p.backward += parts[2]
            p.optimizer += parts[3]
            p.wall += seconds
            p.trainer_cpu += cpu1 - cpu0
            p.shard_cpu = [s + y - x for s, x, y in zip(p.shard_cpu, shards0, shards1, strict=True)]
            if self.rpcs is not None:
                p.rpcs += self.rpcs() - rpcs0
        return seconds

    def close(self) -> None:
        close = getattr(self.model, "close", None)
        if close is not None:
            close()


def summarize(c: Contender, batch_size: int) -> dict[str, Any]:
    """A contender's results, after its timed rounds.

    samples_s: its best round; loss_first: its first step's (warm-up) loss; loss_last:
    the mean loss of its last timed round (untimed calls after it, such as
    ``step_parts``' local step, do not count); for a PS contender also profile_ms
    (``StepProfile.per_step_ms``) and rpcs_per_step (over every timed step).
    """
    if not c.seconds:
        raise ValueError(f"contender {c.name!r} has no timed round")
    steps = len(c.round_losses[-1])
    out: dict[str, Any] = {
        "samples_s": steps * batch_size / min(c.seconds),
        "loss_first": c.loss_first,
        "loss_last": float(np.mean(c.round_losses[-1])),
    }
    if c.rpcs is not None:
        out["rpcs_per_step"] = c.profile.rpcs / c.profile.steps
        out["profile_ms"] = c.profile.per_step_ms()
    return out


def _process_cpu() -> float:
    """CPU seconds of this process (every thread), user + system."""
    return time.process_time()


def _pid_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` (Linux /proc; 0.0 where unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _model_text(cfg: demo.DemoConfig, num_fields: int, num_dense: int) -> str:
    bottom = "->".join(map(str, (num_dense, *cfg.bottom, cfg.dim)))
    top = "->".join(map(str, (*cfg.top, 1)))
    return f"DLRM ({num_fields} fields of dim {cfg.dim}, bottom MLP {bottom}, top MLP ->{top})"


def _dlrm(cfg: demo.DemoConfig, embeddings: list[Any], num_dense: int, num_fields: int) -> Any:
    """The demo's model sizes around ``embeddings``; the MLPs seeded alike in every contender."""
    import torch

    from embps.client.demo.models import DLRM

    torch.manual_seed(cfg.seed)
    return DLRM(
        embeddings, num_dense, cfg.dim, cfg.bottom, cfg.top, cfg.concat_embeddings,
        num_fields=num_fields,
    )  # fmt: skip


def local_contender(cfg: demo.DemoConfig, work: Workload, tables: list[TableConfig]) -> Contender:
    """The baseline: DLRM on ``nn.Embedding(sparse=True)`` tables in this process.

    Field f's table holds the rows of ``work.keys[f]``, each starting as ``tables[f]``
    initializes it on the PS; ``torch.optim.Adagrad`` with the tables' Adagrad
    settings on the rows, Adam on the MLPs.
    """
    import torch

    opt = tables[0].optimizer
    if not isinstance(opt, Adagrad) or any(t.optimizer != opt for t in tables):
        raise ValueError(f"the local baseline needs one Adagrad for every table, got {opt}")
    embs = [
        torch.nn.Embedding.from_pretrained(
            torch.from_numpy(initial_rows(t, keys)), freeze=False, sparse=True
        )
        for t, keys in zip(tables, work.keys, strict=True)
    ]
    model = _dlrm(cfg, embs, work.dense.shape[2], len(embs))
    dense = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
    rows = torch.optim.Adagrad(
        [e.weight for e in embs], lr=opt.lr, eps=opt.eps,
        initial_accumulator_value=opt.initial_accumulator_value,
    )  # fmt: skip
    opts = [torch.optim.Adam(dense, lr=cfg.dense_lr), rows]
    return Contender("local", model, opts, work.local_ids, work, prefetch=False)


def ps_embeddings(ps: PSClient, tables: list[str], staleness: int) -> tuple[list[Any], bool]:
    """The PS side of a contender: (the embedding modules its DLRM gets, prefetch).

    Field f's rows live in ``tables[f]``. One ``RemoteEmbeddingCollection`` of every table
    (what users run: one request per shard per step, whatever the number of tables), seen
    by DLRM through ``FieldColumns`` (int64 (B, F) -> (B, F, dim)). staleness 0: the fused
    synchronous step (this step's pushes with the next pull); >= 1: pipelined, the next
    batch prefetched (prefetch True: the training loop hands over its ids before each
    backward).
    """
    from embps.client.torch import FieldColumns, RemoteEmbeddingCollection, RemoteTableConfig

    ec = RemoteEmbeddingCollection(
        ps, [RemoteTableConfig(t, [t]) for t in tables], staleness=staleness
    )
    return [FieldColumns(ec)], staleness >= 1


def ps_contender(
    name: str,
    cfg: demo.DemoConfig,
    work: Workload,
    ps: PSClient,
    tables: list[str],
    staleness: int,
    shard_pids: list[int],
    rpcs: Callable[[], float],
) -> Contender:
    """DLRM on ``ps_embeddings(ps, tables, staleness)``, Adam on the MLPs (Adagrad runs on
    the server)."""
    import torch

    embs, prefetch = ps_embeddings(ps, tables, staleness)
    model = _dlrm(cfg, embs, work.dense.shape[2], work.sparse.shape[2])
    opts = [torch.optim.Adam(model.parameters(), lr=cfg.dense_lr)]
    return Contender(name, model, opts, work.sparse, work, prefetch, shard_pids, rpcs)


# --------------------------------------------------------------------------
# Parts of a step, alone
# --------------------------------------------------------------------------


def _timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of this process per call) of ``fn`` over ``reps`` calls."""
    best = float("inf")
    cpu0 = _process_cpu()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best, (_process_cpu() - cpu0) / reps


def step_parts(
    cfg: demo.DemoConfig, work: Workload, ps: PSClient, tables: list[str], local: Contender,
    reps: int = 5,
) -> dict[str, float]:  # fmt: skip
    """Milliseconds of each part of one PS step alone, on the last batch (best of ``reps``).

    tables: one per field. Keys: unique_ms (unique + inverse of every field's ids),
    pull_ms / pull_cpu_ms (every table's pull, one after another, train=True; wall and
    this process's CPU), push_ms / push_cpu_ms, torch_ms (forward + backward + Adam with
    the rows in hand: what the trainer computes whatever holds the rows), local_step_ms
    (one step of the local contender; untimed, so its losses count nowhere). Where the
    client has the multi-table calls, also pull_many_ms / pull_many_cpu_ms,
    push_many_ms / push_many_cpu_ms and push_pull_ms / push_pull_cpu_ms: the same rows
    of every table in one call (one RPC per shard).
    """
    import torch
    import torch.nn.functional as F

    from embps.client.torch import unique_inverse

    i = work.num_batches - 1
    batch, fields = work.sparse.shape[1], work.sparse.shape[2]
    cols = [np.ascontiguousarray(work.sparse[i, :, f]) for f in range(fields)]
    out: dict[str, float] = {}
    t, _ = _timed(lambda: [unique_inverse(c) for c in cols], reps)
    out["unique_ms"] = 1e3 * t
    uniq = [unique_inverse(c) for c in cols]
    grads = [np.full((u.shape[0], cfg.dim), 1e-6, dtype=np.float32) for u, _ in uniq]
    pairs = list(zip(tables, [u for u, _ in uniq], strict=True))
    t, c = _timed(lambda: [ps.pull(n, u, train=True) for n, u in pairs], reps)
    out["pull_ms"], out["pull_cpu_ms"] = 1e3 * t, 1e3 * c
    step = iter(range(10**6, 10**7))

    def push() -> None:
        s = next(step)
        for n, (u, _), g in zip(tables, uniq, grads, strict=True):
            ps.push(n, u, g, step=s)

    t, c = _timed(push, reps)
    out["push_ms"], out["push_cpu_ms"] = 1e3 * t, 1e3 * c
    pull_many = getattr(ps, "pull_many", None)
    push_many = getattr(ps, "push_many", None)
    push_pull = getattr(ps, "push_pull", None)
    if pull_many is not None and push_many is not None and push_pull is not None:
        keys = dict(pairs)
        both = {n: (u, g) for (n, u), g in zip(pairs, grads, strict=True)}
        calls: dict[str, Callable[[], object]] = {
            "pull_many": lambda: pull_many(keys, train=True),
            "push_many": lambda: push_many(both, step=next(step)),
            "push_pull": lambda: push_pull(push=both, pull=keys, step=next(step)),
        }
        for what, fn in calls.items():
            t, c = _timed(fn, reps)
            out[f"{what}_ms"], out[f"{what}_cpu_ms"] = 1e3 * t, 1e3 * c

    class InHand(torch.nn.Module):
        """The rows of one field already pulled: F.embedding(inverse, U), U a leaf."""

        def __init__(self, u: int, inverse: np.ndarray) -> None:
            super().__init__()
            self.u = u
            self.inverse = torch.from_numpy(inverse.reshape(batch))

        def forward(self, ids: Any) -> Any:
            rows = torch.zeros(self.u, cfg.dim, requires_grad=True)
            return F.embedding(self.inverse, rows)

    model = _dlrm(cfg, [InHand(u.shape[0], inv) for u, inv in uniq], work.dense.shape[2], fields)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.dense_lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def compute() -> None:
        logits = model(torch.from_numpy(work.sparse[i]), torch.from_numpy(work.dense[i]))
        opt.zero_grad(set_to_none=True)
        loss_fn(logits, torch.from_numpy(work.labels[i])).backward()
        opt.step()

    compute()
    out["torch_ms"] = 1e3 * _timed(compute, reps)[0]
    out["local_step_ms"] = 1e3 * min(local.train(i, i + 1, timed=False) for _ in range(reps))
    return out


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


_T0 = time.perf_counter()


def _progress(what: str) -> None:
    print(f"  .. {time.perf_counter() - _T0:5.1f} s  {what}", file=sys.stderr, flush=True)


def measure(
    quick: bool, batch_sizes: tuple[int, ...], warmup: int, steps: int, rounds: int,
    staleness: int, threads: int, seed: int, vocab_cap: int = VOCAB_CAP,
) -> dict[str, Any]:  # fmt: skip
    """Train every contender at every batch size, interleaved; the flat results object."""
    import torch

    # torch's sparse Adagrad says once that it skips sparse invariant checks: not ours
    warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
    total = warmup + steps * rounds
    args = argparse.Namespace(
        quick=True, steps=total, batch_size=batch_sizes[0], staleness=staleness, seed=seed
    )
    cfg = demo.config_for(args)
    vocab = vocab_sizes(vocab_cap)
    data = SyntheticCTR(num_fields=len(vocab), vocab_sizes=vocab, num_dense=NUM_DENSE, seed=seed)
    r: dict[str, Any] = {
        "quick": quick, "batch_sizes": list(batch_sizes), "warmup_steps": warmup,
        "steps": steps, "rounds": rounds, "staleness": staleness, "torch_threads": threads,
        "seed": seed, "fields": data.num_fields, "vocab_sizes": list(vocab),
        "dim": cfg.dim, "shards": NUM_SHARDS,
        "model": _model_text(cfg, data.num_fields, data.num_dense),
    }  # fmt: skip
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as stack:
            logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="embps-bench-")))
            local_ps = stack.enter_context(localps.LocalPS(NUM_SHARDS, logdir / "serve.log"))
            _progress(f"start embps serve --shards {NUM_SHARDS}")
            local_ps.start()
            ps = stack.enter_context(PSClient(local_ps.addresses, timeout=60.0))
            ps.wait_ready(timeout=30.0)
            r["rpcs_counted_by"], rpcs = rpc_counter(ps, local_ps.shards)
            for b in batch_sizes:
                _progress(f"batch {b}: {total} batches (generated before timing)")
                work = make_workload(data, b, total)
                r.update(
                    _measure_batch(cfg, work, ps, local_ps, rpcs, b, warmup, steps, rounds, quick)
                )
                del work
    finally:
        torch.set_num_threads(old_threads)
    add_ratios(r)
    return r


def _measure_batch(
    cfg: demo.DemoConfig, work: Workload, ps: PSClient, local_ps: localps.LocalPS,
    rpcs: Callable[[], float], b: int, warmup: int, steps: int, rounds: int, quick: bool,
) -> dict[str, Any]:  # fmt: skip
    """The three contenders at batch size ``b``: keys ``<contender>_<b>_...``, parts and
    server tables. Creates the PS tables and drops them at the end."""
    r: dict[str, Any] = {f"vocab_rows_{b}": int(sum(work.vocab))}
    pids = [s.pid for s in local_ps.shards]
    tables = {mode: field_tables(cfg, work, f"b{b}_{mode}") for mode in MODES}
    contenders: list[Contender] = []
    try:
        for configs in tables.values():
            for t in configs:
                ps.create_table(t)
        contenders.append(local_contender(cfg, work, tables["sync"]))
        for mode in MODES:
            st = 0 if mode == "sync" else cfg.staleness
            names = [t.name for t in tables[mode]]
            contenders.append(ps_contender(mode, cfg, work, ps, names, st, pids, rpcs))
        _progress(f"batch {b}: warm-up, {warmup} steps of each contender")
        for c in contenders:
            c.train(0, warmup, timed=False)
        for k in range(rounds):
            _progress(f"batch {b}: round {k + 1}/{rounds}, {steps} steps of each contender")
            lo = warmup + k * steps
            for c in contenders:
                c.train(lo, lo + steps, timed=True)
        for c in contenders:
            c.close()
        for c in contenders:
            r.update({f"{c.name}_{b}_{k}": v for k, v in summarize(c, b).items()})
        _progress(f"batch {b}: parts of one step, alone")
        r[f"parts_{b}_ms"] = step_parts(
            cfg, work, ps, [t.name for t in tables["sync"]], contenders[0], 3 if quick else 5
        )
        memory = demo.table_memory(ps)
        r[f"server_tables_{b}"] = {
            mode: {
                k: sum(memory[t.name][k] for t in configs)
                for k in ("keys", "pulled_rows", "pushed_rows", "bytes")
            }
            for mode, configs in tables.items()
        }
    finally:
        for c in contenders:
            with contextlib.suppress(Exception):
                c.close()
        for configs in tables.values():
            for t in configs:
                with contextlib.suppress(Exception):
                    ps.drop_table(t.name)
    return r


def add_ratios(r: dict[str, Any]) -> None:
    """Per batch size: rpcs_per_step_B (the larger of the two PS modes'), each PS mode's
    rate / local's (``<mode>_B_ratio``); the targets met among those that ran."""
    for b in r["batch_sizes"]:
        r[f"rpcs_per_step_{b}"] = max(r[f"{m}_{b}_rpcs_per_step"] for m in MODES)
        for m in MODES:
            r[f"{m}_{b}_ratio"] = r[f"{m}_{b}_samples_s"] / r[f"local_{b}_samples_s"]
    ran = [t for t in (*TARGETS, *rpc_targets(tuple(r["batch_sizes"]), r["steps"])) if t.ratio in r]
    r["targets_met"] = sum(t.met(r[t.ratio]) for t in ran)
    r["targets_total"] = len(ran)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _target(key: str) -> Target | None:
    return next((t for t in TARGETS if t.ratio == key), None)


def report(r: dict[str, Any]) -> str:
    """The readable report: per batch size, each contender beside the baseline, the
    targets, RPCs per step; then the profile and the parts of a step."""
    s, shards = r["staleness"], r["shards"]
    rpc_bound = rpc_targets((0,), r["steps"])[0]
    labels = {
        "local": "local: nn.Embedding(sparse=True) + Adagrad",
        "sync": "PS synchronous (staleness 0)",
        "pipelined": f"PS pipelined (staleness {s} + prefetch)",
    }
    head = ("batch", "contender", "samples/s", "vs local", "target", "met",
            "RPCs/step", "target", "met")  # fmt: skip
    rows: list[tuple[str, ...]] = []
    for b in r["batch_sizes"]:
        for name in ("local", *MODES):
            rate = r[f"{name}_{b}_samples_s"]
            if name == "local":
                cells: tuple[str, ...] = ("1.00x (baseline)", "", "", "", "", "")
            else:
                ratio = r[f"{name}_{b}_ratio"]
                n_rpcs = r[f"{name}_{b}_rpcs_per_step"]
                rpc_ok = "yes" if rpc_bound.met(n_rpcs) else "NO"
                cells = (
                    fmt_ratio(ratio),
                    *target_cells(_target(f"{name}_{b}_ratio"), ratio),
                    f"{n_rpcs:.1f}", f"== {shards}", rpc_ok,
                )  # fmt: skip
            rows.append((f"{b:,}" if name == "local" else "", labels[name], _rate(rate), *cells))
    title = (
        f"embps bench train{' --quick' if r['quick'] else ''}: {r['model']}; a table per "
        f"field (vocabularies {min(r['vocab_sizes']):,}..{max(r['vocab_sizes']):,}: "
        f"Criteo's capped); Adam (MLPs) + Adagrad (embeddings); a {shards}-shard PS on "
        f"loopback; torch threads {r['torch_threads']}; per batch size {r['warmup_steps']} "
        f"warm-up steps, then {r['rounds']} interleaved rounds of {r['steps']} steps per "
        f"contender, best round; RPCs counted by the {r['rpcs_counted_by']}"
    )
    lines = [title, machine_line(f", torch {demo_report.torch_version()}"), ""]
    lines += table(head, rows, right={2, 3, 6})
    lines += [
        f"RPCs/step: RPCs sent in the timed rounds / their steps. A round's first pull has "
        f"no push to carry and its last pushes go alone (no next batch, the closing flush), "
        f"so the target allows two RPCs per shard per round more: <= {rpc_bound.bound:.2f}.",
        "",
        f"targets met: {r['targets_met']} of {r['targets_total']}",
        "",
    ]
    cols = [(m, b) for b in r["batch_sizes"] for m in MODES]
    prof_head = ("ms per step", *(f"{m} {b}" for m, b in cols))
    keys = ("wall", "forward", "prefetch", "backward", "optimizer", "trainer_cpu")
    prof = [(k, *(f"{r[f'{m}_{b}_profile_ms'][k]:.1f}" for m, b in cols)) for k in keys]
    prof.append(
        (
            "shard_cpu (each)",
            *("/".join(f"{x:.1f}" for x in r[f"{m}_{b}_profile_ms"]["shard_cpu"]) for m, b in cols),
        )
    )
    lines += ["profile of the timed steps (mean; forward includes waiting for rows, "
              "backward includes pushing or queueing the push):"]  # fmt: skip
    lines += table(prof_head, prof, right=set(range(1, len(prof_head))))
    parts = [
        (what, *(_part(r[f"parts_{b}_ms"], k) for b in r["batch_sizes"]))
        for what, k in (
            ("unique + inverse of the ids", "unique"),
            ("pulls, one table after another (CPU)", "pull"),
            ("pushes, one table after another (CPU)", "push"),
            ("pull_many: every table, one call (CPU)", "pull_many"),
            ("push_many: every table, one call (CPU)", "push_many"),
            ("push_pull: both, one call (CPU)", "push_pull"),
            ("torch fwd+bwd+Adam, rows in hand", "torch"),
            ("a local step (the baseline's)", "local_step"),
        )
        if any(f"{k}_ms" in r[f"parts_{b}_ms"] for b in r["batch_sizes"])
    ]
    lines += ["", "parts of one step alone (the last batch, best of a few):"]
    lines += table(
        ("ms", *(f"batch {b:,}" for b in r["batch_sizes"])),
        parts,
        right=set(range(1, len(r["batch_sizes"]) + 1)),
    )
    return "\n".join(lines)


def _part(parts: dict[str, float], key: str) -> str:
    """'12.3' or '12.3 (8.1)' (wall, and CPU where measured) of one part; '-' if absent."""
    if f"{key}_ms" not in parts:
        return "-"
    cpu = parts.get(f"{key}_cpu_ms")
    return f"{parts[f'{key}_ms']:.1f}" + (f" ({cpu:.1f})" if cpu is not None else "")


def _rate(v: float) -> str:
    return f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v / 1e3:.2f}k"


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 128,1024, got {text!r}") from None
    if not sizes or min(sizes) < 1 or len(set(sizes)) < len(sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be distinct and >= 1, got {text!r}")
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps bench train``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"batch sizes {','.join(map(str, QUICK_BATCH_SIZES))}, {QUICK['rounds']} rounds "
        f"of {QUICK['steps']} steps after {QUICK['warmup']} warm-up steps (default batch "
        f"sizes {','.join(map(str, BATCH_SIZES))}, {FULL['rounds']} rounds of "
        f"{FULL['steps']} after {FULL['warmup']})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON object")
    parser.add_argument("--staleness", type=int, default=1, choices=(1, 2),
                        help="the pipelined contender's staleness (default 1)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every contender (default 1, as the demo)")  # fmt: skip
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=None, metavar="B,B,..",
                        help="batch sizes to run (default: the preset's)")  # fmt: skip
    parser.add_argument("--vocab-cap", type=int, default=VOCAB_CAP,
                        help=f"largest vocabulary of a field (default {VOCAB_CAP:,})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="data and table seed (default 0)")
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the report, write the JSON if asked. 0."""
    preset = QUICK if args.quick else FULL
    steps = args.steps or preset["steps"]
    rounds = args.rounds or preset["rounds"]
    warmup = args.warmup or preset["warmup"]
    sizes = args.batch_sizes or (QUICK_BATCH_SIZES if args.quick else BATCH_SIZES)
    if steps < 1 or rounds < 1 or warmup < 1 or args.threads < 1 or args.vocab_cap < 1:
        raise SystemExit("--steps, --rounds, --warmup, --threads and --vocab-cap must be >= 1")
    t0 = time.perf_counter()
    r = measure(bool(args.quick), sizes, warmup, steps, rounds, args.staleness, args.threads,
                args.seed, args.vocab_cap)  # fmt: skip
    print(report(r))
    print(f"(run took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        write_json(args.json, r)
    return 0
