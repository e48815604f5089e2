"""``embps bench train``: training samples/s through a 2-shard PS beside local torch embeddings.

One model, one data stream, one optimizer setup; only where the embedding rows
live changes. Every contender trains its own copy of the demo's model
(``embps.client.demo``: a DLRM of ``embps.client.models`` with 8 categorical
fields of dim 16, bottom MLP 4->32->16, top MLP ->64->32->1, the embeddings
concatenated to the top MLP's input) on the same pre-generated batches of
``SyntheticCTR`` (batch 8192), with the dense layers on torch ``Adam`` (lr 2e-3)
and the embeddings on Adagrad (lr 0.05):

  local_sparse   ``torch.nn.Embedding(sparse=True)`` per field, ``torch.optim.Adagrad``
                 on its sparse gradients (only the rows of the batch are touched).
                 The ids are mapped to rows 0..n-1 of the field's table once,
                 before timing (a vocabulary of every id in the pre-generated
                 batches, like a preprocessed dataset); each id has its own row.
  local_dense    the same with ``sparse=False`` (dense gradient, dense Adagrad).
                 The faster of the two is the baseline (``local_samples_s``).
  ps_sync        one ``RemoteEmbedding`` for all 8 fields against ``embps serve
                 --shards 2`` (a child process on loopback, the demo's ``LocalPS``):
                 one adaptive table holding every field (the ids are field-tagged,
                 so they never collide; its budgets are the demo's per-field plans,
                 ``demo.plan_tables``, summed), Adagrad on the server, the (B, 8) ids
                 mapped at once (``DLRM(num_fields=8)``): one pull and one push per
                 step. Staleness 0: every pull sees every push.
  ps             the same, pipelined as the demo trains: staleness ``--staleness``
                 (default 1), pushes on a background thread, the next batch's rows
                 prefetched while the current batch's backward runs. This is
                 ``ps_samples_s``, the number the target is about.
  ps_per_field_sync / ps_per_field
                 the demo's layout exactly: one adaptive table per field, one
                 ``RemoteEmbedding`` each (8 pulls and 8 pushes per step), synchronous
                 and pipelined.
  local_sparse_all_threads
                 information, not the baseline: ``local_sparse`` with as many torch
                 threads as the machine has cores.

Timing. Each contender first trains ``warm-up`` steps (not timed: numba and torch
warm-up, the first rows created). Then ``rounds`` rounds; in each, every
contender trains the next ``steps`` batches in turn (the same batches for all),
so a busy moment of the shared machine hits all of them alike. A round's time
runs from the first pull (or prefetch) to the last push acknowledged (``flush``);
garbage collection is paused in it. A contender's rate is its best round.
Data generation is outside every timing (batches are made before the first
round). Torch runs with ``--threads`` threads (default 1, as the demo: on a
2-core machine the two shard processes need the other core).

Profile. For the PS contenders the benchmark also records, per timed step: the
trainer's wall time in forward (including waiting for the rows), in the
prefetch call, in backward (including handing the gradients to the push thread
or, synchronous, pushing) and in the optimizer; the trainer process's CPU time
(all its threads) and each shard's CPU time (``/proc``). After the rounds, it
times the parts of one step alone on one batch: unique + inverse of every
field's ids, the pulls and the pushes of every table (wall and trainer CPU), the
torch forward + backward with the rows already in hand, and a local step.

Target (issue 4): ``ps_samples_s / local_samples_s >= 0.7``.

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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from embps.protos.config import TableConfig
from embps.server.benchreport import (
    Target,
    fmt_ratio,
    machine_line,
    table,
    target_cells,
    write_json,
)

from . import demo
from .data import SyntheticCTR
from .ps_client import PSClient

NUM_SHARDS = 2
BATCH = 8192  # the demo's batch size
FULL = {"warmup": 10, "steps": 25, "rounds": 5}
QUICK = {"warmup": 4, "steps": 8, "rounds": 3}
TARGETS: tuple[Target, ...] = (Target("ratio", 0.7),)
PS_CONTENDERS = ("ps_sync", "ps", "ps_per_field_sync", "ps_per_field")
LOCAL_CONTENDERS = ("local_sparse", "local_dense")
INFO_CONTENDER = "local_sparse_all_threads"  # not the baseline: other torch threads


# --------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------


@dataclass
class Workload:
    """Pre-generated batches (every contender trains on these, in this order).

    sparse: int64 (N, B, F) field-tagged ids; local_ids: int64 (N, B, F) the same
    ids as rows of the local tables; dense: float32 (N, B, D); labels: float32 (N, B);
    vocab: rows of each field's local table (distinct ids over all N batches).
    """

    sparse: np.ndarray
    local_ids: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    vocab: list[int]

    @property
    def num_batches(self) -> int:
        return int(self.sparse.shape[0])


def make_workload(data: SyntheticCTR, batch_size: int, num_batches: int) -> Workload:
    """``num_batches`` batches from sample 0 on, and their ids mapped to local rows."""
    block = data.generate(0, batch_size * num_batches)
    f, d = data.num_fields, data.num_dense
    sparse = block.sparse.reshape(num_batches, batch_size, f)
    local = np.empty_like(sparse)
    vocab = []
    for j in range(f):
        uniq, inverse = np.unique(sparse[:, :, j], return_inverse=True)
        local[:, :, j] = inverse.reshape(num_batches, batch_size)
        vocab.append(int(uniq.shape[0]))
    return Workload(
        np.ascontiguousarray(sparse),
        local,
        np.ascontiguousarray(block.dense.reshape(num_batches, batch_size, d)),
        np.ascontiguousarray(block.labels.reshape(num_batches, batch_size)),
        vocab,
    )


def shared_table(plans: list[demo.FieldPlan], name: str) -> TableConfig:
    """One adaptive table for every field: the per-field plans' budgets summed.

    Static rows: the sum of the fields' ``hash_bucket_size`` (a multiple of 64);
    sketch: the next power of two of the summed widths. Threshold, optimizer,
    seed and dim as the per-field tables.
    """
    first = plans[0].config
    width = sum(p.config.sketch_width for p in plans)
    return replace(
        first,
        name=name,
        hash_bucket_size=sum(p.config.hash_bucket_size for p in plans),
        sketch_width=1 << (width - 1).bit_length(),
    )


# --------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------


@dataclass
class StepProfile:
    """Wall seconds of the trainer's main thread per part of a step, summed over steps,
    and the CPU seconds of the trainer process and of each shard over the same steps."""

    steps: int = 0
    forward: float = 0.0
    prefetch: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    wall: float = 0.0
    trainer_cpu: float = 0.0
    shard_cpu: list[float] = field(default_factory=list)

    def per_step_ms(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        out: dict[str, Any] = {
            k: 1e3 * getattr(self, k) / n
            for k in ("forward", "prefetch", "backward", "optimizer", "wall", "trainer_cpu")
        }
        out["shard_cpu"] = [1e3 * c / n for c in self.shard_cpu]
        return out


class Contender:
    """One model + optimizers training on the workload, a segment of batches at a time."""

    def __init__(
        self,
        name: str,
        model: Any,
        optimizers: list[Any],
        ids: np.ndarray,
        work: Workload,
        pipelined: bool,
        shard_pids: list[int] | None = None,
        threads: int = 0,
    ) -> None:
        import torch

        self.name = name
        self.threads = threads  # torch threads while it trains (0: the run's setting)
        self.model = model
        self.optimizers = optimizers
        self.ids = ids
        self.work = work
        self.pipelined = pipelined
        self.shard_pids = shard_pids or []
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        self.losses: list[float] = []
        self.seconds: list[float] = []  # per timed round
        self.profile = StepProfile(shard_cpu=[0.0] * len(self.shard_pids))

    def train(self, lo: int, hi: int, timed: bool) -> float:
        """Train on batches [lo, hi); wall seconds from the first pull to the last push."""
        import torch

        losses = []
        parts = np.zeros(4)
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        gc.collect()
        gc.disable()
        try:
            cpu0, shards0 = _process_cpu(), [_pid_cpu(p) for p in self.shard_pids]
            t0 = time.perf_counter()
            if self.pipelined:
                self.model.prefetch(self.ids[lo])
            for i in range(lo, hi):
                a = time.perf_counter()
                logits = self.model(
                    torch.from_numpy(self.ids[i]), torch.from_numpy(self.work.dense[i])
                )
                b = time.perf_counter()
                if self.pipelined and i + 1 < hi:
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
            torch.set_num_threads(threads)
        self.losses += [float(x) for x in losses]
        if timed:
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
        return seconds

    def close(self) -> None:
        close = getattr(self.model, "close", None)
        if close is not None:
            close()


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
    """The demo's model (same sizes, same seed) around ``embeddings``."""
    import torch

    from .models import DLRM

    torch.manual_seed(cfg.seed)
    return DLRM(
        embeddings, num_dense, cfg.dim, cfg.bottom, cfg.top, cfg.concat_embeddings,
        num_fields=num_fields,
    )  # fmt: skip


def local_contender(
    name: str, cfg: demo.DemoConfig, work: Workload, sparse: bool, threads: int = 0
) -> Contender:
    """DLRM on ``nn.Embedding`` tables in this process, Adagrad on the rows, Adam on the MLPs."""
    import torch

    embs = [torch.nn.Embedding(n, cfg.dim, sparse=sparse) for n in work.vocab]
    model = _dlrm(cfg, embs, work.dense.shape[2], len(embs))
    dense = [p for n, p in model.named_parameters() if not n.startswith("embeddings.")]
    rows = [e.weight for e in embs]
    opts = [torch.optim.Adam(dense, lr=cfg.dense_lr), torch.optim.Adagrad(rows, lr=cfg.emb_lr)]
    return Contender(name, model, opts, work.local_ids, work, pipelined=False, threads=threads)


def ps_contender(
    name: str,
    cfg: demo.DemoConfig,
    work: Workload,
    ps: PSClient,
    tables: list[str],
    staleness: int,
    shard_pids: list[int],
) -> Contender:
    """DLRM on ``RemoteEmbedding`` (one per table; one table = every field), as the demo wires it."""
    import torch

    from .torch import RemoteEmbedding

    embs = [RemoteEmbedding(ps, t, staleness=staleness) for t in tables]
    model = _dlrm(cfg, embs, work.dense.shape[2], work.sparse.shape[2])
    opts = [torch.optim.Adam(model.parameters(), lr=cfg.dense_lr)]
    return Contender(name, model, opts, work.sparse, work, staleness > 0, shard_pids)


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


def r_local(contenders: dict[str, Contender]) -> str:
    """The local contender with the best round so far (the baseline's setup)."""
    return min(LOCAL_CONTENDERS, key=lambda n: min(contenders[n].seconds))


def step_parts(
    cfg: demo.DemoConfig, work: Workload, ps: PSClient, tables: list[str], local: Contender
) -> dict[str, float]:
    """Milliseconds of each part of one PS step alone, on one batch.

    tables: one per field, or one for every field. Keys: unique_ms (unique + inverse
    of the ids of every table), pull_ms / pull_cpu_ms (every table's pull, one after
    another, train=True; wall and this process's CPU), push_ms / push_cpu_ms, torch_ms
    (forward + backward + Adam with the rows in hand: what the trainer computes
    whatever holds the rows), local_step_ms (one step of the local contender).
    """
    import torch
    import torch.nn.functional as F

    from .torch import unique_inverse

    i = work.num_batches - 1
    batch, fields = work.sparse.shape[1], work.sparse.shape[2]
    if len(tables) == 1:
        cols = [work.sparse[i].reshape(-1)]
    else:
        cols = [np.ascontiguousarray(work.sparse[i, :, f]) for f in range(fields)]
    reps = 5
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

    class InHand(torch.nn.Module):
        """The rows of one field already pulled: F.embedding(inverse, U), U a leaf."""

        def __init__(self, u: int, inverse: np.ndarray) -> None:
            super().__init__()
            self.u = u
            shape = (batch,) if inverse.shape[0] == batch else (batch, -1)  # (B,) or (B, F)
            self.inverse = torch.from_numpy(inverse.reshape(shape))

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


def _progress(what: str) -> None:
    print(f"  .. {what}", file=sys.stderr, flush=True)


def measure(
    quick: bool, warmup: int, steps: int, rounds: int, batch_size: int, staleness: int,
    threads: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Train every contender, interleaved; the flat results object (rates, ratios, profile)."""
    import torch

    total = warmup + steps * rounds
    args = argparse.Namespace(
        quick=True, steps=total, batch_size=batch_size, staleness=staleness, seed=seed
    )
    cfg = demo.config_for(args)
    data = SyntheticCTR(seed=seed)
    _progress(f"data: {total} batches of {batch_size} (generated before timing)")
    work = make_workload(data, batch_size, total)
    plans = demo.plan_tables(data, cfg, NUM_SHARDS)
    r: dict[str, Any] = {
        "quick": quick, "batch_size": batch_size, "warmup_steps": warmup, "steps": steps,
        "rounds": rounds, "staleness": staleness, "torch_threads": threads, "seed": seed,
        "fields": data.num_fields, "dim": cfg.dim, "shards": NUM_SHARDS,
        "model": _model_text(cfg, data.num_fields, data.num_dense),
    }  # fmt: skip
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    contenders: list[Contender] = []
    try:
        with contextlib.ExitStack() as stack:
            logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="embps-bench-")))
            local_ps = stack.enter_context(demo.LocalPS(NUM_SHARDS, logdir / "serve.log"))
            _progress("start embps serve --shards 2")
            local_ps.start()
            pids = [s.pid for s in local_ps.shards]
            ps = stack.enter_context(PSClient(local_ps.addresses, timeout=60.0))
            ps.wait_ready(timeout=30.0)
            tables: dict[str, list[str]] = {}
            for name in PS_CONTENDERS:
                if name.startswith("ps_per_field"):
                    cfgs = [replace(p.config, name=f"{name}_{p.table}") for p in plans]
                else:
                    cfgs = [shared_table(plans, f"{name}_all_fields")]
                for c in cfgs:
                    ps.create_table(c)
                tables[name] = [c.name for c in cfgs]
            for name in LOCAL_CONTENDERS:
                contenders.append(local_contender(name, cfg, work, sparse=name == "local_sparse"))
            all_threads = os.cpu_count() or 1
            if all_threads != threads:  # information: what local training gets by default
                contenders.append(
                    local_contender(INFO_CONTENDER, cfg, work, sparse=True, threads=all_threads)
                )
                r["info_threads"] = all_threads
            for name in PS_CONTENDERS:
                st = 0 if name.endswith("_sync") else staleness
                contenders.append(ps_contender(name, cfg, work, ps, tables[name], st, pids))
            _progress(f"warm-up: {warmup} steps of each of {len(contenders)} contenders")
            for c in contenders:
                c.train(0, warmup, timed=False)
            for k in range(rounds):
                _progress(f"round {k + 1}/{rounds}: {steps} steps of each contender")
                lo = warmup + k * steps
                for c in contenders:
                    c.train(lo, lo + steps, timed=True)
            for c in contenders:
                c.close()
            by_name = {c.name: c for c in contenders}
            _progress("parts of one step, alone")
            local = by_name[r_local(by_name)]
            r["parts_ms"] = step_parts(cfg, work, ps, tables["ps"], local)
            r["parts_per_field_ms"] = step_parts(cfg, work, ps, tables["ps_per_field"], local)
            memory = demo.table_memory(ps)
            r["server_tables"] = {
                name: {
                    k: sum(memory[t][k] for t in tabs)
                    for k in ("keys", "static_rows", "pulled_rows", "pushed_rows", "bytes")
                }
                for name, tabs in tables.items()
            }
    finally:
        torch.set_num_threads(old_threads)
        for c in contenders:
            with contextlib.suppress(Exception):
                c.close()
    for c in contenders:
        r[f"{c.name}_samples_s"] = steps * batch_size / min(c.seconds)
        r[f"{c.name}_loss_first"] = c.losses[0]
        r[f"{c.name}_loss_last"] = float(np.mean(c.losses[-steps:]))
        if c.shard_pids:
            r[f"{c.name}_profile_ms"] = c.profile.per_step_ms()
    add_ratios(r)
    return r


def add_ratios(r: dict[str, Any]) -> None:
    """The baseline (the faster local setup), every PS contender / baseline, targets met."""
    best = max(LOCAL_CONTENDERS, key=lambda n: r[f"{n}_samples_s"])
    r["local_setup"] = best
    r["local_samples_s"] = r[f"{best}_samples_s"]
    for name in PS_CONTENDERS:
        r[f"{name}_vs_local"] = r[f"{name}_samples_s"] / r["local_samples_s"]
    r["ratio"] = r["ps_samples_s"] / r["local_samples_s"]
    if f"{INFO_CONTENDER}_samples_s" in r:  # no target: the PS trainer keeps 1 core free
        r["ps_vs_local_all_threads"] = r["ps_samples_s"] / r[f"{INFO_CONTENDER}_samples_s"]
    r["targets_met"] = sum(t.met(r[t.ratio]) for t in TARGETS)
    r["targets_total"] = len(TARGETS)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

_LABELS = {
    "local_sparse": "local: nn.Embedding(sparse=True) + Adagrad",
    "local_dense": "local: nn.Embedding (dense grads) + Adagrad",
    INFO_CONTENDER: "  (information) local sparse, {threads} torch threads",
    "ps_sync": "PS, one table for all fields, synchronous",
    "ps": "PS, one table for all fields, pipelined",
    "ps_per_field_sync": "PS, a table per field (the demo's), synchronous",
    "ps_per_field": "PS, a table per field (the demo's), pipelined",
}


def report(r: dict[str, Any]) -> str:
    """The readable report: every contender beside the baseline, the target, the profile."""
    s = r["staleness"]
    head = ("contender", "samples/s", "vs local", "target", "met")
    rows: list[tuple[str, ...]] = []
    info = (INFO_CONTENDER,) if f"{INFO_CONTENDER}_samples_s" in r else ()
    for name in (*LOCAL_CONTENDERS, *info, *PS_CONTENDERS):
        label = _LABELS[name].format(threads=r.get("info_threads"))
        if name.startswith("ps") and not name.endswith("_sync"):
            label += f" (staleness {s} + prefetch)"
        vs = r[f"{name}_samples_s"] / r["local_samples_s"]
        mark = " (baseline)" if name == r["local_setup"] else ""
        t = TARGETS[0] if name == "ps" else None
        rows.append(
            (
                label + mark,
                f"{r[f'{name}_samples_s'] / 1e3:.1f}k",
                fmt_ratio(vs),
                *target_cells(t, vs),
            )
        )
    title = (
        f"embps bench train{' --quick' if r['quick'] else ''}: {r['model']}; batch "
        f"{r['batch_size']:,}; Adam (MLPs) + Adagrad (embeddings); a 2-shard PS on loopback; "
        f"torch threads {r['torch_threads']}; {r['warmup_steps']} warm-up steps, then "
        f"{r['rounds']} interleaved rounds of {r['steps']} steps per contender, best round"
    )
    lines = [title, machine_line(f", torch {demo._torch_version()}"), ""]
    lines += table(head, rows, right={1, 2})
    lines += ["", f"targets met: {r['targets_met']} of {r['targets_total']}"]
    if "ps_vs_local_all_threads" in r:
        lines.append(
            f"PS pipelined vs local sparse with {r['info_threads']} torch threads: "
            f"{fmt_ratio(r['ps_vs_local_all_threads'])} (no target: the PS trainer runs "
            f"{r['torch_threads']} thread beside the shards, which need the other cores here)"
        )
    lines.append("")
    prof_head = ("ms per step", *(n for n in PS_CONTENDERS))
    keys = ("wall", "forward", "prefetch", "backward", "optimizer", "trainer_cpu")
    prof = [(k, *(f"{r[f'{n}_profile_ms'][k]:.1f}" for n in PS_CONTENDERS)) for k in keys]
    shards = [r[f"{n}_profile_ms"]["shard_cpu"] for n in PS_CONTENDERS]
    prof.append(("shard_cpu (each)", *("/".join(f"{x:.1f}" for x in sc) for sc in shards)))
    lines += ["profile of the timed steps (mean; forward includes waiting for rows, "
              "backward includes pushing or queueing the push):"]  # fmt: skip
    lines += table(prof_head, prof, right=set(range(1, len(prof_head))))
    one, per = r["parts_ms"], r["parts_per_field_ms"]
    parts = [
        (what, *(f"{p[k]:.1f}" + (f" ({p[k2]:.1f})" if k2 else "") for p in (one, per)))
        for what, k, k2 in (
            ("unique + inverse of the ids", "unique_ms", ""),
            ("pulls, one after another (CPU)", "pull_ms", "pull_cpu_ms"),
            ("pushes, one after another (CPU)", "push_ms", "push_cpu_ms"),
            ("torch fwd+bwd+Adam, rows in hand", "torch_ms", ""),
            ("a local step (the baseline's)", "local_step_ms", ""),
        )
    ]
    lines += ["", "parts of one step alone (one batch, best of 5):"]
    lines += table(("ms", "one table", "a table per field"), parts, right={1, 2})
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps bench train``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK['rounds']} rounds of {QUICK['steps']} steps after {QUICK['warmup']} "
        f"warm-up steps (default {FULL['rounds']} of {FULL['steps']} after {FULL['warmup']})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON object")
    parser.add_argument("--staleness", type=int, default=1, choices=(1, 2),
                        help="pipelined contenders' staleness (default 1)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every contender (default 1, as the demo)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"default {BATCH}")
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
    if steps < 1 or rounds < 1 or warmup < 1 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("--steps, --rounds, --warmup, --batch-size and --threads must be >= 1")
    t0 = time.perf_counter()
    r = measure(bool(args.quick), warmup, steps, rounds, args.batch_size, args.staleness,
                args.threads, args.seed)  # fmt: skip
    print(report(r))
    print(f"(run took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        write_json(args.json, r)
    return 0
