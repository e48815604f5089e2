"""`embps bench train --quick`: a real 2-shard PS, 26 tables, every contender trains, the JSON adds up.

The targets themselves are not asserted (a shared CI machine makes the ratios noisy);
what is: the rates exist, the ratios are the rates divided, RPCs per step are counted,
the PS contenders trained (their loss fell, their tables hold a row per id), and the
baseline is fair: the local model starts from the PS's rows (same first loss, and the
synchronous PS tracks it step for step), and its last loss is its last round's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

from embps.client.bench.train import (  # noqa: E402
    MODES,
    QUICK_BATCH_SIZES,
    field_tables,
    initial_rows,
    local_contender,
    make_workload,
    rpc_counter,
    summarize,
)
from embps.client.data import SyntheticCTR  # noqa: E402
from embps.client.demo import job as demo  # noqa: E402
from embps.client.demo import localps  # noqa: E402
from embps.client.demo.models import DLRM  # noqa: E402
from embps.client.ps_client import PSClient  # noqa: E402
from embps.protos.config import Initializer, TableConfig  # noqa: E402

BENCH_TIMEOUT_S = 240.0  # --quick takes about 45 s on 2 idle cores (PS start included)
Factory = Callable[..., list[Any]]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    path = tmp_path_factory.mktemp("bench") / "train.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "embps.client.cli",
            "bench",
            "train",
            "--quick",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text()), proc.stdout


def _tiny(batch: int = 64, batches: int = 6) -> tuple[demo.DemoConfig, Any]:
    args = argparse.Namespace(quick=True, steps=batches, batch_size=batch, staleness=1, seed=0)
    data = SyntheticCTR(num_fields=3, vocab_sizes=(5, 50, 500), num_dense=2, seed=0)
    return demo.config_for(args), make_workload(data, batch, batches)


# --------------------------------------------------------------------------
# The quick run
# --------------------------------------------------------------------------


def test_rates_ratios_and_rpcs_are_consistent(bench: tuple[dict[str, Any], str]) -> None:
    r, _ = bench
    assert r["batch_sizes"] == list(QUICK_BATCH_SIZES) and r["fields"] == 26
    fields, shards = r["fields"], r["shards"]
    for b in r["batch_sizes"]:
        assert r[f"local_{b}_samples_s"] > 0
        for m in MODES:
            assert r[f"{m}_{b}_samples_s"] > 0, (m, b)
            assert r[f"{m}_{b}_ratio"] == pytest.approx(
                r[f"{m}_{b}_samples_s"] / r[f"local_{b}_samples_s"], rel=1e-12
            )
            # at least one RPC per shard per step; at most a pull and a push per table
            assert shards <= r[f"{m}_{b}_rpcs_per_step"] <= 2 * shards * fields, (m, b)
        assert r[f"rpcs_per_step_{b}"] == max(r[f"{m}_{b}_rpcs_per_step"] for m in MODES)
    met = (
        int(r["pipelined_1024_ratio"] >= 0.7)
        + int(r["pipelined_128_ratio"] >= 0.33)
        + int(r["sync_1024_ratio"] >= 0.5)
        # one per shard per step, and per round two more for its ends
        + sum(
            int(r[f"rpcs_per_step_{b}"] <= shards * (1 + 2 / r["steps"]) + 1e-9)
            for b in r["batch_sizes"]
        )
    )
    assert r["targets_met"] == met and r["targets_total"] == 3 + len(r["batch_sizes"])


def test_the_contenders_trained(bench: tuple[dict[str, Any], str]) -> None:
    r, _ = bench
    for b in r["batch_sizes"]:
        for name in ("local", *MODES):
            assert r[f"{name}_{b}_loss_last"] < r[f"{name}_{b}_loss_first"] - 0.05, (name, b)
        for m in MODES:
            t = r[f"server_tables_{b}"][m]
            assert t["keys"] == r[f"vocab_rows_{b}"], (m, b, t)  # each id its own row
            assert t["pulled_rows"] >= t["pushed_rows"] > 0, (m, b, t)
            prof = r[f"{m}_{b}_profile_ms"]
            assert prof["wall"] > 0 and prof["trainer_cpu"] > 0 and len(prof["shard_cpu"]) == 2


def test_the_local_baseline_starts_where_the_ps_starts(bench: tuple[dict[str, Any], str]) -> None:
    """Same rows, same MLPs, same batch: the same first loss. With N(0, 1) local rows
    (nn.Embedding's default) against the PS's U(-0.05, 0.05) it differs by far more."""
    r, _ = bench
    for b in r["batch_sizes"]:
        first = r[f"local_{b}_loss_first"]
        for m in MODES:
            assert r[f"{m}_{b}_loss_first"] == pytest.approx(first, rel=1e-6), (m, b)
        # synchronous PS training is local training with the rows elsewhere
        assert r[f"sync_{b}_loss_last"] == pytest.approx(r[f"local_{b}_loss_last"], abs=1e-4)


def test_report_prints_the_baseline_the_targets_and_the_profile(
    bench: tuple[dict[str, Any], str],
) -> None:
    r, out = bench
    assert "1.00x (baseline)" in out and ">= 0.7x" in out and ">= 0.33x" in out
    assert "RPCs/step" in out and f"== {r['shards']}" in out
    assert f"{r['pipelined_1024_ratio']:#.3g}".rstrip(".") + "x" in out
    assert f"{r['rpcs_per_step_1024']:.1f}" in out
    assert "profile of the timed steps" in out and "parts of one step alone" in out
    for b in r["batch_sizes"]:
        keys = {"unique_ms", "pull_ms", "push_ms", "torch_ms", "local_step_ms"}
        assert set(r[f"parts_{b}_ms"]) >= keys


# --------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------


def test_loss_last_is_the_last_timed_rounds_mean() -> None:
    """Untimed steps after the rounds (step_parts' local step) must not enter loss_last."""
    cfg, work = _tiny()
    tables = field_tables(cfg, work, "t")
    plain, probed = (local_contender(cfg, work, tables) for _ in range(2))
    for c in (plain, probed):
        c.train(0, 2, timed=False)
        c.train(2, 4, timed=True)
        c.train(4, 6, timed=True)
    for _ in range(10):
        probed.train(5, 6, timed=False)  # as step_parts times a local step
    a, b = summarize(plain, 64), summarize(probed, 64)
    assert a["loss_last"] == b["loss_last"] == pytest.approx(np.mean(plain.round_losses[-1]))
    assert a["loss_first"] == b["loss_first"] == plain.loss_first
    assert len(plain.round_losses) == 2 and len(plain.round_losses[-1]) == 2
    with pytest.raises(ValueError, match="no timed round"):
        summarize(local_contender(cfg, work, tables), 64)


@pytest.mark.parametrize("kind", ["uniform", "normal", "constant", "zeros"])
def test_local_rows_are_the_ps_rows_on_first_pull(inproc_factory: Factory, kind: str) -> None:
    cfg, work = _tiny()
    tables = [replace(t, initializer=Initializer(kind)) for t in field_tables(cfg, work, kind)]
    shards = inproc_factory(2)
    with PSClient([s.address for s in shards]) as ps:
        for t in tables:
            ps.create_table(t)
        local = local_contender(cfg, work, tables)
        for f, (t, keys) in enumerate(zip(tables, work.keys, strict=True)):
            pulled = ps.pull(t.name, keys, train=True)
            np.testing.assert_array_equal(initial_rows(t, keys), pulled)
            emb = local.model.embeddings[f]
            np.testing.assert_array_equal(emb.weight.detach().numpy(), pulled)
            assert emb.sparse
    if kind == "uniform":  # the tables' default: U(-0.05, 0.05), not nn.Embedding's N(0, 1)
        w = local.model.embeddings[2].weight.detach().numpy()
        assert w.min() >= -0.05 and w.max() <= 0.05 and w.std() > 0.02
    opt = local.optimizers[1]
    assert isinstance(opt, torch.optim.Adagrad) and opt.defaults["lr"] == cfg.emb_lr


def test_rpc_counter_counts_in_the_client_or_at_the_shards(inproc_factory: Factory) -> None:
    shards = inproc_factory(2, metrics_port=0)
    infos = [localps.ShardInfo(i, s.address, s.metrics_port, 0) for i, s in enumerate(shards)]
    keys = np.arange(200, dtype=np.int64)  # both shards hold some
    with PSClient([s.address for s in shards]) as ps:
        name = "c"
        ps.create_table(TableConfig(name, dim=4, kind="dynamic"))
        ps.pull(name, keys)  # the table's dim, once
        counters = [rpc_counter(types.SimpleNamespace(), infos)]  # no rpcs_sent: the shards count
        if getattr(ps, "rpcs_sent", None) is not None:
            counters.append(rpc_counter(ps, infos))
        before = [count() for _, count in counters]
        for _ in range(3):
            ps.pull(name, keys)
        for (source, count), b in zip(counters, before, strict=True):
            assert count() - b == 3 * 2, source
    assert counters[0][0] == "shards"


def test_dlrm_with_one_shared_embedding_equals_one_per_field() -> None:
    """num_fields=F with one module mapping (B, F) -> (B, F, dim): the same logits and
    gradients as F modules holding the same rows (how a collection of every field's
    tables plugs into the bench: ``ps_embeddings`` returning one ``FieldColumns``)."""
    f, dim, vocab = 3, 4, 10
    torch.manual_seed(0)
    weights = torch.randn(f, vocab, dim)
    per_field = [
        torch.nn.Embedding.from_pretrained(weights[j].clone(), freeze=False) for j in range(f)
    ]

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weights.reshape(f * vocab, dim).clone())

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, F, dim)
            return torch.nn.functional.embedding(ids + vocab * torch.arange(f), self.weight)

    torch.manual_seed(1)
    a = DLRM(per_field, num_dense=2, dim=dim, bottom=(8,), top=(8,), concat_embeddings=True)
    torch.manual_seed(1)
    shared = Shared()
    b = DLRM([shared], num_dense=2, dim=dim, bottom=(8,), top=(8,), concat_embeddings=True,
             num_fields=f)  # fmt: skip
    assert b.shared and not a.shared and b.num_fields == f
    rng = np.random.default_rng(3)
    sparse = torch.from_numpy(rng.integers(0, vocab, size=(6, f)))
    dense = torch.from_numpy(rng.standard_normal((6, 2)).astype(np.float32))
    la, lb = a(sparse, dense), b(sparse, dense)
    torch.testing.assert_close(la, lb)
    la.sum().backward()
    lb.sum().backward()
    for j in range(f):
        torch.testing.assert_close(
            per_field[j].weight.grad, shared.weight.grad[j * vocab : (j + 1) * vocab]
        )
    with pytest.raises(ValueError, match="one shared"):
        DLRM(per_field[:2], num_dense=2, dim=dim, num_fields=f)
