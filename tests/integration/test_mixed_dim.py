"""MixedDimEmbedding and its block planner against a real 2-shard PS (in-process gRPC)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs PyTorch (pip install torch)")

from embps.client import SGD, PSClient, TableConfig  # noqa: E402
from embps.client.torch import (  # noqa: E402
    MixedDimBlock,
    MixedDimEmbedding,
    plan_mixed_dim_blocks,
    plan_mixed_dim_blocks_from_ps,
)
from embps.protos.routing import shard_of, static_rows  # noqa: E402
from embps.server.service import ShardServer  # noqa: E402

Factory = Callable[..., list[ShardServer]]
LR = 0.5
BASE = 8
DIMS = (8, 4, 2)
TAIL_BUCKETS = 16
TABLES = ("b0", "b1", "tail")


@pytest.fixture
def ps(inproc_factory: Factory) -> Iterator[PSClient]:
    shards = inproc_factory(
        2,
        tables=(
            TableConfig("cnt", dim=1),
            TableConfig("b0", dim=DIMS[0], optimizer=SGD(lr=LR)),
            TableConfig("b1", dim=DIMS[1], optimizer=SGD(lr=LR)),
            TableConfig("tail", dim=DIMS[2], kind="static", hash_bucket_size=TAIL_BUCKETS,
                        optimizer=SGD(lr=LR)),
        ),
    )  # fmt: skip
    with PSClient([s.address for s in shards]) as client:
        yield client


def _count(ps: PSClient, counts: dict[int, int]) -> None:
    """Training pulls of the counting table: id k in counts[k] pulls."""
    for r in range(max(counts.values())):
        ps.pull("cnt", np.array([k for k, c in counts.items() if c > r], dtype=np.int64))


# 20 ids: 100..119 with counts 20, 19, ..., 1; plus two never seen
IDS = np.arange(100, 120, dtype=np.int64)
COUNTS = {int(k): 20 - i for i, k in enumerate(IDS)}
UNSEEN = np.array([7, 9], dtype=np.int64)


def _blocks(ps: PSClient) -> list[MixedDimBlock]:
    _count(ps, COUNTS)
    return plan_mixed_dim_blocks_from_ps(
        ps, "cnt", np.concatenate([IDS, UNSEEN]), sizes=[3, 5], dims=DIMS, tables=TABLES
    )


def test_blocks_follow_the_servers_frequencies(ps: PSClient) -> None:
    blocks = _blocks(ps)
    assert [b.table for b in blocks] == list(TABLES)
    assert [b.dim for b in blocks] == list(DIMS)
    np.testing.assert_array_equal(blocks[0].ids, [100, 101, 102])  # the 3 most frequent
    np.testing.assert_array_equal(blocks[1].ids, [103, 104, 105, 106, 107])  # the next 5
    assert blocks[2].ids is None  # the rest, and ids never seen, go to the catch-all
    emb = MixedDimEmbedding(ps, blocks, BASE)
    got = emb.block_of(np.array([101, 107, 108, 119, 7, 10**12, -5], dtype=np.int64))
    np.testing.assert_array_equal(got, [0, 1, 2, 2, 2, 2, 2])


def test_planner_ranks_by_count_then_id_and_skips_zero_counts() -> None:
    ids = np.array([5, 3, 9, 1, 4], dtype=np.int64)
    counts = np.array([2, 7, 2, 0, 7])
    b = plan_mixed_dim_blocks(ids, counts, sizes=[1, 10], dims=[4, 2, 1], tables=["a", "b", "c"])
    np.testing.assert_array_equal(b[0].ids, [3])  # 3 and 4 tie at 7: the smaller id first
    np.testing.assert_array_equal(b[1].ids, [4, 5, 9])  # id 1 (count 0) stays in the tail
    assert b[2].ids is None and b[2].dim == 1
    with pytest.raises(ValueError, match="one per block"):
        plan_mixed_dim_blocks(ids, counts, sizes=[1], dims=[4, 2, 1], tables=["a", "b", "c"])
    with pytest.raises(ValueError, match="distinct"):
        plan_mixed_dim_blocks([1, 1], [1, 2], sizes=[1], dims=[4, 1], tables=["a", "b"])
    with pytest.raises(ValueError, match="one per id"):
        plan_mixed_dim_blocks([1, 2], [1], sizes=[1], dims=[4, 1], tables=["a", "b"])


def test_module_rejects_bad_blocks(ps: PSClient) -> None:
    tail = MixedDimBlock("tail", DIMS[2])
    with pytest.raises(ValueError, match="catch-all"):
        MixedDimEmbedding(ps, [MixedDimBlock("b0", DIMS[0], np.array([1]))], BASE)
    with pytest.raises(ValueError, match="has dim"):
        MixedDimEmbedding(ps, [MixedDimBlock("b0", 3, np.array([1])), tail], BASE)
    with pytest.raises(ValueError, match="two blocks"):
        MixedDimEmbedding(
            ps,
            [MixedDimBlock("b0", DIMS[0], np.array([1, 2])),
             MixedDimBlock("b1", DIMS[1], np.array([2])), tail],
            BASE,
        )  # fmt: skip


def _batch() -> torch.Tensor:
    # block 0: 100, 102 (twice); block 1: 104, 107; tail: 110, 119 (twice), 7 (never seen)
    return torch.tensor([[100, 104, 110, 7], [102, 119, 102, 107], [119, 100, 110, 104]])


def test_outputs_have_base_dim_and_each_id_reaches_its_blocks_table(ps: PSClient) -> None:
    emb = MixedDimEmbedding(ps, _blocks(ps), BASE)
    ids = _batch()
    out = emb(ids)
    assert out.shape == (3, 4, BASE) and out.dtype == torch.float32
    assert emb(ids[0]).shape == (4, BASE)
    # each block's (dynamic) table saw exactly its ids, once per forward (102: not in ids[0])
    np.testing.assert_array_equal(ps.frequencies("b0", [100, 102, 104, 110]), [2, 1, 0, 0])
    np.testing.assert_array_equal(ps.frequencies("b1", [104, 107, 100, 119]), [2, 1, 0, 0])
    stats = {t: sum(s.tables[t]["keys"] for s in ps.stats()) for t in TABLES}
    assert stats == {"b0": 2, "b1": 2, "tail": 0}  # the tail is a static table: no own rows
    # the same id gives the same vector wherever it appears in the batch
    torch.testing.assert_close(out[1, 0], out[1, 2])


def test_gradients_reach_the_projections_and_the_rows_exactly_as_sgd_predicts(
    ps: PSClient,
) -> None:
    torch.manual_seed(0)
    blocks = _blocks(ps)
    emb = MixedDimEmbedding(ps, blocks, BASE)
    ids = _batch()
    keys = ids.reshape(-1).numpy()
    with torch.no_grad():
        emb(ids)  # creates the dynamic rows (training pull, nothing pushed)
    which = emb.block_of(keys)
    before = [ps.pull(t, keys[which == b], train=False) for b, t in enumerate(TABLES)]
    weights = [p.weight.detach().clone() for p in emb.projections]
    c = torch.randn(keys.shape[0], BASE)  # loss = sum(out * c): d loss / d out = c
    out = emb(ids).reshape(-1, BASE)
    for p in emb.projections:
        p.weight.grad = None
    (out * c).sum().backward()  # pushes the rows' gradients (SGD on the shards)

    for b, t in enumerate(TABLES):
        k = keys[which == b]
        g = (c[torch.from_numpy(np.flatnonzero(which == b))] @ weights[b]).numpy()  # (k, d_b)
        # rows shared by several ids get their summed gradient: dynamic rows per id,
        # static rows per (shard, h(id) % buckets)
        if t == "tail":
            group = shard_of(k, 2) * TAIL_BUCKETS + static_rows(k, TAIL_BUCKETS, 0)
        else:
            group = k
        summed = np.zeros_like(g)
        for i in range(k.shape[0]):
            summed[i] = g[group == group[i]].sum(axis=0)
        want = before[b] - LR * summed
        got = ps.pull(t, k, train=False)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=t)
        assert np.abs(got - before[b]).max() > 1e-3  # the rows really moved

        # the projection's gradient: sum_i c_i^T rows_i
        grad_w = emb.projections[b].weight.grad
        assert grad_w is not None and float(grad_w.abs().sum()) > 0
        want_w = c[torch.from_numpy(np.flatnonzero(which == b))].T @ torch.from_numpy(before[b])
        torch.testing.assert_close(grad_w, want_w, rtol=1e-5, atol=1e-6)


def test_memory_per_block_is_dim_times_rows(ps: PSClient) -> None:
    blocks = _blocks(ps)
    emb = MixedDimEmbedding(ps, blocks, BASE)
    emb(torch.from_numpy(np.concatenate([IDS, UNSEEN])))
    per = {t: {"keys": 0, "bytes": 0, "static_bytes": 0} for t in TABLES}
    for s in ps.stats():
        for t in TABLES:
            for f in per[t]:
                per[t][f] += s.tables[t][f]
    assert per["b0"]["keys"] == 3 and per["b1"]["keys"] == 5
    for b in (0, 1):
        rows, d = per[TABLES[b]]["keys"], DIMS[b]
        assert per[TABLES[b]]["bytes"] >= rows * d * 4  # values of the rows (SGD: no slots)
    # a static block costs exactly buckets x (dim floats + freq, last_step, version) per shard
    assert (
        per["tail"]["bytes"] == per["tail"]["static_bytes"] == 2 * TAIL_BUCKETS * (4 * DIMS[2] + 24)
    )
    assert emb.projection_bytes == 4 * BASE * sum(DIMS)
