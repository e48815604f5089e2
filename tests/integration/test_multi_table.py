"""Many tables in one round trip: the Step RPC and PSClient.pull_many / push_many /
push_pull against a real 2-shard `embps serve` (max 256 keys per request).

What must hold: one request per shard per call whatever the number of tables; the same
rows and updates as the single-table calls; the fused call's pulls see its pushes; a bad
group refuses the whole request with its exact status and nothing changes; a pull refused
after the pushes were applied does not claim "nothing changed".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from support.cluster import Cluster, running_cluster

from embps.client import (
    SGD,
    Adagrad,
    Adam,
    InvalidArgumentError,
    PSClient,
    PushOutcomeUnknownError,
    TableConfig,
    TableNotFoundError,
)
from embps.protos import codec, limits
from embps.protos.routing import shard_of
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

N_SHARDS = 2
MAX_KEYS = 256
DIM = 4
Code = grpc.StatusCode
TWINS = {  # each table twice: "<name>" through the multi-table calls, "<name>_1" one by one
    "sgd": TableConfig("sgd", DIM, optimizer=SGD(lr=0.1)),
    "ada": TableConfig("ada", DIM, optimizer=Adagrad(lr=0.1)),
    "adam": TableConfig("adam", 8, optimizer=Adam(lr=0.01)),
    "adp": TableConfig("adp", DIM, kind="adaptive", hash_bucket_size=16, promote_threshold=3),
    "st": TableConfig("st", DIM, kind="static", hash_bucket_size=32),
    "qr": TableConfig("qr", DIM, kind="qr", qr_quotient_buckets=8, qr_remainder_buckets=8),
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster(N_SHARDS, "--max-keys-per-request", str(MAX_KEYS), "--evict-every",
                         "0") as c:  # fmt: skip
        with PSClient(c.addresses, max_keys_per_request=MAX_KEYS) as ps:
            for cfg in TWINS.values():
                ps.create_table(cfg)
                ps.create_table(TableConfig.from_dict({**cfg.to_dict(), "name": cfg.name + "_1"}))
            ps.create_table(TableConfig("full", DIM, max_rows=4))
        yield c


@pytest.fixture
def ps(cluster: Cluster) -> Iterator[PSClient]:
    with PSClient(cluster.addresses, max_keys_per_request=MAX_KEYS, retry_deadline=1.0) as c:
        yield c


def dim_of(name: str) -> int:
    return TWINS[name.removesuffix("_1")].dim


def batch(seed: int, n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t: rng.integers(-50, 50, size=(n // 4, 4)) for t in TWINS}  # duplicates, 2-D


def grads_for(keys: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t: rng.normal(0, 1, (*k.shape, dim_of(t))).astype(np.float32) for t, k in keys.items()}


def twin_rows(ps: PSClient, keys: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Inference rows of each table and of its twin."""
    a = {t: ps.pull(t, k, train=False) for t, k in keys.items()}
    b = {t: ps.pull(t + "_1", k, train=False) for t, k in keys.items()}
    return a, b


def test_one_request_per_shard_and_the_same_as_table_by_table(ps: PSClient) -> None:
    ps.pull_many({t: [1] for t in TWINS}, train=False)  # the dims, known from here on
    for step in range(4):
        keys = batch(step)
        grads = grads_for(keys, 100 + step)
        before = ps.rpcs_sent
        if step == 0:  # a multi-table pull, then a multi-table push
            rows = ps.pull_many(keys)
            res = ps.push_many({t: (keys[t], grads[t]) for t in keys}, step=step)
            assert ps.rpcs_sent - before == 2 * N_SHARDS
        else:  # the fused call: step's pushes, then the next keys' pulls
            nxt = batch(step + 10)
            res, rows = ps.push_pull({t: (keys[t], grads[t]) for t in keys}, nxt, step=step)
            assert ps.rpcs_sent - before == N_SHARDS  # 6 tables, 2 shards: 2 RPCs
        singles = {}
        for t in keys:  # the same, one table at a time, on the twins
            if step == 0:
                singles[t] = ps.pull(t + "_1", keys[t])
            r1 = ps.push(t + "_1", keys[t], grads[t], step=step)
            assert (res[t].applied, res[t].dropped) == (r1.applied, r1.dropped), t
            if step:
                singles[t] = ps.pull(t + "_1", nxt[t])
        for t in keys:
            np.testing.assert_array_equal(rows[t], singles[t])  # the pulls saw the pushes
            want = ((keys if step == 0 else nxt)[t].size, dim_of(t))  # flattened, as pull
            assert rows[t].shape == want and rows[t].dtype == np.float32
    a, b = twin_rows(ps, batch(3))
    for t in a:
        np.testing.assert_array_equal(a[t], b[t])


def test_split_past_the_request_limits_gives_the_same_rows(cluster: Cluster, ps: PSClient) -> None:
    keys = {t: np.arange(-300, 300) for t in ("sgd", "ada", "st")}  # 600 keys each: > 64
    want = {t: ps.pull(t, k, train=False) for t, k in keys.items()}
    before = ps.rpcs_sent
    got = ps.pull_many(keys, train=False)
    assert ps.rpcs_sent - before >= 3 * 600 // MAX_KEYS  # split into requests of <= 64 keys
    for t in keys:
        np.testing.assert_array_equal(got[t], want[t])


def test_masks_promote_in_a_multi_table_pull(ps: PSClient) -> None:
    keys = np.array([1001, 1002, 1003])
    before = sum(s.tables["adp"]["promotions"] for s in ps.stats("adp"))
    ps.pull_many({"adp": keys, "sgd": keys}, masks={"adp": np.array([True, False, True])})
    after = sum(s.tables["adp"]["promotions"] for s in ps.stats("adp"))
    assert after - before == 2


def test_empty_groups_and_no_tables(ps: PSClient) -> None:
    rows = ps.pull_many({"sgd": np.array([], dtype=np.int64), "ada": [5]})
    assert rows["sgd"].shape == (0, DIM) and rows["ada"].shape == (1, DIM)
    assert ps.pull_many({}) == {}
    assert ps.push_pull({}, {}) == ({}, {})


CLIENT_CASES: dict[str, tuple[Callable[[PSClient], Any], type, str]] = {
    "grads of the wrong dim": (
        lambda ps: ps.push_many({"sgd": ([1, 2], np.ones((2, DIM + 1), np.float32))}),
        InvalidArgumentError, "dim"),
    "NaN gradient": (
        lambda ps: ps.push_many({"sgd": ([1], np.full((1, DIM), np.nan, np.float32)),
                                 "ada": ([1], np.ones((1, DIM), np.float32))}),
        InvalidArgumentError, "NaN"),
    "not a (keys, grads) pair": (
        lambda ps: ps.push_many({"sgd": np.ones((1, DIM))}), InvalidArgumentError, "pair"),
    "mask for a table not pulled": (
        lambda ps: ps.pull_many({"sgd": [1]}, masks={"adp": [True]}), InvalidArgumentError,
        "not pulled"),
    "mask of the wrong size": (
        lambda ps: ps.pull_many({"adp": [1, 2]}, masks={"adp": [True]}), InvalidArgumentError,
        "one entry per key"),
    "non-integer keys": (
        lambda ps: ps.pull_many({"sgd": [1.5]}), InvalidArgumentError, "integer"),
    "negative step": (
        lambda ps: ps.push_many({"sgd": ([1], np.ones((1, DIM), np.float32))}, step=-1),
        InvalidArgumentError, "step"),
    "unknown table": (
        lambda ps: ps.pull_many({"sgd": [1], "nope": [2]}), TableNotFoundError, "nope"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CLIENT_CASES))
def test_client_refuses_before_sending(ps: PSClient, case: str) -> None:
    call, exc, match = CLIENT_CASES[case]
    ps.pull_many({t: [1] for t in TWINS}, train=False)  # dims known
    keys = batch(7)
    before_rows, _ = twin_rows(ps, keys)
    before = ps.rpcs_sent
    with pytest.raises(exc, match=match):
        call(ps)
    if exc is InvalidArgumentError:  # nothing sent (a wrong dim re-reads the dims once)
        assert ps.rpcs_sent - before == (1 if case == "grads of the wrong dim" else 0)
    after_rows, _ = twin_rows(ps, keys)
    for t in before_rows:
        np.testing.assert_array_equal(before_rows[t], after_rows[t])


# --------------------------------------------------------------------------
# Raw Step requests: status codes, and nothing changes
# --------------------------------------------------------------------------


def own_keys(shard: int, n: int = 5) -> np.ndarray:
    k = np.arange(10_000, dtype=np.int64)
    return k[shard_of(k, N_SHARDS) == shard][:n]


def group(shard: int, table: str = "sgd", n: int = 5, dim: int = DIM, **kw: Any) -> pb.TableGroup:
    base: dict[str, Any] = {"table": table, "keys": codec.encode_keys(own_keys(shard, n)),
                            "grads": np.ones((n, dim), np.float32).tobytes()}  # fmt: skip
    base.update(kw)
    return pb.TableGroup(**base)


def pull_group(shard: int, table: str = "sgd", n: int = 5, **kw: Any) -> pb.TableGroup:
    return pb.TableGroup(table=table, keys=codec.encode_keys(own_keys(shard, n)), **kw)


def step_req(shard: int, push: list | None = None, pull: list | None = None, **kw: Any):
    base: dict[str, Any] = {"num_shards": N_SHARDS, "train": True,
                            "push": [group(shard)] if push is None else push,
                            "pull": [] if pull is None else pull}  # fmt: skip
    base.update(kw)
    return pb.StepRequest(**base)


NAN = np.ones((5, DIM), np.float32)
NAN[2, 1] = np.nan
STEP_CASES: dict[str, tuple[Callable[[int], pb.StepRequest], grpc.StatusCode, str]] = {
    "push group to an unknown table": (
        lambda s: step_req(s, [group(s), group(s, "nope")]), Code.NOT_FOUND, "nope"),
    "NaN in a later push group": (
        lambda s: step_req(s, [group(s), group(s, "ada", grads=NAN.tobytes())]),
        Code.INVALID_ARGUMENT, "NaN or Inf"),
    "gradients of the wrong length": (
        lambda s: step_req(s, [group(s), group(s, "ada", dim=DIM + 1)]),
        Code.INVALID_ARGUMENT, "bytes of gradients"),
    "a table twice among the pushes": (
        lambda s: step_req(s, [group(s), group(s)]), Code.INVALID_ARGUMENT, "appears twice"),
    "a table twice among the pulls": (
        lambda s: step_req(s, pull=[pull_group(s), pull_group(s)]), Code.INVALID_ARGUMENT,
        "appears twice"),
    "mask on a dynamic table's pull": (
        lambda s: step_req(s, pull=[pull_group(s, mask=b"\x01" * 5)]), Code.INVALID_ARGUMENT,
        "adaptive"),
    "mask of the wrong length": (
        lambda s: step_req(s, pull=[pull_group(s, "adp", mask=b"\x01" * 4)]),
        Code.INVALID_ARGUMENT, "one byte per key"),
    "a mask on a push group": (
        lambda s: step_req(s, [group(s, mask=b"\x01" * 5)]), Code.INVALID_ARGUMENT, "mask"),
    "gradients on a pull group": (
        lambda s: step_req(s, pull=[group(s, "ada")]), Code.INVALID_ARGUMENT, "gradients"),
    "pull of an unknown table after a good push": (
        lambda s: step_req(s, pull=[pull_group(s, "nope")]), Code.NOT_FOUND, "nope"),
    "a key of another shard in a pull group": (
        lambda s: step_req(s, pull=[pb.TableGroup(table="ada",
                                                  keys=codec.encode_keys(own_keys(1 - s)))]),
        Code.FAILED_PRECONDITION, "belongs to shard"),
    "too many keys over all groups": (
        lambda s: step_req(s, [group(s, n=130)], [pull_group(s, "ada", n=130)]),
        Code.RESOURCE_EXHAUSTED, "max_keys_per_request"),
    "wrong shard count": (
        lambda s: step_req(s, num_shards=3), Code.FAILED_PRECONDITION, "shard count"),
    "unknown dtype": (lambda s: step_req(s, dtype=9), Code.INVALID_ARGUMENT, "dtype"),
    "negative step": (lambda s: step_req(s, step=-2), Code.INVALID_ARGUMENT, "step"),
    "sequence without client_id": (
        lambda s: step_req(s, sequence=7), Code.INVALID_ARGUMENT, "client_id"),
}  # fmt: skip


def shard_state(ps: PSClient) -> list[Any]:
    out: list[Any] = []
    for t in ("sgd", "ada", "adp"):
        out.append(ps.pull(t, np.arange(0, 200), train=False))
        out.append([{f: s.tables[t][f] for f in ("keys", "step", "pushed_rows", "promotions")}
                    for s in ps.stats(t)])  # fmt: skip
    return out


@pytest.mark.parametrize("shard", range(N_SHARDS))
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_raw_bad_step_is_rejected_whole(cluster: Cluster, ps: PSClient, case: str, shard: int):
    build, code, match = STEP_CASES[case]
    before = shard_state(ps)
    with (
        grpc.insecure_channel(cluster.addresses[shard]) as ch,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.ParameterServerStub(ch).Step(build(shard), timeout=10)
    err = info.value
    assert err.code() == code, err.details()
    assert match.lower() in (err.details() or "").lower(), err.details()
    assert dict(err.trailing_metadata() or ()).get(limits.OUTCOME_KEY) == limits.OUTCOME_REJECTED
    after = shard_state(ps)
    for x, y in zip(before, after, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def test_a_pull_refused_after_the_pushes_says_they_were_applied(cluster: Cluster, ps: PSClient):
    ps.pull("full", [1, 2, 3, 4])  # the table is at its 4 rows (eviction none)
    before = ps.pull("sgd", [1], train=False)
    with grpc.insecure_channel(cluster.addresses[int(shard_of(np.array([1]), 2)[0])]) as ch:
        s = int(shard_of(np.array([1]), 2)[0])
        req = pb.StepRequest(
            num_shards=N_SHARDS, train=True,
            push=[pb.TableGroup(table="sgd", keys=codec.encode_keys(np.array([1])),
                                grads=np.ones((1, DIM), np.float32).tobytes())],
            pull=[pb.TableGroup(table="full", keys=codec.encode_keys(own_keys(s, 8)[4:]))],
        )  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ParameterServerStub(ch).Step(req, timeout=10)
    assert info.value.code() == Code.RESOURCE_EXHAUSTED
    assert "pushes were applied" in (info.value.details() or "")
    assert limits.OUTCOME_KEY not in dict(info.value.trailing_metadata() or ())
    assert not np.array_equal(ps.pull("sgd", [1], train=False), before)  # applied
    with pytest.raises(PushOutcomeUnknownError):  # the client cannot say "nothing changed"
        ps.push_pull({"sgd": ([1], np.ones((1, DIM), np.float32))}, {"full": own_keys(s, 12)[8:]})


def test_step_permissions_follow_what_it_changes() -> None:
    from embps.server.service.auth import Permission, required_permission

    method = f"/{limits.SERVICE_NAME}/Step"
    g = pb.TableGroup(table="t", keys=codec.encode_keys(np.array([1])))
    assert required_permission(method, pb.StepRequest(pull=[g], train=False)) is Permission.READ
    assert required_permission(method, pb.StepRequest(pull=[g], train=True)) is Permission.WRITE
    assert required_permission(method, pb.StepRequest(push=[g], train=False)) is Permission.WRITE
