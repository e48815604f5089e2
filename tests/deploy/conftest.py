"""Fixtures of the deployment checks: rendered overlays, a live metrics endpoint, a real Prometheus.

``live_metrics`` is a real shard's ``ShardMetrics`` over an ``Engine`` with a
table of each kind, serving /metrics on 127.0.0.1, with a bounded background
thread that keeps counting requests (OK and non-OK) so that rates move.
``prometheus`` is the Prometheus server binary scraping it every second as job
"embps" with deploy/prometheus/alerts.yml loaded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from .artifacts import ALERTS, K8S, OVERLAYS, kustomize, require

LIVE_FOR_S = 120.0  # the request-counting thread stops after this, whatever happens
PROMETHEUS_START_S = 30.0


# --------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require("kubectl")


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """``kubectl kustomize`` output of the base and of every overlay, by name."""
    out = {"base": kustomize(kubectl, K8S / "base")}
    for name in OVERLAYS:
        out[name] = kustomize(kubectl, K8S / "overlays" / name)
    return out


# --------------------------------------------------------------------------
# A live /metrics endpoint
# --------------------------------------------------------------------------


@dataclass
class LiveMetrics:
    """A serving ShardMetrics: its port, one scrape's text, and per-series-name label sets."""

    port: int
    text: str
    labels: dict[str, set[str]] = field(default_factory=dict)  # sample name -> label names


def _parse_scrape(text: str) -> dict[str, set[str]]:
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


@pytest.fixture(scope="session")
def live_metrics() -> Iterator[LiveMetrics]:
    from embps.protos.config import TableConfig
    from embps.server.engine import Engine
    from embps.server.metrics import ShardMetrics

    engine = Engine()
    for cfg in (
        TableConfig("item_id", dim=4, kind="dynamic", max_rows=1000, eviction="lfu"),
        TableConfig("category", dim=4, kind="static", hash_bucket_size=64),
        TableConfig("user_id", dim=4, kind="adaptive", hash_bucket_size=64, promote_threshold=2),
        TableConfig("cross", dim=4, kind="qr", qr_quotient_buckets=8, qr_remainder_buckets=8),
    ):
        engine.create_table(cfg)
    metrics = ShardMetrics(0, 2, engine.tables)
    calls = [
        ("Pull", "item_id", "OK", 0.0004),
        ("Push", "item_id", "OK", 0.002),
        ("Pull", "user_id", "OK", 0.03),
        ("Push", "user_id", "INVALID_ARGUMENT", 0.0002),
        ("Pull", "category", "UNAVAILABLE", 0.0001),
    ]
    for call in calls:
        metrics.observe(*call)
    metrics.checkpoint_done("full", 1.5)
    metrics.eviction_sweep_done("periodic", 0.02)
    # and the gauges a replica shard adds (server/replica.py), read from a stand-in follower
    # (its engine is this one): every family a shard can export is on this one endpoint
    follower = types.SimpleNamespace(engine=engine, resyncs=1, lag_seconds=lambda: 0.4)
    metrics.follow(follower, 5.0)
    port = metrics.serve(0, "127.0.0.1")

    stop = threading.Event()

    def keep_counting() -> None:
        deadline = time.monotonic() + LIVE_FOR_S
        i = 0
        while not stop.wait(0.02) and time.monotonic() < deadline:
            metrics.observe(*calls[i % len(calls)])
            i += 1

    thread = threading.Thread(target=keep_counting, name="live-metrics", daemon=True)
    thread.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    try:
        yield LiveMetrics(port=port, text=text, labels=_parse_scrape(text))
    finally:
        stop.set()
        thread.join(timeout=5)


# --------------------------------------------------------------------------
# A real Prometheus server scraping it
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> Any:
        """GET an API path; the decoded JSON (errors included: Prometheus answers 400 with JSON)."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def query(self, promql: str) -> Any:
        return self.get("/api/v1/query", query=promql)


@pytest.fixture(scope="session")
def prometheus(
    live_metrics: LiveMetrics, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = require("prometheus")
    work: Path = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "embps",
                "static_configs": [{"targets": [f"127.0.0.1:{live_metrics.port}"]}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + PROMETHEUS_START_S
        while True:
            assert proc.poll() is None, (
                f"prometheus exited with {proc.returncode}:\n{(work / 'prometheus.log').read_text()}"
            )
            with contextlib.suppress(OSError):
                res = prom.query('count_over_time(up{job="embps"}[1m])')
                result = res["data"]["result"] if res["status"] == "success" else []
                if result and float(result[0]["value"][1]) >= 2:  # enough for rate()
                    break
            assert time.monotonic() < deadline, "prometheus did not scrape twice in time"
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``overlay`` parameter: every overlay under deploy/k8s/overlays."""
    if "overlay" in metafunc.fixturenames:
        metafunc.parametrize("overlay", OVERLAYS)
