"""OptEmbed tuning for ``embps bench memory``: where the AUC goes, stage by stage.

Runs the dynamic baseline once, then each variant given on the command line (JSON
objects of ``Variant`` fields) against the same local 2-shard PS, data and held-out
samples as the benchmark, and prints for each: the thresholds over training, rows kept,
the held-out AUC of the supernet (full width, thresholds on) at the search, at the
searched dims, after the found dims trained on, after prune + narrow, and the bytes.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python docs/experiments/optembed_tuning.py \
        '{"weight": 2e-3}' '{"search_at": 1.0}'

``--steps N`` shortens every training run (the bytes fractions then differ from the
full run's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embps.client import optembed as oe
from embps.client.bench import memory as bm
from embps.client.demo.job import NUM_SHARDS
from embps.client.demo.localps import LocalPS
from embps.client.ps_client import PSClient


@dataclasses.dataclass
class Variant:
    weight: float = bm.OPTEMBED_WEIGHT
    aim: float = bm.OPTEMBED_AIM
    search_at: float = bm.OPTEMBED_SEARCH_AT
    freeze: bool = bm.OPTEMBED_FREEZE
    masked_rows_learn: bool = bm.OPTEMBED_MASKED_ROWS_LEARN
    step_grad_to_rows: bool = bm.OPTEMBED_STEP_GRAD_TO_ROWS
    warmup: float = bm.OPTEMBED_WARMUP
    full_prob: float = bm.OPTEMBED_FULL_PROB
    eval_samples: int | None = None  # the search's validation samples (None: the bench's)
    dims: list[int] | None = None  # skip the search: these dims (what would they give?)


def run_variant(s: Any, v: Variant, dyn: Any, say: Any) -> dict[str, Any]:
    old = (bm.OPTEMBED_WEIGHT, bm.OPTEMBED_AIM, bm.OPTEMBED_SEARCH_AT, bm.OPTEMBED_FREEZE, bm.OPTEMBED_MASKED_ROWS_LEARN, bm.OPTEMBED_STEP_GRAD_TO_ROWS,
           bm.OPTEMBED_WARMUP, bm.OPTEMBED_FULL_PROB)  # fmt: skip
    bm.OPTEMBED_WEIGHT, bm.OPTEMBED_AIM = v.weight, v.aim
    bm.OPTEMBED_WARMUP, bm.OPTEMBED_FULL_PROB = v.warmup, v.full_prob
    bm.OPTEMBED_SEARCH_AT, bm.OPTEMBED_FREEZE = v.search_at, v.freeze
    bm.OPTEMBED_MASKED_ROWS_LEARN = v.masked_rows_learn
    bm.OPTEMBED_STEP_GRAD_TO_ROWS = v.step_grad_to_rows
    search, budget = oe.evolutionary_search, bm.search_budget
    if v.dims is not None:
        forced = np.array(v.dims, dtype=np.int64)

        def fixed(score: Any, *a: Any, **k: Any) -> oe.SearchResult:
            return oe.SearchResult(forced, score(forced), [], 1)

        oe.evolutionary_search = fixed
    if v.eval_samples is not None:
        n = v.eval_samples
        bm.search_budget = lambda quick: dataclasses.replace(budget(quick), eval_samples=n)
    try:
        t0 = time.monotonic()
        run = bm.run_optembed(s, say)
        s.drop(run)
    finally:
        oe.evolutionary_search, bm.search_budget = search, budget
        (bm.OPTEMBED_WEIGHT, bm.OPTEMBED_AIM, bm.OPTEMBED_SEARCH_AT, bm.OPTEMBED_FREEZE, bm.OPTEMBED_MASKED_ROWS_LEARN, bm.OPTEMBED_STEP_GRAD_TO_ROWS,
         bm.OPTEMBED_WARMUP, bm.OPTEMBED_FULL_PROB) = old  # fmt: skip
    assert run.probs is not None and dyn.probs is not None
    se = bm.auc_difference_se(s.heldout.labels, run.probs, dyn.probs)
    return {
        "variant": dataclasses.asdict(v), "fraction": run.bytes / dyn.bytes,
        "gap": dyn.auc - run.auc, "se": se, "seconds": time.monotonic() - t0,
        "note": run.note, "stages": run.stages,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variants", nargs="*", default=["{}"])
    p.add_argument("--steps", type=int, default=bm.FULL.steps)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    pre = bm.Preset(args.steps, bm.FULL.batch_size, bm.FULL.eval_samples)
    cfg = bm.demo_config(pre, args.seed, quick=False)
    data = bm.make_data(args.seed)
    heldout = data.generate(cfg.train_samples, cfg.eval_samples)
    out = []
    with LocalPS(NUM_SHARDS, Path(f"/tmp/optembed-tuning-serve-{os.getpid()}.log")) as local:
        local.start()
        with PSClient(local.addresses, timeout=60.0) as ps:
            ps.wait_ready(timeout=30.0)
            s = bm._Session(ps, cfg, data, heldout)
            dyn, _pruned = bm.run_dynamic_and_pruned(s, print)
            print(f"dynamic AUC {dyn.auc:.4f}, {dyn.bytes:,} B; rows per field "
                  f"{[p.ids.shape[0] for p in s.profiles]}")  # fmt: skip
            for raw in args.variants:
                v = Variant(**json.loads(raw))
                print(f"--- {v}", flush=True)
                r = run_variant(s, v, dyn, print)
                print(json.dumps(r, default=float), flush=True)
                out.append(r)
        local.stop()
    for r in out:
        print(f"{r['variant']}: {r['fraction']:.1%} bytes, gap {r['gap']:+.4f} ± {r['se']:.4f}")


if __name__ == "__main__":
    main()
