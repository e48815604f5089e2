"""Promise audit: every `TableConfig` option and every `embps serve` flag, shown acting in
a real `embps serve` process.

One row per promise: ``Promise(name, effect, check)``, where ``name`` is the option or
flag as README.md writes it ("Table kinds" options, "Command line" flags; ``option=value``
where one option has several behaviours), ``effect`` is what the row observes and
``check`` observes it. ``test_promise`` runs every row with the name as its id, so a
failure names the promise it broke. Each check asserts an effect that the option's
absence (or its default) would not produce; where that is not obvious from the check
alone it runs the default beside it.

Table options run against ONE shared 2-shard ``embps serve --evict-every 0`` (module
fixture; each row makes its own tables). Flags start their own short-lived processes,
with short periods and bounded waits (``--evict-every 0.5``, ``--checkpoint-every 1``,
``--drain-delay-seconds 1.5``, ``--grace-seconds 0.5``). The meta-tests keep the rows
complete: every field of ``TableConfig``, every option of README's options table, every
flag `embps serve --help` prints and every flag of README's flag table has a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.certs import Certs, make_certs
from support.cluster import Cluster, free_port_range, running_cluster, wait_ready, wait_until

from embps.client import (
    FTRL,
    SGD,
    Adagrad,
    Adam,
    CheckpointFailedError,
    PermissionDeniedError,
    PSClient,
    ResourceExhaustedError,
    ShardMismatchError,
    TableNotFoundError,
    TLSConfig,
    UnauthenticatedError,
    UnavailableError,
)
from embps.client.exceptions import EmbpsError
from embps.protos import codec
from embps.protos.config import Initializer, TableConfig
from embps.protos.routing import shard_of
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

README = Path(__file__).resolve().parents[2] / "README.md"
DIM = 4
ANY_PORTS = ("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0")
BIG_MESSAGE = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
]


# --------------------------------------------------------------------------
# Rows and the context a check runs in
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Promise:
    """One documented option or flag and how to see it act.

    name: ``option``, ``option=value`` or ``--flag``; the test id. effect: what ``check``
    observes, in one line. check: starts what it needs (a table on the shared cluster,
    a process of its own) and asserts the effect.
    """

    name: str
    effect: str
    check: Callable[[Ctx], None]

    @property
    def option(self) -> str:
        """The option or flag alone (``optimizer=adam`` -> ``optimizer``)."""
        return self.name.split("=")[0]


@dataclasses.dataclass
class Shared:
    """The module's 2-shard cluster (`--port port --metrics-port metrics_port`) and a client."""

    cluster: Cluster
    ps: PSClient
    port: int
    metrics_port: int


class Ctx:
    """What a check gets: the shared cluster (started on first use), new processes
    (stopped at the end of the test), certificates, a temporary directory."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path, slug: str) -> None:
        self._request = request
        self.tmp = tmp
        self.slug = slug
        self._n = 0

    @functools.cached_property
    def shared(self) -> Shared:
        return self._request.getfixturevalue("shared")

    @property
    def ps(self) -> PSClient:
        return self.shared.ps

    @functools.cached_property
    def certs(self) -> Certs:
        return self._request.getfixturevalue("certs")

    @functools.cached_property
    def _factory(self) -> Callable[..., Cluster]:
        return self._request.getfixturevalue("cluster_factory")

    def name(self) -> str:
        """A table name no other row uses."""
        self._n += 1
        return f"{self.slug}_{self._n}"

    def create(self, dim: int = DIM, **options: Any) -> TableConfig:
        """A new table on the shared cluster (options: TableConfig's)."""
        cfg = TableConfig(self.name(), dim, **options)
        assert self.ps.create_table(cfg)
        return cfg

    def serve(self, n: int, *args: str) -> Cluster:
        """`embps serve --shards n` on any free ports plus ``args``, once every shard listens."""
        return self._factory(n, *args)

    def shard(self, *args: str, shard_id: int = 0, shards: int = 1) -> Cluster:
        """`embps serve --shard-id i --shards n` on any free ports plus ``args`` (one process,
        no supervisor: half the processes of ``serve``), once it listens."""
        c = self.launch("--shard-id", str(shard_id), "--shards", str(shards), *ANY_PORTS, *args)
        return wait_ready(c, shards, ids=[shard_id])

    def launch(self, *args: str) -> Cluster:
        """`embps serve ARGS` exactly as given, at once (``wait_ready`` or ``wait`` on it)."""
        return self._factory(None, *args)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def keys_on(shard: int, n: int, num_shards: int = 2, start: int = 0) -> np.ndarray:
    """The n smallest keys >= start that ``shard`` owns: int64 (n,), ascending."""
    cand = np.arange(start, start + 8 * num_shards * n + 64, dtype=np.int64)
    mine = cand[shard_of(cand, num_shards) == shard][:n]
    assert mine.shape[0] == n
    return mine


def total(ps: PSClient, table: str, field: str) -> int:
    """A Stats field summed over the shards."""
    return int(sum(s.tables[table][field] for s in ps.stats(table)))


def per_shard(ps: PSClient, table: str, field: str) -> list[int]:
    return [int(s.tables[table][field]) for s in ps.stats(table)]


@contextlib.contextmanager
def stub(address: str) -> Iterator[pb_grpc.ParameterServerStub]:
    """A raw stub (no client-side splitting, routing or checks) on its own channel."""
    with grpc.insecure_channel(address, options=BIG_MESSAGE) as ch:
        yield pb_grpc.ParameterServerStub(ch)


def pull_request(table: str, keys: np.ndarray, num_shards: int, train: bool = True) -> Any:
    return pb.PullRequest(
        table=table,
        keys=codec.encode_keys(np.asarray(keys, np.int64)),
        train=train,
        num_shards=num_shards,
    )


def rpc(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of a raw call."""
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def raw_pull(address: str, table: str, keys: np.ndarray, num_shards: int) -> tuple[Any, str]:
    """(status code, details) of one raw training Pull."""
    with stub(address) as s:
        return rpc(lambda: s.Pull(pull_request(table, keys, num_shards), timeout=30))


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        req = health_pb2.HealthCheckRequest(service="")
        return int(health_pb2_grpc.HealthStub(ch).Check(req, timeout=5).status)


def steps(root: Path) -> list[int]:
    """Complete checkpoint steps under ``root`` (every shard directory has its manifest)."""
    out = []
    for d in sorted(root.glob("[0-9]*"), key=lambda p: int(p.name)):
        shards = list(d.glob("shard-*-of-*"))
        if shards and all((s / "manifest.json").is_file() for s in shards):
            n = int(shards[0].name.rsplit("-", 1)[1])
            if len(shards) == n:
                out.append(int(d.name))
    return out


def manifest(root: Path, step: int, shard: int = 0, n: int = 1) -> dict[str, Any]:
    return json.loads((root / str(step) / f"shard-{shard}-of-{n}" / "manifest.json").read_text())


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def slow_pull(address: str, table: str, seconds: float) -> pb.PullRequest:
    """A raw training Pull of new keys that keeps one shard busy for about ``seconds``
    (measured here: the machine's speed varies), encoded before it is sent."""
    with stub(address) as s:
        s.Pull(pull_request(table, np.arange(1 << 40, (1 << 40) + 50_000), 1), timeout=60)  # warm
        n0 = 300_000
        t0 = time.perf_counter()
        s.Pull(pull_request(table, np.arange(1 << 41, (1 << 41) + n0), 1), timeout=60)
        per_key = (time.perf_counter() - t0) / n0
    n = int(min(8_000_000, max(1_000_000, seconds / per_key)))
    return pull_request(table, np.arange(1 << 42, (1 << 42) + n), 1)


def table_busy(address: str, table: str, idle: str) -> bool:
    """True while a call holds ``table``'s lock: Stats on it times out, on ``idle`` answers."""
    with stub(address) as s:
        code, _ = rpc(lambda: s.Stats(pb.StatsRequest(table=table), timeout=0.3))
        if code != grpc.StatusCode.DEADLINE_EXCEEDED:
            return False
        return rpc(lambda: s.Stats(pb.StatsRequest(table=idle), timeout=5))[0] == grpc.StatusCode.OK


def unique_rows(rows: np.ndarray) -> int:
    return int(np.unique(rows, axis=0).shape[0])


# --------------------------------------------------------------------------
# TableConfig options (the shared cluster)
# --------------------------------------------------------------------------


def check_name(ctx: Ctx) -> None:
    ps = ctx.ps
    name = f"{ctx.slug}.Item-id_7"  # every character class a name may use
    twin = f"{ctx.slug}.Item-id_8"
    for n in (name, twin):  # same config (seed, initializer), different names
        assert ps.create_table(TableConfig(n, DIM, optimizer=SGD(lr=1.0)))
    assert {name, twin} <= {t.name for t in ps.describe_tables()}
    keys = np.arange(20)
    before = ps.pull(name, keys)
    np.testing.assert_array_equal(ps.pull(twin, keys), before)
    ps.push(name, keys, np.ones((20, DIM), np.float32))
    np.testing.assert_allclose(ps.pull(name, keys, train=False), before - 1.0, rtol=1e-6)
    np.testing.assert_array_equal(ps.pull(twin, keys, train=False), before)  # its own rows
    with pytest.raises(TableNotFoundError):
        ps.pull(name.lower(), keys)


def check_dim(ctx: Ctx) -> None:
    for dim in (1, 7, 33):
        cfg = ctx.create(dim=dim)
        assert ctx.ps.pull(cfg.name, np.arange(5)).shape == (5, dim)
        assert {t.name: t.dim for t in ctx.ps.describe_tables()}[cfg.name] == dim
        code, details = raw_pull(ctx.shared.cluster.addresses[0], cfg.name, keys_on(0, 3), 2)
        assert code == grpc.StatusCode.OK, details


def check_kind_dynamic(ctx: Ctx) -> None:
    cfg = ctx.create(kind="dynamic")
    rows = ctx.ps.pull(cfg.name, np.arange(100))
    assert unique_rows(rows) == 100  # one row per key
    assert total(ctx.ps, cfg.name, "keys") == 100
    assert per_shard(ctx.ps, cfg.name, "static_rows") == [0, 0]


def check_kind_static(ctx: Ctx) -> None:
    cfg = ctx.create(kind="static", hash_bucket_size=4)
    rows = ctx.ps.pull(cfg.name, np.arange(100))
    assert unique_rows(rows) <= 8  # 4 shared rows on each shard
    assert total(ctx.ps, cfg.name, "keys") == 0
    assert per_shard(ctx.ps, cfg.name, "static_rows") == [4, 4]


def check_kind_adaptive(ctx: Ctx) -> None:
    cfg = ctx.create(kind="adaptive", hash_bucket_size=4, promote_threshold=2)
    keys = np.arange(100)
    assert unique_rows(ctx.ps.pull(cfg.name, keys)) <= 8  # first sighting: static rows
    assert total(ctx.ps, cfg.name, "keys") == 0
    assert total(ctx.ps, cfg.name, "pulled_static") == 100
    ctx.ps.pull(cfg.name, keys)  # second sighting: own rows
    assert total(ctx.ps, cfg.name, "keys") == 100
    assert total(ctx.ps, cfg.name, "promotions") == 100
    assert per_shard(ctx.ps, cfg.name, "static_rows") == [4, 4]


def check_kind_qr(ctx: Ctx) -> None:
    cfg = ctx.create(kind="qr", qr_quotient_buckets=2, qr_remainder_buckets=3)
    rows = ctx.ps.pull(cfg.name, np.arange(100))
    assert unique_rows(rows) == 6  # Q * m combinations
    assert total(ctx.ps, cfg.name, "keys") == 0
    assert per_shard(ctx.ps, cfg.name, "static_rows") == [5, 5]  # Q + m rows


# Optimizers: a push of known gradients (at steps 4 and 5) on rows of 0.5, against
# README "Optimizers" in float64.
G = np.array([[[0.2, -0.4], [0.1, 0.3]], [[-0.3, 0.05], [0.25, -0.2]]], dtype=np.float32)
W0 = 0.5
PUSH_STEPS = (4, 5)


def ref_sgd(opt: SGD) -> np.ndarray:
    w = np.full(G.shape[1:], W0)
    for g in G.astype(np.float64):
        w -= opt.lr * g
    return w


def ref_adagrad(opt: Adagrad) -> np.ndarray:
    w, a = np.full(G.shape[1:], W0), np.full(G.shape[1:], opt.initial_accumulator_value)
    for g in G.astype(np.float64):
        a += g * g
        w -= opt.lr * g / (np.sqrt(a) + opt.eps)
    return w


def ref_adam(opt: Adam) -> np.ndarray:
    w, m, v = np.full(G.shape[1:], W0), np.zeros(G.shape[1:]), np.zeros(G.shape[1:])
    for g, step in zip(G.astype(np.float64), PUSH_STEPS, strict=True):
        t = step + 1
        m = opt.beta1 * m + (1 - opt.beta1) * g
        v = opt.beta2 * v + (1 - opt.beta2) * g * g
        m_hat, v_hat = m / (1 - opt.beta1**t), v / (1 - opt.beta2**t)
        w -= opt.lr * m_hat / (np.sqrt(v_hat) + opt.eps)
    return w


def ref_ftrl(opt: FTRL) -> np.ndarray:
    """TensorFlow's Ftrl (learning_rate_power -0.5)."""
    w, n, z = np.full(G.shape[1:], W0), np.full(G.shape[1:], opt.initial_accumulator_value), 0.0
    for g in G.astype(np.float64):
        n_new = n + g * g
        z = z + g - (np.sqrt(n_new) - np.sqrt(n)) / opt.alpha * w
        n = n_new
        quad = (opt.beta + np.sqrt(n)) / opt.alpha + 2 * opt.l2
        w = np.where(np.abs(z) <= opt.l1, 0.0, (np.sign(z) * opt.l1 - z) / quad)
    return np.asarray(w)


def optimizer_check(opt: Any, ref: Callable[[Any], np.ndarray]) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        cfg = ctx.create(dim=2, optimizer=opt, initializer=Initializer("constant", W0, 0.0))
        keys = np.array([11, 12])
        ctx.ps.pull(cfg.name, keys)
        for g, step in zip(G, PUSH_STEPS, strict=True):
            assert ctx.ps.push(cfg.name, keys, g, step=step).applied == 2
        got = ctx.ps.pull(cfg.name, keys, train=False)
        want = ref(opt)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
        if not isinstance(opt, SGD):  # the default, SGD(lr=0.01), would give another row
            assert not np.allclose(got, ref_sgd(SGD()), rtol=1e-3)

    return check


def check_initializer_zeros(ctx: Ctx) -> None:
    cfg = ctx.create(initializer=Initializer("zeros"))
    assert np.all(ctx.ps.pull(cfg.name, np.arange(50)) == 0.0)


def check_initializer_constant(ctx: Ctx) -> None:
    cfg = ctx.create(initializer=Initializer("constant", 0.25, 0.0))
    assert np.all(ctx.ps.pull(cfg.name, np.arange(50)) == np.float32(0.25))


def check_initializer_uniform(ctx: Ctx) -> None:
    init = Initializer("uniform", 2.0, 3.0)
    cfg = ctx.create(dim=8, initializer=init)
    keys = np.arange(500)
    rows = ctx.ps.pull(cfg.name, keys)
    assert rows.min() >= 2.0 and rows.max() <= 3.0
    assert rows.min() < 2.05 and rows.max() > 2.95
    assert abs(rows.mean() - 2.5) < 0.03 and abs(rows.std() - 1 / np.sqrt(12)) < 0.02
    # seeded by (seed, key): dropped and re-created, the rows are the same
    assert ctx.ps.drop_table(cfg.name)
    assert ctx.ps.create_table(cfg)
    np.testing.assert_array_equal(ctx.ps.pull(cfg.name, keys[::-1]), rows[::-1])


def check_initializer_normal(ctx: Ctx) -> None:
    cfg = ctx.create(dim=8, initializer=Initializer("normal", 5.0, 0.5))
    rows = ctx.ps.pull(cfg.name, np.arange(500))  # 4000 samples: 6 standard errors
    assert abs(rows.mean() - 5.0) < 0.05 and abs(rows.std() - 0.5) < 0.03
    assert rows.min() < 4.0 and rows.max() > 6.0  # not a narrow or uniform shape


def check_seed(ctx: Ctx) -> None:
    ps, keys = ctx.ps, np.arange(200)
    one, two, one_again = (ctx.create(seed=s) for s in (1, 2, 1))
    r1 = ps.pull(one.name, keys)
    assert not np.any(np.all(ps.pull(two.name, keys) == r1, axis=1))  # initializers
    np.testing.assert_array_equal(ps.pull(one_again.name, keys), r1)

    def colliders(seed: int) -> set[int]:  # static hashing: the keys that share key 0's row
        cfg = ctx.create(
            kind="static",
            hash_bucket_size=8,
            seed=seed,
            optimizer=SGD(lr=1.0),
            initializer=Initializer("zeros"),
        )
        ps.push(cfg.name, [0], np.ones((1, DIM), np.float32))
        rows = ps.pull(cfg.name, keys, train=False)
        return set(keys[rows[:, 0] != 0.0].tolist())

    a, b = colliders(1), colliders(2)
    assert 0 in a and 0 in b and len(a) > 3 and a != b


# Options of "dynamic, adaptive": checked on both kinds (an adaptive key gets its own row
# at its first sighting here, so both hold the same own rows).
DYNAMIC: dict[str, Any] = {}
ADAPTIVE: dict[str, Any] = {
    "kind": "adaptive",
    "hash_bucket_size": 16,
    "promote_threshold": 1,
    "sketch_width": 1024,
    "sketch_depth": 2,
}


def has_row(ps: PSClient, table: str, key: int) -> bool:
    """Whether ``key`` has its own row: a dynamic key without one reads the default value
    (0.0; the rows here start at 0.5), an adaptive key is served by the static part."""
    kind = next(t.kind for t in ps.describe_tables() if t.name == table)
    if kind == "dynamic":
        return not np.all(ps.pull(table, [key], train=False) == 0.0)
    before = total(ps, table, "pulled_static")
    ps.pull(table, [key], train=False)
    return total(ps, table, "pulled_static") == before


def check_initial_capacity(ctx: Ctx) -> None:
    for extra in (DYNAMIC, ADAPTIVE):
        small = ctx.create(dim=8, initial_capacity=1024, **extra)
        big = ctx.create(dim=8, initial_capacity=65_536, **extra)
        for s, b in zip(
            per_shard(ctx.ps, small.name, "dynamic_bytes"),
            per_shard(ctx.ps, big.name, "dynamic_bytes"),
            strict=True,
        ):
            assert b - s >= (65_536 - 1024) * small.row_bytes, (extra, s, b)
        assert total(ctx.ps, big.name, "keys") == 0


def check_admission_threshold(ctx: Ctx) -> None:
    ps = ctx.ps
    cfg = ctx.create(admission_threshold=3, initializer=Initializer("constant", 0.5, 0.0))
    key, g = [42], np.ones((1, DIM), np.float32)
    for sighting in (1, 2):
        assert np.all(ps.pull(cfg.name, key) == 0.0), sighting  # default_value, no row
        res = ps.push(cfg.name, key, g)
        assert (res.applied, res.dropped) == (0, 1)
        assert total(ps, cfg.name, "keys") == 0
    assert np.all(ps.pull(cfg.name, key) == 0.5)  # third sighting: a row
    assert total(ps, cfg.name, "keys") == 1
    assert total(ps, cfg.name, "admissions_rejected") == 2
    assert ps.push(cfg.name, key, g).applied == 1
    free = ctx.create(initializer=Initializer("constant", 0.5, 0.0))  # the default: first pull
    assert np.all(ps.pull(free.name, key) == 0.5) and total(ps, free.name, "keys") == 1


def check_default_value(ctx: Ctx) -> None:
    ps = ctx.ps
    cfg = ctx.create(
        default_value=0.7, admission_threshold=2, initializer=Initializer("constant", 0.5, 0.0)
    )
    assert np.all(ps.pull(cfg.name, [5], train=False) == np.float32(0.7))  # never seen
    assert np.all(ps.pull(cfg.name, [6]) == np.float32(0.7))  # seen once, not admitted
    assert np.all(ps.pull(cfg.name, [6]) == 0.5)  # admitted: its own row
    plain = ctx.create()
    assert np.all(ps.pull(plain.name, [5], train=False) == 0.0)


def check_max_rows(ctx: Ctx) -> None:
    ps = ctx.ps
    k0 = keys_on(0, 11)
    for extra in (DYNAMIC, ADAPTIVE):
        cfg = ctx.create(max_rows=10, **extra)
        ps.pull(cfg.name, k0[:10])
        with pytest.raises(ResourceExhaustedError):
            ps.pull(cfg.name, k0[10:])
        assert per_shard(ps, cfg.name, "keys") == [10, 0], extra  # nothing of the refused batch
        ps.pull(cfg.name, keys_on(1, 10))  # the cap is per shard
        assert per_shard(ps, cfg.name, "keys") == [10, 10], extra


def eviction_check(policy: str) -> Callable[[Ctx], None]:
    """max_rows 4 on shard 0: d is pulled most but longest ago, a (b, c) less but lately;
    at the cap a new key e evicts a under lfu, d under lru (an adaptive table demotes it)."""

    def check(ctx: Ctx) -> None:
        ps = ctx.ps
        a, b, c, d, e = (int(k) for k in keys_on(0, 5))
        for extra in (DYNAMIC, ADAPTIVE):
            cfg = ctx.create(
                max_rows=4,
                eviction=policy,
                optimizer=SGD(lr=0.1),
                initializer=Initializer("constant", 0.5, 0.0),
                **extra,
            )
            ps.pull(cfg.name, [a, b, c, d])
            for _ in range(3):
                ps.pull(cfg.name, [d])  # d: 4 sightings, at step 0
            ps.push(cfg.name, [a, b, c], np.ones((3, DIM), np.float32), step=5)
            ps.pull(cfg.name, [a, b, c])  # a, b, c: 2 sightings, at step 5
            ps.pull(cfg.name, [e])  # at the cap: one eviction, no refusal
            assert per_shard(ps, cfg.name, "keys") == [4, 0], extra
            assert total(ps, cfg.name, "evictions_capacity") == 1, extra
            gone = a if policy == "lfu" else d
            assert [has_row(ps, cfg.name, k) for k in (a, b, c, d, e)] == [
                k != gone for k in (a, b, c, d, e)
            ], extra

    return check


STL_KEYS = np.arange(1, 41, dtype=np.int64)
STL_KEPT = STL_KEYS[STL_KEYS % 4 == 0]


def make_stale(ps: PSClient, table: str) -> None:
    """Rows for STL_KEYS at step 0, then a push of STL_KEPT at step 10."""
    ps.pull(table, STL_KEYS)
    ps.push(table, STL_KEPT, np.full((STL_KEPT.size, DIM), 0.01, np.float32), step=10)


def check_steps_to_live(ctx: Ctx) -> None:
    ps = ctx.ps
    stale = STL_KEYS.size - STL_KEPT.size
    for extra in (DYNAMIC, ADAPTIVE):
        cfg = ctx.create(steps_to_live=3, **extra)
        plain = ctx.create(**extra)
        for t in (cfg, plain):
            make_stale(ps, t.name)
        res = ps.evict(cfg.name)[cfg.name]
        assert (res.rows, res.steps_to_live_rows) == (stale, stale), extra
        assert total(ps, cfg.name, "keys") == STL_KEPT.size
        assert total(ps, cfg.name, "evictions_steps_to_live") == stale
        assert ps.evict(plain.name)[plain.name].rows == 0  # without it: nothing to evict
        assert total(ps, plain.name, "keys") == STL_KEYS.size


def check_l2_evict_threshold(ctx: Ctx) -> None:
    ps = ctx.ps
    opts: dict[str, Any] = {
        "optimizer": SGD(lr=1.0),
        "initializer": Initializer("constant", 0.1, 0.0),
    }
    low = STL_KEYS.size - STL_KEPT.size
    for extra in (DYNAMIC, ADAPTIVE):
        cfg = ctx.create(l2_evict_threshold=0.5, **opts, **extra)
        plain = ctx.create(**opts, **extra)
        for t in (cfg, plain):
            ps.pull(t.name, STL_KEYS)  # L2 of every row: 0.2
            ps.push(t.name, STL_KEPT, np.full((STL_KEPT.size, DIM), -1.0, np.float32))  # -> 2.2
        res = ps.evict(cfg.name)[cfg.name]
        assert (res.rows, res.l2_rows) == (low, low), extra
        assert total(ps, cfg.name, "evictions_l2") == low
        np.testing.assert_allclose(ps.pull(cfg.name, STL_KEPT, train=False), 1.1, rtol=1e-6)
        assert ps.evict(plain.name)[plain.name].rows == 0
        assert total(ps, plain.name, "keys") == STL_KEYS.size


def check_max_bytes(ctx: Ctx) -> None:
    ps = ctx.ps
    cap = 32_768
    cfg = ctx.create(dim=8, max_bytes=cap)
    plain = ctx.create(dim=8)
    keys = keys_on(0, 2000)
    refused = False
    for batch in np.split(keys, 40):
        ps.pull(plain.name, batch)
        try:
            ps.pull(cfg.name, batch)
        except ResourceExhaustedError:
            refused = True
        assert per_shard(ps, cfg.name, "bytes")[0] <= cap
    assert refused and 0 < per_shard(ps, cfg.name, "keys")[0] < 2000
    assert per_shard(ps, plain.name, "keys")[0] == 2000
    assert per_shard(ps, plain.name, "bytes")[0] > cap
    # adaptive at the cap: the pull succeeds, keys past it stay on their static rows
    ad = ctx.create(
        kind="adaptive",
        dim=8,
        hash_bucket_size=16,
        promote_threshold=1,
        sketch_width=1024,
        sketch_depth=2,
        max_bytes=cap,
    )
    for batch in np.split(keys, 10):
        assert ps.pull(ad.name, batch).shape == (200, 8)
    assert 0 < per_shard(ps, ad.name, "keys")[0] < 2000
    assert per_shard(ps, ad.name, "bytes")[0] <= cap
    # a fixed part over the cap: the shard refuses the config (sent raw: the client checks too)
    static = TableConfig(ctx.name(), 8, kind="static", hash_bucket_size=64)
    raw = static.to_proto()
    raw.max_bytes = 1000
    with stub(ctx.shared.cluster.addresses[0]) as s:
        code, details = rpc(lambda: s.CreateTable(pb.CreateTableRequest(config=raw), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "max_bytes=1000" in details and str(static.fixed_bytes) in details, details


def check_hash_bucket_size(ctx: Ctx) -> None:
    for b in (5, 50):
        cfg = ctx.create(kind="static", hash_bucket_size=b)
        assert per_shard(ctx.ps, cfg.name, "static_rows") == [b, b]
        for shard in (0, 1):
            rows = ctx.ps.pull(cfg.name, keys_on(shard, 1000), train=False)
            assert unique_rows(rows) == b  # a key's row is among its own shard's b


def check_promote_threshold(ctx: Ctx) -> None:
    ps = ctx.ps
    cfg = ctx.create(kind="adaptive", hash_bucket_size=16, promote_threshold=3)
    key = [77]
    static_row = ps.pull(cfg.name, key)
    ps.pull(cfg.name, key)
    assert total(ps, cfg.name, "keys") == 0 and total(ps, cfg.name, "promotions") == 0
    np.testing.assert_array_equal(ps.pull(cfg.name, key), static_row)  # third: promoted
    assert total(ps, cfg.name, "keys") == 1 and total(ps, cfg.name, "promotions") == 1
    assert total(ps, cfg.name, "pulled_static") == 2 and total(ps, cfg.name, "pulled_dynamic") == 1


def sketch_check(option: str) -> Callable[[Ctx], None]:
    """An empty table's bytes grow by 4 * width * depth."""

    def check(ctx: Ctx) -> None:
        w, d = 1024, 2
        bigger = {"sketch_width": (2 * w, d), "sketch_depth": (w, 2 * d)}[option]
        adaptive = {"kind": "adaptive", "hash_bucket_size": 8, "promote_threshold": 2}
        admission = {"admission_threshold": 2}
        for opts in (adaptive, admission):
            base = ctx.create(sketch_width=w, sketch_depth=d, **opts)
            more = ctx.create(sketch_width=bigger[0], sketch_depth=bigger[1], **opts)
            got = [
                m - b
                for b, m in zip(
                    per_shard(ctx.ps, base.name, "bytes"),
                    per_shard(ctx.ps, more.name, "bytes"),
                    strict=True,
                )
            ]
            assert got == [4 * w * d] * 2, (opts, got)

    return check


def qr_halves(ctx: Ctx, q: int, m: int) -> tuple[TableConfig, np.ndarray, np.ndarray]:
    """A concat qr table: (config, quotient halves, remainder halves) of keys 0 .. 2*q*m - 1."""
    cfg = ctx.create(kind="qr", qr_quotient_buckets=q, qr_remainder_buckets=m, qr_combiner="concat")
    rows = ctx.ps.pull(cfg.name, np.arange(2 * q * m), train=False)
    return cfg, rows[:, : DIM // 2], rows[:, DIM // 2 :]


def check_qr_quotient_buckets(ctx: Ctx) -> None:
    for q in (3, 5):
        cfg, quo, _ = qr_halves(ctx, q, 4)
        assert unique_rows(quo) == q
        h = np.arange(2 * q * 4)
        for i in range(h.size):  # the quotient half depends on (h mod Q*m) // m alone
            same = (h % (q * 4)) // 4 == (h[i] % (q * 4)) // 4
            assert np.all(np.all(quo == quo[i], axis=1) == same)
        assert per_shard(ctx.ps, cfg.name, "static_rows") == [q + 4] * 2


def check_qr_remainder_buckets(ctx: Ctx) -> None:
    for m in (3, 5):
        cfg, _, rem = qr_halves(ctx, 4, m)
        assert unique_rows(rem) == m
        h = np.arange(2 * 4 * m)
        for i in range(h.size):  # the remainder half depends on h mod m alone
            assert np.all(np.all(rem == rem[i], axis=1) == (h % m == h[i] % m))
        assert per_shard(ctx.ps, cfg.name, "static_rows") == [4 + m] * 2


def combiner_check(combiner: str, pulled: float, after: float) -> Callable[[Ctx], None]:
    """Parts of 0.5: the row combines them (mult 0.25, add 1.0, concat 0.5); a gradient of 1
    with SGD(lr=1) reaches the parts as the combiner's derivative."""

    def check(ctx: Ctx) -> None:
        cfg = ctx.create(
            kind="qr",
            qr_quotient_buckets=4,
            qr_remainder_buckets=4,
            qr_combiner=combiner,
            optimizer=SGD(lr=1.0),
            initializer=Initializer("constant", 0.5, 0.0),
        )
        assert np.all(ctx.ps.pull(cfg.name, [3]) == np.float32(pulled))
        ctx.ps.push(cfg.name, [3], np.ones((1, DIM), np.float32))
        np.testing.assert_allclose(ctx.ps.pull(cfg.name, [3], train=False), after, atol=1e-7)
        # key 3 + k * Q*m on the same shard (each shard has its own parts) shares the row
        same = 3 + 16 * np.arange(64, dtype=np.int64)
        alias = same[1:][shard_of(same[1:], 2) == shard_of(same[:1], 2)[0]]
        np.testing.assert_allclose(ctx.ps.pull(cfg.name, alias[:1], train=False), after, atol=1e-7)

    return check


# --------------------------------------------------------------------------
# `embps serve` flags (processes of their own, unless the shared cluster shows it)
# --------------------------------------------------------------------------


def check_shards(ctx: Ctx) -> None:
    c = ctx.shared.cluster  # `embps serve --shards 2`
    assert len({s.pid for s in c.shards}) == 2
    assert [(s.shard_id, s.num_shards) for s in ctx.ps.stats()] == [(0, 2), (1, 2)]
    cfg = ctx.create()
    one = PSClient(c.addresses[:1], timeout=10, retry_deadline=0)  # a client of 1 shard
    with one, pytest.raises(ShardMismatchError):
        one.pull(cfg.name, [1, 2, 3])


def check_host(ctx: Ctx) -> None:
    c = ctx.shard("--host", "127.0.0.2")
    host, port = c.addresses[0].rsplit(":", 1)
    assert host == "127.0.0.2"
    with PSClient(c.addresses, timeout=10) as ps:
        ps.create_table(TableConfig("t", DIM))
        assert ps.pull("t", [1]).shape == (1, DIM)
    assert http_get(f"http://127.0.0.2:{c.shards[0].metrics_port}/metrics")[0] == 200
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")  # not on the default interface
    with ch, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(ch).result(timeout=1.0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{c.shards[0].metrics_port}/metrics", timeout=2)


def check_port(ctx: Ctx) -> None:
    """The shared cluster runs `--port P` (every other process here `--port 0`: any free
    port, read from its readiness line)."""
    p = ctx.shared.port
    assert ctx.shared.cluster.addresses == [f"127.0.0.1:{p}", f"127.0.0.1:{p + 1}"]
    with PSClient([f"127.0.0.1:{p}", f"127.0.0.1:{p + 1}"], timeout=10) as ps:
        assert [s.shard_id for s in ps.stats()] == [0, 1]


def check_metrics_port(ctx: Ctx) -> None:
    m = ctx.shared.metrics_port  # the shared cluster runs `--metrics-port M`
    assert [s.metrics_port for s in ctx.shared.cluster.shards] == [m, m + 1]
    for i in (0, 1):
        status, text = http_get(f"http://127.0.0.1:{m + i}/metrics")
        assert status == 200
        assert re.search(rf'^embps_shard_info\{{[^}}]*shard="{i}"[^}}]*\}} 1\.0$', text, re.M), i


def check_config(ctx: Ctx) -> None:
    """Shard 0 of the file's 2 shards: the file's tables and options; a flag wins over it."""
    f = write_yaml(
        ctx.tmp / "embps.yaml",
        """\
server:
  shards: 2
  max_keys_per_request: 50
  verify_routing: false
tables:
  - {name: cfg_a, dim: 3, optimizer: {name: adagrad, lr: 0.05}}
  - {name: cfg_b, dim: 2, kind: static, hash_bucket_size: 16}
""",
    )
    c = ctx.launch("--shard-id", "0", *ANY_PORTS, "--config", f, "--max-keys-per-request", "80")
    a = wait_ready(c, 2, ids=[0]).addresses[0]
    with stub(a) as s:
        stats = s.Stats(pb.StatsRequest(), timeout=10)
        described = s.DescribeTables(pb.DescribeTablesRequest(), timeout=10).tables
    assert (stats.shard_id, stats.num_shards) == (0, 2)
    assert [TableConfig.from_proto(t) for t in described] == [
        TableConfig("cfg_a", 3, optimizer=Adagrad(lr=0.05)),
        TableConfig("cfg_b", 2, kind="static", hash_bucket_size=16),
    ]
    assert raw_pull(a, "cfg_a", keys_on(0, 80), 2)[0] == grpc.StatusCode.OK  # flag 80 > file 50
    assert raw_pull(a, "cfg_a", keys_on(0, 81), 2)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert raw_pull(a, "cfg_a", keys_on(1, 3), 2)[0] == grpc.StatusCode.OK  # verify_routing: false


def check_shard_id(ctx: Ctx) -> None:
    p = free_port_range(3)
    c = ctx.launch(
        "--shards",
        "3",
        "--shard-id",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(p),
        "--metrics-port",
        "0",
    )
    wait_ready(c, 3, ids=[2])
    s = c.shards[0]
    assert (s.shard_id, s.num_shards, s.address) == (2, 3, f"127.0.0.1:{p}")  # exactly --port
    assert s.pid == c.proc.pid  # this very process: no supervisor
    with stub(s.address) as raw:
        stats = raw.Stats(pb.StatsRequest(), timeout=10)
    assert (stats.shard_id, stats.num_shards) == (2, 3)
    assert "started" not in c.log()


def check_max_keys_per_request(ctx: Ctx) -> None:
    c = ctx.shard("--max-keys-per-request", "100")
    a = c.addresses[0]
    with PSClient(c.addresses, timeout=10, max_keys_per_request=1000) as ps:
        ps.create_table(TableConfig("t", DIM))
        assert raw_pull(a, "t", np.arange(100), 1)[0] == grpc.StatusCode.OK
        code, details = raw_pull(a, "t", np.arange(101), 1)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_keys_per_request=100" in details
        with pytest.raises(ResourceExhaustedError):
            ps.pull("t", np.arange(1000, 1101))
    cfg = ctx.create()  # the default (1048576): 101 keys pass
    assert (
        raw_pull(ctx.shared.cluster.addresses[0], cfg.name, keys_on(0, 101), 2)[0]
        == grpc.StatusCode.OK
    )


def check_max_message_bytes(ctx: Ctx) -> None:
    c = ctx.shard("--max-message-bytes", "65536")
    a = c.addresses[0]
    with PSClient(c.addresses, timeout=10) as ps:
        ps.create_table(TableConfig("one", 1))
        ps.create_table(TableConfig("wide", 4))
    assert raw_pull(a, "one", np.arange(7000), 1)[0] == grpc.StatusCode.OK  # 56 kB in, 28 out
    code, _ = raw_pull(a, "one", np.arange(9000), 1)  # 72 kB in
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = raw_pull(a, "wide", np.arange(7000), 1)  # 56 kB in, 112 kB out
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    cfg = ctx.create(dim=1)  # the default (256 MiB): the same requests pass
    assert (
        raw_pull(ctx.shared.cluster.addresses[0], cfg.name, keys_on(0, 9000), 2)[0]
        == grpc.StatusCode.OK
    )


def check_max_workers(ctx: Ctx) -> None:
    """One RPC thread: a call sent while a long pull runs is answered only after it."""
    c = ctx.shard("--max-workers", "1", "--max-keys-per-request", "10000000")
    a = c.addresses[0]
    with PSClient(c.addresses, timeout=10) as ps:  # dim 1: a small answer, sent at once
        ps.create_table(TableConfig("big", 1))
        ps.create_table(TableConfig("small", 1))
    req = slow_pull(a, "big", 2.5)
    done: list[float] = []
    with stub(a) as puller, stub(a) as other:
        fut = puller.Pull.future(req, timeout=120)
        fut.add_done_callback(lambda _f: done.append(time.perf_counter()))
        time.sleep(0.5)
        sent = time.perf_counter()
        other.Stats(pb.StatsRequest(table="small"), timeout=120)
        answered = time.perf_counter()
        fut.result()
        wait_until(lambda: bool(done), 5, "the pull's completion")
    assert done[0] - sent > 1.0, f"inconclusive: the pull ended {done[0] - sent:.2f}s after Stats"
    assert answered > done[0] - 0.3, (
        f"Stats answered {done[0] - answered:.2f}s before the pull ended: more than one worker"
    )


def check_grace_seconds(ctx: Ctx) -> None:
    """SIGTERM while a pull of seconds runs: after 0.5 s it is cut off (the default, 10 s,
    lets it finish: test_serve)."""
    c = ctx.shard("--grace-seconds", "0.5", "--max-keys-per-request", "10000000")
    a = c.addresses[0]
    with PSClient(c.addresses, timeout=10) as ps:
        ps.create_table(TableConfig("big", 1))
        ps.create_table(TableConfig("small", 1))
    req = slow_pull(a, "big", 3.0)
    with stub(a) as s:
        fut = s.Pull.future(req, timeout=120)
        wait_until(lambda: table_busy(a, "big", "small"), 20, "the long pull to hold its table")
        t0 = time.perf_counter()
        c.signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as err:
            fut.result()
        cut = time.perf_counter() - t0
    assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert cut < 3.0, f"the pull ended {cut:.2f}s after SIGTERM"
    c.kill_all()  # its worker thread still computes the cut-off pull: no need to wait


def check_drain_delay_seconds(ctx: Ctx) -> None:
    c = ctx.serve(1, "--drain-delay-seconds", "1.5")
    a = c.addresses[0]
    with PSClient(c.addresses, timeout=5, retry_deadline=0) as ps:
        ps.create_table(TableConfig("t", DIM))
        ps.pull("t", [1, 2])  # the kernels of the client and the shard loaded before
        t0 = time.perf_counter()
        c.signal(signal.SIGTERM)
        wait_until(
            lambda: health(a) == health_pb2.HealthCheckResponse.NOT_SERVING,
            1.5,
            "NOT_SERVING after SIGTERM",
        )
        assert http_get(f"http://127.0.0.1:{c.shards[0].metrics_port}/readyz")[0] == 503
        assert ps.pull("t", [1, 2]).shape == (2, DIM)  # NOT_SERVING, and still serving
    assert c.wait() == 0
    assert time.perf_counter() - t0 >= 1.5


def check_verify_routing(ctx: Ctx) -> None:
    """--verify-routing wins over `verify_routing: false` in the file: a misrouted key is
    refused."""
    f = write_yaml(ctx.tmp / "off.yaml", "server:\n  verify_routing: false\n")
    a = ctx.shard("--config", f, "--verify-routing", shards=2).addresses[0]
    with PSClient([a], timeout=10) as ps:
        ps.create_table(TableConfig("t", DIM))
    assert raw_pull(a, "t", keys_on(0, 3), 2)[0] == grpc.StatusCode.OK
    code, details = raw_pull(a, "t", keys_on(1, 1), 2)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "belongs to shard 1" in details


def check_no_verify_routing(ctx: Ctx) -> None:
    a = ctx.shard("--no-verify-routing", shards=2).addresses[0]
    with PSClient([a], timeout=10) as ps:
        ps.create_table(TableConfig("t", DIM))
    k = keys_on(1, 1)
    assert raw_pull(a, "t", k, 2)[0] == grpc.StatusCode.OK  # misrouted, and served
    with stub(a) as s:
        assert s.Stats(pb.StatsRequest(table="t"), timeout=10).tables[0].keys == 1
    cfg = ctx.create()  # the default: refused
    code, details = raw_pull(ctx.shared.cluster.addresses[0], cfg.name, k, 2)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "belongs to shard 1" in details


def check_log_level(ctx: Ctx) -> None:
    c = ctx.shard("--log-level", "WARNING")
    with PSClient(c.addresses, timeout=10) as ps:
        ps.create_table(TableConfig("quiet", DIM))
    assert c.stop() == 0
    log = c.log()
    assert "created table" not in log and " INFO " not in log, log
    cfg = ctx.create()  # the default (INFO): logged
    wait_until(
        lambda: f"created table '{cfg.name}'" in ctx.shared.cluster.log(),
        5,
        "the INFO line of the default log level",
    )


def check_checkpoint_dir(ctx: Ctx) -> None:
    root = ctx.tmp / "ck"
    c = ctx.shard("--checkpoint-dir", str(root))
    with PSClient(c.addresses, timeout=30) as ps:
        ps.create_table(TableConfig("t", DIM))
        ps.pull("t", np.arange(100))
        for step in (5, 6):
            (r,) = ps.checkpoint(step)
            assert Path(r.path) == root / str(step) / "shard-0-of-1"
            assert r.kind == "full"  # --checkpoint-incremental 0
    assert c.stop() == 0
    assert steps(root) == [5, 6, 7]  # and one on exit (the default with a directory)
    assert [t["config"]["name"] for t in manifest(root, 7)["tables"]] == ["t"]
    with pytest.raises(CheckpointFailedError):  # without a directory: no checkpoint
        ctx.ps.checkpoint(1)


def check_checkpoint_every(ctx: Ctx) -> None:
    root = ctx.tmp / "ck"
    c = ctx.shard(
        "--checkpoint-dir", str(root), "--checkpoint-every", "1", "--no-checkpoint-on-exit"
    )
    with PSClient(c.addresses, timeout=10) as ps:
        ps.create_table(TableConfig("t", DIM))
        ps.pull("t", np.arange(10))
    wait_until(lambda: len(steps(root)) >= 2, 8, "two periodic checkpoints")
    assert steps(root)[:2] == [0, 1]


def check_checkpoint_incremental(ctx: Ctx) -> None:
    root = ctx.tmp / "ck"
    c = ctx.shard(
        "--checkpoint-dir", str(root), "--checkpoint-incremental", "2", "--no-checkpoint-on-exit"
    )
    kinds = []
    with PSClient(c.addresses, timeout=30) as ps:
        ps.create_table(TableConfig("t", DIM))
        ps.pull("t", np.arange(100))
        for step in (1, 2, 3, 4):
            ps.push("t", [step], np.ones((1, DIM), np.float32))
            (r,) = ps.checkpoint(step)
            kinds.append(r.kind)
    assert kinds == ["full", "incremental", "full", "incremental"]
    assert [manifest(root, s)["kind"] for s in (1, 2, 3, 4)] == kinds
    assert manifest(root, 2)["base_step"] == 1 and manifest(root, 4)["base_step"] == 3


def check_checkpoint_on_exit(ctx: Ctx) -> None:
    """--checkpoint-on-exit wins over `checkpoint_on_exit: false` in the file."""
    root = ctx.tmp / "ck"
    f = write_yaml(
        ctx.tmp / "off.yaml", f"server:\n  checkpoint_dir: {root}\n  checkpoint_on_exit: false\n"
    )
    c = ctx.shard("--config", f, "--checkpoint-on-exit")
    with PSClient(c.addresses, timeout=10) as ps:
        ps.create_table(TableConfig("t", DIM))
        ps.pull("t", np.arange(10))
    assert steps(root) == []
    assert c.stop() == 0
    assert steps(root) == [0]
    assert [t["config"]["name"] for t in manifest(root, 0)["tables"]] == ["t"]


def check_no_checkpoint_on_exit(ctx: Ctx) -> None:
    root = ctx.tmp / "ck"
    c = ctx.shard("--checkpoint-dir", str(root), "--no-checkpoint-on-exit")
    with PSClient(c.addresses, timeout=30) as ps:
        ps.create_table(TableConfig("t", DIM))
        ps.pull("t", np.arange(10))
        ps.checkpoint(3)
    assert c.stop() == 0
    assert steps(root) == [3]  # none on exit (with a directory the default writes one)


def check_restore(ctx: Ctx) -> None:
    """Checkpoints of 2 shards (steps 7 and 9), restored onto 1 shard (resharded): `latest`
    serves step 9's rows, `DIR/7` step 7's."""
    root = ctx.tmp / "ck"
    args = ("--checkpoint-dir", str(root), "--no-checkpoint-on-exit")
    writers = [ctx.launch("--shard-id", str(i), "--shards", "2", *ANY_PORTS, *args) for i in (0, 1)]
    addresses = [wait_ready(w, 2, ids=[i]).addresses[0] for i, w in enumerate(writers)]
    keys, ones = np.arange(200), np.ones((200, DIM), np.float32)
    with PSClient(addresses, timeout=30) as ps:
        ps.create_table(TableConfig("r", DIM, optimizer=SGD(lr=1.0)))
        ps.pull("r", keys)
        ps.push("r", keys, ones, step=0)
        ps.checkpoint(7)
        want7 = ps.pull("r", keys, train=False)
        ps.push("r", keys, ones, step=1)
        ps.checkpoint(9)
        want9 = ps.pull("r", keys, train=False)
    one = ("--shard-id", "0", "--shards", "1", *ANY_PORTS)
    latest = ctx.launch(*one, "--checkpoint-dir", str(root), "--restore", "latest")
    path = ctx.launch(*one, "--restore", str(root / "7"))
    for c, want in ((latest, want9), (path, want7)):
        with PSClient(wait_ready(c, 1).addresses, timeout=30) as ps:
            np.testing.assert_array_equal(ps.pull("r", keys, train=False), want)


def trainer_and_replica(ctx: Ctx, *replica_args: str) -> tuple[Cluster, Cluster, np.ndarray]:
    """A training shard with rows in table "t", and a replica of it (synced: SERVING)."""
    trainer = ctx.shard()
    keys = np.arange(100)
    with PSClient(trainer.addresses, timeout=10) as ps:
        ps.create_table(TableConfig("t", DIM, optimizer=SGD(lr=1.0)))
        ps.pull("t", keys)
        ps.push("t", keys, np.ones((100, DIM), np.float32))
    replica = ctx.shard("--replica-of", trainer.addresses[0], *replica_args)
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_until(lambda: health(replica.addresses[0]) == serving, 20, "the replica's first sync")
    return trainer, replica, keys


def check_replica_of(ctx: Ctx) -> None:
    trainer, replica, keys = trainer_and_replica(ctx)
    with (
        PSClient(trainer.addresses, timeout=10) as ps,
        PSClient(replica.addresses, timeout=10) as rep,
    ):

        def same() -> bool:
            want = ps.pull("t", keys, train=False)
            return bool(np.array_equal(rep.pull("t", keys, train=False), want))

        wait_until(same, 10, "the replica's rows")
        ps.push("t", keys[:10], np.ones((10, DIM), np.float32))  # it follows new pushes
        wait_until(same, 10, "the replica following a push")
    a = replica.addresses[0]
    with stub(a) as s:
        assert s.Stats(pb.StatsRequest(), timeout=10).replica_of == trainer.addresses[0]
    code, details = raw_pull(a, "t", keys[:3], 1)  # a training pull: a write
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "read-only replica" in details


def max_replica_lag(address: str, seconds: float) -> float:
    """The largest ``lag_seconds`` a replica's Stats reports over ``seconds``."""
    lag = 0.0
    end = time.monotonic() + seconds
    with stub(address) as s:
        while time.monotonic() < end:
            lag = max(lag, s.Stats(pb.StatsRequest(), timeout=10).lag_seconds)
            time.sleep(0.05)
    return lag


def check_replica_poll_seconds(ctx: Ctx) -> None:
    """Polled every 2 s, the state served ages to ~2 s between rounds (at the default 0.2 s
    it stays under ~0.3 s)."""
    _, replica, _ = trainer_and_replica(ctx, "--replica-poll-seconds", "2")
    lag = max_replica_lag(replica.addresses[0], 2.5)
    assert 1.2 < lag < 4.0, lag


def check_replica_dtype(ctx: Ctx) -> None:
    """An int8 replica answers within half a quantization step of each row, not bit for bit,
    in fewer bytes than a float32 replica of the same table."""
    trainer, f32, keys = trainer_and_replica(ctx)
    i8 = ctx.shard("--replica-of", trainer.addresses[0], "--replica-dtype", "int8",
                   "--replica-poll-seconds", "0.05")  # fmt: skip
    with (
        PSClient(trainer.addresses, timeout=10) as ps,
        PSClient(f32.addresses, timeout=10) as r32,
        PSClient(i8.addresses, timeout=10) as r8,
    ):
        want = ps.pull("t", keys, train=False)
        step = (want.max(axis=1) - want.min(axis=1))[:, None] / 255

        def close() -> bool:
            try:
                got = r8.pull("t", keys, train=False)
            except EmbpsError:
                return False
            return bool((np.abs(got - want) <= step / 2 * 1.001 + 1e-6).all())

        wait_until(close, 10, "the int8 replica's rows")
        assert not np.array_equal(r8.pull("t", keys, train=False), want)
        wait_until(lambda: r32.stats("t")[0].tables["t"]["keys"] == len(keys), 10, "f32 rows")
        assert r8.stats("t")[0].tables["t"]["bytes"] < r32.stats("t")[0].tables["t"]["bytes"]


def check_replica_checkpoint_dir(ctx: Ctx) -> None:
    """A replica given the training shard's checkpoint directory serves the checkpoint's
    rows with the training shard gone (without the flag it has nothing to serve)."""
    root = ctx.tmp / "replica-ck"
    trainer = ctx.shard("--checkpoint-dir", str(root), "--no-checkpoint-on-exit")
    keys = np.arange(50)
    with PSClient(trainer.addresses, timeout=10) as ps:
        ps.create_table(TableConfig("t", DIM, optimizer=SGD(lr=1.0)))
        ps.pull("t", keys)
        ps.push("t", keys, np.ones((50, DIM), np.float32))
        ps.checkpoint(1)
        want = ps.pull("t", keys, train=False)
    trainer.kill_all()
    follow = ("--replica-of", trainer.addresses[0])
    with_ck = ctx.shard(*follow, "--replica-checkpoint-dir", str(root))
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_until(lambda: health(with_ck.addresses[0]) == serving, 20, "serving the checkpoint")
    with PSClient(with_ck.addresses, timeout=10) as rep:
        np.testing.assert_array_equal(rep.pull("t", keys, train=False), want)
    without = ctx.shard(*follow)
    time.sleep(1.0)
    assert health(without.addresses[0]) != serving


def check_max_lag(ctx: Ctx) -> None:
    """The training shard gone, the replica's lag grows: past 1 s it reports NOT_SERVING,
    and still answers inference pulls."""
    trainer, replica, keys = trainer_and_replica(ctx, "--max-lag", "1")
    a = replica.addresses[0]
    trainer.kill_all()
    t0 = time.monotonic()
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    wait_until(lambda: health(a) == not_serving, 10, "NOT_SERVING past --max-lag")
    assert time.monotonic() - t0 > 0.5  # not at once: the lag had to pass 1 s
    assert http_get(f"http://127.0.0.1:{replica.shards[0].metrics_port}/readyz")[0] == 503
    with PSClient(replica.addresses, timeout=10) as rep:
        assert rep.pull("t", keys, train=False).shape == (100, DIM)


def check_evict_every(ctx: Ctx) -> None:
    c = ctx.shard("--evict-every", "0.5")
    cfg = TableConfig("t", DIM, steps_to_live=3)
    same = ctx.create(steps_to_live=3)  # the shared cluster: --evict-every 0
    with PSClient(c.addresses, timeout=10) as ps:
        ps.create_table(cfg)
        t0 = time.monotonic()
        make_stale(ps, "t")
        make_stale(ctx.ps, same.name)
        wait_until(lambda: total(ps, "t", "keys") == STL_KEPT.size, 10, "a periodic sweep")
        stale = STL_KEYS.size - STL_KEPT.size
        assert total(ps, "t", "evictions_steps_to_live") == stale
    time.sleep(max(0.0, t0 + 1.5 - time.monotonic()))  # three periods of 0.5 s
    assert total(ctx.ps, same.name, "keys") == STL_KEYS.size  # with 0: no sweep


def check_tls_cert(ctx: Ctx) -> None:
    certs = ctx.certs
    c = ctx.shard("--tls-cert", certs.server_cert, "--tls-key", certs.server_key)
    plain = PSClient(c.addresses, timeout=5, retry_deadline=0.3)
    with plain, pytest.raises(UnavailableError):
        plain.describe_tables()
    with PSClient(c.addresses, timeout=10, tls=TLSConfig(ca=certs.ca)) as ps:
        ps.create_table(TableConfig("t", DIM))
        assert ps.pull("t", [1, 2]).shape == (2, DIM)


def check_tls_key(ctx: Ctx) -> None:
    certs = ctx.certs  # a key that is not the certificate's: the shard refuses to start
    c = ctx.launch(
        "--shard-id",
        "0",
        "--shards",
        "1",
        *ANY_PORTS,
        "--tls-cert",
        certs.server_cert,
        "--tls-key",
        certs.other_server_key,
    )
    assert c.wait() == 2
    assert f"--tls-key {certs.other_server_key}" in c.log(), c.log()


def check_tls_client_ca(ctx: Ctx) -> None:
    certs = ctx.certs
    c = ctx.shard(
        "--tls-cert", certs.server_cert, "--tls-key", certs.server_key, "--tls-client-ca", certs.ca
    )
    no_cert = PSClient(c.addresses, timeout=5, retry_deadline=0.3, tls=TLSConfig(ca=certs.ca))
    with no_cert, pytest.raises(UnavailableError):
        no_cert.describe_tables()
    mtls = TLSConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    with PSClient(c.addresses, timeout=10, tls=mtls) as ps:
        ps.create_table(TableConfig("t", DIM))
        assert ps.pull("t", [1, 2]).shape == (2, DIM)


def check_auth_token_file(ctx: Ctx) -> None:
    admin, read = "admin-0123456789abcdef-TOKEN", "read-0123456789abcdef-TOKEN"
    tokens = ctx.tmp / "tokens"
    tokens.write_text(f"admin {admin}\nread {read}\n")
    c = ctx.shard("--auth-token-file", str(tokens))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a token over plaintext (loopback)
        anon = PSClient(c.addresses, timeout=10, retry_deadline=0)
        with anon, pytest.raises(UnauthenticatedError):
            anon.describe_tables()
        with PSClient(c.addresses, timeout=10, token=admin) as ps:
            ps.create_table(TableConfig("t", DIM))
            ps.pull("t", [1, 2])
        with PSClient(c.addresses, timeout=10, token=read) as ps:
            assert ps.pull("t", [1, 2], train=False).shape == (2, DIM)
            with pytest.raises(PermissionDeniedError):
                ps.push("t", [1, 2], np.ones((2, DIM), np.float32))


def secured_trainer(ctx: Ctx) -> tuple[Cluster, tuple[str, ...]]:
    """A mutual-TLS training shard with tokens and a table "t"; the replica flags that
    follow it (without the token file)."""
    certs = ctx.certs
    tokens = ctx.tmp / "replica-tokens"
    tokens.write_text("admin admin-0123456789abcdef-TOKEN\nread read-0123456789abcdef-TOKEN\n")
    trainer = ctx.shard("--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                        "--tls-client-ca", certs.ca, "--auth-token-file", str(tokens))  # fmt: skip
    mtls = TLSConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    with PSClient(trainer.addresses, timeout=10, tls=mtls,
                  token="admin-0123456789abcdef-TOKEN") as ps:  # fmt: skip
        ps.create_table(TableConfig("t", DIM))
        ps.pull("t", np.arange(50))
    follow = ("--replica-of", trainer.addresses[0], "--replica-tls-ca", certs.ca,
              "--replica-tls-cert", certs.client_cert, "--replica-tls-key", certs.client_key)  # fmt: skip
    return trainer, follow


def replica_synced(replica: Cluster, seconds: float) -> bool:
    """Whether the replica reports SERVING (its first sync done) within ``seconds``."""
    serving = health_pb2.HealthCheckResponse.SERVING
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if health(replica.addresses[0]) == serving:
            return True
        time.sleep(0.1)
    return False


def check_replica_token_file(ctx: Ctx) -> None:
    """With the read token the replica syncs from a token-protected shard; without, never."""
    _, follow = secured_trainer(ctx)
    token = ctx.tmp / "replica-token"
    token.write_text("read-0123456789abcdef-TOKEN\n")
    assert replica_synced(ctx.shard(*follow, "--replica-token-file", str(token)), 20)
    assert not replica_synced(ctx.shard(*follow), 1.5)


def check_replica_tls(ctx: Ctx) -> None:
    """--replica-tls-ca/-cert/-key: the replica syncs from a mutual-TLS shard; without its
    client certificate (CA only) the handshake fails and it never syncs."""
    _, follow = secured_trainer(ctx)
    token = ctx.tmp / "replica-token"
    token.write_text("read-0123456789abcdef-TOKEN\n")
    assert replica_synced(ctx.shard(*follow, "--replica-token-file", str(token)), 20)
    ca_only = follow[:4]  # --replica-of A --replica-tls-ca CA
    assert not replica_synced(ctx.shard(*ca_only, "--replica-token-file", str(token)), 1.5)


# --------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------

P = Promise
PROMISES: list[Promise] = [
    # TableConfig options (README "Table kinds")
    P("name", "a table is addressed by its name; another name is another table", check_name),
    P("dim", "rows have dim columns", check_dim),
    P("kind=dynamic", "one own row per key", check_kind_dynamic),
    P("kind=static", "keys share hash_bucket_size rows per shard", check_kind_static),
    P("kind=adaptive", "static rows first, own rows once promoted", check_kind_adaptive),
    P("kind=qr", "Q * m distinct rows from Q + m stored rows", check_kind_qr),
    P("optimizer=SGD", "w -= lr*g", optimizer_check(SGD(lr=0.3), ref_sgd)),
    P(
        "optimizer=Adagrad",
        "a += g^2; w -= lr*g/(sqrt(a)+eps)",
        optimizer_check(Adagrad(lr=0.1, initial_accumulator_value=0.2), ref_adagrad),
    ),
    P(
        "optimizer=Adam",
        "lazy Adam, bias correction with t = step + 1",
        optimizer_check(Adam(lr=0.05, beta1=0.8, beta2=0.99), ref_adam),
    ),
    P(
        "optimizer=FTRL",
        "TensorFlow's Ftrl",
        optimizer_check(FTRL(alpha=0.1, beta=1.0, l1=0.001, l2=0.01), ref_ftrl),
    ),
    P("initializer=zeros", "new rows are 0.0", check_initializer_zeros),
    P("initializer=constant", "new rows are a", check_initializer_constant),
    P("initializer=uniform", "U(a, b); a re-created row is identical", check_initializer_uniform),
    P("initializer=normal", "N(a, b)", check_initializer_normal),
    P("seed", "seeds the initializer and the static hashing", check_seed),
    P("initial_capacity", "an empty table reserves its rows", check_initial_capacity),
    P("admission_threshold", "a row at the N-th training sighting", check_admission_threshold),
    P("default_value", "what keys without a row read", check_default_value),
    P("max_rows", "eviction none: RESOURCE_EXHAUSTED at the cap, per shard", check_max_rows),
    P("eviction=lfu", "at the cap the least pulled row goes", eviction_check("lfu")),
    P("eviction=lru", "at the cap the least recently touched row goes", eviction_check("lru")),
    P("steps_to_live", "evict() removes rows untouched for that many steps", check_steps_to_live),
    P("l2_evict_threshold", "evict() removes rows of small L2 norm", check_l2_evict_threshold),
    P("max_bytes", "Stats bytes never pass it", check_max_bytes),
    P("hash_bucket_size", "static rows per shard", check_hash_bucket_size),
    P(
        "promote_threshold",
        "own row at the N-th sighting, from the static row",
        check_promote_threshold,
    ),
    P("sketch_width", "sketch bytes: 4 * width * depth", sketch_check("sketch_width")),
    P("sketch_depth", "sketch bytes: 4 * width * depth", sketch_check("sketch_depth")),
    P("qr_quotient_buckets", "Q quotient rows: (h mod Q*m) // m", check_qr_quotient_buckets),
    P("qr_remainder_buckets", "m remainder rows: h mod m", check_qr_remainder_buckets),
    P("qr_combiner=mult", "Q[q] * R[r] (the default)", combiner_check("mult", 0.25, 0.0)),
    P("qr_combiner=add", "Q[q] + R[r]", combiner_check("add", 1.0, -1.0)),
    P("qr_combiner=concat", "[Q[q], R[r]]", combiner_check("concat", 0.5, -0.5)),
    # `embps serve` flags (README "Command line", `embps serve --help`)
    P("--shards", "N processes, each says N; another count is FAILED_PRECONDITION", check_shards),
    P("--host", "listens on that interface only", check_host),
    P("--port", "shard i on P+i", check_port),
    P("--metrics-port", "shard i's /metrics on M+i", check_metrics_port),
    P("--config", "tables and server options from the file; flags win", check_config),
    P("--shard-id", "one shard in this process, on exactly --port", check_shard_id),
    P("--max-keys-per-request", "K+1 keys: RESOURCE_EXHAUSTED", check_max_keys_per_request),
    P("--max-message-bytes", "a message over B: RESOURCE_EXHAUSTED", check_max_message_bytes),
    P("--max-workers", "W=1: calls are served one at a time", check_max_workers),
    P("--grace-seconds", "a call in flight at SIGTERM is cut after S", check_grace_seconds),
    P(
        "--drain-delay-seconds",
        "NOT_SERVING for D s while serving, then exit 0",
        check_drain_delay_seconds,
    ),
    P("--verify-routing", "a misrouted key is FAILED_PRECONDITION", check_verify_routing),
    P("--no-verify-routing", "a misrouted key is served", check_no_verify_routing),
    P("--log-level", "WARNING: no INFO lines", check_log_level),
    P("--checkpoint-dir", "DIR/<step>/shard-i-of-n, one more on exit", check_checkpoint_dir),
    P("--checkpoint-every", "checkpoints without a call", check_checkpoint_every),
    P(
        "--checkpoint-incremental",
        "K=2: full and incremental alternate",
        check_checkpoint_incremental,
    ),
    P("--checkpoint-on-exit", "a checkpoint after SIGTERM", check_checkpoint_on_exit),
    P("--no-checkpoint-on-exit", "no checkpoint after SIGTERM", check_no_checkpoint_on_exit),
    P("--restore", "latest or a path: the rows are served again (resharded)", check_restore),
    P("--replica-of", "a read-only shard serving the training shard's rows", check_replica_of),
    P("--replica-poll-seconds", "S=2: the state served ages to ~S", check_replica_poll_seconds),
    P("--max-lag", "NOT_SERVING once the lag passes S", check_max_lag),
    P("--replica-dtype", "int8 rows: within half a step, fewer bytes", check_replica_dtype),
    P(
        "--replica-checkpoint-dir",
        "serves the checkpoint, trainer gone",
        check_replica_checkpoint_dir,
    ),
    P("--replica-token-file", "the read token lets a replica sync", check_replica_token_file),
    P("--replica-tls-ca", "a replica syncs over mutual TLS", check_replica_tls),
    P("--replica-tls-cert", "without the client certificate: no sync", check_replica_tls),
    P(
        "--replica-tls-key",
        "the client certificate's key (with --replica-tls-cert)",
        check_replica_tls,
    ),
    P("--evict-every", "steps_to_live sweeps without an Evict call", check_evict_every),
    P("--tls-cert", "TLS only: plaintext fails, a client of the CA works", check_tls_cert),
    P("--tls-key", "the certificate's key; another one stops the shard", check_tls_key),
    P("--tls-client-ca", "mutual TLS: no client certificate fails", check_tls_client_ca),
    P("--auth-token-file", "no token: UNAUTHENTICATED; read cannot push", check_auth_token_file),
]


# --------------------------------------------------------------------------
# Fixtures and tests
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    """One 2-shard `embps serve` for every TableConfig row, on fixed ports (the --port and
    --metrics-port rows), without periodic eviction sweeps (the eviction rows sweep when
    they say)."""
    port = free_port_range(2)
    metrics = free_port_range(2)
    while abs(metrics - port) < 2:
        metrics = free_port_range(2)
    args = ("--evict-every", "0", "--port", str(port), "--metrics-port", str(metrics))
    with running_cluster(2, *args) as c, PSClient(c.addresses, timeout=60) as ps:
        yield Shared(c, ps, port, metrics)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("promise", [pytest.param(p, id=p.name) for p in PROMISES])
def test_promise(promise: Promise, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    promise.check(Ctx(request, tmp_path, "p_" + re.sub(r"\W", "_", promise.name)))


def test_every_table_option_has_a_row() -> None:
    fields = {f.name for f in dataclasses.fields(TableConfig)}
    rows = {p.option for p in PROMISES if not p.name.startswith("--")}
    assert sorted(fields - rows) == [], "TableConfig fields without a promise row"
    assert sorted(rows - fields) == [], "promise rows that name no TableConfig field"
    options = _readme_table(README.read_text(), "| option | kinds | meaning |")
    documented = {
        name
        for line in options  # first cell, defaults in [brackets] left out
        for name in re.findall(r"`([a-z_]+)`", re.sub(r"\[[^\]]*\]", "", line.split("|")[1]))
    }
    assert len(documented) > 15, options
    assert sorted(documented - rows) == [], "README options without a promise row"


def test_every_serve_flag_has_a_row() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "embps.client.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    printed = set()
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):  # an option's line: its flags, then (maybe) its help
            printed |= set(re.findall(r"--[a-z][a-z0-9-]*", re.split(r"\s{2,}", line.strip())[0]))
    printed.discard("--help")
    rows = {p.name for p in PROMISES if p.name.startswith("--")}
    assert len(printed) > 20, help_text
    assert sorted(printed - rows) == [], "`embps serve --help` flags without a promise row"
    assert sorted(rows - printed) == [], "promise rows that name no `embps serve` flag"
    flags = _readme_table(README.read_text(), "`embps serve` flags:")
    documented = {f for line in flags for f in re.findall(r"--[a-z][a-z0-9-]*", line.split("|")[1])}
    assert len(documented) > 20, flags
    assert sorted(documented - rows) == [], "README flags without a promise row"


def _readme_table(text: str, after: str) -> list[str]:
    """The body rows of the first markdown table at or after the line containing ``after``."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if after in line)
    while not lines[i].startswith("|"):
        i += 1
    rows = []
    for line in lines[i + 2 :]:  # past the header and the rule
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows
