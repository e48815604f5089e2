"""PyTorch modules against a real 2-shard `embps serve`: parity with local torch, pipelining."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

from support.cluster import Cluster, start_cluster  # noqa: E402

from embps.client import SGD, Adagrad, PSClient, TableConfig  # noqa: E402
from embps.client.torch import RemoteEmbedding, RemoteEmbeddingBag, unique_inverse  # noqa: E402
from embps.protos.config import Initializer  # noqa: E402

V, D = 60, 8


@pytest.fixture(scope="module")
def ps() -> Iterator[PSClient]:
    cluster: Cluster = start_cluster(2)
    try:
        with PSClient(cluster.addresses, timeout=20.0) as client:
            client.wait_ready(timeout=60)
            yield client
    finally:
        cluster.stop()


def _optimizers(kind: str, emb_params: list, dense_params: list) -> tuple:
    if kind == "sgd":
        return (
            SGD(lr=0.2),
            torch.optim.SGD(emb_params + dense_params, lr=0.2),
            torch.optim.SGD(dense_params, lr=0.2),
        )
    return (
        Adagrad(lr=0.1, eps=1e-10),
        torch.optim.Adagrad(emb_params + dense_params, lr=0.1, eps=1e-10),
        torch.optim.Adagrad(dense_params, lr=0.1, eps=1e-10),
    )


def test_unique_inverse_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 1000):
        keys = rng.integers(-5, 5, n).astype(np.int64)
        uniq, inv = unique_inverse(keys)
        ref_u, ref_inv = np.unique(keys, return_inverse=True)
        np.testing.assert_array_equal(uniq, ref_u)
        np.testing.assert_array_equal(inv, ref_inv.reshape(-1))


@pytest.mark.parametrize("opt", ["sgd", "adagrad"])
def test_sync_training_equals_local_torch_embedding(ps: PSClient, opt: str) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    name = f"parity_emb_{opt}"
    dense_local = torch.nn.Sequential(
        torch.nn.Linear(3 * D, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    )
    dense_remote = copy.deepcopy(dense_local)
    local = torch.nn.Embedding(V, D)
    server_opt, opt_local, opt_remote = _optimizers(
        opt, list(local.parameters()), list(dense_local.parameters())
    )
    opt_remote = type(opt_remote)(dense_remote.parameters(), **opt_remote.defaults)
    ps.create_table(
        TableConfig(name, D, optimizer=server_opt, initializer=Initializer("normal", 0.0, 0.3))
    )
    init = ps.pull(name, np.arange(V), train=True)
    with torch.no_grad():
        local.weight.copy_(torch.from_numpy(init))
    remote = RemoteEmbedding(ps, name)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(25):
        ids = torch.from_numpy(rng.integers(0, V, (32, 3)))  # duplicates within and across rows
        y = torch.from_numpy(rng.integers(0, 2, 32).astype(np.float32))
        losses = []
        for emb, dense, o in ((local, dense_local, opt_local), (remote, dense_remote, opt_remote)):
            o.zero_grad()
            loss = loss_fn(dense(emb(ids).reshape(32, -1)).squeeze(1), y)
            loss.backward()
            o.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(
        ps.pull(name, np.arange(V), train=False),
        local.weight.detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    for p_local, p_remote in zip(dense_local.parameters(), dense_remote.parameters(), strict=True):
        np.testing.assert_allclose(
            p_remote.detach().numpy(), p_local.detach().numpy(), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sync_training_equals_local_torch_embedding_bag(ps: PSClient, mode: str) -> None:
    rng = np.random.default_rng(2)
    name = f"parity_bag_{mode}"
    ps.create_table(
        TableConfig(
            name,
            D,
            optimizer=Adagrad(lr=0.1, eps=1e-10),
            initializer=Initializer("uniform", -0.5, 0.5),
        )
    )
    init = ps.pull(name, np.arange(V), train=True)
    local = torch.nn.EmbeddingBag(V, D, mode=mode)
    with torch.no_grad():
        local.weight.copy_(torch.from_numpy(init))
    opt_local = torch.optim.Adagrad(local.parameters(), lr=0.1, eps=1e-10)
    remote = RemoteEmbeddingBag(ps, name, mode=mode)
    target = torch.from_numpy(rng.normal(size=(16, D)).astype(np.float32))
    for _ in range(15):
        lengths = rng.integers(1, 5, 16)
        ids = torch.from_numpy(rng.integers(0, V, int(lengths.sum())))
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        opt_local.zero_grad()
        loss_local = (local(ids, offsets) - target).pow(2).sum()
        loss_local.backward()
        opt_local.step()
        loss_remote = (remote(ids, offsets) - target).pow(2).sum()
        loss_remote.backward()
        assert loss_remote.item() == pytest.approx(loss_local.item(), rel=1e-5)
    np.testing.assert_allclose(
        ps.pull(name, np.arange(V), train=False),
        local.weight.detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("staleness", [1, 3])
def test_pipelined_pulls_miss_at_most_staleness_pushes_and_lose_none(
    ps: PSClient, staleness: int
) -> None:
    """SGD(lr=1), zeros init, loss = row.sum(): every push lowers key 7 by exactly 1.

    The row read for batch t (t pushes issued before it) must lie in [-t, -(t - s)];
    after flush() it equals minus the number of pushes: nothing lost, nothing doubled.
    """
    name = f"stale_{staleness}"
    ps.create_table(TableConfig(name, 2, optimizer=SGD(lr=1.0), initializer=Initializer("zeros")))
    emb = RemoteEmbedding(ps, name, staleness=staleness)
    ids = torch.tensor([7])
    steps = 30
    emb.prefetch(ids)
    for t in range(steps):
        row = emb(ids)
        value = row[0, 0].item()
        assert -t <= value <= -(t - staleness), (t, value)
        if t + 1 < steps:
            emb.prefetch(ids)
        row.sum().backward()
    emb.flush()
    np.testing.assert_array_equal(ps.pull(name, [7], train=False), [[-steps, -steps]])
    emb.close()


def test_synchronous_mode_sees_every_push(ps: PSClient) -> None:
    name = "sync_exact"
    ps.create_table(TableConfig(name, 2, optimizer=SGD(lr=1.0), initializer=Initializer("zeros")))
    emb = RemoteEmbedding(ps, name)
    with pytest.raises(RuntimeError, match="staleness"):
        emb.prefetch(torch.tensor([1]))
    for t in range(5):
        row = emb(torch.tensor([1, 1]))  # duplicates: gradient 2 per step
        assert row[0, 0].item() == -2 * t
        row.sum().backward()


def test_eval_mode_and_no_grad_do_not_push(ps: PSClient) -> None:
    name = "eval_nopush"
    ps.create_table(
        TableConfig(name, 2, optimizer=SGD(lr=1.0), initializer=Initializer("constant", 1.0))
    )
    emb = RemoteEmbedding(ps, name)
    emb(torch.tensor([3]))  # create the row (train pull)
    emb.eval()
    out = emb(torch.tensor([3, 4]))
    assert not out.requires_grad
    np.testing.assert_array_equal(out.numpy(), [[1, 1], [0, 0]])  # key 4 has no row: default 0
    emb.train()
    with torch.no_grad():
        emb(torch.tensor([3])).sum()
    np.testing.assert_array_equal(ps.pull(name, [3], train=False), [[1, 1]])


def test_bad_ids_and_unknown_table(ps: PSClient) -> None:
    ps.create_table(TableConfig("bad_ids", 2))
    emb = RemoteEmbedding(ps, "bad_ids")
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="does not exist"):
        RemoteEmbedding(ps, "no_such_table")
    with pytest.raises(ValueError, match="offsets"):
        RemoteEmbeddingBag(ps, "bad_ids")(torch.tensor([1, 2]))


def test_optembed_mask_zeroes_rows_under_the_threshold_and_learns_it() -> None:
    from embps.client.torch import OptEmbedMask

    mask = OptEmbedMask(num_fields=2, norm="l2", init_threshold=1.0, weight=0.1)
    emb = torch.tensor([[[0.3, 0.4], [3.0, 4.0]], [[6.0, 8.0], [0.0, 0.5]]], requires_grad=True)
    out = mask(emb)  # norms: [[0.5, 5], [10, 0.5]] vs threshold 1.0
    np.testing.assert_array_equal(out.detach().numpy(), [[[0, 0], [3, 4]], [[6, 8], [0, 0]]])
    (out.sum() + mask.regularization()).backward()
    assert mask.threshold.grad is not None and torch.all(mask.threshold.grad != 0)
    assert emb.grad is not None and torch.all(emb.grad[0, 1] != 0)
    with pytest.raises(ValueError, match="B, 2, dim"):
        mask(torch.zeros(3, 4, 2))


def test_optembed_prune_frees_exactly_the_rows_under_each_fields_threshold(ps: PSClient) -> None:
    from embps.client.torch import OptEmbedMask

    tables = ["oe_a", "oe_b"]
    for name in tables:
        ps.create_table(TableConfig(name, 4, initializer=Initializer("uniform", -1.0, 1.0)))
        ps.pull(name, np.arange(200), train=True)
    before = {n: ps.pull(n, np.arange(200), train=False) for n in tables}
    mask = OptEmbedMask(num_fields=2, norm="l2")
    with torch.no_grad():
        mask.threshold.copy_(torch.tensor([0.8, 0.0]))
    bytes_before = sum(s.tables["oe_a"]["bytes"] for s in ps.stats("oe_a"))
    res = mask.prune(ps, tables)
    expect_gone = np.linalg.norm(before["oe_a"], axis=1) < 0.8
    assert res[0].rows == int(expect_gone.sum()) > 0
    assert res[1].rows == 0  # threshold 0 prunes nothing
    after = ps.pull("oe_a", np.arange(200), train=False)
    np.testing.assert_array_equal(after[expect_gone], 0.0)  # deleted rows read the default
    np.testing.assert_array_equal(after[~expect_gone], before["oe_a"][~expect_gone])
    assert sum(s.tables["oe_a"]["keys"] for s in ps.stats("oe_a")) == 200 - res[0].rows
    bytes_after = sum(s.tables["oe_a"]["bytes"] for s in ps.stats("oe_a"))
    assert res[0].bytes == bytes_before - bytes_after > 0
