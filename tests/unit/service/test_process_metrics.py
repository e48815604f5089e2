"""Process metrics of a shard: resident memory, CPU, fds, start time, python_info and the
cgroup memory limit, served on the shard's own /metrics endpoint."""

from __future__ import annotations

import os
import resource
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from embps.server import metrics as metrics_mod
from embps.server.metrics import ShardMetrics, memory_limit_bytes


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_process_metrics_describe_this_process() -> None:
    m = ShardMetrics(0, 1, lambda: [])
    port = m.serve(0, "127.0.0.1")
    got = _scrape(port)
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, KiB on Linux
    assert 1 << 20 < got["process_resident_memory_bytes"] <= rss_kib * 1024 * 1.5
    assert got["process_virtual_memory_bytes"] >= got["process_resident_memory_bytes"]
    cpu = os.times()
    assert 0 < got["process_cpu_seconds_total"] <= cpu.user + cpu.system + 1
    assert 0 < got["process_open_fds"] < got["process_max_fds"]
    assert time.time() - 24 * 3600 < got["process_start_time_seconds"] <= time.time()
    assert got["python_info"] == 1
    assert got["embps_memory_limit_bytes"] == memory_limit_bytes() >= 0


@pytest.mark.parametrize(
    ("v2", "v1", "want"),
    [
        ("4294967296\n", None, 4294967296.0),  # cgroup v2, a 4Gi container
        ("max\n", None, 0.0),  # v2 without a limit
        (None, "2147483648\n", 2147483648.0),  # cgroup v1
        (None, "9223372036854771712\n", 0.0),  # v1 "unlimited"
        (None, None, 0.0),  # no cgroup files
    ],
)
def test_memory_limit_reads_cgroup_v2_then_v1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v2: str | None, v1: str | None, want: float
) -> None:
    paths = (tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes")
    for p, text in zip(paths, (v2, v1), strict=True):
        if text is not None:
            p.write_text(text)
    monkeypatch.setattr(metrics_mod, "_CGROUP_LIMITS", paths)
    assert memory_limit_bytes() == want
