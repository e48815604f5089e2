"""The Narrow RPC against real in-process shards: exactly the first d columns of every row
and of its optimizer slots are kept, the config follows, and bad requests get exact codes
with nothing changed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from embps.client import PSClient, TableConfig
from embps.protos.config import FTRL, SGD, Adagrad, Adam
from embps.server.service import ShardServer
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

Factory = Callable[..., list[ShardServer]]
DIM = 8
KEYS = np.arange(0, 400, 3, dtype=np.int64)

KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "dynamic": {},
    "static": {"kind": "static", "hash_bucket_size": 64},
    "adaptive": {"kind": "adaptive", "hash_bucket_size": 32, "promote_threshold": 2},
    "qr": {"kind": "qr", "qr_quotient_buckets": 16, "qr_remainder_buckets": 16,
           "qr_combiner": "mult"},
}  # fmt: skip
OPTIMIZERS = {"sgd": SGD(lr=0.1), "adagrad": Adagrad(lr=0.1), "adam": Adam(lr=0.01),
              "ftrl": FTRL(alpha=0.1)}  # fmt: skip


def _trained(
    factory: Factory, kind: str, opt: str, shards: int = 2
) -> tuple[list[ShardServer], PSClient]:
    cfg = TableConfig("t", DIM, optimizer=OPTIMIZERS[opt], seed=7, **KIND_OPTIONS[kind])
    servers = factory(shards, tables=(cfg,))
    ps = PSClient([s.address for s in servers])
    rng = np.random.default_rng(0)
    for step in range(3):  # pulls twice: adaptive keys get promoted
        ps.pull("t", KEYS)
        ps.push("t", KEYS, rng.normal(size=(KEYS.shape[0], DIM)).astype(np.float32), step=step)
    return servers, ps


def _arrays(servers: list[ShardServer]) -> list[dict[str, np.ndarray]]:
    """Every array of table t's full snapshot, per shard (replay state left out)."""
    return [
        {k: v for k, v in s.engine.table("t").snapshot().arrays.items() if "." in k}
        for s in servers
    ]


def _first_columns(name: str, a: np.ndarray, d: int, n_slots: int) -> np.ndarray:
    if name.endswith(".values"):
        return a[:, :d]
    if name.endswith(".slots"):
        return a.reshape(a.shape[0], n_slots, DIM)[:, :, :d].reshape(a.shape[0], n_slots * d)
    return a


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind", sorted(KIND_OPTIONS))
def test_narrow_keeps_exactly_the_first_columns_and_slots(
    inproc_factory: Factory, kind: str, opt: str
) -> None:
    servers, ps = _trained(inproc_factory, kind, opt)
    with ps:
        n_slots = servers[0].engine.table("t").n_slots
        before = _arrays(servers)
        bytes_before = sum(s.engine.table("t").memory_bytes() for s in servers)
        rows_before = ps.pull("t", KEYS, train=False)
        res = ps.narrow("t", 3)
        assert (res.old_dim, res.dim) == (DIM, 3)
        after = _arrays(servers)
        for b, a in zip(before, after, strict=True):
            assert sorted(b) == sorted(a)
            for name, arr in b.items():
                if name.endswith(".version"):
                    continue  # every row changed: versions move on
                want = _first_columns(name, arr, 3, n_slots)
                np.testing.assert_array_equal(a[name], want, err_msg=name)
                assert a[name].dtype == arr.dtype
        bytes_after = sum(s.engine.table("t").memory_bytes() for s in servers)
        assert res.bytes == bytes_before - bytes_after > 0
        # what the clients see follows: pulls, the config, a push at the new dim
        np.testing.assert_array_equal(ps.pull("t", KEYS, train=False), rows_before[:, :3])
        assert {c.name: c.dim for c in ps.describe_tables()} == {"t": 3}
        ps.push("t", KEYS, np.ones((KEYS.shape[0], 3), np.float32), step=3)
        assert ps.pull("t", KEYS, train=False).shape == (KEYS.shape[0], 3)
        # the same dim again changes nothing and frees nothing
        assert ps.narrow("t", 3).bytes == 0


def test_narrow_to_the_full_dim_changes_nothing(inproc_factory: Factory) -> None:
    servers, ps = _trained(inproc_factory, "dynamic", "adagrad", shards=1)
    with ps:
        before = _arrays(servers)
        assert ps.narrow("t", DIM).bytes == 0
        for name, a in _arrays(servers)[0].items():
            np.testing.assert_array_equal(a, before[0][name], err_msg=name)


def test_incremental_snapshot_over_a_narrow_is_refused(inproc_factory: Factory) -> None:
    servers, ps = _trained(inproc_factory, "dynamic", "sgd", shards=1)
    with ps:
        table = servers[0].engine.table("t")
        v = table.snapshot().state["version"]
        ps.narrow("t", 2)
        with pytest.raises(ValueError, match="take a full snapshot"):
            table.snapshot(since_version=v)
        assert table.snapshot().config.dim == 2


@pytest.mark.parametrize(
    ("table", "dim", "code", "message"),
    [
        ("t", 0, grpc.StatusCode.INVALID_ARGUMENT, "narrow dim must be in [1, 8]"),
        ("t", DIM + 1, grpc.StatusCode.INVALID_ARGUMENT, "narrow dim must be in [1, 8]"),
        ("qc", 2, grpc.StatusCode.FAILED_PRECONDITION, "concat combiner"),
        ("nope", 2, grpc.StatusCode.NOT_FOUND, "nope"),
    ],
)
def test_bad_narrow_requests_get_exact_codes_and_change_nothing(
    inproc_factory: Factory, table: str, dim: int, code: grpc.StatusCode, message: str
) -> None:
    qc = TableConfig("qc", DIM, kind="qr", qr_quotient_buckets=8, qr_remainder_buckets=8,
                     qr_combiner="concat", optimizer=Adagrad(lr=0.1))  # fmt: skip
    (server,) = inproc_factory(1, tables=(TableConfig("t", DIM, optimizer=Adagrad()), qc))
    with PSClient([server.address]) as ps:
        ps.pull("t", KEYS)
        ps.push("t", KEYS, np.ones((KEYS.shape[0], DIM), np.float32))
    snaps = {n: server.engine.table(n).snapshot().arrays for n in ("t", "qc")}
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Narrow(pb.NarrowRequest(table=table, dim=dim, num_shards=1))
        assert e.value.code() == code
        assert message in e.value.details()
        dims = {c.name: c.dim for c in stub.DescribeTables(pb.DescribeTablesRequest()).tables}
    assert dims == {"t": DIM, "qc": DIM}
    for n, arrays in snaps.items():
        now = server.engine.table(n).snapshot().arrays
        for k, a in arrays.items():
            np.testing.assert_array_equal(now[k], a, err_msg=f"{n} {k}")


def test_narrow_with_the_wrong_shard_count_is_refused(inproc_factory: Factory) -> None:
    (server,) = inproc_factory(1, tables=(TableConfig("t", DIM),))
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Narrow(pb.NarrowRequest(table="t", dim=2, num_shards=3))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert server.engine.table("t").dim == DIM


# --------------------------------------------------------------------------
# The supernet's thresholds and the bench's retraining stage
# --------------------------------------------------------------------------


def test_regularizer_moves_the_thresholds_up_from_their_init() -> None:
    """Trained with its regularizer, a useless field's threshold climbs from its init (its
    rows get pruned) while the field the label depends on stays lower; with weight 0 the
    useless field's threshold stays low."""
    torch = pytest.importorskip("torch")
    from embps.client.optembed import OptEmbedField, OptEmbedSupernet

    def trained(weight: float) -> np.ndarray:
        torch.manual_seed(0)
        net = OptEmbedSupernet(2, 8, (2, 4, 8), weight=weight)
        embs = [OptEmbedField(torch.nn.Embedding(50, 8), net, f) for f in range(2)]
        for e in embs:
            torch.nn.init.uniform_(e.inner.weight, -0.1, 0.1)
        head = torch.nn.Linear(16, 1)
        params = [p for m in (*embs, head) for p in m.parameters()]
        opt = torch.optim.Adam(list(dict.fromkeys(params)), lr=5e-3)
        rng = np.random.default_rng(0)
        for _ in range(100):
            ids = torch.from_numpy(rng.integers(0, 50, size=(64, 2)))
            y = (ids[:, 0] % 2).float()
            x = torch.cat([e(ids[:, f]) for f, e in enumerate(embs)], dim=1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x).squeeze(1), y)
            opt.zero_grad()
            (loss + net.regularization()).backward()
            opt.step()
        return net.mask.threshold.detach().numpy()

    moved = trained(1e-1)  # field 0 decides the label, field 1 is noise
    assert moved[1] > 0.3, moved  # 100 Adam steps of 5e-3 at most: 0.5
    assert moved[0] < moved[1] - 0.2, moved  # the task loss holds the useful field back
    assert trained(0.0)[1] < moved[1] - 0.2


def test_training_goes_on_where_an_earlier_call_stopped(inproc_factory: Factory) -> None:
    """``train(start_step=k, optimizer=opt)`` (how the bench's OptEmbed trains the found
    architecture after its search): batches from k on, the same dense optimizer going on
    (its step count adds up), the embeddings' step counters from k."""
    torch = pytest.importorskip("torch")
    import io

    from embps.client.bench import memory as bm
    from embps.client.demo.job import Progress, train
    from embps.client.torch import RemoteEmbedding

    cfg = bm.demo_config(bm.Preset(steps=3, batch_size=64, eval_samples=256), 0, quick=True)
    data = bm.make_data(0)
    tables = tuple(TableConfig(f"f{f}", bm.DIM, optimizer=Adagrad(lr=0.05)) for f in range(4))
    servers = inproc_factory(2, tables=tables)
    starts: list[int] = []

    class Spy:
        num_fields, num_dense = data.num_fields, data.num_dense

        def batches(self, batch_size: int, n: int, start: int = 0) -> Any:
            starts.append(start)
            return data.batches(batch_size, n, start)

    with PSClient([s.address for s in servers]) as ps:
        embs = [RemoteEmbedding(ps, t.name, staleness=1) for t in tables]
        s = bm._Session(ps, cfg, data, data.generate(10_000, 256))
        model = s.model_for(embs)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.dense_lr)
        curve = s.curve
        train(cfg, Spy(), model, embs, [], ps, curve, Progress(3, io.StringIO()), optimizer=opt)
        train(cfg, Spy(), model, embs, [], ps, curve, Progress(3, io.StringIO()),
              start_step=3, optimizer=opt)  # fmt: skip
        model.close()
    assert starts == [0, 3 * 64]
    first = next(p for p in model.parameters() if p in opt.state)
    assert int(opt.state[first]["step"]) == 6  # one optimizer through both calls
    assert [e.step for e in embs] == [6] * 4  # counted on from 3, not restarted at 0
