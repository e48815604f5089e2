"""Every bad request gets its status code, says what is wrong, and changes nothing.

A 2-shard `embps serve` cluster (max 64 keys per request). Raw gRPC stubs send
malformed requests the client would never build; PSClient calls check the
exception classes. After each rejected request, a full inference pull and
the per-shard stats must be exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from support.cluster import Cluster, free_port, running_cluster

from embps.client import (
    SGD,
    STATUS_TO_ERROR,
    Adam,
    AlreadyExistsError,
    EmbpsError,
    InvalidArgumentError,
    PSClient,
    PushOutcomeUnknownError,
    ResourceExhaustedError,
    ShardMismatchError,
    TableConfig,
    TableNotFoundError,
    UnavailableError,
)
from embps.protos import codec, limits
from embps.protos.routing import shard_of
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

N_SHARDS = 2
MAX_KEYS = 64
DIM = 4
KEYS = np.arange(-100, 100, dtype=np.int64)
Code = grpc.StatusCode


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster(N_SHARDS, "--max-keys-per-request", str(MAX_KEYS)) as c:
        with PSClient(c.addresses, max_keys_per_request=MAX_KEYS) as ps:
            ps.create_table("dyn", dim=DIM, optimizer=Adam(lr=0.01))
            ps.create_table("ada", dim=DIM, kind="adaptive", hash_bucket_size=16,
                            promote_threshold=2)  # fmt: skip
            for t in ("dyn", "ada"):
                ps.pull(t, KEYS)
                ps.push(t, KEYS, np.ones((KEYS.shape[0], DIM), dtype=np.float32), step=0)
        yield c


@pytest.fixture(scope="module")
def stubs(cluster: Cluster) -> Iterator[list[pb_grpc.ParameterServerStub]]:
    channels = [grpc.insecure_channel(a) for a in cluster.addresses]
    yield [pb_grpc.ParameterServerStub(c) for c in channels]
    for c in channels:
        c.close()


@pytest.fixture
def client(cluster: Cluster) -> Iterator[PSClient]:
    with PSClient(cluster.addresses, max_keys_per_request=MAX_KEYS, retry_deadline=1.0) as c:
        yield c


def own_keys(shard: int, n: int = 5) -> np.ndarray:
    """n keys owned by ``shard`` of N_SHARDS."""
    k = np.arange(10_000, dtype=np.int64)
    return k[shard_of(k, N_SHARDS) == shard][:n]


def state(client: PSClient) -> list[Any]:
    """Everything a rejected request must leave alone: rows and counters of both tables."""
    out: list[Any] = []
    for t in ("dyn", "ada"):
        out.append(client.pull(t, KEYS, train=False))
        out.append(
            [{f: s.tables[t][f] for f in ("keys", "step", "pushed_rows", "promotions", "bytes")}
             for s in client.stats(t)]
        )  # fmt: skip
    return out


def assert_same_state(a: list[Any], b: list[Any]) -> None:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def rejected(call: Callable[[], Any], code: grpc.StatusCode, match: str = "") -> str:
    """Run a raw stub call; assert its status, the 'rejected' trailer and the message."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert isinstance(err, grpc.Call)
    assert err.code() == code, err.details()
    md = dict(err.trailing_metadata() or ())
    assert md.get(limits.OUTCOME_KEY) == limits.OUTCOME_REJECTED
    details = err.details() or ""
    assert match.lower() in details.lower(), details
    return details


def pull_req(shard: int, **kw: Any) -> pb.PullRequest:
    base: dict[str, Any] = {"table": "dyn", "keys": codec.encode_keys(own_keys(shard)),
                            "train": True, "num_shards": N_SHARDS}  # fmt: skip
    base.update(kw)
    return pb.PullRequest(**base)


def push_req(shard: int, n: int = 5, dim: int = DIM, **kw: Any) -> pb.PushRequest:
    base: dict[str, Any] = {
        "table": "dyn",
        "keys": codec.encode_keys(own_keys(shard, n)),
        "grads": np.ones((n, dim), dtype=np.float32).tobytes(),
        "num_shards": N_SHARDS,
    }
    base.update(kw)
    return pb.PushRequest(**base)


# --------------------------------------------------------------------------
# Raw requests: status codes, and nothing changes
# --------------------------------------------------------------------------

BAD_GRADS_NAN = np.ones((5, DIM), dtype=np.float32)
BAD_GRADS_NAN[3, 1] = np.nan
BAD_GRADS_INF = np.ones((5, DIM), dtype=np.float32)
BAD_GRADS_INF[0, 0] = -np.inf

RAW_CASES: dict[str, tuple[str, Callable[[int], Any], grpc.StatusCode, str]] = {
    "keys not a multiple of 8 bytes": (
        "Pull", lambda s: pull_req(s, keys=b"\x01" * 7), Code.INVALID_ARGUMENT, "multiple of 8"),
    "push keys not a multiple of 8 bytes": (
        "Push", lambda s: push_req(s, keys=b"\x01" * 9), Code.INVALID_ARGUMENT, "multiple of 8"),
    "fewer grads than keys": (
        "Push", lambda s: push_req(s, grads=np.ones((4, DIM), np.float32).tobytes()),
        Code.INVALID_ARGUMENT, "keys and grads do not match"),
    "more grads than keys": (
        "Push", lambda s: push_req(s, grads=np.ones((6, DIM), np.float32).tobytes()),
        Code.INVALID_ARGUMENT, "keys and grads do not match"),
    "grads of the wrong dim": (
        "Push", lambda s: push_req(s, dim=DIM + 1), Code.INVALID_ARGUMENT, "dim"),
    "stray grad bytes": (
        "Push", lambda s: push_req(s, grads=np.ones((5, DIM), np.float32).tobytes() + b"\0"),
        Code.INVALID_ARGUMENT, "stray bytes"),
    "NaN gradient": (
        "Push", lambda s: push_req(s, grads=BAD_GRADS_NAN.tobytes()),
        Code.INVALID_ARGUMENT, "NaN or Inf"),
    "Inf gradient": (
        "Push", lambda s: push_req(s, grads=BAD_GRADS_INF.tobytes()),
        Code.INVALID_ARGUMENT, "NaN or Inf"),
    "float16 overflow to Inf": (
        "Push", lambda s: push_req(s, dtype=pb.DTYPE_FLOAT16,
                                   grads=BAD_GRADS_INF.astype(np.float16).tobytes()),
        Code.INVALID_ARGUMENT, "NaN or Inf"),
    "unknown dtype": (
        "Pull", lambda s: pull_req(s, dtype=9), Code.INVALID_ARGUMENT, "unknown dtype"),
    "negative step": (
        "Push", lambda s: push_req(s, step=-1), Code.INVALID_ARGUMENT, "step"),
    "mask on a dynamic table": (
        "Pull", lambda s: pull_req(s, mask=b"\x01" * 5), Code.INVALID_ARGUMENT, "adaptive"),
    "mask of the wrong length": (
        "Pull", lambda s: pull_req(s, table="ada", mask=b"\x01" * 4), Code.INVALID_ARGUMENT,
        "one byte per key"),
    "mask byte not 0 or 1": (
        "Pull", lambda s: pull_req(s, table="ada", mask=b"\x02" * 5), Code.INVALID_ARGUMENT,
        "0 or 1"),
    "pull from an unknown table": (
        "Pull", lambda s: pull_req(s, table="nope"), Code.NOT_FOUND, "create it first"),
    "push to an unknown table": (
        "Push", lambda s: push_req(s, table="nope"), Code.NOT_FOUND, "no table 'nope'"),
    "prune an unknown table": (
        "Prune", lambda s: pb.PruneRequest(table="nope", threshold=1.0, num_shards=N_SHARDS),
        Code.NOT_FOUND, "nope"),
    "stats of an unknown table": (
        "Stats", lambda s: pb.StatsRequest(table="nope"), Code.NOT_FOUND, "nope"),
    "num_shards missing": (
        "Pull", lambda s: pull_req(s, num_shards=0), Code.FAILED_PRECONDITION, "shard count"),
    "num_shards too small": (
        "Push", lambda s: push_req(s, num_shards=1), Code.FAILED_PRECONDITION, "shard count"),
    "num_shards too large": (
        "Pull", lambda s: pull_req(s, num_shards=3), Code.FAILED_PRECONDITION, "shard count"),
    "prune with the wrong num_shards": (
        "Prune", lambda s: pb.PruneRequest(table="dyn", threshold=1.0, num_shards=5),
        Code.FAILED_PRECONDITION, "shard count"),
    "key owned by another shard": (
        "Push", lambda s: push_req(s, keys=codec.encode_keys(own_keys(1 - s))),
        Code.FAILED_PRECONDITION, "belongs to shard"),
    "too many keys": (
        "Pull", lambda s: pull_req(s, keys=codec.encode_keys(own_keys(s, MAX_KEYS + 1))),
        Code.RESOURCE_EXHAUSTED, "max_keys_per_request"),
    "push with too many keys": (
        "Push", lambda s: push_req(s, n=MAX_KEYS + 1), Code.RESOURCE_EXHAUSTED,
        "max_keys_per_request"),
    "negative prune threshold": (
        "Prune", lambda s: pb.PruneRequest(table="dyn", threshold=-1.0, num_shards=N_SHARDS),
        Code.INVALID_ARGUMENT, "threshold"),
    "unknown norm": (
        "Prune", lambda s: pb.PruneRequest(table="dyn", threshold=1.0, norm=9,
                                           num_shards=N_SHARDS),
        Code.INVALID_ARGUMENT, "norm"),
    "table config without an optimizer": (
        "CreateTable", lambda s: pb.CreateTableRequest(
            config=pb.TableConfig(name="x", dim=4, kind=pb.TABLE_KIND_DYNAMIC)),
        Code.INVALID_ARGUMENT, "optimizer"),
    "table config with dim 0": (
        "CreateTable", lambda s: pb.CreateTableRequest(
            config=pb.TableConfig(name="x", dim=0, kind=pb.TABLE_KIND_DYNAMIC,
                                  optimizer=pb.Optimizer(sgd=pb.Sgd(lr=0.1)))),
        Code.INVALID_ARGUMENT, "dim"),
    "conflicting create": (
        "CreateTable", lambda s: pb.CreateTableRequest(config=TableConfig("dyn", dim=8).to_proto()),
        Code.ALREADY_EXISTS, "different config"),
}  # fmt: skip


@pytest.mark.parametrize("shard", range(N_SHARDS))
@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_bad_request_is_rejected_and_changes_nothing(
    stubs: list[pb_grpc.ParameterServerStub], client: PSClient, case: str, shard: int
) -> None:
    method, build, code, match = RAW_CASES[case]
    before = state(client)
    rejected(lambda: getattr(stubs[shard], method)(build(shard), timeout=10), code, match)
    assert_same_state(before, state(client))


def test_raw_good_requests_work(stubs: list[pb_grpc.ParameterServerStub]) -> None:
    """The builders above are right when not broken: each shard serves its own keys."""
    for s in range(N_SHARDS):
        r = stubs[s].Pull(pull_req(s, train=False), timeout=10)
        assert r.dim == DIM and r.dtype == pb.DTYPE_FLOAT32
        assert len(r.values) == 5 * DIM * 4
        r16 = stubs[s].Pull(pull_req(s, train=False, dtype=pb.DTYPE_BFLOAT16), timeout=10)
        assert r16.dtype == pb.DTYPE_BFLOAT16 and len(r16.values) == 5 * DIM * 2
        assert stubs[s].CreateTable(
            pb.CreateTableRequest(config=TableConfig("dyn", dim=DIM, optimizer=Adam(lr=0.01)).to_proto()),
            timeout=10,
        ).created is False  # fmt: skip


# --------------------------------------------------------------------------
# Through PSClient: exception classes
# --------------------------------------------------------------------------


def test_client_errors(cluster: Cluster, client: PSClient) -> None:
    before = state(client)
    grads = np.ones((KEYS.shape[0], DIM), dtype=np.float32)
    with pytest.raises(TableNotFoundError, match="nope"):
        client.pull("nope", KEYS)
    with pytest.raises(TableNotFoundError):
        client.push("nope", KEYS, grads)
    with pytest.raises(InvalidArgumentError, match="dim"):
        client.push("dyn", KEYS, np.ones((KEYS.shape[0], DIM + 1), dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="shape"):
        client.push("dyn", KEYS, grads[:-1])
    nan = grads.copy()
    nan[7, 2] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        client.push("dyn", KEYS, nan)
    huge = np.full((2, DIM), 3e38, dtype=np.float32)  # finite, but the sum of duplicates is not
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        client.push("dyn", [5, 5], huge)
    with pytest.raises(InvalidArgumentError, match="integer"):
        client.pull("dyn", np.array([1.5, 2.0]))
    with pytest.raises(ValueError):  # InvalidArgumentError is a ValueError
        client.pull("ada", KEYS, mask=np.ones(3, dtype=bool))
    with pytest.raises(InvalidArgumentError, match="adaptive"):
        client.pull("dyn", KEYS, mask=np.ones(KEYS.shape[0], dtype=bool))
    with pytest.raises(AlreadyExistsError, match="different config"):
        client.create_table("dyn", dim=DIM, optimizer=SGD(lr=0.01))
    with pytest.raises(InvalidArgumentError):
        client.create_table("bad name!", dim=DIM)
    assert client.create_table("dyn", dim=DIM, optimizer={"name": "adam", "lr": 0.01}) is False
    assert_same_state(before, state(client))


def test_wrong_shard_list_is_refused(cluster: Cluster, client: PSClient) -> None:
    before = state(client)
    with PSClient(cluster.addresses[:1], max_keys_per_request=MAX_KEYS) as one:
        with pytest.raises(ShardMismatchError, match="shard count mismatch"):
            one.pull("dyn", KEYS)
        with pytest.raises(ShardMismatchError) as info:
            one.push("dyn", KEYS, np.ones((KEYS.shape[0], DIM), dtype=np.float32), step=0)
        assert info.value.rejected and info.value.code == Code.FAILED_PRECONDITION
    with PSClient(cluster.addresses[::-1], max_keys_per_request=MAX_KEYS) as swapped:
        with pytest.raises(ShardMismatchError, match="belongs to shard"):
            swapped.pull("dyn", KEYS)
        with pytest.raises(ShardMismatchError, match="belongs to shard"):
            swapped.push("dyn", KEYS, np.ones((KEYS.shape[0], DIM), dtype=np.float32), step=0)
    assert_same_state(before, state(client))


def test_request_over_the_server_limit(cluster: Cluster, client: PSClient) -> None:
    before = state(client)
    with (
        PSClient(cluster.addresses, max_keys_per_request=10 * MAX_KEYS) as big,
        pytest.raises(ResourceExhaustedError, match="max_keys_per_request"),
    ):
        big.pull("dyn", KEYS)
    assert_same_state(before, state(client))
    # the same batch through a client with the server's limit is split and served
    assert client.pull("dyn", KEYS, train=False).shape == (KEYS.shape[0], DIM)


def test_push_with_a_dead_shard_reports_an_unknown_outcome(cluster: Cluster) -> None:
    """Shard 0 applies its part, shard 1 is unreachable: the client says exactly that."""
    addrs = [cluster.addresses[0], f"127.0.0.1:{free_port()}"]
    with PSClient(addrs, timeout=2.0, retry_deadline=0.5, max_keys_per_request=MAX_KEYS) as ps:
        with pytest.raises(PushOutcomeUnknownError) as info:
            ps.push("dyn", KEYS, np.zeros((KEYS.shape[0], DIM), dtype=np.float32), step=0)
        e = info.value
        assert (e.applied_shards, e.rejected_shards, e.unknown_shards) == ([0], [], [1])
        assert isinstance(e.errors[0], UnavailableError)
        with pytest.raises(UnavailableError):  # pulls retry UNAVAILABLE, then give up
            ps.pull("dyn", KEYS)


# --------------------------------------------------------------------------
# Exceptions table
# --------------------------------------------------------------------------


def test_every_status_code_maps_to_an_exception() -> None:
    for code in Code:
        if code is not Code.OK:
            assert issubclass(STATUS_TO_ERROR[code], EmbpsError), code
