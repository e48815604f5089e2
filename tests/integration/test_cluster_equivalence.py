"""`embps serve` with 1, 2 and 3 shard processes, driven by PSClient, against in-process engines.

Every table kind x every optimizer: the pulled rows, push counts, final
inference rows and per-shard stats must be *identical* (assert_array_equal)
to the same operations on ``ShardedModel`` (one in-process Engine per shard,
routed as the client documents). Dynamic tables are also compared with a
single in-process Engine fed the raw batches: sharding must be invisible.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from support.cluster import Cluster, running_cluster
from support.sharded_model import ShardedModel

from embps.client import FTRL, SGD, Adagrad, Adam, PSClient, TableConfig
from embps.protos import codec
from embps.server.engine import Engine

DIM = 4
OPTIMIZERS = {
    "sgd": SGD(lr=0.5),
    "adagrad": Adagrad(lr=0.1, initial_accumulator_value=0.1),
    "adam": Adam(lr=0.01),
    "ftrl": FTRL(alpha=0.1, beta=1.0, l1=0.001, l2=0.01),
}
KIND_OPTIONS: dict[str, dict[str, object]] = {
    "dynamic": {"admission_threshold": 2},
    "static": {"hash_bucket_size": 64},
    "adaptive": {"hash_bucket_size": 64, "promote_threshold": 2},
    "qr": {"qr_quotient_buckets": 16, "qr_remainder_buckets": 16},
}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
STAT_FIELDS = ("keys", "dynamic_rows", "static_rows", "bytes", "promotions",
               "admissions_rejected", "pulled_rows", "pushed_rows", "step")  # fmt: skip


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}shard")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with running_cluster(request.param) as c:
        yield c


@pytest.fixture
def client(cluster: Cluster) -> Iterator[PSClient]:
    with PSClient(cluster.addresses, timeout=30.0) as c:
        yield c


def key_pool(rng: np.random.Generator) -> np.ndarray:
    """~150 keys: random (negative too) and the int64 extremes."""
    pool = rng.integers(-(2**40), 2**40, size=150)
    return np.unique(np.concatenate([pool, [INT64_MIN, INT64_MAX, -1, 0, 1]]))


def assert_stats_equal(client: PSClient, model: ShardedModel, name: str) -> None:
    got = [s.tables[name] for s in client.stats(name)]
    want = model.stats(name)
    for s, (g, w) in enumerate(zip(got, want, strict=True)):
        for f in STAT_FIELDS:
            assert g[f] == w[f], f"shard {s} stat {f}: server {g[f]} != model {w[f]}"


# --------------------------------------------------------------------------
# Every kind x every optimizer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", list(KIND_OPTIONS))
def test_kinds_and_optimizers_match_in_process_engines(
    cluster: Cluster, client: PSClient, kind: str, opt: str
) -> None:
    name = f"{kind}_{opt}"
    cfg = TableConfig(name, dim=DIM, kind=kind, optimizer=OPTIMIZERS[opt], seed=7,
                      **KIND_OPTIONS[kind])  # fmt: skip
    model = ShardedModel(len(cluster.shards))
    model.create(cfg)
    assert client.create_table(cfg) is True
    assert client.create_table(cfg) is False  # identical create: fine, nothing new
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    pool = key_pool(rng)
    for rnd in range(4):
        keys = rng.choice(pool, size=(20, 10))  # any shape, duplicates
        np.testing.assert_array_equal(client.pull(name, keys), model.pull(name, keys))
        grads = rng.normal(size=(20, 10, DIM)).astype(np.float32)
        if rnd % 2:
            grads = grads.reshape(200, DIM)  # (n, dim) works as well as keys.shape + (dim,)
        step = None if rnd < 2 else 10 + rnd
        res = client.push(name, keys, grads, step=step)
        assert (res.applied, res.dropped) == model.push(name, keys, grads, step=step)
    probe = np.concatenate([pool, rng.integers(-(2**62), 2**62, size=50)])
    np.testing.assert_array_equal(
        client.pull(name, probe, train=False), model.pull(name, probe, train=False)
    )
    assert_stats_equal(client, model, name)
    assert client.drop_table(name) is True


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_dynamic_sharding_is_invisible(client: PSClient, opt: str) -> None:
    """A dynamic table over N shards == ONE in-process Engine fed the raw (duplicated) batches."""
    name = f"single_{opt}"
    cfg = TableConfig(name, dim=DIM, optimizer=OPTIMIZERS[opt], seed=3)
    one = Engine()
    one.create_table(cfg)
    client.create_table(cfg)
    rng = np.random.default_rng(11)
    pool = key_pool(rng)
    for rnd in range(3):
        keys = rng.choice(pool, size=300)
        np.testing.assert_array_equal(client.pull(name, keys), one.table(name).pull(keys))
        grads = rng.normal(size=(300, DIM)).astype(np.float32)
        step = None if rnd < 2 else 7
        res = client.push(name, keys, grads, step=step)
        one.table(name).push(keys, grads, step=step)
        assert (res.applied, res.dropped) == (np.unique(keys).shape[0], 0)  # distinct keys
    np.testing.assert_array_equal(
        client.pull(name, pool, train=False), one.table(name).pull(pool, train=False)
    )
    client.drop_table(name)


def test_adaptive_mask_promotes(cluster: Cluster, client: PSClient) -> None:
    name = "adaptive_mask"
    cfg = TableConfig(name, dim=DIM, kind="adaptive", optimizer=OPTIMIZERS["adagrad"],
                      hash_bucket_size=32, promote_threshold=100)  # fmt: skip
    model = ShardedModel(len(cluster.shards))
    model.create(cfg)
    client.create_table(cfg)
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 1000, size=64)
    mask = rng.random(64) < 0.5
    np.testing.assert_array_equal(
        client.pull(name, keys, mask=mask), model.pull(name, keys, mask=mask)
    )
    grads = rng.normal(size=(64, DIM)).astype(np.float32)
    res = client.push(name, keys, grads)
    assert (res.applied, res.dropped) == model.push(name, keys, grads)
    np.testing.assert_array_equal(
        client.pull(name, keys, train=False), model.pull(name, keys, train=False)
    )
    promoted = sum(s.tables[name]["promotions"] for s in client.stats(name))
    assert promoted == np.unique(keys[mask]).shape[0]
    client.drop_table(name)


# --------------------------------------------------------------------------
# Wire dtypes, chunking, prune, describe
# --------------------------------------------------------------------------


def _roundtrip(x: np.ndarray, dtype: int) -> np.ndarray:
    n, dim = x.shape
    return codec.decode_values(codec.wire_values(x, dtype).tobytes(), dtype, n, dim)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_wire(cluster: Cluster, dtype: str) -> None:
    name = f"wire_{dtype}"
    wire = codec.dtype_from_name(dtype)
    cfg = TableConfig(name, dim=DIM, optimizer=OPTIMIZERS["adam"])
    model = ShardedModel(len(cluster.shards))
    model.create(cfg)
    rng = np.random.default_rng(2)
    keys = rng.integers(-500, 500, size=100)
    with PSClient(cluster.addresses, dtype=dtype) as ps:
        ps.create_table(cfg)
        np.testing.assert_array_equal(ps.pull(name, keys), _roundtrip(model.pull(name, keys), wire))
        grads = rng.normal(size=(100, DIM)).astype(np.float32)
        # duplicates are summed before encoding: send unique keys to compare exactly
        u = np.unique(keys)
        g = grads[: u.shape[0]]
        ps.push(name, u, g)
        model.push(name, u, _roundtrip(g, wire))
        got = ps.pull(name, u, train=False)
        np.testing.assert_array_equal(got, _roundtrip(model.pull(name, u, train=False), wire))
        ps.drop_table(name)


def test_requests_over_the_chunk_size_are_split(cluster: Cluster) -> None:
    name = "chunked"
    cfg = TableConfig(name, dim=DIM, optimizer=OPTIMIZERS["adagrad"])
    model = ShardedModel(len(cluster.shards))
    model.create(cfg)
    rng = np.random.default_rng(9)
    keys = rng.integers(0, 10_000, size=200)
    grads = rng.normal(size=(200, DIM)).astype(np.float32)
    with PSClient(cluster.addresses, max_keys_per_request=7) as ps:
        ps.create_table(cfg)
        np.testing.assert_array_equal(ps.pull(name, keys), model.pull(name, keys))
        res = ps.push(name, keys, grads, step=0)  # with a step, a split push is exact
        assert (res.applied, res.dropped) == model.push(name, keys, grads, step=0)
        np.testing.assert_array_equal(
            ps.pull(name, keys, train=False), model.pull(name, keys, train=False)
        )
        with pytest.warns(RuntimeWarning, match="pass step="):
            ps.push(name, keys, grads)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ps.push(name, keys[:3], grads[:3])  # fits in one request: no warning
        ps.drop_table(name)


def test_prune_sums_over_shards(cluster: Cluster, client: PSClient) -> None:
    name = "prunable"
    cfg = TableConfig(name, dim=DIM, optimizer=OPTIMIZERS["sgd"])
    model = ShardedModel(len(cluster.shards))
    model.create(cfg)
    client.create_table(cfg)
    keys = np.arange(-300, 300)
    client.pull(name, keys)
    model.pull(name, keys)
    threshold = float(np.median(np.linalg.norm(model.pull(name, keys, train=False), axis=1)))
    res = client.prune(name, threshold)
    assert (res.rows, res.bytes) == model.prune(name, threshold)
    assert 0 < res.rows < keys.shape[0]
    np.testing.assert_array_equal(
        client.pull(name, keys, train=False), model.pull(name, keys, train=False)
    )
    client.drop_table(name)


def test_describe_and_empty_batches(cluster: Cluster, client: PSClient) -> None:
    cfg = TableConfig("described", dim=3, kind="static", hash_bucket_size=8, optimizer=SGD(0.1))
    client.create_table(cfg)
    assert cfg in client.describe_tables()
    assert client.pull("described", np.empty((0,), dtype=np.int64)).shape == (0, 3)
    assert client.pull("described", []).shape == (0, 3)
    res = client.push("described", [], np.empty((0, 3), dtype=np.float32))
    assert (res.applied, res.dropped) == (0, 0)
    stats = client.stats("described")
    assert [s.shard_id for s in stats] == list(range(len(cluster.shards)))
    assert all(s.num_shards == len(cluster.shards) for s in stats)
    assert client.drop_table("described") is True
    assert client.drop_table("described") is False
    assert "described" not in {c.name for c in client.describe_tables()}
