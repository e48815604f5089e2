"""`embps bench soak`: concurrent clients, exact gradients, nothing lost or doubled.

The one-minute soak the issue asks for runs through the console script against a
real `embps serve --shards 2` (4 worker processes). A short soak against two
in-process shards shows that the verifier catches what it claims to catch: rows
changed behind its back (one update too many, one too few, a row no push explains),
and keys that reach their share of the float32-exact range stop being drawn.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embps.client import PSClient
from embps.client.bench import soak as bs

SOAK_TIMEOUT_S = 240.0  # 60 s of soak + PS start, worker spawn and verification on 2 cores


# --------------------------------------------------------------------------
# The one-minute soak (CLI, real `embps serve --shards 2`)
# --------------------------------------------------------------------------


def test_one_minute_soak_loses_and_doubles_nothing(tmp_path: Path) -> None:
    path = tmp_path / "soak.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "embps.client.cli", "bench", "soak", "--minutes", "1",
         "--json", str(path)],
        capture_output=True, text=True, timeout=SOAK_TIMEOUT_S,
    )  # fmt: skip
    took = time.monotonic() - t0
    explain = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, explain
    r = json.loads(path.read_text())
    assert r["ok"] is True and r["failures"] == [], explain
    assert (r["minutes"], r["clients"], r["shards"]) == (1.0, bs.CLIENTS, 2)
    assert 60.0 <= r["seconds"] < took
    # every client pushed throughout, and nothing failed
    assert len(r["per_client_pushes"]) == bs.CLIENTS
    assert min(r["per_client_pushes"]) >= 20, r["per_client_pushes"]
    assert r["pushes"] == sum(r["per_client_pushes"])
    assert r["errors"] == {} and r["unknown_pushes"] == 0, r["error_examples"]
    # the end check: every pushed key, row == -count, and no row without a push
    assert r["mismatched_rows"] == 0, r["mismatch_examples"]
    assert r["verified_keys"] >= 50_000
    assert r["table_rows"] == r["expected_rows_min"] == r["verified_keys"]
    assert r["server_pushed_rows"] == r["applied_rows"] > 0
    assert r["dropped_rows"] == 0 and r["bad_reads"] == 0
    assert r["reads_checked"] >= r["rows_pushed"] > 0
    assert 0 < r["max_count"] < 2**24  # float32 exact
    assert r["ps_exit_code"] == 0
    # throughput and latency are reported per op
    assert r["push_rows_s"] > 0 and r["pull_rows_s"] > r["push_rows_s"]
    for op in bs.OPS:
        assert r["calls"][op] > 0
        assert 0 < r["p50_ms"][op] <= r["p99_ms"][op]
    assert "PASS: nothing lost, nothing doubled" in proc.stdout


# --------------------------------------------------------------------------
# The verifier catches a lost or doubled update (short soak, in-process shards)
# --------------------------------------------------------------------------


def _args(addresses: list[str], hook: Callable[[PSClient, str, bs.Totals], None]) -> Any:
    parser = argparse.ArgumentParser()
    bs.add_arguments(parser)
    args = parser.parse_args(
        ["--minutes", str(3 / 60), "--clients", "2", "--batch", "512", "--keys", "10000",
         "--addresses", ",".join(addresses)]
    )  # fmt: skip
    args.before_verify = hook
    return args


def test_verifier_catches_lost_doubled_and_unexplained_rows(
    inproc_factory: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    shards = inproc_factory(2)
    addresses = [s.address for s in shards]
    seen: dict[str, Any] = {}

    def tamper(ps: PSClient, table: str, totals: bs.Totals) -> None:
        pushed = np.flatnonzero(totals.counts)
        doubled, lost = int(pushed[0]), int(pushed[-1])
        extra = totals.counts.shape[0] + 5  # outside the key space: never drawn
        one = np.ones((1, bs.DIM), dtype=np.float32)
        ps.push(table, [doubled], one)  # one update applied twice
        ps.push(table, [lost], -one)  # one update undone: lost
        ps.pull(table, [extra], train=True)  # a row that no push explains
        seen.update(totals=totals, doubled=doubled, lost=lost, extra=extra)

    args = _args(addresses, tamper)
    args.json = str(tmp_path / "soak.json")
    assert bs.run(args) == 1
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "soak.json").read_text())
    totals = seen["totals"]
    assert min(r["per_client_pushes"]) > 0 and r["errors"] == {}
    assert r["verified_keys"] == int((totals.counts > 0).sum()) > 100
    assert (r["mismatched_rows"], r["lost_rows"], r["doubled_rows"], r["torn_rows"]) == (2, 1, 1, 0)
    assert (r["lost_updates"], r["doubled_updates"]) == (1, 1)
    assert r["table_rows"] == r["expected_rows_max"] + 1 == r["verified_keys"] + 1
    assert r["server_pushed_rows"] == r["applied_rows"] + 2  # the two pushes behind its back
    assert r["ok"] is False and len(r["failures"]) == 3, r["failures"]
    keys_quoted = " ".join(r["mismatch_examples"])
    assert f"key {seen['doubled']}:" in keys_quoted and f"key {seen['lost']}:" in keys_quoted
    assert "FAILED" in out and "2 rows differ from -(acknowledged pushes)" in out
    assert "the table holds" in out


def test_untouched_soak_passes_and_saturated_keys_stop_being_drawn(inproc_factory: Any) -> None:
    """The same short soak without tampering passes; a low exactness limit saturates hot keys."""
    shards = inproc_factory(2)
    cfg = bs.SoakConfig(seconds=2.0, clients=2, batch=512, keys=10_000, exact_limit=2_001)
    totals: list[bs.Totals] = []
    r = bs.soak(
        [s.address for s in shards], cfg, before_verify=lambda ps, t, tot: totals.append(tot)
    )
    assert r["ok"] is True, r["failures"]
    assert r["mismatched_rows"] == 0 and r["verified_keys"] > 100
    assert r["saturated_keys"] >= 1  # key 0 alone is drawn ~60 times a batch
    assert int(totals[0].counts.max()) <= cfg.exact_limit - 1
    assert int(totals[0].counts.max()) > cfg.cap // 2


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------


def test_check_rows_flags_torn_fractional_and_stale_reads() -> None:
    own = np.zeros(10, dtype=np.int64)
    own[[1, 2, 3, 4]] = [2, 2, 2, 2]
    keys = np.array([0, 1, 2, 3, 4, 5], dtype=np.int64)
    rows = np.array(
        [
            [0.0, 0.0],  # never pushed: fine
            [-3.0, -3.0],  # others pushed too: fine
            [-3.0, -2.0],  # torn
            [-2.5, -2.5],  # fractional
            [-1.0, -1.0],  # behind this worker's own 2 pushes
            [1.0, 1.0],  # positive: behind 0
        ],
        dtype=np.float32,
    )
    assert bs.check_rows(keys, rows, own).tolist() == [False, False, True, True, True, True]


def test_zipf_draws_stay_in_the_key_space_and_favor_small_keys() -> None:
    rng = np.random.default_rng(7)
    cdf = bs.zipf_cdf(1000, 1.05)
    k = bs.draw(rng, cdf, 100_000)
    assert k.dtype == np.int64 and k.min() >= 0 and k.max() < 1000
    c = np.bincount(k, minlength=1000)
    assert c[0] > c[1] > c[10] > c[500]
    u = bs.draw(rng, bs.zipf_cdf(1000, 0.0), 100_000)  # s = 0: uniform
    c = np.bincount(u, minlength=1000)  # 100 expected per key
    assert c.min() > 50 and c.max() < 150 and u.max() == 999


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"seconds": 0.0}, "positive duration"),
        ({"clients": 0}, "--clients"),
        ({"zipf": -1.0}, "--zipf"),
        ({"keys": 1 << 28}, "--keys"),
    ],
)
def test_soak_config_rejects_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bs.SoakConfig(**options)
