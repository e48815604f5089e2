"""Fuzzing a live shard: thousands of malformed and random requests, one healthy shard after.

A shard built in-process (shard 0 of 2, every table kind holding rows) gets
random requests through the raw gRPC method paths: structured ones from
hypothesis (random bytes in every field, key and gradient lengths that are
not multiples of 8 or 4, huge key counts, unknown tables, NaN/Inf
gradients and thresholds, wrong shard counts, garbage enum values, absurd
table configs, garbage checkpoints), and bytes that are not even valid
protobuf. Every answer must be OK or an expected status, never UNKNOWN or
INTERNAL; requests that would change a live table are sent only with a defect
the shard must refuse (``fuzz_requests.guard``); afterwards the shard is
SERVING and a checksum of every live table is unchanged. A second test runs
atheris (coverage-guided mutation) in a subprocess against its own shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embps.protos import codec
from embps.protos.config import TableConfig
from embps.server.service import ShardServer
from embps.v1 import embps_pb2 as pb

from .fuzz_requests import (
    ALLOWED,
    FOREIGN,
    FRESH,
    FUZZ_NAMES,
    LIVE,
    LIVE_NAMES,
    MAX_KEYS,
    METHODS,
    N_SHARDS,
    OWNED,
    POPULATED,
    Code,
    Request,
    call,
    check_answer,
    checksum,
    guard,
    serving,
    start_shard,
)

FUZZ_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShardServer]:
    s = start_shard(tmp_path_factory.mktemp("fuzz-checkpoints"))
    try:
        yield s
    finally:
        s.stop(grace=0)


@pytest.fixture(scope="module")
def channel(shard: ShardServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shard.address) as ch:
        yield ch


def send(channel: grpc.Channel, req: Request) -> str:
    """Send one request, check its answer; the status name."""
    code, details, resp = call(channel, req.method, req.data())
    check_answer(req, code, details, resp)
    return code.name


def assert_unchanged(shard: ShardServer, baseline: dict[str, str]) -> None:
    assert serving(shard.address), "the shard must still be SERVING"
    now = checksum(shard.engine)
    changed = sorted(n for n in LIVE_NAMES if now[n] != baseline[n])
    assert not changed, f"live tables changed by refused or read-only requests: {changed}"


# --------------------------------------------------------------------------
# Field strategies
# --------------------------------------------------------------------------

U32 = 2**32 - 1
U64 = 2**64 - 1
# Sizes: small (valid) or over any machine's memory; never in between, so a
# valid create allocates little and an absurd one is refused, not attempted.
SIZES = st.sampled_from([0, 1, 2, 16, 64, 2**40, 2**62, 2**63 - 1, 2**63, U64])
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-3, 0.5, 1.0, -1.0, 1e308, -1e308, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=True),
)
ENUMS = st.one_of(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1))
NUM_SHARDS = st.one_of(st.just(N_SHARDS), st.just(N_SHARDS), st.integers(0, U32))
TABLES = st.one_of(
    st.sampled_from(LIVE_NAMES),
    st.sampled_from(FUZZ_NAMES),
    st.sampled_from(["", "nope", "live_dyn ", "LIVE_DYN", "a" * 300, "\x00", "t\u00e9"]),
    st.text(max_size=12).filter(lambda s: s not in LIVE),
)


@st.composite
def key_bytes(draw: st.DrawFn) -> bytes:
    """Keys: owned ones (extremes included), some foreign, random bytes, or too many."""
    choice = draw(st.integers(0, 9))
    if choice <= 5:
        pool = draw(st.sampled_from([OWNED, POPULATED, FRESH]))
        idx = draw(st.lists(st.integers(0, len(pool) - 1), max_size=24))
        return codec.encode_keys(pool[np.array(idx, dtype=np.int64)])
    if choice == 6:
        keys = draw(st.lists(st.sampled_from(list(OWNED[:20]) + list(FOREIGN[:4])), max_size=8))
        return codec.encode_keys(np.array(keys, dtype=np.int64))
    if choice == 7:
        return codec.encode_keys(OWNED[: draw(st.integers(MAX_KEYS - 1, MAX_KEYS + 40))])
    return draw(st.binary(max_size=80))


@st.composite
def value_bytes(draw: st.DrawFn, n_keys: int, dim: int) -> tuple[int, bytes]:
    """(dtype, gradients): the right length or not, finite or not, any dtype."""
    dtype = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), ENUMS))
    choice = draw(st.integers(0, 4))
    if choice <= 2 and dtype in codec.ITEMSIZE:
        g = draw(st.lists(FLOATS, min_size=n_keys * dim, max_size=n_keys * dim))
        arr = np.array(g, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            data = codec.wire_values(arr.astype(np.float32).reshape(n_keys, dim), dtype).tobytes()
        return dtype, data
    if choice == 3:
        return dtype, draw(st.binary(max_size=n_keys * dim * 4 + 9))
    return dtype, b"\x00" * draw(st.integers(0, n_keys * dim * 4 + 3))


def dim_of(table: str) -> int:
    return LIVE[table].dim if table in LIVE else 4


@st.composite
def pull(draw: st.DrawFn) -> Request:
    keys = draw(key_bytes())
    msg = pb.PullRequest(
        table=draw(TABLES),
        keys=keys,
        train=draw(st.booleans()),
        num_shards=draw(NUM_SHARDS),
        dtype=draw(ENUMS),
        mask=draw(
            st.one_of(st.just(b""), st.binary(max_size=30), st.just(b"\x01" * (len(keys) // 8)))
        ),
    )
    return Request("Pull", msg)


@st.composite
def push(draw: st.DrawFn) -> Request:
    table = draw(TABLES)
    keys = draw(key_bytes())
    dtype, grads = draw(value_bytes(max(len(keys) // 8, 0), dim_of(table)))
    msg = pb.PushRequest(
        table=table, keys=keys, grads=grads, dtype=dtype, num_shards=draw(NUM_SHARDS)
    )
    if draw(st.booleans()):
        msg.step = draw(st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, 10)))
    if draw(st.booleans()):
        msg.client_id = draw(st.text(max_size=20))
        msg.sequence = draw(st.integers(0, U64))
    return Request("Push", msg)


@st.composite
def table_config(draw: st.DrawFn) -> pb.TableConfig:
    """Any TableConfig message: valid and small, or absurd in any field."""
    c = pb.TableConfig(
        name=draw(st.one_of(st.sampled_from(FUZZ_NAMES + LIVE_NAMES), TABLES)),
        dim=draw(st.sampled_from([0, 1, 2, 3, 4, 8, 65536, 65537, U32])),
        kind=draw(ENUMS),
        seed=draw(st.sampled_from([0, 1, 2**63 - 1, 2**63, U64])),
        initial_capacity=draw(SIZES),
        admission_threshold=draw(st.sampled_from([0, 1, 2, 3, U32])),
        default_value=draw(FLOATS),
        max_rows=draw(SIZES),
        eviction=draw(ENUMS),
        steps_to_live=draw(st.sampled_from([0, 1, 2**63, U64])),
        l2_evict_threshold=draw(FLOATS),
        max_bytes=draw(st.sampled_from([0, 1, 303, 304, 10_000, 10**6, 2**63 - 1, U64])),
        hash_bucket_size=draw(SIZES),
        promote_threshold=draw(st.sampled_from([0, 1, 2, U32])),
        sketch_width=draw(st.sampled_from([0, 1, 3, 64, 1024, 2**16, 2**31 + 1, U32])),
        sketch_depth=draw(st.sampled_from([0, 1, 4, 16, 17, U32])),
        qr_quotient_buckets=draw(SIZES),
        qr_remainder_buckets=draw(SIZES),
        qr_combiner=draw(ENUMS),
    )
    opt = draw(st.sampled_from(["sgd", "adagrad", "adam", "ftrl", None]))
    if opt == "sgd":
        c.optimizer.sgd.lr = draw(FLOATS)
    elif opt == "adagrad":
        c.optimizer.adagrad.CopyFrom(
            pb.Adagrad(lr=draw(FLOATS), initial_accumulator_value=draw(FLOATS), eps=draw(FLOATS))
        )
    elif opt == "adam":
        c.optimizer.adam.CopyFrom(
            pb.Adam(lr=draw(FLOATS), beta1=draw(FLOATS), beta2=draw(FLOATS), eps=draw(FLOATS))
        )
    elif opt == "ftrl":
        c.optimizer.ftrl.CopyFrom(
            pb.Ftrl(
                alpha=draw(FLOATS),
                beta=draw(FLOATS),
                l1=draw(FLOATS),
                l2=draw(FLOATS),
                initial_accumulator_value=draw(FLOATS),
            )
        )
    if draw(st.booleans()):
        c.initializer.CopyFrom(pb.Initializer(kind=draw(ENUMS), a=draw(FLOATS), b=draw(FLOATS)))
    return c


@st.composite
def valid_create(draw: st.DrawFn) -> Request:
    """A create that must succeed (or find the identical table): a small table of any kind."""
    name = draw(st.sampled_from(FUZZ_NAMES))
    kind = draw(st.sampled_from(["dynamic", "static", "adaptive", "qr"]))
    dim = draw(st.sampled_from([1, 2, 4]))
    extra = {
        "dynamic": {"max_rows": 32, "eviction": draw(st.sampled_from(["none", "lfu"]))},
        "static": {"hash_bucket_size": 16},
        "adaptive": {"hash_bucket_size": 8, "promote_threshold": 2, "sketch_width": 64},
        "qr": {"qr_quotient_buckets": 4, "qr_remainder_buckets": 4},
    }[kind]
    cfg = TableConfig(name, dim=dim, kind=kind, seed=draw(st.integers(0, 3)), **extra)  # type: ignore[arg-type]
    return Request("CreateTable", pb.CreateTableRequest(config=cfg.to_proto()))


@st.composite
def other(draw: st.DrawFn) -> Request:
    method = draw(
        st.sampled_from(
            [
                "CreateTable",
                "DescribeTables",
                "DropTable",
                "Prune",
                "Stats",
                "Checkpoint",
                "Frequencies",
            ]
        )
    )
    if method == "CreateTable":
        return Request(method, pb.CreateTableRequest(config=draw(table_config())))
    if method == "DescribeTables":
        return Request(method, pb.DescribeTablesRequest())
    if method == "DropTable":
        return Request(
            method, pb.DropTableRequest(name=draw(st.one_of(st.sampled_from(FUZZ_NAMES), TABLES)))
        )
    if method == "Prune":
        msg = pb.PruneRequest(
            table=draw(TABLES),
            threshold=draw(FLOATS),
            norm=draw(ENUMS),
            num_shards=draw(NUM_SHARDS),
        )
        return Request(method, msg)
    if method == "Stats":
        return Request(method, pb.StatsRequest(table=draw(TABLES)))
    if method == "Checkpoint":
        msg = pb.CheckpointRequest(
            step=draw(st.sampled_from([0, 1, 7, 2**63, U64])),
            kind=draw(ENUMS),
            num_shards=draw(st.one_of(st.integers(0, U32), st.just(N_SHARDS + 1))),
        )
        return Request(method, msg)
    return Request(
        method,
        pb.FrequenciesRequest(
            table=draw(TABLES), keys=draw(key_bytes()), num_shards=draw(NUM_SHARDS)
        ),
    )


@st.composite
def full_table_pull(draw: st.DrawFn) -> Request:
    """A training pull of new keys into the full live_cap table: RESOURCE_EXHAUSTED."""
    idx = draw(st.lists(st.integers(0, len(FRESH) - 1), min_size=1, max_size=20))
    keys = codec.encode_keys(FRESH[np.array(idx, dtype=np.int64)])
    return Request(
        "Pull",
        pb.PullRequest(table="live_cap", keys=keys, train=True, num_shards=N_SHARDS),
        expect=Code.RESOURCE_EXHAUSTED,
    )


@st.composite
def request(draw: st.DrawFn) -> Request:
    req = draw(st.one_of(pull(), push(), other(), other(), valid_create(), full_table_pull()))
    return guard(req, draw(st.integers(0, 2**16)))


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_structured_random_requests_get_proper_answers_and_change_nothing(shard, channel):
    baseline = checksum(shard.engine)
    seen: Counter[str] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=300)
    @given(reqs=st.lists(request(), min_size=8, max_size=16))
    def run(reqs: list[Request]) -> None:
        for req in reqs:
            seen[send(channel, req)] += 1

    run()
    assert seen.total() >= 2000, f"too few requests sent: {seen}"
    for code in (
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
    ):
        assert seen[code] > 0, f"no request answered {code}: {seen}"
    assert_unchanged(shard, baseline)


@st.composite
def raw_message(draw: st.DrawFn) -> tuple[str, bytes]:
    """Method and bytes: random, or a valid message of any method with bytes flipped / cut."""
    method = draw(st.sampled_from(sorted(METHODS)))
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return method, draw(st.binary(max_size=200))
    seed = {
        "Pull": pb.PullRequest(
            table="fz_0", keys=codec.encode_keys(OWNED[:3]), train=True, num_shards=N_SHARDS
        ),
        "Push": pb.PushRequest(
            table="fz_1",
            keys=codec.encode_keys(OWNED[:2]),
            grads=b"\x00" * 32,
            num_shards=N_SHARDS,
            step=3,
        ),
        "CreateTable": pb.CreateTableRequest(
            config=pb.TableConfig(name="fz_2", dim=4, kind=pb.TABLE_KIND_STATIC, hash_bucket_size=8)
        ),
        "DescribeTables": pb.DescribeTablesRequest(),
        "DropTable": pb.DropTableRequest(name="fz_3"),
        "Prune": pb.PruneRequest(table="fz_0", threshold=0.5, num_shards=N_SHARDS),
        "Stats": pb.StatsRequest(table="fz_1"),
        "Checkpoint": pb.CheckpointRequest(step=1, num_shards=N_SHARDS + 1),
        "Frequencies": pb.FrequenciesRequest(
            table="fz_2", keys=codec.encode_keys(OWNED[:2]), num_shards=N_SHARDS
        ),
    }[method].SerializeToString()
    data = bytearray(seed)
    if choice == 1 and data:
        for pos, val in draw(
            st.lists(
                st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                min_size=1,
                max_size=4,
            )
        ):
            data[pos] = val
    else:
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=12))
    return method, bytes(data)


def test_bytes_that_are_not_valid_messages_get_proper_answers_and_change_nothing(shard, channel):
    baseline = checksum(shard.engine)
    seen: Counter[str] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=1000)
    @given(msg=raw_message())
    def run(msg: tuple[str, bytes]) -> None:
        method, data = msg
        code, details, _ = call(channel, method, data)
        seen[code.name] += 1
        assert code in ALLOWED, f"{method} {data!r}: {code.name}: {details}"

    run()
    assert seen["INVALID_ARGUMENT"] > 0 and seen["OK"] > 0, seen
    assert_unchanged(shard, baseline)


# --------------------------------------------------------------------------
# atheris: coverage-guided mutation, in a subprocess (it exits the process)
# --------------------------------------------------------------------------

ATHERIS_RUNS = 3000


def test_atheris_mutation_against_a_live_shard(tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (dev extra, Linux, Python < 3.13)")
    status = tmp_path / "status.json"
    script = Path(__file__).with_name("fuzz_atheris.py")
    env = {**os.environ, "EMBPS_FUZZ_STATUS": str(status), "EMBPS_FUZZ_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script), f"-runs={ATHERIS_RUNS}", "-max_total_time=60", "-seed=1",
         "-max_len=512", "-len_control=0"],
        env=env, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    out = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    got = json.loads(status.read_text())
    assert got["checked"] >= 2000, got
    assert got["verified"] >= 1 and got["failures"] == [], got
    assert set(got["codes"]) <= {c.name for c in ALLOWED}, got
