"""`embps serve` as a process: readiness, health, reflection, metrics, config files, shutdown.

Shutdown semantics under test: SIGTERM (or SIGINT) to the supervisor -> every
shard reports NOT_SERVING, refuses new calls, finishes the calls in flight and
exits 0 -> the supervisor exits 0. A shard that dies makes the supervisor say
which one and how, stop the others and exit 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support.cluster import (
    READY_RE,
    START_TIMEOUT_S,
    Cluster,
    free_port_range,
    pid_alive,
    wait_ready,
    wait_until,
)

from embps.client import PSClient, ResourceExhaustedError, UnavailableError
from embps.protos import codec
from embps.protos.routing import shard_of
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

Factory = Callable[..., Cluster]

YAML_CONFIG = """\
server:
  grace_seconds: 60
tables:
  - name: big
    dim: 8
    kind: dynamic
    initial_capacity: 1024
    optimizer: {name: adagrad, lr: 0.05}
  - name: small
    dim: 2
    kind: static
    hash_bucket_size: 16
"""

TOML_CONFIG = """\
[server]
shards = 2
max_keys_per_request = 100

[[tables]]
name = "user"
dim = 4
kind = "adaptive"
hash_bucket_size = 32
promote_threshold = 3
optimizer = { name = "ftrl", alpha = 0.1 }

[[tables]]
name = "item"
dim = 6
kind = "qr"
qr_quotient_buckets = 8
qr_remainder_buckets = 8
qr_combiner = "concat"
"""


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        req = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(ch).Check(req, timeout=5).status)


# --------------------------------------------------------------------------
# A running shard: health, reflection, metrics; then SIGTERM drains it
# --------------------------------------------------------------------------


def test_serve_health_reflection_metrics_and_sigterm_drain(
    cluster_factory: Factory, tmp_path: Path
) -> None:
    cfg = tmp_path / "embps.yaml"
    cfg.write_text(YAML_CONFIG)
    # The big pull below must be ONE request (a split pull's later chunks would be refused
    # once draining starts): both limits allow 5M keys.
    c = cluster_factory(
        1, "--config", str(cfg), "--drain-delay-seconds", "1.0", "--max-keys-per-request", "5000000"
    )
    addr = c.addresses[0]
    SERVING = health_pb2.HealthCheckResponse.SERVING
    assert health_status(addr) == SERVING
    assert health_status(addr, "embps.v1.ParameterServer") == SERVING

    with grpc.insecure_channel(addr) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"embps.v1.ParameterServer", "grpc.health.v1.Health"} <= services

    with PSClient([addr], timeout=60.0, max_keys_per_request=5_000_000) as ps:
        assert [t.name for t in ps.describe_tables()] == ["big", "small"]
        ps.pull("big", np.arange(200_000))

        metrics = (
            urllib.request.urlopen(
                f"http://127.0.0.1:{c.shards[0].metrics_port}/metrics", timeout=10
            )
            .read()
            .decode()
        )
        assert 'embps_requests_total{code="OK",method="Pull",table="big"}' in metrics
        assert 'embps_table_keys{table="big"} 200000.0' in metrics
        # calibrate on a warm shard (the first pull also pays its process's first calls): a
        # pull of new keys that holds the table for seconds
        t0 = time.perf_counter()
        ps.pull("big", np.arange(200_000, 400_000))
        per_key = (time.perf_counter() - t0) / 200_000
        n_big = int(min(5_000_000, max(1_000_000, 6.0 / per_key)))

        result: dict[str, Any] = {}

        def big_pull() -> None:
            try:
                result["rows"] = ps.pull("big", np.arange(1_000_000, 1_000_000 + n_big))
            except Exception as e:  # reported by the assertion below
                result["error"] = e

        t = threading.Thread(target=big_pull)
        t.start()
        # the pull is on the server once it holds the table's lock (Stats waits for it)
        wait_until(lambda: _table_busy(addr, "big"), 30, "the big pull to reach the shard")
        c.signal(signal.SIGTERM)
        wait_until(lambda: _not_serving(addr), 10, "health NOT_SERVING after SIGTERM")
        # after the drain delay the shard takes no new calls...
        with PSClient([addr], timeout=2.0, retry_deadline=0.0) as late:
            wait_until(lambda: _refused(late), 15, "new calls refused while draining")
        # ...while the big pull, in flight, still runs and then completes
        assert t.is_alive(), "the in-flight pull ended before the shard stopped accepting"
        t.join(timeout=120)
        assert "error" not in result, f"{result.get('error')}; log:\n{c.log()}"
        assert result["rows"].shape == (n_big, 8)
    assert c.wait() == 0
    assert not pid_alive(c.shards[0].pid)
    log = c.log()
    assert "SIGTERM received, draining" in log and "stopped cleanly" in log


def _not_serving(addr: str) -> bool:
    try:
        return health_status(addr) == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.RpcError:
        return False


def _table_busy(addr: str, table: str, other: str = "small") -> bool:
    """True while another call holds ``table``'s lock.

    Stats on ``table`` cannot finish within 1.5 s while Stats on ``other`` (an
    idle table) does: the shard is answering, only ``table`` is held. A slow,
    loaded machine alone does not pass for a busy table.
    """
    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        try:
            stub.Stats(pb.StatsRequest(table=table), timeout=1.5)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return False
            try:
                stub.Stats(pb.StatsRequest(table=other), timeout=10)
            except grpc.RpcError:
                return False
            return True
    return False


def _refused(client: PSClient) -> bool:
    try:
        client.pull("small", [1])
    except UnavailableError:
        return True
    time.sleep(0.05)
    return False


# --------------------------------------------------------------------------
# TOML config, fixed ports P+i / M+i, flags over file, SIGINT
# --------------------------------------------------------------------------


def test_serve_toml_config_fixed_ports_and_sigint(cluster_factory: Factory, tmp_path: Path) -> None:
    cfg = tmp_path / "embps.toml"
    cfg.write_text(TOML_CONFIG)
    port = free_port_range(2)
    mport = free_port_range(2)
    while abs(mport - port) < 2:
        mport = free_port_range(2)
    c = cluster_factory(
        None, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(mport), "--max-keys-per-request", "120",
    )  # fmt: skip
    wait_ready(c, 2)  # shards = 2 comes from the file
    assert c.addresses == [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]
    assert [s.metrics_port for s in c.shards] == [mport, mport + 1]
    with PSClient(c.addresses) as ps:
        names = {t.name: t for t in ps.describe_tables()}
        assert set(names) == {"user", "item"}
        assert names["item"].qr_combiner == "concat" and names["user"].optimizer.alpha == 0.1
        assert ps.pull("item", np.arange(10)).shape == (10, 6)
    # the flag (120) wins over the file (100)
    keys = np.arange(100_000, dtype=np.int64)
    keys = keys[shard_of(keys, 2) == 0]
    with grpc.insecure_channel(c.addresses[0]) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        for n, ok in ((110, True), (121, False)):
            req = pb.PullRequest(table="user", keys=codec.encode_keys(keys[:n]), num_shards=2)
            if ok:
                stub.Pull(req, timeout=10)
            else:
                with pytest.raises(grpc.RpcError) as info:
                    stub.Pull(req, timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with (
        PSClient(c.addresses, max_keys_per_request=1000) as ps,
        pytest.raises(ResourceExhaustedError),
    ):
        ps.pull("user", np.arange(1000))
    c.signal(signal.SIGINT)
    assert c.wait() == 0
    assert not any(pid_alive(s.pid) for s in c.shards)


# --------------------------------------------------------------------------
# Failures are loud
# --------------------------------------------------------------------------


def test_dead_shard_stops_the_cluster_loudly(cluster_factory: Factory) -> None:
    c = cluster_factory(2)
    os.kill(c.shards[1].pid, signal.SIGKILL)
    assert c.wait() == 1
    log = c.log()
    assert "SHARD FAILED: shard 1/2" in log and "SIGKILL" in log, log
    wait_until(lambda: not pid_alive(c.shards[0].pid), 10, "shard 0 to stop")


def test_bad_config_file_exits_2(cluster_factory: Factory, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent("""\
        server:
          shardz: 2
    """)
    )
    c = cluster_factory(None, "--config", str(bad))
    assert c.wait() == 2
    assert "unknown server option 'shardz'" in c.log()
    bad.write_text("tables:\n  - {name: t, dim: 0}\n")
    c = cluster_factory(None, "--config", str(bad))
    assert c.wait() == 2
    assert "dim must be" in c.log()
    bad.write_text("# nothing but a comment\n")  # a truncated file: never an empty shard
    c = cluster_factory(None, "--config", str(bad))
    assert c.wait() == 2
    assert f"config file {bad} is empty" in c.log()


def test_port_in_use_is_a_shard_failure(cluster_factory: Factory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        c = cluster_factory(
            None, "--shards", "1", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", "0",
        )  # fmt: skip
        assert c.wait() == 1
    log = c.log()
    assert "cannot listen" in log and "SHARD FAILED: shard 0/1" in log, log


def test_single_shard_mode_for_kubernetes(cluster_factory: Factory) -> None:
    """--shard-id i: this process is shard i of N, on exactly --port (no supervisor)."""
    c = cluster_factory(
        None, "--shards", "3", "--shard-id", "2", "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0",
    )  # fmt: skip
    m = READY_RE.match(c.lines.get(timeout=START_TIMEOUT_S))
    assert m is not None and m.group(1, 2) == ("2", "3")
    assert int(m.group(6)) == c.proc.pid  # the shard runs in this very process
    with grpc.insecure_channel(f"127.0.0.1:{m.group(4)}") as ch:
        stats = pb_grpc.ParameterServerStub(ch).Stats(pb.StatsRequest(), timeout=10)
    assert (stats.shard_id, stats.num_shards) == (2, 3)
    c.signal(signal.SIGTERM)
    assert c.wait() == 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (Debian: strace)")
def test_readiness_line_is_one_write_even_unbuffered() -> None:
    """Shards share the supervisor's stdout: each readiness line must be one write(2),
    or two shards' lines interleave (print() under PYTHONUNBUFFERED=1 writes twice)."""
    code = "from embps.server.serve import announce_ready; announce_ready('shard 0/2 ready')"
    res = subprocess.run(
        ["strace", "-e", "trace=write", "-e", "signal=none", sys.executable, "-c", code],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == "shard 0/2 ready\n"
    writes = [" ".join(ln.split()) for ln in res.stderr.splitlines() if ln.startswith("write(1,")]
    assert writes == ['write(1, "shard 0/2 ready\\n", 16) = 16'], res.stderr
