"""Shards built in-process with build_server (port 0): retries, metrics, options, config checks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.cluster import free_port

from embps.client import (
    InternalError,
    PSClient,
    ShardMismatchError,
    TableConfig,
    UnavailableError,
)
from embps.protos import codec
from embps.protos.routing import shard_of
from embps.server.engine import Engine
from embps.server.serve import parse_serve_doc
from embps.server.service import (
    ErrorInterceptor,
    ParameterServerServicer,
    ShardConfig,
    ShardServer,
    build_server,
)
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

Factory = Callable[..., list[ShardServer]]


def test_pull_retries_until_a_late_shard_is_up() -> None:
    port = free_port()
    cfg = ShardConfig(port=port, tables=(TableConfig("t", dim=3),))
    got: dict[str, Any] = {}
    with PSClient([f"127.0.0.1:{port}"], timeout=2.0, retry_deadline=20.0) as ps:

        def pull() -> None:
            try:
                got["rows"] = ps.pull("t", [1, 2, 3])
            except Exception as e:  # reported below
                got["error"] = e

        t = threading.Thread(target=pull)
        t.start()
        time.sleep(0.5)  # the first attempts find nothing listening
        shard = build_server(cfg)
        shard.start()
        try:
            t.join(timeout=30)
            assert "error" not in got, got.get("error")
            assert got["rows"].shape == (3, 3)
        finally:
            shard.stop(grace=0)


def test_pull_gives_up_after_the_retry_deadline() -> None:
    with PSClient([f"127.0.0.1:{free_port()}"], timeout=1.0, retry_deadline=0.3) as ps:
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            ps.describe_tables()
        assert time.monotonic() - t0 < 10


def test_metrics_count_calls_by_method_table_and_code(inproc_factory: Factory) -> None:
    (shard,) = inproc_factory(1, tables=(TableConfig("t", dim=2),))
    with PSClient([shard.address]) as ps:
        ps.pull("t", [1, 2])  # DescribeTables (the dim, once) + Pull
        ps.pull("t", [3])
    reg = shard.metrics.registry
    ok = {"method": "Pull", "table": "t", "code": "OK"}
    assert reg.get_sample_value("embps_requests_total", ok) == 2
    assert reg.get_sample_value("embps_request_duration_seconds_count", ok) == 2
    describe = {"method": "DescribeTables", "table": "", "code": "OK"}
    assert reg.get_sample_value("embps_requests_total", describe) == 1
    assert reg.get_sample_value("embps_table_keys", {"table": "t"}) == 3


def test_unknown_table_label_is_bounded(inproc_factory: Factory) -> None:
    (shard,) = inproc_factory(1)
    with grpc.insecure_channel(shard.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        for name in ("a", "b", "c"):
            with pytest.raises(grpc.RpcError):
                stub.Pull(pb.PullRequest(table=name, num_shards=1), timeout=5)
    reg = shard.metrics.registry
    assert (
        reg.get_sample_value(
            "embps_requests_total", {"method": "Pull", "table": "-", "code": "NOT_FOUND"}
        )
        == 3
    )


def test_verify_routing_can_be_turned_off(inproc_factory: Factory) -> None:
    strict = inproc_factory(2, tables=(TableConfig("t", dim=2),))
    loose = inproc_factory(2, tables=(TableConfig("t", dim=2),), verify_routing=False)
    keys = np.arange(100)
    foreign = keys[shard_of(keys, 2) == 1]
    req = pb.PullRequest(table="t", keys=codec.encode_keys(foreign), num_shards=2)
    with grpc.insecure_channel(strict[0].address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ParameterServerStub(ch).Pull(req, timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with grpc.insecure_channel(loose[0].address) as ch:
        assert pb_grpc.ParameterServerStub(ch).Pull(req, timeout=5).dim == 2
    with PSClient([loose[1].address, loose[0].address]) as swapped:  # shard count still checked
        with pytest.raises(ShardMismatchError):
            PSClient([loose[0].address]).pull("t", [1])
        assert swapped.pull("t", keys).shape == (100, 2)


def test_stop_reports_not_serving_then_refuses(inproc_factory: Factory) -> None:
    (shard,) = inproc_factory(1, drain_delay_seconds=0.5)
    with grpc.insecure_channel(shard.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        check = health_pb2.HealthCheckRequest(service="embps.v1.ParameterServer")
        assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        t = threading.Thread(target=shard.stop, kwargs={"grace": 1.0})
        t.start()
        time.sleep(0.2)
        assert health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
        t.join(timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(check, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"shard_id": 2, "num_shards": 2}, "shard_id"),
        ({"num_shards": 0}, "num_shards"),
        ({"port": 70000}, "port"),
        ({"max_keys_per_request": 0}, "max_keys_per_request"),
        ({"max_message_bytes": 2**31}, "max_message_bytes"),
        ({"grace_seconds": -1}, "grace_seconds"),
        ({"tables": (TableConfig("t", dim=2), TableConfig("t", dim=3))}, "duplicate"),
    ],
)
def test_shard_config_validation(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShardConfig(**options)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "top level must be a mapping"),
        ({"servers": {}}, "unknown sections"),
        ({"server": {"port": "50051"}}, "wrong type"),
        ({"server": {"shards": True}}, "wrong type"),
        ({"tables": {"name": "t"}}, "must be a list"),
        ({"tables": [{"name": "t", "dim": 2, "colour": "red"}]}, "unknown options"),
        ({"tables": [{"name": "t", "dim": 2, "optimizer": {"name": "rmsprop"}}]}, "optimizer"),
        ({"tables": [{"name": "t", "dim": 2}, {"name": "t", "dim": 2}]}, "duplicate"),
    ],
)
def test_config_file_validation(doc: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_serve_doc(doc)


def test_config_file_parses_tables() -> None:
    f = parse_serve_doc({"server": {"shards": 2, "grace_seconds": 1.5},
                         "tables": [{"name": "t", "dim": 2, "optimizer": {"name": "adam"}}]})  # fmt: skip
    assert f.server == {"shards": 2, "grace_seconds": 1.5}
    assert f.tables[0].name == "t" and type(f.tables[0].optimizer).__name__ == "Adam"


# --------------------------------------------------------------------------
# Unexpected exceptions -> INTERNAL, logged
# --------------------------------------------------------------------------


class _BrokenServicer(ParameterServerServicer):
    """A servicer with a bug in Stats: the interceptor must contain it."""

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return pb.StatsResponse(shard_id=1 // 0)


def test_unexpected_exception_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine()
    cfg = ShardConfig()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[ErrorInterceptor(engine, None, shard_id=0)],
    )
    pb_grpc.add_ParameterServerServicer_to_server(_BrokenServicer(engine, cfg), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with PSClient([f"127.0.0.1:{port}"]) as ps:
            with pytest.raises(InternalError) as info:
                ps.stats()
            assert ps.describe_tables() == []  # the server keeps serving
        assert "ZeroDivisionError" in str(info.value) and "bug" in str(info.value)
        assert info.value.rejected is False  # a call that hit a bug has an unknown outcome
        assert any("Stats failed unexpectedly" in r.getMessage() for r in caplog.records)
    finally:
        server.stop(0)


def test_wait_ready() -> None:
    with PSClient([f"127.0.0.1:{free_port()}"]) as ps, pytest.raises(UnavailableError):
        ps.wait_ready(timeout=0.3)
