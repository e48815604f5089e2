"""A real Prometheus server scrapes a real 2-shard `embps serve` under load.

The test queries rates through Prometheus' HTTP API: the requests and rows
counters of both shards must be seen moving.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from support.cluster import start_cluster

from embps.client import Adagrad, PSClient

LOAD_SECONDS_MAX = 40.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=5) as r:
            body = json.load(r)
    except (urllib.error.URLError, OSError):
        return []
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_scrapes_a_loaded_two_shard_ps_and_sees_the_rates(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "prometheus is not installed (Debian package prometheus; CI installs it, see .ci/run)"
        )
    cluster = start_cluster(2)
    prom = None
    stop = threading.Event()
    try:
        targets = [f"127.0.0.1:{s.metrics_port}" for s in cluster.shards]
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "embps", "static_configs": [{"targets": targets}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = _free_port()
        log = (tmp_path / "prometheus.log").open("w")
        prom = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"

        with PSClient(cluster.addresses, timeout=20.0) as ps:
            ps.wait_ready(timeout=60)
            ps.create_table("scraped", dim=8, optimizer=Adagrad(lr=0.1))

            def load() -> None:
                rng = np.random.default_rng(0)
                deadline = time.monotonic() + LOAD_SECONDS_MAX
                step = 0
                while not stop.is_set() and time.monotonic() < deadline:
                    keys = rng.integers(0, 100_000, 4096)
                    rows = ps.pull("scraped", keys)
                    ps.push("scraped", keys, np.full_like(rows, 0.01), step=step)
                    step += 1
                    time.sleep(0.01)

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            deadline = time.monotonic() + LOAD_SECONDS_MAX
            pull_rates: dict[str, float] = {}
            rows_rate = 0.0
            while time.monotonic() < deadline:
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                res = _query(
                    url,
                    'sum by (instance) (rate(embps_requests_total{method="Pull",code="OK"}[5s]))',
                )
                pull_rates = {r["metric"]["instance"]: float(r["value"][1]) for r in res}
                rows = _query(url, 'sum(rate(embps_rows_pulled_total{table="scraped"}[5s]))')
                rows_rate = float(rows[0]["value"][1]) if rows else 0.0
                if len(pull_rates) == 2 and min(pull_rates.values()) > 0 and rows_rate > 0:
                    break
                time.sleep(0.5)
            stop.set()
            loader.join(timeout=30)
        assert sorted(pull_rates) == sorted(targets), f"not every shard was scraped: {pull_rates}"
        assert min(pull_rates.values()) > 0, f"pull rate not seen on every shard: {pull_rates}"
        assert rows_rate > 0
        up = _query(url, 'up{job="embps"}')
        assert sorted(float(r["value"][1]) for r in up) == [1.0, 1.0]
    finally:
        stop.set()
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom.kill()
        cluster.stop()
