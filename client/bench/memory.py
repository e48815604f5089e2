"""``embps bench memory``: held-out AUC against embedding memory, one model, seven embedding kinds.

The same DLRM (``embps.client.demo.models``), data (``SyntheticCTR``: Zipf ids, fresh ids
over time, a planted logistic model) and training loop (``embps.client.demo.job.train``,
pipelined like the demo: staleness 1) run once per embedding kind against one local 2-shard PS
(``embps serve --shards 2``, ``localps.LocalPS``); every kind is scored on the *same*
held-out samples (those that follow the training ones in time), so AUC differences
are paired. Kinds, each with one table set per categorical field (dim 16, Adagrad):

  dynamic   the full table: an own row for every id (the baseline, 100% memory)
  static    the hashing trick: ``hash_bucket_size`` shared rows sized to BUDGET of
            the dynamic table's bytes (static bytes are exact: rows x 152 B)
  adaptive  static part + own rows for ids seen ``promote_threshold`` times + a
            count-min sketch; one threshold for all fields and the static parts are
            planned from the dynamic run's per-id counts (``PSClient.frequencies``)
            to fit the budget of all fields together (``adaptive_configs``)
  qr        quotient-remainder (mult) with quotient + remainder rows at the budget
  mixed     ``MixedDimEmbedding``: the most frequent ids (by ``PSClient.frequencies``
            of the dynamic run: a profile of the same training data, as yesterday's
            counts would be in production) in a dim-16 table, the next in a dim-8
            table, the long tail in a hashed static dim-4 table; trainable projections
            to dim 16 on the trainer
  magnitude-pruned  the dynamic run's tables after ``OptEmbedMask.prune`` with per-field
            thresholds set to the row-norm quantile that fits the budget (magnitude
            pruning after training, no retraining; pruned ids read zeros). Not OptEmbed:
            nothing is learned, the thresholds are read off the row norms.
  optembed  the whole of OptEmbed (``embps.client.optembed``), in one pass over the same
            training data: dynamic tables trained as a supernet (learned per-field
            thresholds with their regularizer, uniform dimension sampling over
            OPTEMBED_DIMS after OPTEMBED_WARMUP of the steps at full width) for
            OPTEMBED_SEARCH_AT of the steps; an evolutionary search of a dim per field
            (``search_budget``: held-out AUC on validation samples that follow the test
            samples, so the test samples never choose; candidates over OPTEMBED_AIM of
            the dynamic bytes are not scored, the bytes estimated from the rows the
            thresholds keep, projected to the end of the pass); the found architecture
            (``OptEmbedSupernet.fix``: dims fixed, thresholds frozen) trained on the
            rest of the steps; then on the PS: prune under the thresholds and
            ``Narrow`` each table to its dim. Bytes and AUC are measured after that;
            its target: <= OPTEMBED_BUDGET (35%) of dynamic within OPTEMBED_TOLERANCE
            (0.001) AUC. The search's seconds are reported, and the held-out AUC after
            each stage (``stages`` in the JSON: supernet at the search, searched dims,
            found dims trained, applied) with the thresholds over training.

Memory is what the shards report (``PSClient.stats``: every array a table owns,
index, arena, optimizer slots, metadata, sketch, free list) summed over the kind's
tables and shards, plus, for mixed, the projection weights on the trainer.
Targets: adaptive within AUC_TOLERANCE (0.002) of dynamic at <= BUDGET (30%) of its
memory, and ahead of static at the same memory. The standard error of each AUC
difference is DeLong's (paired: same samples); the target is reported with it.

Output: a table on stdout, ``--json PATH`` (``{"runs": [{"kind", "bytes", "auc",
"logloss", ...}], ...}``) and ``memory_auc.png`` in ``--out DIR``. The full run takes
about 9 minutes on 2 busy cores, ``--quick`` about a minute (too few samples for the
targets to mean much: it checks that everything runs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embps.client.data import SyntheticCTR, auc, logloss
from embps.client.demo.job import (
    NUM_SHARDS,
    DemoConfig,
    Progress,
    predict,
    table_memory,
    train,
)
from embps.client.demo.localps import LocalPS
from embps.client.ps_client import PSClient
from embps.protos.config import Adagrad, Combiner, TableConfig, TableKind

KINDS = ("dynamic", "static", "adaptive", "qr", "mixed", "magnitude-pruned", "optembed")
BUDGET = 0.30  # memory of every budget kind, as a fraction of the dynamic tables' bytes
AIM = 0.27  # what the planners aim at, below BUDGET: sketch over-counts, arena growth
AUC_TOLERANCE = 0.002
STALENESS = 1  # pipelined as in the demo: asynchronous pushes, next batch prefetched
DIM = 16
STATIC_ROW_BYTES = 4 * DIM * 2 + 24  # value + Adagrad slot + freq, last_step, version
MIXED_DIMS = (16, 8, 4)
MIXED_SHARES = (0.45, 0.25, 0.30)  # of a field's budget: dim-16 rows, dim-8 rows, tail
ADAPTIVE_OWN_SHARE = 0.6  # of a field's budget (after the sketch) for own rows at most
OPTEMBED_BUDGET = 0.35  # OptEmbed's target: bytes <= this fraction of dynamic ...
OPTEMBED_TOLERANCE = 0.001  # ... within this AUC of dynamic
OPTEMBED_AIM = 0.30  # the search's bytes limit (estimated), below OPTEMBED_BUDGET
OPTEMBED_DIMS = (1, 2, 4, 8, 16)
OPTEMBED_WEIGHT = 2.5e-3  # threshold regularizer weight (docs/benchmarks.md: 1.5e-3 .. 5e-3)
OPTEMBED_WARMUP = 0.45  # of the steps at full width before dims are sampled (sampling costs
# AUC in proportion to how long it lasts: docs/benchmarks.md, "OptEmbed on six seeds")
OPTEMBED_FULL_PROB = 0.5  # after warmup: chance a batch uses the full width anyway
OPTEMBED_SEARCH_AT = 0.6  # of the steps: search, then the found dims train on the rest
OPTEMBED_FREEZE = True  # after the search the thresholds stay where they are
OPTEMBED_MASKED_ROWS_LEARN = True  # rows under a threshold get their whole gradient too
OPTEMBED_STEP_GRAD_TO_ROWS = False  # the mask's straight-through gradient: thresholds only


@dataclass(frozen=True)
class Preset:
    """Run size: training batches, batch size, held-out samples."""

    steps: int
    batch_size: int
    eval_samples: int


FULL = Preset(steps=1000, batch_size=8192, eval_samples=300_000)
QUICK = Preset(steps=50, batch_size=8192, eval_samples=50_000)


def search_budget(quick: bool) -> Any:
    """The evolutionary search's budget: population x generations candidates at most."""
    from embps.client.optembed import SearchBudget

    if quick:
        return SearchBudget(population=10, generations=4, parents=4, eval_samples=10_000)
    return SearchBudget(population=20, generations=10, parents=8, eval_samples=50_000)


def make_data(seed: int) -> SyntheticCTR:
    """4 fields (vocabularies 2M, 500k, 100k, 10k; Zipf 1.05, 1.1, 1.0, 0.9), 4 dense."""
    return SyntheticCTR(
        num_fields=4,
        vocab_sizes=(2_000_000, 500_000, 100_000, 10_000),
        zipf_exponents=(1.05, 1.1, 1.0, 0.9),
        seed=seed,
    )


def demo_config(p: Preset, seed: int, quick: bool, staleness: int = 1) -> DemoConfig:
    """The demo's model and optimizer settings, one evaluation at the end."""
    return DemoConfig(
        quick=quick, seed=seed, steps=p.steps, batch_size=p.batch_size,
        eval_samples=p.eval_samples, curve_samples=2048, evals=1, dim=DIM, bottom=(32,),
        top=(64, 32), concat_embeddings=True, dense_lr=2e-3, emb_lr=0.05, staleness=staleness,
        sync_steps=0, stats_every=p.steps, max_train_seconds=1e9, bucket_fraction=0.125,
        promote_threshold=8,
    )  # fmt: skip


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values: (V10 per positive (m,), V01 per negative (n,))."""
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    sp, sn = s[y], s[~y]
    v10 = (np.searchsorted(neg, sp, "left") + np.searchsorted(neg, sp, "right")) / (
        2.0 * neg.shape[0]
    )
    above = (
        pos.shape[0] - (np.searchsorted(pos, sn, "left") + np.searchsorted(pos, sn, "right")) / 2
    )
    return v10, above / pos.shape[0]


def auc_difference_se(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong standard error of AUC(a) - AUC(b) on the same samples (paired)."""
    y = np.asarray(labels).astype(bool)
    a10, a01 = _placements(y, np.asarray(a, dtype=np.float64))
    b10, b01 = _placements(y, np.asarray(b, dtype=np.float64))
    var = np.var(a10 - b10, ddof=1) / a10.shape[0] + np.var(a01 - b01, ddof=1) / a01.shape[0]
    return float(math.sqrt(max(var, 0.0)))


# --------------------------------------------------------------------------
# Table plans
# --------------------------------------------------------------------------


@dataclass
class FieldProfile:
    """What the dynamic run tells about one field: its ids, their counts, its bytes."""

    ids: np.ndarray  # int64 (u,) distinct training ids, ascending
    counts: np.ndarray  # int64 (u,) training pulls per id (PSClient.frequencies)
    bytes: int  # the dynamic table's bytes (both shards)

    @property
    def row_bytes(self) -> float:
        """Dynamic bytes per own row, index and growth slack included."""
        return self.bytes / max(self.ids.shape[0], 1)


def _pow2_at_least(x: float, lo: int, hi: int) -> int:
    return 1 << int(np.clip(math.ceil(math.log2(max(x, 1.0))), lo, hi))


def static_config(name: str, budget: float, seed: int, lr: float) -> TableConfig:
    """A static table whose 2 shards' rows take at most ``budget`` bytes."""
    rows = max(16, int(budget / NUM_SHARDS / STATIC_ROW_BYTES))
    return TableConfig(name, DIM, kind=TableKind.STATIC, optimizer=Adagrad(lr=lr), seed=seed,
                       hash_bucket_size=rows)  # fmt: skip


def adaptive_configs(
    names: list[str], profs: list[FieldProfile], budget: float, seed: int, lr: float
) -> list[TableConfig]:
    """Adaptive tables sharing ``budget`` bytes (all fields together): the sketches first,
    then own rows for ids seen >= T times, one T for every field (the smallest whose own
    rows fit ADAPTIVE_OWN_SHARE of what is left), then static rows, split between the
    fields by their ids seen fewer than T times. Small fields whose ids are all frequent
    thus keep own rows; the long tails share."""
    widths = [_pow2_at_least(p.ids.shape[0] / NUM_SHARDS / 2, 10, 17) for p in profs]
    left = max(budget - sum(NUM_SHARDS * 4 * w * 4 for w in widths), 0.0)
    costs = [1.15 * p.row_bytes for p in profs]  # margin: sketch over-counts promote a few more

    def own(t: int) -> float:
        return sum(int((p.counts >= t).sum()) * c for p, c in zip(profs, costs, strict=True))

    threshold = 2
    while threshold < 1024 and own(threshold) > ADAPTIVE_OWN_SHARE * left:
        threshold += 1
    rest = max(left - own(threshold), 0.0)
    rare = [int((p.counts < threshold).sum()) + 1 for p in profs]
    out = []
    for name, r, w in zip(names, rare, widths, strict=True):
        rows = max(16, int(rest * r / sum(rare) / NUM_SHARDS / STATIC_ROW_BYTES))
        out.append(TableConfig(name, DIM, kind=TableKind.ADAPTIVE, optimizer=Adagrad(lr=lr), seed=seed,
                               hash_bucket_size=rows, promote_threshold=threshold,
                               sketch_width=w))  # fmt: skip
    return out


def qr_config(name: str, budget: float, seed: int, lr: float) -> TableConfig:
    """QR (mult) table with quotient + remainder rows of both shards within ``budget``."""
    rows = max(4, int(budget / NUM_SHARDS / STATIC_ROW_BYTES))
    return TableConfig(name, DIM, kind=TableKind.QR, optimizer=Adagrad(lr=lr), seed=seed,
                       qr_quotient_buckets=rows // 2, qr_remainder_buckets=rows - rows // 2,
                       qr_combiner=Combiner.MULT)  # fmt: skip


def mixed_plan(prof: FieldProfile, budget: float) -> tuple[list[int], int]:
    """(ids in the dim-16 and dim-8 blocks, static tail rows per shard) for ``budget`` bytes."""
    full = 8 * DIM + 56  # value + slot bytes, plus metadata, key and index per row
    sizes = []
    for d, share in zip(MIXED_DIMS[:-1], MIXED_SHARES[:-1], strict=True):
        cost = 1.15 * prof.row_bytes * (8 * d + 56) / full
        sizes.append(int(share * budget / cost))
    tail_row = 4 * MIXED_DIMS[-1] * 2 + 24
    return sizes, max(16, int(MIXED_SHARES[-1] * budget / NUM_SHARDS / tail_row))


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


@dataclass
class KindRun:
    """The tables of one kind and what its run measured."""

    kind: str
    tables: list[str] = field(default_factory=list)
    trainer_bytes: int = 0  # mixed: the projections
    note: str = ""
    bytes: int = 0
    auc: float = 0.0
    logloss: float = 0.0
    train_seconds: float = 0.0
    search_seconds: float = 0.0  # optembed: the evolutionary search
    stages: dict[str, Any] = field(default_factory=dict)  # optembed: AUC after each stage
    probs: np.ndarray | None = None

    def row(self, dynamic_bytes: int) -> dict[str, Any]:
        return {
            "kind": self.kind, "bytes": self.bytes, "auc": self.auc, "logloss": self.logloss,
            "fraction_of_dynamic": self.bytes / max(dynamic_bytes, 1),
            "trainer_bytes": self.trainer_bytes, "train_seconds": self.train_seconds,
            "search_seconds": self.search_seconds, "tables": self.tables, "note": self.note,
            **({"stages": self.stages} if self.stages else {}),
        }  # fmt: skip


class _Session:
    """A running PS, the data and the settings every kind shares."""

    def __init__(self, ps: PSClient, cfg: DemoConfig, data: SyntheticCTR, heldout: Any) -> None:
        self.ps = ps
        self.cfg = cfg
        self.data = data
        self.heldout = heldout
        self.curve = heldout.slice(0, cfg.curve_samples)
        self.profiles: list[FieldProfile] = []

    def budget(self, f: int) -> float:
        return AIM * self.profiles[f].bytes

    def model_for(self, embeddings: list[Any]) -> Any:
        """A DLRM over ``embeddings``, the same dense initialisation for every kind."""
        import torch

        from embps.client.demo.models import DLRM

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        return DLRM(embeddings, self.data.num_dense, DIM, cfg.bottom, cfg.top,
                    cfg.concat_embeddings)  # fmt: skip

    def train_part(
        self,
        run: KindRun,
        model: Any,
        embeddings: list[Any],
        steps: int,
        start_step: int = 0,
        optimizer: Any = None,
        extra_loss: Callable[[], Any] | None = None,
    ) -> None:
        """Train ``model`` on batches ``start_step .. start_step + steps`` (adds the
        seconds to ``run.train_seconds``)."""
        cfg = dataclasses.replace(self.cfg, steps=steps, stats_every=max(steps, 1))
        t0 = time.monotonic()
        with open(os.devnull, "w") as quiet:
            train(cfg, self.data, model, embeddings, [], self.ps, self.curve,
                  Progress(cfg.steps, quiet), extra_loss, start_step, optimizer)  # fmt: skip
        run.train_seconds += time.monotonic() - t0

    def train_eval(
        self,
        run: KindRun,
        embeddings: list[Any],
        extra_loss: Callable[[], Any] | None = None,
        keep: bool = False,
    ) -> Any:
        """Train a DLRM over ``embeddings`` and score it on the held-out samples.

        Returns the model, closed (its embeddings' threads stopped) unless ``keep``.
        """
        model = self.model_for(embeddings)
        self.train_part(run, model, embeddings, self.cfg.steps, extra_loss=extra_loss)
        self.score(run, model)
        if not keep:
            model.close()
        return model

    def score(self, run: KindRun, model: Any) -> None:
        probs = predict(model, self.heldout.sparse, self.heldout.dense)
        run.probs = probs
        run.auc = auc(self.heldout.labels, probs)
        run.logloss = logloss(self.heldout.labels, probs)
        mem = table_memory(self.ps)
        run.bytes = sum(mem[t]["bytes"] for t in run.tables) + run.trainer_bytes

    def drop(self, run: KindRun) -> None:
        for t in run.tables:
            self.ps.drop_table(t)


def _distinct_ids(data: SyntheticCTR, n: int) -> list[np.ndarray]:
    """Distinct ids of each field in samples 0..n-1: int64 (u_f,) ascending."""
    seen: list[list[np.ndarray]] = [[] for _ in range(data.num_fields)]
    for lo in range(0, n, 1 << 18):
        b = data.generate(lo, min(1 << 18, n - lo))
        for f in range(data.num_fields):
            seen[f].append(np.unique(b.sparse[:, f]))
    return [np.unique(np.concatenate(s)) for s in seen]


def run_dynamic_and_pruned(s: _Session, say: Callable[[str], None]) -> list[KindRun]:
    """The full tables (baseline), their per-id counts, then the same tables pruned."""
    from embps.client.torch import OptEmbedMask, RemoteEmbedding

    cfg, ps = s.cfg, s.ps
    run = KindRun("dynamic", [f"dynamic.f{f}" for f in range(s.data.num_fields)])
    for t in run.tables:
        ps.create_table(TableConfig(t, DIM, optimizer=Adagrad(lr=cfg.emb_lr), seed=cfg.seed))
    model = s.train_eval(
        run, [RemoteEmbedding(ps, t, staleness=cfg.staleness) for t in run.tables], keep=True
    )
    say(_line(run, run.bytes))
    ids = _distinct_ids(s.data, cfg.train_samples)
    mem = table_memory(ps)
    s.profiles = [
        FieldProfile(ids[f], ps.frequencies(t, ids[f]), mem[t]["bytes"])
        for f, t in enumerate(run.tables)
    ]
    pruned = KindRun("magnitude-pruned", run.tables)
    mask = OptEmbedMask(len(run.tables), norm="l2")
    keep = []
    for f, t in enumerate(run.tables):
        rows = ps.pull(t, ids[f], train=False)
        norms = np.sort(np.linalg.norm(rows, axis=1))[::-1]
        k = int(min(norms.shape[0], s.budget(f) / (1.3 * s.profiles[f].row_bytes)))
        keep.append(k)
        mask.threshold.data[f] = float(norms[k]) if k < norms.shape[0] else 0.0
    freed = mask.prune(ps, run.tables)
    pruned.note = (
        f"OptEmbedMask.prune at the row-norm quantile of the budget: kept {sum(keep):,} of "
        f"{sum(len(i) for i in ids):,} rows, {sum(r.rows for r in freed):,} deleted"
    )
    s.score(pruned, model)
    say(_line(pruned, run.bytes))
    model.close()
    s.drop(run)
    return [run, pruned]


def run_static(s: _Session) -> KindRun:
    from embps.client.torch import RemoteEmbedding

    run = KindRun("static", [f"static.f{f}" for f in range(s.data.num_fields)])
    for f, t in enumerate(run.tables):
        s.ps.create_table(static_config(t, BUDGET * s.profiles[f].bytes, s.cfg.seed, s.cfg.emb_lr))
    s.train_eval(run, [RemoteEmbedding(s.ps, t, staleness=s.cfg.staleness) for t in run.tables])
    return run


def run_adaptive(s: _Session) -> KindRun:
    from embps.client.torch import RemoteEmbedding

    run = KindRun("adaptive", [f"adaptive.f{f}" for f in range(s.data.num_fields)])
    budget = sum(s.budget(f) for f in range(len(run.tables)))
    cfgs = adaptive_configs(run.tables, s.profiles, budget, s.cfg.seed, s.cfg.emb_lr)
    for c in cfgs:
        s.ps.create_table(c)
    run.note = f"promote_threshold {cfgs[0].promote_threshold}, static rows per shard " + ", ".join(
        str(c.hash_bucket_size) for c in cfgs
    )
    s.train_eval(run, [RemoteEmbedding(s.ps, t, staleness=s.cfg.staleness) for t in run.tables])
    return run


def run_qr(s: _Session) -> KindRun:
    from embps.client.torch import RemoteEmbedding

    run = KindRun("qr", [f"qr.f{f}" for f in range(s.data.num_fields)])
    for f, t in enumerate(run.tables):
        s.ps.create_table(qr_config(t, s.budget(f), s.cfg.seed, s.cfg.emb_lr))
    s.train_eval(run, [RemoteEmbedding(s.ps, t, staleness=s.cfg.staleness) for t in run.tables])
    return run


def run_mixed(s: _Session) -> KindRun:
    from embps.client.torch import MixedDimEmbedding, plan_mixed_dim_blocks

    cfg, ps = s.cfg, s.ps
    run = KindRun("mixed")
    embs = []
    notes = []
    for f, prof in enumerate(s.profiles):
        sizes, tail_rows = mixed_plan(prof, s.budget(f))
        names = [f"mixed.f{f}.d{d}" for d in MIXED_DIMS[:-1]] + [f"mixed.f{f}.tail"]
        blocks = plan_mixed_dim_blocks(prof.ids, prof.counts, sizes, MIXED_DIMS, names)
        for b in blocks[:-1]:
            per_shard = max(16, math.ceil(1.05 * b.size / NUM_SHARDS))  # no growth slack
            ps.create_table(TableConfig(b.table, b.dim, optimizer=Adagrad(lr=cfg.emb_lr),
                                        seed=cfg.seed, initial_capacity=per_shard))  # fmt: skip
        ps.create_table(TableConfig(names[-1], MIXED_DIMS[-1], kind=TableKind.STATIC,
                                    optimizer=Adagrad(lr=cfg.emb_lr), seed=cfg.seed,
                                    hash_bucket_size=tail_rows))  # fmt: skip
        run.tables += names
        notes.append("/".join(str(b.size) for b in blocks[:-1]) + f"/{2 * tail_rows}")
        embs.append(MixedDimEmbedding(ps, blocks, DIM, staleness=cfg.staleness))
    run.trainer_bytes = sum(e.projection_bytes for e in embs)
    run.note = (
        "ids in dims " + "/".join(map(str, MIXED_DIMS)) + " (tail: rows): " + ", ".join(notes)
    )
    s.train_eval(run, embs)
    return run


def optembed_bytes(kept: int, d: int) -> int:
    """Bytes of one shard's dynamic table of ``kept`` rows narrowed to ``d`` after a prune's
    compaction (arena 1.25x rows of values + Adagrad slot + metadata, row keys, buckets)."""
    from embps.server.kernels import hashmap as hm

    cap = max(16, kept + kept // 4)
    return cap * (8 * d + 24 + 8) + 16 * hm.capacity_for(cap) + 8 * hm.META_LEN


def projected_kept(counts: np.ndarray, kept: np.ndarray, final_counts: np.ndarray) -> int:
    """Rows a field will keep at the end of the pass: the share the thresholds keep
    now among ids trained about as often (counts in powers of two), applied to every id
    of the pass at its final count (the dynamic run's profile). A row's norm follows how
    often it trained, and by the end most ids have trained more than at the search: a
    flat share of the ids seen so far ran 6-19% low on six seeds, this within 6%.

    counts: int (n,) training counts so far of the ids seen so far; kept: bool (n,)
    whether each is over its threshold now; final_counts: int (u,) every pass id's
    count at the end."""

    def bucket(c: np.ndarray) -> np.ndarray:
        return np.floor(np.log2(np.maximum(c, 1))).astype(np.int64)

    b, fb = bucket(counts), bucket(final_counts)
    top = int(b.max(initial=0))
    nb = max(top, int(fb.max(initial=0))) + 1
    seen = np.bincount(b, minlength=nb).astype(np.float64)
    share = np.bincount(b, weights=kept.astype(np.float64), minlength=nb) / np.maximum(seen, 1)
    share[top + 1 :] = share[top]  # counts never reached yet: as the most trained ids
    return int(share[fb].sum())


def run_optembed(s: _Session, say: Callable[[str], None]) -> KindRun:
    """Supernet training, evolutionary search, the found architecture trained on, then
    prune + narrow on the PS (module doc). ``run.stages``: held-out AUC after each stage,
    thresholds over training."""
    import torch

    from embps.client.optembed import (
        DimSchedule,
        OptEmbedField,
        OptEmbedSupernet,
        apply_optembed,
        auc_scorer,
        evolutionary_search,
    )  # fmt: skip
    from embps.client.torch import RemoteEmbedding

    cfg, ps = s.cfg, s.ps
    nf = s.data.num_fields
    run = KindRun("optembed", [f"optembed.f{f}" for f in range(nf)])
    for t in run.tables:
        ps.create_table(TableConfig(t, DIM, optimizer=Adagrad(lr=cfg.emb_lr), seed=cfg.seed))
    schedule = DimSchedule(warmup_steps=int(OPTEMBED_WARMUP * cfg.steps),
                           full_prob=OPTEMBED_FULL_PROB)  # fmt: skip
    net = OptEmbedSupernet(nf, DIM, OPTEMBED_DIMS, schedule, weight=OPTEMBED_WEIGHT,
                           seed=cfg.seed, masked_rows_learn=OPTEMBED_MASKED_ROWS_LEARN,
                           step_grad_to_rows=OPTEMBED_STEP_GRAD_TO_ROWS)  # fmt: skip
    embs = [
        OptEmbedField(RemoteEmbedding(ps, t, staleness=cfg.staleness), net, f)
        for f, t in enumerate(run.tables)
    ]
    trace: list[list[float]] = []

    def snap_thresholds() -> None:
        trace.append([round(float(t), 4) for t in net.mask.threshold.detach()])

    steps_seen = [0]

    def extra() -> Any:
        if steps_seen[0] % max(cfg.steps // 10, 1) == 0:
            snap_thresholds()
        steps_seen[0] += 1
        return net.regularization()

    model = s.model_for(embs)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.dense_lr)  # one, through every phase
    search_step = max(1, round(OPTEMBED_SEARCH_AT * cfg.steps))
    s.train_part(run, model, embs, search_step, optimizer=opt, extra_loss=extra)
    snap_thresholds()
    s.score(run, model)
    stages: dict[str, Any] = {"thresholds": trace, "supernet": run.auc, "search_step": search_step}

    def kept_rows(ids: list[np.ndarray]) -> list[np.ndarray]:
        """Per field, bool (len(ids[f]),): which of ``ids[f]`` the learned thresholds
        keep (full rows, as prune judges them)."""
        return [
            np.linalg.norm(ps.pull(t, ids[f], train=False), axis=1)
            >= max(float(net.mask.threshold[f].detach()), 0.0)
            for f, t in enumerate(run.tables)
        ]

    pass_ids = [p.ids for p in s.profiles]  # every training id (the dynamic run's profile)
    ids = (
        _distinct_ids(s.data, search_step * cfg.batch_size) if search_step < cfg.steps else pass_ids
    )
    keep = kept_rows(ids)
    stages["kept_at_search"] = [int(k.sum()) for k in keep]
    kept = [
        projected_kept(ps.frequencies(t, i), k, p.counts)
        for t, i, k, p in zip(run.tables, ids, keep, s.profiles, strict=True)
    ]
    stages["kept_projected"] = kept
    stages["kept_projected_flat"] = [
        int(k.mean() * p.ids.shape[0]) if k.shape[0] else 0
        for k, p in zip(keep, s.profiles, strict=True)
    ]  # the share of ids seen so far, times the pass's ids (kept for comparison)
    dyn_bytes = sum(p.bytes for p in s.profiles)

    def cost(dims: np.ndarray) -> float:
        return float(sum(NUM_SHARDS * optembed_bytes(k // NUM_SHARDS, int(d))
                         for k, d in zip(kept, dims, strict=True)))  # fmt: skip

    limit = OPTEMBED_AIM * dyn_bytes
    smallest = cost(np.full(nf, min(OPTEMBED_DIMS)))
    budget = search_budget(cfg.quick)
    val = s.data.generate(cfg.train_samples + cfg.eval_samples, budget.eval_samples)
    t0 = time.monotonic()
    score = auc_scorer(model, net, val.sparse, val.dense, val.labels)
    found = evolutionary_search(score, nf, OPTEMBED_DIMS, budget, seed=cfg.seed, cost=cost,
                                max_cost=max(limit, smallest))  # fmt: skip
    search_s = time.monotonic() - t0
    h = s.heldout
    test_score = auc_scorer(model, net, h.sparse, h.dense, h.labels)  # reported, never chooses
    stages["supernet_full"] = test_score(np.full(nf, DIM))
    stages["supernet_searched_dims"] = test_score(found.dims)
    stages["estimated_bytes_fraction"] = cost(found.dims) / dyn_bytes
    if search_step < cfg.steps:  # the found architecture trains on the rest of the pass
        if OPTEMBED_FREEZE:
            net.fix(found.dims.tolist())  # dims and thresholds
        else:
            net.dim_mask.fix(found.dims.tolist())  # dims only: the thresholds go on learning
        s.train_part(run, model, embs, cfg.steps - search_step, start_step=search_step,
                     optimizer=opt, extra_loss=extra)  # fmt: skip
        snap_thresholds()
        s.score(run, model)
        stages["found_dims_trained"] = run.auc
        ids = pass_ids
        kept = [int(k.sum()) for k in kept_rows(ids)]
    stages["kept"] = kept
    stages["rows"] = [int(i.shape[0]) for i in ids]
    applied = apply_optembed(ps, run.tables, net, found.dims.tolist())
    with torch.no_grad():
        net.mask.threshold.clamp_(min=0.0)  # as prune read them: a negative one prunes nothing
    for e in embs:
        e.close()
    model.embeddings = torch.nn.ModuleList(
        OptEmbedField(RemoteEmbedding(ps, t, staleness=cfg.staleness), net, f)
        for f, t in enumerate(run.tables)
    )
    s.score(run, model)
    stages["applied"] = run.auc
    model.close()
    run.stages = stages
    run.search_seconds = search_s
    run.note = (
        f"dims {'/'.join(str(int(d)) for d in found.dims)} (search: {found.evaluations} "
        f"candidates, {search_s:.1f} s, validation AUC {found.score:.4f}), kept "
        f"{sum(kept):,} of {sum(len(i) for i in ids):,} rows (thresholds "
        + ", ".join(f"{float(t):.3f}" for t in net.mask.threshold.detach())
        + f"), freed {sum(a.bytes_freed for a in applied):,} bytes"
        + ("" if limit >= smallest else "; the thresholds keep too many rows for the "
           f"{OPTEMBED_AIM:.0%} aim even at dim {min(OPTEMBED_DIMS)}")
    )  # fmt: skip
    say(_line(run, dyn_bytes) + f"  search {search_s:.1f} s")
    say(f"    {run.note}")
    return run


def _line(run: KindRun, dynamic_bytes: int) -> str:
    return (
        f"  {run.kind:<16} {run.bytes / 2**20:8.2f} MB ({100 * run.bytes / max(dynamic_bytes, 1):5.1f}%)"
        f"  AUC {run.auc:.4f}  logloss {run.logloss:.4f}  ({run.train_seconds:.0f} s training)"
    )


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def evaluate_targets(runs: dict[str, KindRun], labels: np.ndarray) -> dict[str, Any]:
    """Deltas vs dynamic with their DeLong SE, budget checks and the two targets."""
    dyn = runs["dynamic"]
    out: dict[str, Any] = {"deltas": {}}
    for k, r in runs.items():
        if k == "dynamic" or r.probs is None or dyn.probs is None:
            continue
        out["deltas"][k] = {
            "delta_auc": r.auc - dyn.auc,
            "se": auc_difference_se(labels, r.probs, dyn.probs),
        }
    ada, st = runs["adaptive"], runs["static"]
    frac = ada.bytes / dyn.bytes
    gap = dyn.auc - ada.auc
    vs_static = ada.auc - st.auc
    se_static = (
        auc_difference_se(labels, ada.probs, st.probs)
        if ada.probs is not None and st.probs is not None
        else float("nan")
    )
    out["adaptive_within_tolerance"] = {
        "pass": bool(gap <= AUC_TOLERANCE and frac <= BUDGET),
        "auc_gap": gap, "se": out["deltas"]["adaptive"]["se"], "fraction": frac,
        "target": f"AUC(dynamic) - AUC(adaptive) <= {AUC_TOLERANCE} at <= {BUDGET:.0%} memory",
    }  # fmt: skip
    out["adaptive_beats_static"] = {
        "pass": bool(vs_static > 0 and ada.bytes <= st.bytes),
        "auc_lead": vs_static, "se": se_static,
        "bytes_adaptive": ada.bytes, "bytes_static": st.bytes,
        "target": "AUC(adaptive) > AUC(static), adaptive bytes <= static bytes",
    }  # fmt: skip
    out["budget_kinds_within_budget"] = {
        k: runs[k].bytes / dyn.bytes <= (OPTEMBED_BUDGET if k == "optembed" else BUDGET)
        for k in KINDS
        if k != "dynamic"
    }
    oe = runs["optembed"]
    out["optembed_target"] = {
        "pass": bool(dyn.auc - oe.auc <= OPTEMBED_TOLERANCE and oe.bytes <= OPTEMBED_BUDGET * dyn.bytes),
        "auc_gap": dyn.auc - oe.auc, "se": out["deltas"]["optembed"]["se"],
        "fraction": oe.bytes / dyn.bytes, "search_seconds": oe.search_seconds,
        "target": f"AUC(dynamic) - AUC(optembed) <= {OPTEMBED_TOLERANCE} at <= "
        f"{OPTEMBED_BUDGET:.0%} memory",
    }  # fmt: skip
    return out


def format_table(runs: dict[str, KindRun], targets: dict[str, Any]) -> str:
    dyn = runs["dynamic"]
    lines = [
        "| kind | bytes | % of dynamic | AUC | logloss | ΔAUC vs dynamic (± SE) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in KINDS:
        r = runs[k]
        d = targets["deltas"].get(k)
        delta = "-" if d is None else f"{d['delta_auc']:+.4f} ± {d['se']:.4f}"
        lines.append(
            f"| {k} | {r.bytes:,} | {100 * r.bytes / dyn.bytes:.1f}% | {r.auc:.4f} | "
            f"{r.logloss:.4f} | {delta} |"
        )
    a, b = targets["adaptive_within_tolerance"], targets["adaptive_beats_static"]
    lines += [
        "",
        f"target 1: {a['target']}: gap {a['auc_gap']:+.4f} (SE {a['se']:.4f}) at "
        f"{a['fraction']:.1%}: {'PASS' if a['pass'] else 'FAIL'}",
        f"target 2: {b['target']}: lead {b['auc_lead']:+.4f} (SE {b['se']:.4f}), "
        f"{b['bytes_adaptive']:,} vs {b['bytes_static']:,} bytes: {'PASS' if b['pass'] else 'FAIL'}",
    ]
    o = targets["optembed_target"]
    lines.append(
        f"target 3: {o['target']}: gap {o['auc_gap']:+.4f} (SE {o['se']:.4f}) at "
        f"{o['fraction']:.1%}, search {o['search_seconds']:.1f} s: {'PASS' if o['pass'] else 'FAIL'}"
    )
    return "\n".join(lines)


def plot(path: Path, runs: dict[str, KindRun]) -> None:
    """memory_auc.png: held-out AUC against embedding memory, one point per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dyn = runs["dynamic"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in KINDS:
        r = runs[k]
        ax.scatter(r.bytes / 2**20, r.auc, s=40)
        ax.annotate(k, (r.bytes / 2**20, r.auc), textcoords="offset points", xytext=(5, 4))
    ax.axvline(BUDGET * dyn.bytes / 2**20, ls="--", c="grey", lw=1)
    ax.axhline(dyn.auc - AUC_TOLERANCE, ls=":", c="grey", lw=1)
    ax.set_xlabel("embedding memory (MB: PS tables + trainer projections)")
    ax.set_ylabel("held-out AUC")
    ax.set_title(
        f"AUC vs memory (dashed: {BUDGET:.0%} of dynamic; dotted: dynamic - {AUC_TOLERANCE})"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps bench memory``."""
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.steps} steps of {QUICK.batch_size} (default "
                        f"{FULL.steps} of {FULL.batch_size}), {QUICK.eval_samples:,} held-out "
                        "samples: checks that it runs, too small for the targets")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON object")
    parser.add_argument("--out", metavar="DIR", help="folder for memory_auc.png and serve.log "
                        "(default ./bench-memory-<timestamp>/)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="data, table and model seed")
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)  # tuning
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--staleness", type=int, default=STALENESS, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run every kind, print the table, write the JSON and the plot. 0 if it all ran."""
    import torch

    t0 = time.monotonic()
    quick = bool(args.quick)
    p = QUICK if quick else FULL
    p = Preset(args.steps or p.steps, args.batch_size or p.batch_size, p.eval_samples)
    cfg = demo_config(p, args.seed, quick, args.staleness)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"bench-memory-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(args.seed)
    heldout = data.generate(cfg.train_samples, cfg.eval_samples)
    say = _say
    say(
        f"embps bench memory ({'quick' if quick else 'full'}): {cfg.steps} steps x "
        f"{cfg.batch_size}, {cfg.eval_samples:,} held-out samples, 2 shards; output in {out}"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores: the trainer and 2 shards share them
    runs: dict[str, KindRun] = {}
    try:
        with LocalPS(NUM_SHARDS, out / "serve.log") as local:
            local.start()
            with PSClient(local.addresses, timeout=60.0) as ps:
                ps.wait_ready(timeout=30.0)
                s = _Session(ps, cfg, data, heldout)
                for r in run_dynamic_and_pruned(s, say):
                    runs[r.kind] = r
                dyn_bytes = runs["dynamic"].bytes
                for fn in (run_static, run_adaptive, run_qr, run_mixed):
                    r = fn(s)
                    s.drop(r)
                    runs[r.kind] = r
                    say(_line(r, dyn_bytes))
                r = run_optembed(s, say)
                s.drop(r)
                runs[r.kind] = r
            local.stop()
    except Exception:
        traceback.print_exc()
        print(f"embps bench memory: FAILED; the PS log is {out / 'serve.log'}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
    targets = evaluate_targets(runs, heldout.labels)
    say("")
    say(format_table(runs, targets))
    png = out / "memory_auc.png"
    plot(png, runs)
    total = time.monotonic() - t0
    result = {
        "runs": [runs[k].row(runs["dynamic"].bytes) for k in KINDS],
        "targets": targets,
        "budget_fraction": BUDGET,
        "auc_tolerance": AUC_TOLERANCE,
        "config": {"quick": quick, "seed": args.seed, "steps": cfg.steps,
                   "batch_size": cfg.batch_size, "eval_samples": cfg.eval_samples,
                   "dim": DIM, "shards": NUM_SHARDS, "fields": data.num_fields,
                   "vocab_sizes": data.vocab_sizes},
        "plot": str(png),
        "seconds": total,
    }  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=_json_default))
    say(f"plot: {png}; {total:.0f} s in all")
    return 0


def _json_default(o: object) -> object:
    if isinstance(o, np.integer | np.bool_):
        return o.item()
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m embps.client.bench.memory``: the same flags as ``embps bench memory``."""
    parser = argparse.ArgumentParser(prog="embps bench memory", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
