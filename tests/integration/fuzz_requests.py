"""A live shard to fuzz, its checksum, and the rule that keeps fuzzing from changing it.

Used by tests/integration/test_fuzz.py (hypothesis) and fuzz_atheris.py
(atheris, in a subprocess). The shard is shard 0 of 2 (so misrouted keys are
possible), with small request limits and one table of every kind, each
holding rows. "Live" tables are the ones the checksum covers: a request that
could change one (a training pull, a push, a prune, a drop) is sent to it
only with a defect that the shard must refuse (``guard``); valid mutations go
to fuzz tables (``fz_*``) that the fuzzer creates and drops as it likes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embps.protos import codec
from embps.protos.config import FTRL, Adagrad, Adam, TableConfig
from embps.protos.limits import SERVICE_NAME
from embps.protos.routing import shard_of
from embps.server.engine import Engine
from embps.server.service import ShardConfig, ShardServer, build_server
from embps.v1 import embps_pb2 as pb

N_SHARDS = 2
MAX_KEYS = 256
MAX_MESSAGE = 1 << 16
Code = grpc.StatusCode
# Every answer must be one of these: UNKNOWN or INTERNAL mean an unhandled exception.
ALLOWED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.RESOURCE_EXHAUSTED,
        Code.ALREADY_EXISTS,
        Code.OUT_OF_RANGE,
    }
)

LIVE: dict[str, TableConfig] = {
    c.name: c
    for c in (
        TableConfig("live_dyn", dim=4, optimizer=Adam(lr=0.01)),
        TableConfig("live_adm", dim=3, admission_threshold=2, max_rows=64, eviction="lfu"),
        # Full, without eviction: a training pull of a new key must be refused.
        TableConfig("live_cap", dim=2, max_bytes=TableConfig("x", dim=2).fixed_bytes + 12 * 56),
        TableConfig("live_static", dim=5, kind="static", hash_bucket_size=32,
                    optimizer=Adagrad(lr=0.1)),
        TableConfig("live_ada", dim=4, kind="adaptive", hash_bucket_size=16, promote_threshold=2,
                    sketch_width=256, optimizer=FTRL(), max_bytes=1 << 20),
        TableConfig("live_qr", dim=6, kind="qr", qr_quotient_buckets=8, qr_remainder_buckets=4,
                    qr_combiner="concat"),
    )
}  # fmt: skip
LIVE_NAMES = sorted(LIVE)
FUZZ_NAMES = [f"fz_{i}" for i in range(4)]

# Keys this shard owns (extremes included) and keys it does not.
_CAND = np.concatenate(
    [
        np.array([-(2**63), 2**63 - 1, -1, 0, 1, 2**31, -(2**31)], dtype=np.int64),
        np.arange(-600, 600, dtype=np.int64) * 7919,
    ]
)
OWNED = _CAND[shard_of(_CAND, N_SHARDS) == 0]
FOREIGN = _CAND[shard_of(_CAND, N_SHARDS) == 1]
POPULATED = OWNED[: len(OWNED) // 2]  # pulled for training at start
FRESH = OWNED[len(OWNED) // 2 :]  # never pulled for training: new keys to every table
assert len(OWNED) > 2 * MAX_KEYS + 2 and len(FOREIGN) > 0


def start_shard(checkpoint_dir: Path) -> ShardServer:
    """Shard 0 of 2 on 127.0.0.1, every LIVE table created and holding rows."""
    shard = build_server(
        ShardConfig(
            shard_id=0,
            num_shards=N_SHARDS,
            port=0,
            max_keys_per_request=MAX_KEYS,
            max_message_bytes=MAX_MESSAGE,
            max_workers=4,
            tables=tuple(LIVE.values()),
            checkpoint_dir=str(checkpoint_dir),
            checkpoint_on_exit=False,
        )
    )
    shard.start()
    rng = np.random.default_rng(7)
    for name in LIVE_NAMES:
        t = shard.engine.table(name)
        keys = POPULATED[: {"live_cap": 12, "live_adm": 48}.get(name, len(POPULATED))]
        for step in range(3):  # admission / promotion need repeated sightings
            t.pull(keys, train=True)
            grads = rng.normal(0, 0.1, (len(keys), t.dim)).astype(np.float32)
            t.push(keys, grads, step=step)
    cap = shard.engine.table("live_cap")
    assert cap.stats().keys == cap.row_limit == 12, "live_cap must be full"
    return shard


def checksum(engine: Engine) -> dict[str, str]:
    """sha256 per LIVE table of every array it owns (snapshot + hash map) and its step."""
    out = {}
    for name in LIVE_NAMES:
        t = engine.table(name)
        h = hashlib.sha256(repr(t.config).encode())
        snap = t.snapshot()
        for key in sorted(snap.arrays):
            a = np.ascontiguousarray(snap.arrays[key])
            h.update(f"{key}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
        part = getattr(t, "part", None)
        if part is not None:
            h.update(part.buckets.tobytes())
            h.update(part.meta.tobytes())
        h.update(f"step={snap.state['step']}/{snap.state['auto_step']}".encode())
        out[name] = h.hexdigest()
    return out


def serving(address: str) -> bool:
    """gRPC health of the ParameterServer service is SERVING."""
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------

METHODS: dict[str, type] = {
    "Pull": pb.PullRequest,
    "Push": pb.PushRequest,
    "CreateTable": pb.CreateTableRequest,
    "DescribeTables": pb.DescribeTablesRequest,
    "DropTable": pb.DropTableRequest,
    "Prune": pb.PruneRequest,
    "Stats": pb.StatsRequest,
    "Checkpoint": pb.CheckpointRequest,
    "Frequencies": pb.FrequenciesRequest,
}

# Defects the shard must refuse before it changes anything, per mutating method.
DEFECTS: dict[str, tuple[str, ...]] = {
    "Pull": ("shards", "key_bytes", "dtype", "mask", "too_many", "misrouted"),
    "Push": ("shards", "key_bytes", "dtype", "too_many", "misrouted", "grad_bytes", "nan",
             "negative_step"),
    "Prune": ("shards", "nan", "negative", "norm"),
}  # fmt: skip


@dataclass
class Request:
    """One request to send: the method, its message, and whether it must be refused."""

    method: str
    message: Any
    must_fail: bool = False
    expect: grpc.StatusCode | None = None  # a precise status, where the request implies one

    def data(self) -> bytes:
        return bytes(self.message.SerializeToString())


def guard(req: Request, defect: int) -> Request:
    """Make a request that could change a LIVE table one the shard must refuse.

    Training pulls, pushes and prunes of a LIVE table get the defect
    ``DEFECTS[method][defect % n]``; a drop of a LIVE table is renamed to a
    fuzz table. Everything else passes unchanged (read-only, or aimed at fuzz
    tables, or a create: an existing name answers created=False or
    ALREADY_EXISTS).
    """
    m = req.message
    if req.expect is not None:  # refused by construction (a precise status is expected)
        req.must_fail = req.expect != Code.OK
        return req
    if req.method == "DropTable" and m.name in LIVE:
        m.name = FUZZ_NAMES[0]
        return req
    if req.method not in DEFECTS or m.table not in LIVE:
        return req
    if req.method == "Pull" and not m.train:
        return req
    kind = DEFECTS[req.method][defect % len(DEFECTS[req.method])]
    dim = LIVE[m.table].dim
    if kind == "shards":
        m.num_shards = N_SHARDS + 1 + defect % 5
    elif kind == "key_bytes":
        m.keys = bytes(m.keys) + b"\x01" * (1 + defect % 7)
    elif kind == "dtype":
        m.dtype = 4 + defect % 1000
    elif kind == "mask":
        m.mask = b"\x01" * (len(m.keys) // 8 + 1)
    elif kind == "too_many":
        m.keys = codec.encode_keys(OWNED[: MAX_KEYS + 1])
    elif kind == "misrouted":
        m.num_shards = N_SHARDS
        m.keys = bytes(m.keys) + codec.encode_keys(FOREIGN[defect % len(FOREIGN) :][:1])
    elif kind == "grad_bytes":
        m.grads = bytes(m.grads) + b"\x00" * (1 + defect % 3)
    elif kind == "nan" and req.method == "Push":
        n = max(1, len(m.keys) // 8)
        if len(m.keys) // 8 == 0 or len(m.keys) % 8:
            m.keys = codec.encode_keys(OWNED[:n])
        g = np.zeros((n, dim), dtype=np.float32)
        g.flat[defect % g.size] = (np.nan, np.inf, -np.inf)[defect % 3]
        m.dtype, m.grads = pb.DTYPE_FLOAT32, g.tobytes()
    elif kind == "negative_step":
        m.step = -1 - defect
    elif kind == "nan":  # Prune
        m.threshold = (np.nan, np.inf, -np.inf)[defect % 3]
    elif kind == "negative":
        m.threshold = -1.0 - defect
    else:  # norm
        m.norm = 4 + defect % 100
    req.must_fail = True
    return req


def check_answer(req: Request, code: grpc.StatusCode, details: str, response: bytes | None) -> None:
    """The shard's answer to ``req`` must be proper; AssertionError saying why not."""
    what = f"{req.method} {str(req.message)[:300]!r}"
    assert code in ALLOWED, f"{what}: got {code.name}: {details[:500]}"
    if req.must_fail:
        assert code != Code.OK, f"{what}: must be refused, got OK"
    if req.expect is not None:
        assert code == req.expect, f"{what}: expected {req.expect.name}, got {code.name}: {details}"
    if code != Code.OK:
        assert details, f"{what}: {code.name} without a message"
        return
    assert response is not None
    if req.method == "Pull" and req.message.table in LIVE:
        resp = pb.PullResponse.FromString(response)
        dim = LIVE[req.message.table].dim
        n = len(req.message.keys) // 8
        assert resp.dim == dim and len(resp.values) == n * dim * codec.ITEMSIZE[resp.dtype], what


def call(
    channel: grpc.Channel, method: str, data: bytes
) -> tuple[grpc.StatusCode, str, bytes | None]:
    """Send raw request bytes; (status, details, raw response or None)."""
    stub = channel.unary_unary(f"/{SERVICE_NAME}/{method}")
    try:
        resp = stub(data, timeout=30)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None
    return Code.OK, "", resp
