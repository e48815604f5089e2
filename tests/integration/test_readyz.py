"""``GET /readyz`` on a shard's metrics port: real shards, real HTTP, real gRPC health checks.

/readyz answers 200 ``SERVING`` exactly when the shard's ``grpc.health.v1`` status
(service "") is SERVING and 503 with the status name otherwise: while a restore runs
(in-process shard held mid-restore), and while an `embps serve` shard drains after
SIGTERM (its drain delay keeps gRPC answering NOT_SERVING). /metrics stays
prometheus_client's exposition; any other path is 404; /readyz takes no table lock.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import start_http_server
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.parser import text_string_to_metric_families
from support.cluster import wait_until

from embps.client.ps_client import PSClient
from embps.protos.config import TableConfig
from embps.server.metrics import ShardMetrics
from embps.server.service import ShardConfig, ShardServer, build_server

TABLE = TableConfig.from_dict({"name": "t", "dim": 4, "optimizer": {"name": "adagrad"}})
KEYS = np.arange(1000)
HTTP_TIMEOUT_S = 5.0

Reply = tuple[int, dict[str, str], bytes]


def request(port: int, path: str, method: str = "GET", **headers: str) -> Reply:
    """(status, headers, body) of one HTTP request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def grpc_health(address: str) -> str:
    """The overall status ("" service) a grpc.health.v1 Check over the network gets."""
    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=HTTP_TIMEOUT_S
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def samples(exposition: bytes) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """(sample name, labels) of a Prometheus text exposition (values change between scrapes)."""
    return {
        (x.name, tuple(sorted(x.labels.items())))
        for f in text_string_to_metric_families(exposition.decode())
        for x in f.samples
    }


@pytest.fixture
def shards() -> Iterator[Callable[..., ShardServer]]:
    """``factory(start=True, **ShardConfig options)`` -> an in-process shard on 127.0.0.1
    with a metrics port; stopped at the end."""
    started: list[ShardServer] = []

    def factory(start: bool = True, **options: Any) -> ShardServer:
        options = {"port": 0, "metrics_port": 0, "host": "127.0.0.1", **options}
        s = build_server(ShardConfig(**options))
        started.append(s)
        if start:
            s.start()
        return s

    yield factory
    for s in started:
        s.stop(grace=0, checkpoint=False)


# --------------------------------------------------------------------------
# A serving shard: /readyz, /metrics, other paths
# --------------------------------------------------------------------------


def test_serving_shard_answers_readyz_200(shards: Callable[..., ShardServer]) -> None:
    s = shards(tables=(TABLE,))
    assert s.metrics_port is not None
    status, headers, body = request(s.metrics_port, "/readyz")
    assert (status, body) == (200, b"SERVING\n")
    assert headers["Content-Type"].startswith("text/plain")
    assert grpc_health(s.address) == "SERVING" == s.health_status()
    # HEAD: the same status and length, no body; other methods: 405
    status, headers, body = request(s.metrics_port, "/readyz", "HEAD")
    assert (status, headers["Content-Length"], body) == (200, "8", b"")
    status, headers, _ = request(s.metrics_port, "/readyz", "POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_metrics_is_unchanged_and_other_paths_are_404(shards: Callable[..., ShardServer]) -> None:
    s = shards(tables=(TABLE,))
    assert s.metrics_port is not None
    with PSClient([s.address]) as ps:
        ps.pull("t", KEYS)
    status, headers, body = request(s.metrics_port, "/metrics")
    # what prometheus_client's own start_http_server answers for the same registry
    reference, _ = start_http_server(0, addr="127.0.0.1", registry=s.metrics.registry)
    try:
        ref_status, ref_headers, ref_body = request(reference.server_port, "/metrics")
    finally:
        reference.shutdown()
    assert (status, headers["Content-Type"]) == (ref_status, ref_headers["Content-Type"])
    assert samples(body) == samples(ref_body)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {"embps_requests", "embps_table_keys", "embps_shard_info", "process_cpu_seconds"} <= set(
        families
    )
    (keys,) = families["embps_table_keys"].samples
    assert keys.labels == {"table": "t"} and keys.value == len(KEYS)
    # prometheus_client's own handler: content negotiation and name[] filters still work
    status, headers, body = request(s.metrics_port, "/metrics", Accept=OPENMETRICS)
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    _, _, body = request(s.metrics_port, "/metrics?name[]=embps_shard_info")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert names == {"embps_shard_info"}
    for path in ("/", "/favicon.ico", "/readyz/", "/metricsx", "/healthz", "/t?keys=1,2"):
        status, _, body = request(s.metrics_port, path)
        assert status == 404, (path, body)
        assert b"embps_" not in body


def test_readyz_takes_no_table_lock(shards: Callable[..., ShardServer]) -> None:
    """A table held by a long call blocks /metrics (stats are read under the table lock)
    but not /readyz, which reads only the health status."""
    s = shards(tables=(TABLE,))
    assert s.metrics_port is not None
    table = s.engine.table("t")
    with table._lock.write():  # what a training pull or a push holds
        t0 = time.monotonic()
        assert request(s.metrics_port, "/readyz")[:1] == (200,)
        assert time.monotonic() - t0 < 2.0
        scrape: dict[str, Any] = {}
        blocked = threading.Thread(
            target=lambda: scrape.update(reply=request(s.metrics_port or 0, "/metrics")),
            daemon=True,
        )
        blocked.start()
        blocked.join(0.5)
        assert blocked.is_alive(), "the lock was not held: this test proves nothing"
    blocked.join(HTTP_TIMEOUT_S)
    assert scrape["reply"][0] == 200


def test_metrics_server_without_readiness_has_no_readyz() -> None:
    """ShardMetrics.serve alone (no shard): /metrics as before, /readyz is just a 404."""
    m = ShardMetrics(0, 1, lambda: [])
    port = m.serve(0, "127.0.0.1")
    assert request(port, "/metrics")[0] == 200
    assert request(port, "/readyz")[0] == 404
    m.close()
    with pytest.raises(ConnectionRefusedError):
        request(port, "/metrics")
    m.close()  # idempotent


def test_stop_closes_the_metrics_port_after_the_exit_checkpoint(
    shards: Callable[..., ShardServer], tmp_path: Path
) -> None:
    """stop(): /readyz is 503 while the shard drains and writes its exit checkpoint, and
    the port is released once stop returns (the checkpoint's metrics were set before)."""
    s = shards(tables=(TABLE,), checkpoint_dir=str(tmp_path), drain_delay_seconds=1.0)
    port = s.metrics_port
    assert port is not None
    stopper = threading.Thread(target=s.stop, kwargs={"grace": 0, "checkpoint": True})
    stopper.start()
    wait_until(lambda: request(port, "/readyz")[0] == 503, HTTP_TIMEOUT_S, "/readyz 503")
    stopper.join(30)
    assert not stopper.is_alive()
    assert s.metrics.registry.get_sample_value("embps_checkpoint_last_success_timestamp_seconds")
    with pytest.raises(ConnectionRefusedError):
        request(port, "/readyz")


# --------------------------------------------------------------------------
# Not serving: restoring, draining
# --------------------------------------------------------------------------


def test_readyz_is_503_while_restoring(shards: Callable[..., ShardServer], tmp_path: Path) -> None:
    src = shards(tables=(TABLE,), checkpoint_dir=str(tmp_path))
    with PSClient([src.address]) as ps:
        ps.pull("t", KEYS)
        ps.checkpoint(1)
    gate = threading.Event()
    s = shards(start=False, checkpoint_dir=str(tmp_path), restore="latest", tables=(TABLE,))
    s.on_restore_progress = lambda ratio: gate.wait(30) if ratio > 0.3 else None  # hold it
    assert s.health_status() == "NOT_SERVING"  # not SERVING before start() either
    try:
        s.start()
        assert s.metrics_port is not None
        wait_until(lambda: s._restore_ratio > 0.3, 20, "the restore to start")
        assert request(s.metrics_port, "/readyz")[::2] == (503, b"NOT_SERVING\n")
        assert grpc_health(s.address) == "NOT_SERVING"
        assert request(s.metrics_port, "/metrics")[0] == 200  # scrapes go on meanwhile
    finally:
        gate.set()
    assert s.restored.wait(30) and s.restore_error is None
    assert request(s.metrics_port, "/readyz")[::2] == (200, b"SERVING\n")
    assert grpc_health(s.address) == "SERVING"


def test_readyz_is_503_while_draining_after_sigterm(cluster_factory: Any) -> None:
    """`embps serve` with a drain delay: after SIGTERM, /readyz turns 503 while the gRPC
    port still answers, and its health check says NOT_SERVING at that moment."""
    c = cluster_factory(1, "--drain-delay-seconds", "4")
    shard = c.shards[0]
    assert request(shard.metrics_port, "/readyz")[::2] == (200, b"SERVING\n")
    assert grpc_health(shard.address) == "SERVING"
    c.signal(signal.SIGTERM)
    wait_until(
        lambda: request(shard.metrics_port, "/readyz")[0] == 503, 10, "/readyz 503 after SIGTERM"
    )
    assert grpc_health(shard.address) == "NOT_SERVING"  # within the 4 s drain delay
    assert request(shard.metrics_port, "/readyz")[::2] == (503, b"NOT_SERVING\n")
    assert c.wait() == 0
