"""The Frequencies RPC through real gRPC shards (2, in-process): counts and bad input."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest

from embps.client import PSClient, TableConfig, TableNotFoundError
from embps.protos import codec
from embps.protos.routing import shard_of
from embps.server.service import ShardServer
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

Factory = Callable[..., list[ShardServer]]


@pytest.fixture
def shards(inproc_factory: Factory) -> list[ShardServer]:
    return inproc_factory(
        2,
        tables=(
            TableConfig("dyn", dim=4),
            TableConfig("ada", dim=4, kind="adaptive", hash_bucket_size=8, promote_threshold=4,
                        sketch_width=1024),
            TableConfig("st", dim=4, kind="static", hash_bucket_size=8),
        ),
    )  # fmt: skip


def test_counts_equal_the_training_pulls_of_each_key(shards: list[ShardServer]) -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**62), 2**62, size=40, dtype=np.int64)
    want = np.zeros(40, dtype=np.int64)
    with PSClient([s.address for s in shards]) as ps:
        assert set(shard_of(keys, 2).tolist()) == {0, 1}  # both shards own some
        for _ in range(12):
            pick = rng.integers(0, 40, size=25)
            ps.pull("dyn", keys[pick])
            want[np.unique(pick)] += 1  # the client deduplicates: one sighting per pull
            ps.pull("dyn", keys[pick[:5]], train=False)  # inference pulls do not count
        query = np.concatenate([keys[::-1], keys[:3], [123456789]])  # any order, dups, unseen
        got = ps.frequencies("dyn", query)
        assert got.dtype == np.int64 and got.shape == (query.shape[0],)
        np.testing.assert_array_equal(got, np.concatenate([want[::-1], want[:3], [0]]))
        assert int(ps.frequencies("dyn", keys.reshape(8, 5)).sum()) == int(want.sum())
        assert ps.frequencies("dyn", np.empty(0, dtype=np.int64)).shape == (0,)


def test_adaptive_reads_the_sketch_and_static_reads_zero(shards: list[ShardServer]) -> None:
    with PSClient([s.address for s in shards]) as ps:
        for keys in ([3, 5, 7], [5, 7], [7]):
            ps.pull("ada", keys)
            ps.pull("st", keys)
        np.testing.assert_array_equal(ps.frequencies("ada", [7, 5, 3, 9]), [3, 2, 1, 0])
        np.testing.assert_array_equal(ps.frequencies("st", [7, 5, 3, 9]), [0, 0, 0, 0])


def test_unknown_table_is_not_found(shards: list[ShardServer]) -> None:
    with PSClient([s.address for s in shards]) as ps, pytest.raises(TableNotFoundError):
        ps.frequencies("nope", [1, 2])


def _call(shard: ShardServer, req: pb.FrequenciesRequest) -> grpc.RpcError:
    with grpc.insecure_channel(shard.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Frequencies(req, timeout=10)
    return e.value


def test_bad_requests_get_their_status_codes(shards: list[ShardServer]) -> None:
    s0 = shards[0]
    own = np.array([k for k in range(100) if shard_of(np.array([k]), 2)[0] == 0][:3])
    other = np.array([k for k in range(100) if shard_of(np.array([k]), 2)[0] == 1][:1])
    ok = pb.FrequenciesRequest(table="dyn", keys=codec.encode_keys(own), num_shards=2)
    with grpc.insecure_channel(s0.address) as ch:
        counts = pb_grpc.ParameterServerStub(ch).Frequencies(ok, timeout=10).counts
    np.testing.assert_array_equal(codec.decode_keys(counts), [0, 0, 0])

    cases = {
        grpc.StatusCode.FAILED_PRECONDITION: [
            pb.FrequenciesRequest(table="dyn", keys=ok.keys, num_shards=3),  # shard count
            pb.FrequenciesRequest(table="dyn", keys=ok.keys),  # no shard count
            pb.FrequenciesRequest(table="dyn", keys=codec.encode_keys(other), num_shards=2),
        ],
        grpc.StatusCode.NOT_FOUND: [
            pb.FrequenciesRequest(table="nope", keys=ok.keys, num_shards=2),
        ],
        grpc.StatusCode.INVALID_ARGUMENT: [
            pb.FrequenciesRequest(table="dyn", keys=ok.keys[:-1], num_shards=2),  # 23 bytes
        ],
    }
    for code, reqs in cases.items():
        for req in reqs:
            err = _call(s0, req)
            assert err.code() == code, (req, err.details())
            assert err.details()
    misrouted = _call(s0, cases[grpc.StatusCode.FAILED_PRECONDITION][2])
    assert "belongs to shard 1" in misrouted.details()
    assert "multiple of 8" in _call(s0, cases[grpc.StatusCode.INVALID_ARGUMENT][0]).details()
