"""`embps bench service` at a tiny size: real shards, echo server and redis-server; every JSON
key is there and positive, the report reads, and the Redis baseline moves the right bytes."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

from embps.client.bench import service as bs
from embps.client.cli import main

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"
)

REQUIRED = (
    # throughput, rows per second
    "pull_rows_s",
    "push_rows_s",
    "echo_rows_s",
    "redis_pull_rows_s",
    "redis_push_rows_s",
    "pull_fp16_rows_s",
    "pull_train_rows_s",
    "pull_sorted_rows_s",
    "push_fp16_rows_s",
    "echo_fp16_rows_s",
    "echo_push_rows_s",
    "echo_push_fp16_rows_s",
    "pull_2shard_rows_s",
    "push_2shard_rows_s",
    # ratios
    "pull_vs_echo",
    "pull_vs_redis",
    "push_vs_redis",
    "push_vs_echo",
    "pull_2shard_vs_1shard",
    "push_2shard_vs_1shard",
    # configuration
    "rows",
    "dim",
    "batches",
    "reps",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    path = tmp_path_factory.mktemp("bench") / "service.json"
    # --default-malloc: tune_malloc() would change this test process's allocator for good
    argv = ["bench", "service", "--rows", "300", "--batches", "2", "--reps", "1",
            "--default-malloc"]  # fmt: skip
    assert main([*argv, "--json", str(path)]) == 0
    result: dict[str, object] = json.loads(path.read_text())
    return result


def test_json_has_every_required_key_with_a_positive_number(tiny_run) -> None:
    for key in REQUIRED:
        assert key in tiny_run, key
        v = tiny_run[key]
        assert isinstance(v, int | float) and not isinstance(v, bool), (key, v)
        assert math.isfinite(v) and v > 0, (key, v)
    assert (tiny_run["rows"], tiny_run["dim"], tiny_run["batches"]) == (300, bs.DIM, 2)
    assert tiny_run["quick"] is False and tiny_run["malloc_tuned"] is False
    assert 0 <= tiny_run["targets_met"] <= tiny_run["targets_total"] == len(bs.TARGETS)
    assert tiny_run["pull_vs_echo"] == pytest.approx(
        tiny_run["pull_rows_s"] / tiny_run["echo_rows_s"]
    )


def test_report_shows_each_baseline_target_and_the_count(tiny_run) -> None:
    text = bs.report(tiny_run)
    for t in bs.TARGETS:
        assert t.text() in text
    for name in ("gRPC echo", "Redis MGET", "Redis MSET", "1 shard"):
        assert name in text
    assert f"targets met: {tiny_run['targets_met']} of {len(bs.TARGETS)}" in text


def test_batches_are_distinct_keys() -> None:
    pool = bs.make_batches(3, 1000, seed=1)
    keys = np.concatenate(pool)
    assert [b.shape for b in pool] == [(1000,)] * 3 and keys.dtype == np.int64
    assert np.unique(keys).shape[0] == 3000
    assert all(np.array_equal(a, b) for a, b in zip(pool, bs.make_batches(3, 1000, 1), strict=True))


@pytest.fixture
def redis() -> Iterator[bs.RespClient]:
    assert REDIS is not None
    with contextlib.ExitStack() as stack:
        yield bs.start_redis(REDIS, stack)


def test_redis_rows_round_trip_and_a_missing_key_is_an_error(redis: bs.RespClient) -> None:
    keys = np.array([-(2**63), -1, 0, 2**63 - 1, 12345], dtype=np.int64)
    rows = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    redis.mset_rows(keys, rows)
    got = redis.mget_rows(keys[::-1], np.dtype(np.float32), 4)
    np.testing.assert_array_equal(got, rows[::-1])
    assert redis.command(b"DBSIZE") == 5
    redis.sock.settimeout(0.5)
    with pytest.raises(bs.RedisError, match="missing key"):
        redis.mget_rows(np.array([1, 2], dtype=np.int64), np.dtype(np.float32), 4)


def test_tune_malloc_takes_on_glibc() -> None:
    """In a child process (the setting is process-wide): glibc accepts both thresholds."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("tune_malloc is for glibc; this C library is not glibc")
    code = "from embps.client.memory import tune_malloc; print(tune_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
