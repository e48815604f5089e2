"""max_bytes through a real shard (build_server on port 0): status codes, client errors, metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from embps.client import (
    InvalidArgumentError,
    PSClient,
    ResourceExhaustedError,
    TableConfig,
)
from embps.protos import codec
from embps.server.kernels import hashmap as hm
from embps.server.tables import row_limit
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

Factory = Callable[..., list[Any]]
ROWS = 40


def capped_config(name: str, **options: Any) -> TableConfig:
    """A dynamic table of dim 8 whose max_bytes holds exactly ROWS rows."""
    base = TableConfig(name, dim=8, **options)
    max_bytes = base.fixed_bytes + ROWS * (base.row_bytes + 24)
    max_bytes += 16 * (hm.capacity_for(ROWS) - hm.MIN_CAPACITY)
    cfg = TableConfig(name, dim=8, max_bytes=max_bytes, **options)
    assert row_limit(cfg) == ROWS
    return cfg


def metric(shard: Any, name: str, table: str) -> float:
    value = shard.metrics.registry.get_sample_value(name, {"table": table})
    return 0.0 if value is None else float(value)


def test_a_full_table_answers_resource_exhausted_and_keeps_its_rows(inproc_factory: Factory):
    (shard,) = inproc_factory(1)
    cfg = capped_config("capped")
    keys = np.arange(1000, 1000 + ROWS + 10, dtype=np.int64)
    with PSClient([shard.address]) as ps:
        assert ps.create_table(cfg)
        ps.pull("capped", keys[:30])
        ps.pull("capped", keys[30:ROWS])
        before = ps.pull("capped", keys[:ROWS], train=False)
        with pytest.raises(ResourceExhaustedError, match="max_bytes") as info:
            ps.pull("capped", keys[ROWS - 5 : ROWS + 3])  # 3 new keys, no room
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.rejected, "the shard says the refused pull changed nothing"
        (stats,) = ps.stats("capped")
        assert stats.tables["capped"]["keys"] == ROWS
        assert stats.tables["capped"]["bytes"] <= cfg.max_bytes
        np.testing.assert_array_equal(ps.pull("capped", keys[:ROWS], train=False), before)
        assert (ps.pull("capped", keys[ROWS:], train=False) == 0).all(), "no row was created"
    # The raw status, as any gRPC client sees it.
    with grpc.insecure_channel(shard.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        req = pb.PullRequest(table="capped", keys=codec.encode_keys(keys[ROWS:]), train=True,
                             num_shards=1)  # fmt: skip
        with pytest.raises(grpc.RpcError) as raw:
            stub.Pull(req, timeout=10)
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{ROWS} of {ROWS} rows" in (raw.value.details() or "")
    assert metric(shard, "embps_capacity_refusals_total", "capped") == 3 + 10
    assert metric(shard, "embps_table_max_bytes", "capped") == cfg.max_bytes


def test_with_lfu_eviction_a_capped_table_keeps_serving(inproc_factory: Factory):
    (shard,) = inproc_factory(1)
    cfg = capped_config("lfu", max_rows=10**6, eviction="lfu")
    with PSClient([shard.address]) as ps:
        ps.create_table(cfg)
        for i in range(10):
            ps.pull("lfu", np.arange(i * 25, i * 25 + 25))
            (stats,) = ps.stats("lfu")
            assert stats.tables["lfu"]["bytes"] <= cfg.max_bytes
        assert stats.tables["lfu"]["keys"] == ROWS
        assert stats.tables["lfu"]["evictions"] == 250 - ROWS
    assert metric(shard, "embps_capacity_refusals_total", "lfu") == 0


def test_a_cap_below_the_fixed_arrays_is_invalid_argument_naming_both_numbers(
    inproc_factory: Factory,
):
    (shard,) = inproc_factory(1)
    cfg = TableConfig("st", dim=4, kind="static", hash_bucket_size=100).to_proto()
    cfg.max_bytes = 1000
    with grpc.insecure_channel(shard.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateTable(pb.CreateTableRequest(config=cfg), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_bytes=1000 is below the 4000 bytes" in (info.value.details() or "")
    with PSClient([shard.address]) as ps, pytest.raises(InvalidArgumentError, match="4000"):
        ps.create_table("st", dim=4, kind="static", hash_bucket_size=100, max_bytes=1000)


def test_a_table_larger_than_the_machine_is_refused_not_attempted(inproc_factory: Factory):
    (shard,) = inproc_factory(1)
    with PSClient([shard.address]) as ps:
        with pytest.raises(ResourceExhaustedError, match="more than this machine's"):
            ps.create_table("huge", dim=65536, kind="static", hash_bucket_size=2**40)
        assert ps.describe_tables() == []
