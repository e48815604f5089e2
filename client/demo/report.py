"""The demo's report: ``report.md``, the loss and memory plots and ``summary.json``."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embps.client.data import SyntheticCTR
from embps.client.demo.job import DemoConfig, FieldPlan, TrainLog
from embps.client.demo.localps import ShardInfo
from embps.protos.config import TableConfig

# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


@dataclass
class DemoResult:
    """Everything the report shows."""

    cfg: DemoConfig
    data: SyntheticCTR
    plans: list[FieldPlan]
    shards: list[ShardInfo] = field(default_factory=list)
    supervisor_pid: int = 0
    log: TrainLog = field(default_factory=TrainLog)
    model_desc: str = ""
    dense_params: int = 0
    heldout_start: int = 0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # model/optimum/baseline
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    checkpoint: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_note: str = ""
    checkpoint_dir: str = ""
    exit_code: int | None = None
    shards_left: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    torch_threads: int = 1

    def throughput(self) -> dict[str, float]:
        """Samples/s: pipelined over all steps after the first 10%, and the sync window
        beside the pipelined steps just before it (same length, same phase of training)."""
        log, b = self.log, self.cfg.batch_size
        out = {"pipelined": log.rate(max(1, log.steps // 10), log.steps, b, False)}
        sync_idx = [i for i, s in enumerate(log.synchronous) if s]
        if sync_idx:
            lo, hi = sync_idx[0], sync_idx[-1] + 1
            out["synchronous"] = log.rate(lo, hi, b, True)
            out["pipelined_before_sync"] = log.rate(max(0, lo - (hi - lo)), lo, b, False)
        return out


def mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB"


def plot_training(path: Path, res: DemoResult) -> None:
    """loss.png: training log loss (and held-out log loss) and held-out AUC over samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log, b = res.log, res.cfg.batch_size
    x = (np.arange(1, log.steps + 1) * b) / 1e6
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    losses = np.asarray(log.losses)
    w = max(1, log.steps // 30)
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid") if log.steps >= w else losses
    ax1.plot(x, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (batch)")
    ax1.plot(x[w - 1 :], smooth, color="tab:blue", lw=1.8, label=f"train (mean of {w})")
    ex = np.asarray([e.samples for e in res.log.evals]) / 1e6
    ax1.plot(ex, [e.logloss for e in log.evals], "o-", color="tab:orange", ms=4, label="held-out")
    opt, base = res.metrics["optimum"], res.metrics["baseline"]
    ax1.axhline(opt["logloss"], color="tab:green", ls="--", label="planted optimum")
    ax1.axhline(base["logloss"], color="grey", ls=":", label="base-CTR baseline")
    ax2.plot(ex, [e.auc for e in log.evals], "o-", color="tab:orange", ms=4, label="held-out")
    ax2.axhline(opt["auc"], color="tab:green", ls="--", label="planted optimum")
    ax2.axhline(0.5, color="grey", ls=":", label="base-CTR baseline")
    sync = [i for i, s in enumerate(log.synchronous) if s]
    for ax in (ax1, ax2):
        if sync:
            ax.axvspan(
                x[sync[0]] - b / 1e6,
                x[sync[-1]],
                color="tab:red",
                alpha=0.08,
                label="synchronous window",
            )
        ax.set_xlabel("training samples (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    lo = min(opt["logloss"], float(losses.min()))
    ax1.set_ylim(lo - 0.02, max(base["logloss"], float(np.median(losses[: max(1, w)]))) + 0.05)
    ax1.set_ylabel("log loss")
    ax1.set_title("Log loss")
    ax2.set_ylabel("AUC")
    ax2.set_title("Held-out AUC")
    if log.steps > 1:
        t = np.asarray(log.ended_at)
        sec = ax2.secondary_xaxis(
            "top", functions=(lambda v: np.interp(v, x, t), lambda s: np.interp(s, t, x))
        )
        sec.set_xlabel("seconds of training", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_memory(path: Path, res: DemoResult) -> None:
    """memory.png: own (dynamic) rows and bytes per table over training samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = res.log.memory
    x = np.asarray([m.step * res.cfg.batch_size for m in mem]) / 1e6
    names = list(mem[-1].tables) if mem else []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    for name in names:
        ax1.plot(x, [m.tables.get(name, {}).get("keys", 0) for m in mem], lw=1.5, label=name)
    ax1.set_yscale("symlog", linthresh=100)
    ax1.set_title("Own (dynamic) rows: promoted ids")
    ax1.set_ylabel("rows, all shards")
    mb = np.asarray([[m.tables.get(n, {}).get("bytes", 0) / 2**20 for m in mem] for n in names])
    if len(names):
        ax2.stackplot(x, mb, labels=names, alpha=0.85)
    ax2.set_title("Table memory (static + dynamic + sketch)")
    ax2.set_ylabel("MB, all shards")
    for ax in (ax1, ax2):
        ax.set_xlabel("training samples (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sketch_bytes(cfg: TableConfig, num_shards: int) -> int:
    """Bytes of an adaptive table's count-min sketches over all shards (uint32 counters)."""
    width = cfg.sketch_width or 1 << 20
    depth = cfg.sketch_depth or 4
    return 4 * width * depth * num_shards


def write_report(out: Path, res: DemoResult) -> Path:
    """report.md (and summary.json) in ``out``; the PNGs are referenced by name."""
    cfg, data, log = res.cfg, res.data, res.log
    m, opt, base = res.metrics["model"], res.metrics["optimum"], res.metrics["baseline"]
    tp = res.throughput()
    lines: list[str] = []
    add = lines.append
    kind = "quick" if cfg.quick else "full"
    add(f"# embps demo report ({kind} run)\n")
    add(
        f"Written {dt.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
        f"({os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch_version()}, "
        f"{res.torch_threads} torch thread). Total time {res.phases.get('total', 0):.1f} s.\n"
    )

    # ---- results
    add("## Results\n")
    end = res.heldout_start + cfg.eval_samples - 1
    add(
        f"Held-out: {cfg.eval_samples:,} samples, numbers {res.heldout_start:,}..{end:,}: "
        "the samples that follow the training ones in time (new ids included).\n"
    )
    add("| predictor | AUC | log loss |\n|---|---:|---:|")
    add(f"| **DLRM on embps (this run)** | **{m['auc']:.4f}** | **{m['logloss']:.4f}** |")
    add(f"| planted model (the optimum) | {opt['auc']:.4f} | {opt['logloss']:.4f} |")
    add(
        f"| trivial baseline: the training CTR {base['ctr']:.4f} | {base['auc']:.4f} | "
        f"{base['logloss']:.4f} |"
    )
    add(
        f"| gap to the optimum | {opt['auc'] - m['auc']:.4f} | "
        f"{m['logloss'] - opt['logloss']:.4f} |\n"
    )
    ll_share = (base["logloss"] - m["logloss"]) / max(base["logloss"] - opt["logloss"], 1e-12)
    auc_share = (m["auc"] - 0.5) / max(opt["auc"] - 0.5, 1e-12)
    add(
        f"The model closes {100 * ll_share:.0f}% of the log-loss gap between the trivial "
        f"baseline and the optimum, and {100 * auc_share:.0f}% of the AUC gap. Most of what "
        "is left is the planted weight of rare ids (seen a few times, sharing static rows), "
        "which no model learns from this many samples; longer runs close more of it.\n"
    )
    add("![training curves](loss.png)\n")
    early = " (**stopped early**: the time budget ran out)" if log.stopped_early else ""
    add(
        f"Training: {log.steps} steps x {cfg.batch_size:,} = {log.samples:,} samples in "
        f"{log.wall_seconds:.1f} s{early}. Held-out points during training: "
        f"the first {cfg.curve_samples:,} held-out samples.\n"
    )

    # ---- throughput
    add("## Throughput and pipelining\n")
    add("| mode | samples/s |\n|---|---:|")
    mode = (
        f"pipelined (staleness {cfg.staleness} + prefetch)"
        if cfg.staleness
        else "synchronous (staleness 0, no prefetch: `--staleness 0`)"
    )
    add(f"| {mode}, every step after the first 10% | {tp['pipelined']:,.0f} |")
    if "synchronous" in tp:
        n_sync = sum(log.synchronous)
        add(
            f"| pipelined, the {n_sync} steps just before the synchronous window | "
            f"{tp['pipelined_before_sync']:,.0f} |"
        )
        add(
            f"| synchronous (staleness 0, no prefetch), {n_sync} steps | {tp['synchronous']:,.0f} |\n"
        )
        ratio = tp["pipelined_before_sync"] / max(tp["synchronous"], 1e-9)
        add(f"Pipelined / synchronous: **{ratio:.2f}x** (same run, same tables, adjacent steps).\n")
    where = (
        "the shaded window in the plots ran that way"
        if "synchronous" in tp
        else "this run used it throughout"
        if cfg.staleness == 0
        else "this run had no synchronous window"
    )
    add(
        "Note on pipelining: with `staleness=s >= 1` (this run: "
        f"{cfg.staleness}) the `RemoteEmbeddingCollection` holds each step's gradients "
        "for every table and `prefetch()` sends them with the pull of the next batch's rows "
        "(one request per shard per step), on a background thread, while the current batch "
        "runs backward. A pull then misses at most the last push (bounded staleness): "
        "exactness traded for throughput, which pays most when the trainer has "
        "cores (or a GPU) to spare while the shards work. `staleness=0` is exactly "
        "synchronous training, equal to in-process torch (each step's push rides on the "
        f"next step's pull, also one request per shard); {where}.\n"
    )

    # ---- memory
    add("## Memory per table\n")
    add(
        "From `PSClient.stats()` after training, summed over the shards. The static part has "
        "`hash_bucket_size` rows **per shard**; own rows belong to ids promoted after "
        f"`promote_threshold` = {cfg.promote_threshold} sightings (counted in a count-min "
        "sketch). Bytes count every array: values, the Adagrad slot, per-row metadata, the "
        "hash index and the arena's spare capacity.\n"
    )
    add(
        "| table | static rows | own rows | promotions | static bytes | own-row bytes | "
        "sketch bytes | total | bytes per own row | pulls served by own rows |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    tot = dict.fromkeys(("static_rows", "keys", "promotions", "static", "own", "sketch", "all"), 0)
    plans = {p.table: p for p in res.plans}
    for name, t in res.memory.items():
        sketch = _sketch_bytes(plans[name].config, len(res.shards)) if name in plans else 0
        sketch = min(sketch, t["dynamic_bytes"])
        own = t["dynamic_bytes"] - sketch
        for k, v in (
            ("static_rows", t["static_rows"]),
            ("keys", t["keys"]),
            ("promotions", t["promotions"]),
            ("static", t["static_bytes"]),
            ("own", own),
            ("sketch", sketch),
            ("all", t["bytes"]),
        ):
            tot[k] += v
        served = t["pulled_dynamic"] / max(t["pulled_static"] + t["pulled_dynamic"], 1)
        per_row = f"{own / t['keys']:,.0f}" if t["keys"] else "-"
        add(
            f"| {name} | {t['static_rows']:,} | {t['keys']:,} | {t['promotions']:,} | "
            f"{mb(t['static_bytes'])} | {mb(own)} | {mb(sketch)} | {mb(t['bytes'])} | "
            f"{per_row} | {100 * served:.1f}% |"
        )
    add(
        f"| **all** | {tot['static_rows']:,} | {tot['keys']:,} | {tot['promotions']:,} | "
        f"{mb(tot['static'])} | {mb(tot['own'])} | {mb(tot['sketch'])} | "
        f"**{mb(tot['all'])}** | | |\n"
    )
    seen = sum(p.expected_ids for p in res.plans)
    raw = seen * (8 + 2 * 4 * cfg.dim)
    add(
        f"For comparison: an own row for every id the training met (about {seen:,} ids, "
        f"expected) would take at least {mb(raw)} (8-byte key + value + Adagrad slot, no "
        f"index or metadata): {raw / max(tot['all'], 1):.1f}x this run's {mb(tot['all'])}.\n"
    )
    add("![memory over time](memory.png)\n")

    # ---- checkpoint
    add("## Checkpoint\n")
    if res.checkpoint:
        c0 = res.checkpoint[0]
        add(f"Step {c0['step']}, written by every shard under `{res.checkpoint_dir}`:\n")
        add("| shard | path | kind | bytes | seconds |\n|---|---|---|---:|---:|")
        for c in res.checkpoint:
            add(
                f"| {c['shard_id']} | `{c['path']}` | {c['kind']} | {mb(c['bytes'])} | "
                f"{c['seconds']:.2f} |"
            )
        add(
            "\nRestore it (onto any shard count): `embps serve --shards 2 --checkpoint-dir "
            f"{res.checkpoint_dir} --restore latest`. Export it for serving: `embps export "
            f"{res.checkpoint_dir}/{c0['step']} OUT`.\n"
        )
    else:
        add(f"checkpoint: {res.checkpoint_note}\n")

    # ---- setup
    add("## Setup\n")
    add(f"**PS**: `embps serve --shards {len(res.shards)}` on loopback; its log is `serve.log`.\n")
    for s in res.shards:
        add(f"- shard {s.shard_id}: {s.address}, metrics :{s.metrics_port}, pid {s.pid}")
    clean = res.exit_code == 0 and not res.shards_left
    add(
        f"\nShutdown: SIGTERM, exit code {res.exit_code}, shard processes left: "
        f"{len(res.shards_left)} ({'clean' if clean else '**not clean**'}).\n"
    )
    add(
        f"**Model**: {res.model_desc}. {res.dense_params:,} dense parameters on the trainer "
        f"(torch Adam, lr {cfg.dense_lr}); the embedding rows live on the PS (Adagrad, lr "
        f"{cfg.emb_lr}, applied by the shards).\n"
    )
    add(
        f"**Training**: {cfg.steps} steps planned (batch {cfg.batch_size:,}, "
        f"{cfg.train_samples:,} samples, at most {cfg.max_train_seconds:.0f} s), seed "
        f"{cfg.seed}, staleness {cfg.staleness}, synchronous window {cfg.sync_steps} steps, "
        f"{cfg.evals} held-out evaluations during training.\n"
    )
    add("**Phases** (seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in res.phases.items()) + "\n")

    # ---- data
    add("## Data\n")
    add(
        f"`SyntheticCTR(seed={data.seed})`: {data.num_fields} categorical fields, "
        f"{data.num_dense} dense features, training CTR {base['ctr']:.3f}. New ids over time: "
        f"{100 * data.new_id_rate:g}% of draws pick a fresh id, drawn about "
        f"{data.new_id_reuse:g} times within {data.new_id_lifetime:,} samples, then never "
        "again. Labels come from a planted logistic model (a weight per id, FM interactions "
        f"of fields {list(data.interactions or [])}, dense coefficients); its click "
        "probabilities give the optimum above.\n"
    )
    add(
        "| field | table | vocabulary | Zipf exponent | ids in training (expected) | "
        f"seen >= {cfg.promote_threshold} times (expected) | own rows (actual) | "
        "hash_bucket_size per shard | sketch width per shard |"
    )
    add("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in res.plans:
        own_rows = res.memory.get(p.table, {}).get("keys", 0)
        add(
            f"| {p.field} | {p.table} | {p.vocab:,} | {p.zipf:g} | {p.expected_ids:,} | "
            f"{p.expected_promoted:,} | {own_rows:,} | {p.config.hash_bucket_size:,} | "
            f"{p.config.sketch_width:,} |"
        )
    add(
        f"\nTables: adaptive, dim {cfg.dim}, Adagrad (lr {cfg.emb_lr}), promote_threshold "
        f"{cfg.promote_threshold}. hash_bucket_size is sized for the ids expected to stay rare "
        f"(about {1 / cfg.bucket_fraction:g} of them per shared row), the sketch for the ids a "
        "shard sees. Expected counts are Poisson estimates from each field's Zipf law and the "
        "fresh-id rate (a fresh id: Poisson(reuse) draws); own rows above the estimate come "
        "from sketch over-counts, below it from fresh ids still young at the end.\n"
    )

    path = out / "report.md"
    path.write_text("\n".join(lines))
    summary = {
        "config": asdict(cfg),
        "metrics": res.metrics,
        "throughput": tp,
        "memory": res.memory,
        "checkpoint": res.checkpoint or res.checkpoint_note,
        "ps_exit_code": res.exit_code,
        "shards_left": res.shards_left,
        "ps_pids": [res.supervisor_pid] + [s.pid for s in res.shards],
        "phases": res.phases,
        "steps": log.steps,
        "samples": log.samples,
        "stopped_early": log.stopped_early,
        "evals": [asdict(e) for e in log.evals],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return path


def torch_version() -> str:
    import torch

    return str(torch.__version__)
