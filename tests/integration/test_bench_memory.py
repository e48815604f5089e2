"""`embps bench memory --quick` end to end: every kind trains against a real 2-shard PS.

The quick run is too small for the AUC targets to be reliable (those numbers come
from the full run, in docs/benchmarks.md); this checks that every kind ran, that
the budget kinds stay within their memory budget, and that the outputs exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")

from embps.client.bench import memory as bench_memory

RUN_TIMEOUT_S = 240.0  # --quick takes about a minute on 2 busy cores
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    tmp = tmp_path_factory.mktemp("bench_memory")
    js = tmp / "memory.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embps.client.cli", "bench", "memory", "--quick",
         "--json", str(js), "--out", str(tmp / "out")],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(js.read_text()), tmp / "out", proc.stdout


def test_every_kind_ran_with_memory_and_a_sane_auc(quick: tuple[dict[str, Any], Path, str]) -> None:
    result, _, _ = quick
    runs = {r["kind"]: r for r in result["runs"]}
    assert sorted(runs) == sorted(bench_memory.KINDS)
    for kind, r in runs.items():
        assert r["bytes"] > 0, kind
        assert 0.5 < r["auc"] <= 1.0, (kind, r["auc"])
        assert np.isfinite(r["logloss"]) and r["logloss"] > 0, kind
    assert runs["mixed"]["trainer_bytes"] > 0  # the projections are counted


def test_budget_kinds_stay_within_the_stated_fraction(
    quick: tuple[dict[str, Any], Path, str],
) -> None:
    result, _, _ = quick
    runs = {r["kind"]: r for r in result["runs"]}
    budget = result["budget_fraction"]
    assert budget == bench_memory.BUDGET == 0.30
    dyn = runs["dynamic"]["bytes"]
    for kind in ("static", "adaptive", "qr", "mixed", "magnitude-pruned"):
        assert runs[kind]["bytes"] <= budget * dyn, (kind, runs[kind]["bytes"], dyn)
        assert runs[kind]["fraction_of_dynamic"] == pytest.approx(runs[kind]["bytes"] / dyn)
    # pruning really freed rows of the dynamic tables
    assert runs["magnitude-pruned"]["bytes"] < dyn
    # OptEmbed pruned and narrowed its tables on the PS, and timed its search
    assert runs["optembed"]["bytes"] < 0.5 * dyn
    assert runs["optembed"]["search_seconds"] > 0
    stages = runs["optembed"]["stages"]  # held-out AUC after each stage, in the JSON
    assert stages["applied"] == pytest.approx(runs["optembed"]["auc"])
    assert all(0.5 < stages[k] <= 1.0 for k in ("supernet", "found_dims_trained"))
    assert len(stages["kept"]) == len(stages["kept_projected"]) == 4


def test_report_plot_and_targets(quick: tuple[dict[str, Any], Path, str]) -> None:
    result, out, stdout = quick
    png = out / "memory_auc.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert result["plot"] == str(png.resolve())
    for name in ("adaptive_within_tolerance", "adaptive_beats_static", "optembed_target"):
        t = result["targets"][name]
        assert isinstance(t["pass"], bool) and t["se"] >= 0
        assert ("PASS" if t["pass"] else "FAIL") in stdout
    for kind in bench_memory.KINDS:
        assert f"| {kind} |" in stdout


def test_delong_standard_error_matches_a_bootstrap() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.random(n) < 0.3
    a = y * 1.0 + rng.normal(size=n)
    b = a + rng.normal(scale=0.7, size=n)  # correlated with a, as two models are
    se = bench_memory.auc_difference_se(y, a, b)
    from embps.client.data import auc

    diffs = []
    for _ in range(200):
        i = rng.integers(0, n, n)
        diffs.append(auc(y[i], a[i]) - auc(y[i], b[i]))
    assert se == pytest.approx(float(np.std(diffs)), rel=0.2)
    assert bench_memory.auc_difference_se(y, a, a) == 0.0


def test_projected_kept_rows_follow_each_ids_count() -> None:
    """The OptEmbed search prices rows kept at the end of the pass by each id's final
    count: the share kept now among ids trained about as often (powers of two)."""
    counts = np.array([1, 1, 2, 3, 4, 6])  # buckets 0, 0, 1, 1, 2, 2
    kept = np.array([False, False, True, False, True, True])  # shares 0, 0.5, 1
    final = np.array([1, 2, 3, 5, 9, 1, 40])  # buckets 0, 1, 1, 2, 3, 0, 5
    assert bench_memory.projected_kept(counts, kept, final) == 4  # 0 + .5 + .5 + 1 + 1 + 0 + 1
    # rare ids keep arriving: a flat share (3 of 6 -> 3.5 of 7) would miss how few survive
    rare = np.ones(100, dtype=np.int64)
    assert bench_memory.projected_kept(counts, kept, np.concatenate([final, rare])) == 4
