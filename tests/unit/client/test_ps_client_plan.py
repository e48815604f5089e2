"""PSClient's routing plan and row assembly (pure functions, no server), against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from embps.client.plan import assemble_rows, plan_keys, slices, sum_duplicates
from embps.protos.routing import shard_of

DIM = 3


def batches() -> dict[str, np.ndarray]:
    """Edge cases first: empty, one key, then distinct (sorted, shuffled) and duplicated keys."""
    rng = np.random.default_rng(42)
    distinct = np.unique(rng.integers(-(2**63), 2**63 - 1, 300))
    return {
        "empty": np.empty(0, dtype=np.int64),
        "one": np.array([-5], dtype=np.int64),
        "sorted_distinct": distinct,
        "shuffled_distinct": rng.permutation(distinct),
        "descending": distinct[::-1].copy(),
        "duplicates": rng.integers(-50, 50, 400),
        "all_equal": np.full(20, 7, dtype=np.int64),
    }


def rows_of(keys: np.ndarray) -> np.ndarray:
    """A row per key that depends only on the key: float32 (n, DIM)."""
    k = keys.astype(np.float64)[:, None]
    return (np.sin(k + np.arange(DIM)) * 100).astype(np.float32)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("name", list(batches()))
def test_plan_routes_each_distinct_key_once_in_first_occurrence_order(
    name: str, num_shards: int
) -> None:
    keys = batches()[name].astype(np.int64)
    plan = plan_keys(keys, num_shards, first=True)
    assert len(plan.bounds) == num_shards + 1 and plan.bounds[-1] == plan.keys.shape[0]
    np.testing.assert_array_equal(np.sort(plan.keys), np.unique(keys))
    np.testing.assert_array_equal(plan.keys[plan.where], keys)
    assert plan.first is not None
    np.testing.assert_array_equal(keys[plan.first], plan.keys)
    for j, k in enumerate(plan.keys):  # the first occurrence, not any
        assert plan.first[j] == np.flatnonzero(keys == k)[0]
    for s in range(num_shards):
        lo, hi = plan.bounds[s], plan.bounds[s + 1]
        mine = plan.keys[lo:hi]
        assert (shard_of(mine, num_shards) == s).all()
        assert (np.diff(plan.first[lo:hi]) > 0).all()  # first occurrences, in batch order
    distinct = np.unique(keys).shape[0] == keys.shape[0]
    assert plan.same == (num_shards == 1 and distinct)
    if plan.same:
        assert plan.keys is keys


@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_plan_at_scale_matches_numpy(num_shards: int) -> None:
    """A batch large enough to probe long runs in the kernel's table: 200k keys drawn
    from 50k, plus the int64 extremes and keys whose mix collides on the low bits."""
    rng = np.random.default_rng(7)
    keys = rng.integers(-(2**63), 2**63 - 1, 50_000)[rng.integers(0, 50_000, 200_000)]
    keys = np.concatenate([keys, [-(2**63), 2**63 - 1, 0, -1], np.arange(0, 1 << 20, 1 << 16)])
    plan = plan_keys(keys, num_shards, first=True)
    uniq, index = np.unique(keys, return_index=True)
    assert plan.first is not None
    np.testing.assert_array_equal(np.sort(plan.keys), uniq)
    np.testing.assert_array_equal(plan.keys[plan.where], keys)
    np.testing.assert_array_equal(np.sort(plan.first), np.sort(index))
    owner = shard_of(plan.keys, num_shards)
    np.testing.assert_array_equal(owner, np.sort(owner, kind="stable"))
    np.testing.assert_array_equal(plan.bounds, np.searchsorted(owner, np.arange(num_shards + 1)))


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("name", [n for n in batches() if n != "empty"])
def test_assembled_rows_are_in_the_callers_order(name: str, num_shards: int, chunk: int) -> None:
    keys = batches()[name].astype(np.int64)
    plan = plan_keys(keys, num_shards)
    answer = rows_of(plan.keys)
    parts = []
    for s in range(num_shards):
        for a, b in slices(plan.bounds[s], plan.bounds[s + 1], chunk):
            if a < b:
                view = np.frombuffer(answer[a:b].tobytes(), np.float32).reshape(b - a, DIM)
                parts.append((a, b, view))  # read-only, like a response
    got = assemble_rows(plan, parts, DIM)
    np.testing.assert_array_equal(got, rows_of(keys))
    assert got.flags.writeable and got.flags.owndata and got.dtype == np.float32


@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("name", list(batches()))
def test_duplicate_gradients_are_summed_in_batch_order(name: str, num_shards: int) -> None:
    keys = batches()[name].astype(np.int64)
    rng = np.random.default_rng(5)
    grads = rng.normal(size=(keys.shape[0], DIM)).astype(np.float32)
    grads[:2] = -0.0
    before = grads.copy()
    plan = plan_keys(keys, num_shards, first=True)
    got = sum_duplicates(plan, grads)
    want = np.zeros((plan.keys.shape[0], DIM), dtype=np.float32)
    for i, w in enumerate(plan.where):  # ((0 + g_first) + g_second) + ... in float32
        want[w] = want[w] + grads[i]
    if plan.keys.shape[0] == keys.shape[0]:  # distinct: the shard adds the zero itself
        got = np.float32(0.0) + got
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(grads, before)  # the caller's gradients are left alone


def test_shard_addresses_from_a_dns_pattern() -> None:
    from embps.client import PSClient, shard_addresses

    assert shard_addresses("embps-{i}.embps-headless:50051", 3) == [
        "embps-0.embps-headless:50051",
        "embps-1.embps-headless:50051",
        "embps-2.embps-headless:50051",
    ]
    with pytest.raises(ValueError, match="placeholder"):
        shard_addresses("embps.embps-headless:50051", 2)
    with pytest.raises(ValueError, match="num_shards"):
        shard_addresses("embps-{i}:1", 0)
    ps = PSClient("127.0.0.1:{i}", num_shards=2)  # channels connect lazily: no server needed
    try:
        assert ps.addresses == ["127.0.0.1:0", "127.0.0.1:1"] and ps.num_shards == 2
    finally:
        ps.close()
    with pytest.raises(ValueError, match="needs num_shards"):
        PSClient("embps-{i}:50051")
    with pytest.raises(ValueError, match="2 addresses"):
        PSClient(["a:1", "b:2"], num_shards=3)


@pytest.mark.parametrize("num_shards", [1, 2, 5])
def test_dedup_route_groups_equals_dedup_route_per_group(num_shards: int) -> None:
    from embps.protos.routing import dedup_route, dedup_route_groups

    rng = np.random.default_rng(num_shards)
    groups = [rng.integers(-40, 40, size=n).astype(np.int64) for n in (0, 1, 17, 200, 5, 0)]
    offsets = np.cumsum([0] + [g.shape[0] for g in groups]).astype(np.int64)
    uniq, where, first, counts, bounds = dedup_route_groups(
        np.concatenate(groups), offsets, num_shards
    )
    for g, keys in enumerate(groups):
        lo, hi, u = offsets[g], offsets[g + 1], counts[g]
        want = dedup_route(keys, num_shards)
        np.testing.assert_array_equal(uniq[lo : lo + u], want[0])
        np.testing.assert_array_equal(where[lo:hi], want[1])
        np.testing.assert_array_equal(first[lo : lo + u], want[2])
        np.testing.assert_array_equal(bounds[g], want[3])
