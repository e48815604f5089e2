"""The key hashes of ``embps.protos.routing``: each numpy form equals its ``@njit`` twin
bit for bit (client and server must agree: a key routed or a static row chosen one way
on one side and another way on the other is a wrong answer, not an error)."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from embps.protos import routing

EDGES = np.array([0, 1, -1, 2**63 - 1, -(2**63), 0x5EED], dtype=np.int64)


def _keys(n: int = 20_000, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(-(2**63), 2**63 - 1, n), EDGES])


@njit(cache=False)
def _mix64_each(keys):  # pragma: no cover - compiled
    out = np.empty(keys.shape[0], dtype=np.uint64)
    for i in range(keys.shape[0]):
        out[i] = routing.mix64_one(keys[i])
    return out


@njit(cache=False)
def _fmix64_each(x):  # pragma: no cover - compiled
    out = np.empty(x.shape[0], dtype=np.uint64)
    for i in range(x.shape[0]):
        out[i] = routing.fmix64_one(x[i])
    return out


def test_splitmix64_twins_agree() -> None:
    keys = _keys()
    want = routing.mix64(keys)
    np.testing.assert_array_equal(_mix64_each(keys), want)
    z = keys.view(np.uint64) + routing.GOLDEN
    np.testing.assert_array_equal(routing.mix64_inplace(z), want)
    for k in EDGES.tolist():
        assert routing.mix64_int((k + int(routing.GOLDEN)) & (2**64 - 1)) == int(
            routing.mix64(np.array([k]))[0]
        )


def test_fmix64_twins_agree() -> None:
    x = _keys().view(np.uint64)
    np.testing.assert_array_equal(_fmix64_each(x), routing.fmix64(x))


@pytest.mark.parametrize(("buckets", "seed"), [(1, 0), (1000, 7), (2**40 + 3, 2**62)])
def test_static_rows_twins_agree(buckets: int, seed: int) -> None:
    keys = _keys()
    rows = routing.static_rows(keys, buckets, seed)
    np.testing.assert_array_equal(rows, routing.static_rows_nb(keys, buckets, seed))
    assert rows.min() >= 0 and rows.max() < buckets


@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_first_misrouted_is_shard_of(num_shards: int) -> None:
    keys = _keys(2000)
    owner = routing.shard_of(keys, num_shards)
    for s in range(num_shards):
        mine = keys[owner == s]
        assert routing.first_misrouted(mine, num_shards, s) == -1
        other = np.flatnonzero(owner != s)
        want = int(other[0]) if other.size else -1
        assert routing.first_misrouted(keys, num_shards, s) == want


def test_dedup_route_is_shard_of() -> None:
    keys = np.concatenate([_keys(500), _keys(500)])  # every key twice
    uniq, where, first, bounds = routing.dedup_route(keys, 3)
    assert uniq.shape[0] == np.unique(keys).shape[0]
    np.testing.assert_array_equal(uniq[where], keys)
    np.testing.assert_array_equal(keys[first], uniq)
    for s in range(3):
        part = uniq[bounds[s] : bounds[s + 1]]
        assert (routing.shard_of(part, 3) == s).all()
