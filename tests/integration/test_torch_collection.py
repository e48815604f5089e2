"""RemoteEmbeddingCollection / RemoteEmbeddingBagCollection against a real 2-shard
`embps serve`: one RPC per shard per step, parity with local torch (SGD, Adagrad,
Adam; shared tables; sum and mean bags), the held push and flush, pipelining with
bounded staleness, bad input."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

from support.cluster import Cluster, start_cluster  # noqa: E402

from embps.client import SGD, Adagrad, Adam, PSClient, TableConfig  # noqa: E402
from embps.client.torch import (  # noqa: E402
    FieldColumns,
    JaggedIds,
    Pooling,
    RemoteEmbeddingBagCollection,
    RemoteEmbeddingCollection,
    RemoteTableConfig,
)
from embps.protos.config import Initializer  # noqa: E402

# torch's own sparse Adagrad (the local reference) warns about its invariant checks
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

V, D, B = 50, 8, 16
NUM_SHARDS = 2
_names = (f"t{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def ps() -> Iterator[PSClient]:
    cluster: Cluster = start_cluster(NUM_SHARDS)
    try:
        with PSClient(cluster.addresses, timeout=20.0) as client:
            client.wait_ready(timeout=60)
            yield client
    finally:
        cluster.stop()


def _table(ps: PSClient, dim: int = D, **kw: Any) -> str:
    name = next(_names)
    kw.setdefault("optimizer", SGD(lr=1.0))
    kw.setdefault("initializer", Initializer("zeros"))
    ps.create_table(TableConfig(name, dim, **kw))
    return name


# --------------------------------------------------------------------------
# Edge cases first: empty batches, config and input errors
# --------------------------------------------------------------------------


def test_empty_batch_and_empty_bags(ps: PSClient) -> None:
    t = _table(ps)
    ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["a", "b"])])
    out = ec({"a": torch.zeros(0, dtype=torch.int64), "b": torch.zeros(0, 3, dtype=torch.int64)})
    assert out["a"].shape == (0, D) and out["b"].shape == (0, 3, D)
    (out["a"].sum() + out["b"].sum()).backward()  # nothing to push
    ec.flush()
    ebc = RemoteEmbeddingBagCollection(ps, [RemoteTableConfig(t, ["a"], pooling="mean")])
    empty = JaggedIds(torch.zeros(0, dtype=torch.int64), torch.tensor([0, 0, 0]))
    np.testing.assert_array_equal(ebc({"a": empty})["a"].detach().numpy(), np.zeros((2, D)))


def test_config_errors(ps: PSClient) -> None:
    t = _table(ps)
    with pytest.raises(ValueError, match="do not exist on the PS"):
        RemoteEmbeddingCollection(ps, [RemoteTableConfig("no_such_table", ["f"])])
    with pytest.raises(ValueError, match="Duplicate table name"):
        RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f"]), RemoteTableConfig(t, ["g"])])
    u = _table(ps)
    with pytest.raises(ValueError, match="feature 'f' is in tables"):
        RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f"]), RemoteTableConfig(u, ["f"])])
    with pytest.raises(ValueError, match="pooling is for RemoteEmbeddingBagCollection"):
        RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f"], pooling="sum")])
    with pytest.raises(ValueError, match="staleness"):
        RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f"])], staleness=-1)
    with pytest.raises(ValueError, match="pooling must be 'sum' or 'mean'"):
        RemoteTableConfig(t, ["f"], pooling="max")
    with pytest.raises(ValueError, match="list of names"):
        RemoteTableConfig(t, "f")
    with pytest.raises(ValueError, match="empty"):
        RemoteTableConfig(t, [])
    with pytest.raises(ValueError, match="duplicate feature"):
        RemoteTableConfig(t, ["f", "f"])
    assert RemoteTableConfig(t, ["f"], pooling="MEAN").pooling is Pooling.MEAN
    ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f"])])
    with pytest.raises(RuntimeError, match="staleness"):
        ec.prefetch({"f": torch.tensor([1])})


def test_bad_input_is_refused_before_anything_is_sent(ps: PSClient) -> None:
    t = _table(ps)
    ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f", "g"])])
    ec({"f": torch.tensor([1]), "g": torch.tensor([2])})["f"].sum().backward()  # a held push
    sent = ps.rpcs_sent
    ok = torch.tensor([1])
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['zzz'\]"):
        ec({"f": ok, "g": ok, "zzz": ok})
    with pytest.raises(ValueError, match=r"feature\(s\) \['g'\] missing"):
        ec({"f": ok})
    with pytest.raises(ValueError, match="feature 'g': ids must be an integer tensor"):
        ec({"f": ok, "g": torch.tensor([1.5])})
    with pytest.raises(ValueError, match="feature 'g': ids must be integers"):
        ec({"f": ok, "g": np.array([1.5])})
    with pytest.raises(ValueError, match="feature 'f': RemoteEmbeddingCollection takes id"):
        ec({"f": JaggedIds(ok, torch.tensor([0, 1])), "g": ok})
    with pytest.raises(ValueError, match="input must be a dict"):
        ec(ok)
    assert ps.rpcs_sent == sent  # nothing reached the PS: the held push is still held
    ec.flush()
    np.testing.assert_array_equal(ps.pull(t, [1, 2], train=False), [[-1] * D, [0] * D])

    ebc = RemoteEmbeddingBagCollection(ps, [RemoteTableConfig(t, ["bag"])])
    sent = ps.rpcs_sent
    vals = torch.tensor([1, 2, 3])
    bad_offsets = {
        "EmbeddingBag starts": torch.tensor([0, 2]),
        "not from 0": torch.tensor([1, 2, 3]),
        "past the end": torch.tensor([0, 2, 4]),
        "decreasing": torch.tensor([0, 2, 1, 3]),
        "2-D": torch.tensor([[0, 3]]),
        "float": torch.tensor([0.0, 3.0]),
        "empty": torch.zeros(0, dtype=torch.int64),
    }
    for why, off in bad_offsets.items():
        with pytest.raises(ValueError, match="feature 'bag': offsets must be"):
            ebc({"bag": JaggedIds(vals, off)})
            pytest.fail(why)
    with pytest.raises(ValueError, match="feature 'bag': JaggedIds values must be 1-D"):
        ebc({"bag": JaggedIds(vals.view(3, 1), torch.tensor([0, 3]))})
    with pytest.raises(ValueError, match="feature 'bag': bags are JaggedIds"):
        ebc({"bag": vals})  # 1-D ids without offsets
    with pytest.raises(ValueError, match="feature 'bag': ids must be an integer"):
        ebc({"bag": JaggedIds(torch.tensor([0.5]), torch.tensor([0, 1]))})
    assert ps.rpcs_sent == sent


# --------------------------------------------------------------------------
# Parity with local torch (synchronous mode)
# --------------------------------------------------------------------------

OPTIMIZERS: dict[str, tuple[Any, Callable[[list[Any]], Any]]] = {
    "sgd": (SGD(lr=0.3), lambda p: torch.optim.SGD(p, lr=0.3)),
    "adagrad": (
        Adagrad(lr=0.1, eps=1e-10),
        lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10),
    ),
    "adam": (
        Adam(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8),
        lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.9, 0.999), eps=1e-8),
    ),
}


def _local_copy(ps: PSClient, table: str) -> torch.nn.Embedding:
    """A local sparse nn.Embedding holding the PS table's initial rows of ids 0..V-1."""
    local = torch.nn.Embedding(V, D, sparse=True)
    with torch.no_grad():
        local.weight.copy_(torch.from_numpy(ps.pull(table, np.arange(V), train=True)))
    return local


def _assert_rows_equal(ps: PSClient, table: str, weight: torch.Tensor) -> float:
    got = ps.pull(table, np.arange(V), train=False)
    want = weight.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return float(np.abs(got - want).max())


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_sync_collection_equals_local_torch(ps: PSClient, opt: str) -> None:
    """Tables "a" (features u and hist (B, 2): a shared table) and "b" (feature v)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    server_opt, torch_opt = OPTIMIZERS[opt]
    init = Initializer("normal", 0.0, 0.3)
    a = _table(ps, optimizer=server_opt, initializer=init)
    b = _table(ps, optimizer=server_opt, initializer=init)
    local = {a: _local_copy(ps, a), b: _local_copy(ps, b)}
    ec = RemoteEmbeddingCollection(
        ps, [RemoteTableConfig(a, ["u", "hist"]), RemoteTableConfig(b, ["v"])]
    )
    assert ec.embedding_dims == {"u": D, "hist": D, "v": D}
    head_local = torch.nn.Sequential(torch.nn.Linear(4 * D, 16), torch.nn.ReLU(),
                                     torch.nn.Linear(16, 1))  # fmt: skip
    head_remote = copy.deepcopy(head_local)
    opt_local = [torch_opt([e.weight for e in local.values()]),
                 torch.optim.SGD(head_local.parameters(), lr=0.1)]  # fmt: skip
    opt_remote = torch.optim.SGD(head_remote.parameters(), lr=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def local_forward(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "u": local[a](feats["u"]),
            "hist": local[a](feats["hist"]),
            "v": local[b](feats["v"]),
        }

    for t in range(12):
        feats = {
            "u": torch.from_numpy(rng.integers(0, V, B)),
            "hist": torch.from_numpy(rng.integers(0, V, (B, 2))),  # overlaps u: one push group
            "v": torch.from_numpy(rng.integers(0, V, B)),
        }
        y = torch.from_numpy(rng.integers(0, 2, B).astype(np.float32))
        losses = []
        sent = ps.rpcs_sent
        for fwd, head, opts in ((local_forward, head_local, opt_local),
                                (ec, head_remote, [opt_remote])):  # fmt: skip
            for o in opts:
                o.zero_grad()
            out = fwd(feats)
            x = torch.cat([out["u"], out["hist"].flatten(1), out["v"]], dim=1)
            loss = loss_fn(head(x).squeeze(1), y)
            loss.backward()
            for o in opts:
                o.step()
            losses.append(loss.item())
        # one Step RPC per shard: step t's pull carries step t-1's push
        assert ps.rpcs_sent - sent == NUM_SHARDS, t
        assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6), t
    assert ec.step == 12
    ec.flush()
    _assert_rows_equal(ps, a, local[a].weight)
    _assert_rows_equal(ps, b, local[b].weight)
    for p_local, p_remote in zip(head_local.parameters(), head_remote.parameters(), strict=True):
        np.testing.assert_allclose(p_remote.detach().numpy(), p_local.detach().numpy(),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_sync_bag_collection_equals_local_torch(ps: PSClient, pooling: str) -> None:
    """Table x (jagged "clicks" and fixed-length "views": shared, ``pooling``) and table
    y (jagged "tags", sum), Adagrad; empty bags included."""
    rng = np.random.default_rng(2)
    init = Initializer("uniform", -0.5, 0.5)
    x = _table(ps, optimizer=Adagrad(lr=0.1, eps=1e-10), initializer=init)
    y = _table(ps, optimizer=Adagrad(lr=0.1, eps=1e-10), initializer=init)
    local = {x: _local_copy(ps, x), y: _local_copy(ps, y)}
    opt_local = torch.optim.Adagrad([e.weight for e in local.values()], lr=0.1, eps=1e-10)
    ebc = RemoteEmbeddingBagCollection(
        ps,
        [RemoteTableConfig(x, ["clicks", "views"], pooling=pooling),
         RemoteTableConfig(y, ["tags"])],
    )  # fmt: skip
    target = torch.from_numpy(rng.normal(size=(B, 3 * D)).astype(np.float32))

    def bag(table: str, ids: Any, mode: str) -> torch.Tensor:
        w = local[table].weight
        if isinstance(ids, JaggedIds):
            return torch.nn.functional.embedding_bag(
                ids.values, w, ids.offsets, mode=mode, sparse=True, include_last_offset=True
            )
        return torch.nn.functional.embedding_bag(ids, w, mode=mode, sparse=True)

    for t in range(10):
        feats: dict[str, Any] = {
            "clicks": JaggedIds.from_lengths(
                torch.from_numpy(rng.integers(0, V, int((n := rng.integers(0, 4, B)).sum()))), n
            ),
            "views": torch.from_numpy(rng.integers(0, V, (B, 3))),
            "tags": JaggedIds.from_lengths(
                torch.from_numpy(rng.integers(0, V, int((m := rng.integers(0, 3, B)).sum()))), m
            ),
        }
        opt_local.zero_grad()
        out_local = torch.cat([bag(x, feats["clicks"], pooling), bag(x, feats["views"], pooling),
                               bag(y, feats["tags"], "sum")], dim=1)  # fmt: skip
        loss_local = (out_local - target).pow(2).sum()
        loss_local.backward()
        opt_local.step()
        sent = ps.rpcs_sent
        out = ebc(feats)
        assert out["clicks"].shape == (B, D)
        loss = (torch.cat([out["clicks"], out["views"], out["tags"]], dim=1) - target).pow(2).sum()
        loss.backward()
        assert ps.rpcs_sent - sent == NUM_SHARDS, t
        assert loss.item() == pytest.approx(loss_local.item(), rel=1e-5), t
    ebc.eval()  # flushes the held push
    _assert_rows_equal(ps, x, local[x].weight)
    _assert_rows_equal(ps, y, local[y].weight)


# --------------------------------------------------------------------------
# The held push: flush, eval, inference, gradient accumulation
# --------------------------------------------------------------------------


def test_held_push_is_sent_by_the_next_pull_flush_or_eval(ps: PSClient) -> None:
    t = _table(ps, dim=2)
    ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f", "g"])], start_step=5)
    for k in range(3):
        out = ec({"f": torch.tensor([7, 7]), "g": torch.tensor([[7]])})  # key 7 three times
        assert out["f"][0, 0].item() == -3 * k  # every earlier push seen: exactly synchronous
        (out["f"].sum() + out["g"].sum()).backward()
        assert ps.pull(t, [7], train=False)[0, 0] == -3 * k  # held, not sent yet
    assert ec.step == 8
    ec.flush()
    assert ps.pull(t, [7], train=False)[0, 0] == -9
    assert ps.stats(t)[0].tables[t]["step"] == 7  # the last push carried step 7

    ec({"f": torch.tensor([7]), "g": torch.tensor([[8]])})["f"].sum().backward()
    ec.eval()  # flushes: inference pulls see every push
    assert ps.pull(t, [7], train=False)[0, 0] == -10
    out = ec({"f": torch.tensor([7]), "g": torch.tensor([[9]])})
    assert not out["f"].requires_grad
    np.testing.assert_array_equal(out["g"].numpy(), [[[0, 0]]])  # an inference pull: no row made
    ec.train()
    with torch.no_grad():
        ec({"f": torch.tensor([7]), "g": torch.tensor([[7]])})
    ec.flush()
    assert ps.pull(t, [7], train=False)[0, 0] == -10  # no_grad: nothing pushed


def test_a_batch_is_deduplicated_once(ps: PSClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The collection plans each table's keys (dedup + route) and the client takes the plan
    as it is, for the pull and for the fused push: the client plans no group again."""
    import embps.client.ps_client as ps_client

    t = _table(ps, dim=2)
    ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f", "g"])])
    replanned: list[int] = []
    real = ps_client.plan_groups

    def spy(keys: list[np.ndarray], num_shards: int, first: int = 0) -> Any:
        replanned.extend(k.shape[0] for k in keys)
        return real(keys, num_shards, first)

    monkeypatch.setattr(ps_client, "plan_groups", spy)
    for _ in range(3):
        out = ec({"f": torch.tensor([3, 1, 3, 5]), "g": torch.tensor([[1], [9]])})
        (out["f"].sum() + out["g"].sum()).backward()
    ec.flush()
    assert replanned == [], replanned
    # and the rows are right: keys 1 and 3 were pulled and pushed twice a step (SGD lr 1)
    np.testing.assert_array_equal(ps.pull(t, [1, 3, 5, 9], train=False)[:, 0], [-6, -6, -3, -3])


def test_two_backwards_before_the_next_pull_send_the_first_alone(ps: PSClient) -> None:
    t = _table(ps, dim=2)
    ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f"])])
    first = ec({"f": torch.tensor([1])})["f"]
    second = ec({"f": torch.tensor([1])})["f"]
    (first.sum() + 2 * second.sum()).backward()  # two autograd nodes: two pushes, two steps
    assert ec.step == 2
    ec.flush()
    assert ps.pull(t, [1], train=False)[0, 0] == -3


# --------------------------------------------------------------------------
# Pipelined mode
# --------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch_after_backward", [False, True])
def test_pipelined_staleness_and_one_rpc_per_shard_per_step(
    ps: PSClient, prefetch_after_backward: bool
) -> None:
    """SGD(lr=1), zeros: every step lowers the batch's keys by 2 (features f and g share
    the table and carry the same ids, 0..9: keys on both shards).

    Prefetch issued before the backward: batch k's rows miss exactly batch k-1's push
    (staleness 1). Issued after it: they miss nothing. Either way each step is one
    request per shard (the prefetch carries the held push) and nothing is lost.
    """
    t = _table(ps, dim=2)
    ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, ["f", "g"])], staleness=2)
    ids = torch.arange(10)
    batch = {"f": ids, "g": ids}
    steps = 12
    sent = ps.rpcs_sent
    ec.prefetch(batch)
    for k in range(steps):
        out = ec(batch)
        expect = -2 * k if prefetch_after_backward else -2 * max(k - 1, 0)
        np.testing.assert_array_equal(out["f"].detach().numpy(), expect, err_msg=str(k))
        if not prefetch_after_backward and k + 1 < steps:
            ec.prefetch(batch)
        (out["f"].sum() + out["g"].sum()).backward()
        if prefetch_after_backward and k + 1 < steps:
            ec.prefetch(batch)
    ec.close()
    # One call per step (each prefetch; every one after the first two carries a push),
    # then the pushes no prefetch carried: the last one (after backward), the last two
    # (before backward: the last step's backward sends the previous push alone).
    alone = 1 if prefetch_after_backward else 2
    assert ps.rpcs_sent - sent == (steps + alone) * NUM_SHARDS
    np.testing.assert_array_equal(ps.pull(t, ids, train=False), np.full((10, 2), -2 * steps))


def test_pipelined_training_learns(ps: PSClient) -> None:
    """Rows regress onto fixed targets through a pipelined collection: the loss falls."""
    rng = np.random.default_rng(3)
    a = _table(ps, optimizer=Adagrad(lr=0.3), initializer=Initializer("normal", 0.0, 0.1))
    b = _table(ps, optimizer=Adam(lr=0.05), initializer=Initializer("normal", 0.0, 0.1))
    ec = RemoteEmbeddingCollection(
        ps, [RemoteTableConfig(a, ["u"]), RemoteTableConfig(b, ["v", "w"])], staleness=1
    )
    target = torch.from_numpy(rng.normal(size=(V, D)).astype(np.float32))
    batches = [
        {f: torch.from_numpy(rng.integers(0, V, B)) for f in ("u", "v", "w")} for _ in range(60)
    ]
    losses = []
    ec.prefetch(batches[0])
    for k, feats in enumerate(batches):
        out = ec(feats)
        if k + 1 < len(batches):
            ec.prefetch(batches[k + 1])
        loss = sum((out[f] - target[feats[f]]).pow(2).mean() for f in out)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        losses.append(loss.item())
    ec.close()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses


def test_field_columns_feed_a_dlrm(ps: PSClient) -> None:
    """(B, F) id columns -> (B, F, dim) through one collection, as the demo uses it."""
    from embps.client.demo.models import DLRM

    tables = [_table(ps, optimizer=Adagrad(lr=0.05)) for _ in range(3)]
    ec = RemoteEmbeddingCollection(
        ps, [RemoteTableConfig(t, [f"c{i}"]) for i, t in enumerate(tables)], staleness=1
    )
    cols = FieldColumns(ec)
    model = DLRM([cols], num_dense=2, dim=D, num_fields=3)
    sparse = torch.from_numpy(np.random.default_rng(4).integers(0, V, (B, 3)))
    sent = ps.rpcs_sent
    model.prefetch(sparse)
    model(sparse, torch.zeros(B, 2)).sum().backward()  # holds the push of step 0
    cols.step = 10
    model.prefetch(sparse)  # carries it
    model(sparse, torch.zeros(B, 2)).sum().backward()  # holds the push of step 10
    model.eval()  # flush: sends it alone
    assert ps.rpcs_sent - sent == 3 * NUM_SHARDS
    assert [s.tables[tables[0]]["step"] for s in ps.stats(tables[0])] == [10] * NUM_SHARDS
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        cols(sparse[:, :2])
    model.close()
