"""`embps bench serving --quick` runs end to end against real processes and reports what
the issue asks for (replica and training pulls, bytes per key, lag)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from embps.client.bench import serving as bench_serving


def test_bench_serving_quick(tmp_path: Path, capsys) -> None:
    out = tmp_path / "serving.json"
    args = argparse.Namespace(quick=True, json=str(out))
    assert bench_serving.run(args) == 0
    r = json.loads(out.read_text())
    for key in ("replica_pull_rows_s", "training_pull_rows_s", "replica_bytes_per_key_fp32",
                "training_bytes_per_key", "lag_p50_s", "lag_p99_s"):  # fmt: skip
        assert r[key] > 0 or key.startswith("lag"), key
    assert r["replica_bytes_per_key_fp32"] < r["training_bytes_per_key"]  # no optimizer slots
    # int8 rows: the target holds even on --quick's 50k keys
    assert r["replica_bytes_per_key_int8"] < r["replica_bytes_per_key_fp16"]
    assert r["replica_bytes_per_key_fp16"] < r["replica_bytes_per_key_fp32"]
    assert r["bytes_ratio_int8"] <= 0.35, r["bytes_ratio_int8"]
    assert r["int8_pull_rows_s"] > 0
    assert 0 <= r["lag_p50_s"] <= r["lag_p99_s"] < 10
    assert r["push_rows_s"] > 0  # the load ran
    text = capsys.readouterr().out
    assert "inference pull rows/s" in text and "lag p50 / p99" in text
