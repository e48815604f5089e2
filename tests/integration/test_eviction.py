"""Eviction acts in a running `embps serve`: steps_to_live and l2_evict_threshold, through
every trigger (the Evict call, `--evict-every`, every checkpoint), for dynamic and
adaptive tables, with metrics by reason and deletions that reach incremental checkpoints.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.cluster import wait_until

from embps.client import SGD, Adagrad, PSClient, TableConfig
from embps.client.exceptions import ShardMismatchError, TableNotFoundError
from embps.protos.config import Initializer
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

DIM = 4
KEYS = np.arange(1, 401, dtype=np.int64)
KEPT = KEYS[KEYS % 4 == 0]  # pushed at a late step: they stay
STALE = KEYS[KEYS % 4 != 0]  # last touched at step 0: past steps_to_live


def stl_table(kind: str, name: str = "t") -> TableConfig:
    extra = {"hash_bucket_size": 64, "promote_threshold": 1} if kind == "adaptive" else {}
    return TableConfig(name, DIM, kind=kind, optimizer=Adagrad(lr=0.1), steps_to_live=3, **extra)


def make_stale(ps: PSClient, table: str) -> None:
    """Rows for every key (step 0), then a push of KEPT at step 10 on every shard."""
    ps.pull(table, KEYS)
    ps.push(table, KEPT, np.full((KEPT.size, DIM), 0.01, np.float32), step=10)


def keys_of(ps: PSClient, table: str) -> int:
    return sum(s.tables[table]["keys"] for s in ps.stats(table))


def metric(port: int, name: str, **labels: str) -> float:
    """One sample of the shard's /metrics (0.0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(part in m.group(1).split(",") for part in want.split(",") if part):
            total += float(m.group(2))
    return total


@pytest.mark.parametrize("kind", ["dynamic", "adaptive"])
def test_evict_call_removes_rows_past_steps_to_live(cluster_factory, kind: str) -> None:
    cluster = cluster_factory(2, "--evict-every", "0")
    with PSClient(cluster.addresses) as ps:
        ps.create_table(stl_table(kind))
        make_stale(ps, "t")
        assert keys_of(ps, "t") == KEYS.size
        before = ps.pull("t", STALE, train=False)
        static_before = sum(s.tables["t"]["pulled_static"] for s in ps.stats("t"))

        res = ps.evict()
        assert list(res) == ["t"]
        r = res["t"]
        assert (r.rows, r.steps_to_live_rows, r.l2_rows) == (STALE.size, STALE.size, 0)
        assert r.bytes == STALE.size * (stl_table(kind).row_bytes + 8)
        assert keys_of(ps, "t") == KEPT.size
        stats = [s.tables["t"] for s in ps.stats("t")]
        assert sum(s["evictions"] for s in stats) == STALE.size
        assert sum(s["evictions_steps_to_live"] for s in stats) == STALE.size
        assert ps.evict("t")["t"].rows == 0  # nothing left to evict: a sweep is repeatable

        after = ps.pull("t", STALE, train=False)
        if kind == "dynamic":  # no row: the default value
            assert np.all(after == 0.0) and not np.all(before == 0.0)
        else:  # demoted: every evicted key is served by the static part again
            static_after = sum(s.tables["t"]["pulled_static"] for s in ps.stats("t"))
            assert static_after - static_before == STALE.size
            assert sum(s.tables["t"]["static_rows"] for s in ps.stats("t")) == 2 * 64
        for s in cluster.shards:
            assert metric(s.metrics_port, "embps_evictions_total", table="t",
                          reason="steps_to_live") > 0  # fmt: skip
            assert metric(s.metrics_port, "embps_eviction_sweep_duration_seconds_count",
                          trigger="rpc") >= 1  # fmt: skip


@pytest.mark.parametrize("kind", ["dynamic", "adaptive"])
def test_evict_call_removes_rows_under_the_l2_threshold(cluster_factory, kind: str) -> None:
    cluster = cluster_factory(2, "--evict-every", "0")
    extra = {"hash_bucket_size": 64, "promote_threshold": 1} if kind == "adaptive" else {}
    cfg = TableConfig("t", DIM, kind=kind, optimizer=SGD(lr=1.0), l2_evict_threshold=0.5,
                      initializer=Initializer("constant", 0.1), **extra)  # fmt: skip
    with PSClient(cluster.addresses) as ps:
        ps.create_table(cfg)
        ps.pull("t", KEYS)  # every row: 0.1 per element, L2 0.2 < 0.5
        ps.push("t", KEPT, np.full((KEPT.size, DIM), -1.0, np.float32), step=1)  # -> L2 2.2
        res = ps.evict("t")["t"]
        assert (res.rows, res.l2_rows, res.steps_to_live_rows) == (STALE.size, STALE.size, 0)
        assert keys_of(ps, "t") == KEPT.size
        assert np.allclose(ps.pull("t", KEPT, train=False), 1.1)
        for s in cluster.shards:
            assert metric(s.metrics_port, "embps_evictions_total", table="t", reason="l2") > 0


def test_evict_every_sweeps_on_its_own(cluster_factory) -> None:
    cluster = cluster_factory(2, "--evict-every", "0.5")
    with PSClient(cluster.addresses) as ps:
        ps.create_table(stl_table("dynamic", "d"))
        ps.create_table(stl_table("adaptive", "a"))
        for name in ("d", "a"):
            make_stale(ps, name)
        wait_until(lambda: keys_of(ps, "d") == KEPT.size and keys_of(ps, "a") == KEPT.size,
                   timeout=15, what="periodic eviction sweeps")  # fmt: skip
        for s in cluster.shards:
            assert metric(s.metrics_port, "embps_eviction_sweep_duration_seconds_count",
                          trigger="periodic") >= 2  # fmt: skip
            assert metric(s.metrics_port, "embps_eviction_sweep_duration_seconds_count",
                          trigger="rpc") == 0  # fmt: skip


def test_every_checkpoint_evicts_first_and_increments_carry_the_deletions(
    cluster_factory, tmp_path: Path
) -> None:
    ck = tmp_path / "ck"
    args = ("--evict-every", "0", "--checkpoint-dir", str(ck), "--checkpoint-incremental", "5")
    cluster = cluster_factory(2, *args)
    with PSClient(cluster.addresses) as ps:
        for kind in ("dynamic", "adaptive"):
            ps.create_table(stl_table(kind, kind))
            ps.pull(kind, KEYS)
        ps.checkpoint(1, incremental=False)  # base: every row (all touched at step 0)
        assert keys_of(ps, "dynamic") == KEYS.size
        for kind in ("dynamic", "adaptive"):
            ps.push(kind, KEPT, np.full((KEPT.size, DIM), 0.01, np.float32), step=10)
        res = ps.checkpoint(2)  # the policy: an increment over step 1
        assert {r.kind for r in res} == {"incremental"}
        for kind in ("dynamic", "adaptive"):  # evicted before the snapshot
            assert keys_of(ps, kind) == KEPT.size, kind
        for s in cluster.shards:
            assert metric(s.metrics_port, "embps_eviction_sweep_duration_seconds_count",
                          trigger="checkpoint") >= 4  # 2 tables x 2 checkpoints  # fmt: skip
        want = {k: ps.pull(k, KEYS, train=False) for k in ("dynamic", "adaptive")}
    assert cluster.stop() == 0
    # the increment's deletions: restored from step 2 (base 1 + increment), stale keys are gone
    back = cluster_factory(2, "--evict-every", "0", "--checkpoint-dir", str(tmp_path / "ck2"),
                           "--restore", str(ck / "2"))  # fmt: skip
    with PSClient(back.addresses) as ps:
        ps.wait_ready(timeout=30)
        wait_until(lambda: _serving(ps), timeout=30, what="restore")
        for kind in ("dynamic", "adaptive"):
            assert keys_of(ps, kind) == KEPT.size, kind
            assert np.array_equal(ps.pull(kind, KEYS, train=False), want[kind])


def _serving(ps: PSClient) -> bool:
    try:
        ps.stats()
    except Exception:
        return False
    return True


def test_evict_bad_requests_get_exact_codes_and_change_nothing(cluster_factory) -> None:
    cluster = cluster_factory(2, "--evict-every", "0")
    with PSClient(cluster.addresses) as ps:
        ps.create_table(stl_table("dynamic"))
        make_stale(ps, "t")
        with pytest.raises(TableNotFoundError, match="'nope'"):
            ps.evict("nope")
        with PSClient(cluster.addresses[:1]) as one, pytest.raises(ShardMismatchError):
            one.evict("t")
        with grpc.insecure_channel(cluster.addresses[0]) as ch:
            stub = pb_grpc.ParameterServerStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Evict(pb.EvictRequest(table="t", num_shards=3), timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert keys_of(ps, "t") == KEYS.size  # nothing was evicted by the refused calls


def test_evict_every_flag_is_checked(cluster_factory) -> None:
    bad = cluster_factory(None, "--shards", "1", "--port", "0", "--metrics-port", "0",
                          "--evict-every", "-1")  # fmt: skip
    assert bad.wait() == 2
    assert "evict_every must be >= 0" in bad.log()
