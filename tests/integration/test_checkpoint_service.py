"""Durability through the gRPC service, with in-process shards (build_server on port 0):
the Checkpoint RPC and its errors, periodic and exit checkpoints, restore behind
UNAVAILABLE, the metrics.

Process-level behaviour (embps serve --restore, SIGTERM, kill -9, resharding,
export) is in test_checkpoint_cluster.py.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.cluster import wait_until

from embps.client.exceptions import CheckpointFailedError, UnavailableError
from embps.client.ps_client import PSClient
from embps.protos import codec
from embps.protos.config import TableConfig
from embps.server.durability import arrayio as checkpoint_mod
from embps.server.durability import latest_step, restore_tables, shard_count_at
from embps.server.service import ShardConfig, ShardServer, build_server
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

TABLES = (
    TableConfig.from_dict({"name": "user", "dim": 4, "optimizer": {"name": "adagrad", "lr": 0.1}}),
    TableConfig.from_dict(
        {"name": "item", "dim": 4, "kind": "adaptive", "hash_bucket_size": 16,
         "promote_threshold": 2, "sketch_width": 1024, "optimizer": {"name": "adam"}}
    ),
)  # fmt: skip
KEYS = np.arange(-50, 400)

Factory = Callable[..., list[ShardServer]]


@pytest.fixture
def shards() -> Iterator[Factory]:
    """``factory(n, **ShardConfig options)`` -> started in-process shards; stopped at the end
    without exit checkpoints (a test that wants one calls ``stop`` itself)."""
    started: list[ShardServer] = []

    def factory(n: int = 1, start: bool = True, **options: Any) -> list[ShardServer]:
        options.setdefault("port", 0)
        out = [build_server(ShardConfig(shard_id=i, num_shards=n, **options)) for i in range(n)]
        started.extend(out)
        if start:
            for s in out:
                s.start()
        return out

    yield factory
    for s in started:
        s.stop(grace=0, checkpoint=False)


def train(ps: PSClient, steps: range, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for step in steps:
        keys = rng.integers(0, 300, 128)
        for t in ("user", "item"):
            ps.pull(t, keys)
            ps.push(t, keys, rng.standard_normal((keys.shape[0], 4)), step=step)


def infer(ps: PSClient) -> dict[str, np.ndarray]:
    return {t: ps.pull(t, KEYS, train=False) for t in ("user", "item")}


def metric(shard: ShardServer, name: str, labels: dict[str, str] | None = None) -> float:
    v = shard.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if v is None else float(v)


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        req = health_pb2.HealthCheckRequest(service="embps.v1.ParameterServer")
        return int(health_pb2_grpc.HealthStub(ch).Check(req, timeout=5).status)


# --------------------------------------------------------------------------
# The Checkpoint RPC
# --------------------------------------------------------------------------


def test_checkpoint_rpc_writes_every_shard(shards: Factory, tmp_path: Path) -> None:
    servers = shards(2, tables=TABLES, checkpoint_dir=str(tmp_path), checkpoint_incremental=3)
    with PSClient([s.address for s in servers]) as ps:
        train(ps, range(3))
        res = full = ps.checkpoint(10)
        assert [(r.shard_id, r.step, r.kind) for r in res] == [(0, 10, "full"), (1, 10, "full")]
        assert res[1].path == str(tmp_path / "10" / "shard-1-of-2") and res[0].tables == 2
        ps.push("user", [1, 2, 3], np.ones((3, 4)), step=3)  # a few rows change
        res = ps.checkpoint(11)  # the policy: every 3rd is full
        assert {(r.kind, r.base_step) for r in res} == {("incremental", 10)}
        assert all(r.bytes < f.bytes for r, f in zip(res, full, strict=True))
        for r in res:  # only the changed rows of "user"
            entries = json.loads((Path(r.path) / "manifest.json").read_text())["tables"]
            user = next(e for e in entries if e["config"]["name"] == "user")
            assert user["arrays"]["dynamic.keys"]["shape"][0] <= 3
        assert {r.kind for r in ps.checkpoint(12, incremental=False)} == {"full"}
        live = infer(ps)
    assert shard_count_at(tmp_path, 12) == 2 and latest_step(tmp_path) == 12
    for s in servers:
        assert metric(s, "embps_checkpoint_duration_seconds_count", {"kind": "full"}) == 2
        assert metric(s, "embps_checkpoint_duration_seconds_count", {"kind": "incremental"}) == 1
        assert metric(s, "embps_checkpoint_last_success_timestamp_seconds") > time.time() - 60
    back = shards(2, checkpoint_dir=str(tmp_path), restore="latest")
    for s in back:
        assert s.restored.wait(30) and s.restore_error is None
    with PSClient([s.address for s in back]) as ps:
        for t, rows in infer(ps).items():
            np.testing.assert_array_equal(rows, live[t])


def test_checkpoint_without_a_directory_is_refused(shards: Factory) -> None:
    (s,) = shards(1, tables=TABLES)
    with PSClient([s.address]) as ps, pytest.raises(CheckpointFailedError) as info:
        ps.checkpoint(1)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "--checkpoint-dir" in str(info.value) and info.value.written == []


def test_failed_write_is_an_error_and_the_shard_keeps_serving(
    shards: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    servers = shards(2, tables=TABLES, checkpoint_dir=str(tmp_path))
    with PSClient([s.address for s in servers]) as ps:
        train(ps, range(2))
        ps.checkpoint(1)
        before = infer(ps)
        (tmp_path / "2").write_text("a file where a directory is expected")
        train(ps, range(2, 3))
        with pytest.raises(CheckpointFailedError) as info:
            ps.checkpoint(2)
        assert info.value.code == grpc.StatusCode.INTERNAL
        assert "File exists" in str(info.value) or "Not a directory" in str(info.value)
        assert "previous checkpoint is intact" in str(info.value)
        assert ps.pull("user", KEYS, train=False).shape == (KEYS.shape[0], 4)  # still serving
    for s in servers:
        assert metric(s, "embps_checkpoint_failures_total") == 1
    assert any("checkpoint of step 2" in r.getMessage() for r in caplog.records)
    assert latest_step(tmp_path) == 1
    for i in range(2):
        (user, _item), _ = restore_tables(tmp_path, 1, i, 2)
        assert user.stats().keys > 0
    back = shards(2, checkpoint_dir=str(tmp_path), restore=str(tmp_path / "1"))
    for s in back:
        assert s.restored.wait(30)
    with PSClient([s.address for s in back]) as ps:
        np.testing.assert_array_equal(ps.pull("user", KEYS, train=False), before["user"])


def test_disk_full_is_resource_exhausted(
    shards: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (s,) = shards(1, tables=TABLES, checkpoint_dir=str(tmp_path))
    real = checkpoint_mod.write_array

    def full_disk(path: Path, arr: np.ndarray) -> str:
        if "values" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, arr)

    with PSClient([s.address]) as ps:
        train(ps, range(1))
        monkeypatch.setattr(checkpoint_mod, "write_array", full_disk)
        with pytest.raises(CheckpointFailedError) as info:
            ps.checkpoint(3)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "No space left on device" in str(info.value)
        assert list((tmp_path / "3").iterdir()) == []  # the partial directory is gone
        monkeypatch.setattr(checkpoint_mod, "write_array", real)
        assert ps.checkpoint(3)[0].kind == "full"


def test_checkpoint_request_checks(shards: Factory, tmp_path: Path) -> None:
    (s,) = shards(1, tables=TABLES, checkpoint_dir=str(tmp_path))
    with grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        for req, code in (
            (pb.CheckpointRequest(step=1, num_shards=2), grpc.StatusCode.FAILED_PRECONDITION),
            (pb.CheckpointRequest(step=1, num_shards=1, kind=9), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.RpcError) as info:
                stub.Checkpoint(req, timeout=10)
            assert info.value.code() == code
    with PSClient([s.address]) as ps:
        ps.checkpoint(5)
        ps.checkpoint(6, incremental=True)
        with pytest.raises(CheckpointFailedError, match="base of the incremental checkpoint"):
            ps.checkpoint(5)


# --------------------------------------------------------------------------
# Periodic and exit checkpoints
# --------------------------------------------------------------------------


def test_periodic_checkpoints_agree_on_the_step(shards: Factory, tmp_path: Path) -> None:
    servers = shards(2, tables=TABLES, checkpoint_dir=str(tmp_path), checkpoint_every=0.4)
    with PSClient([s.address for s in servers]) as ps:
        train(ps, range(2))
        wait_until(lambda: (latest_step(tmp_path) or 0) >= 2, 20, "two periodic checkpoints")
    step = latest_step(tmp_path)
    assert step is not None and shard_count_at(tmp_path, step) == 2
    assert sorted(int(p.name) for p in tmp_path.iterdir())[:2] == [0, 1]


def test_stop_writes_an_exit_checkpoint(shards: Factory, tmp_path: Path) -> None:
    servers = shards(2, tables=TABLES, checkpoint_dir=str(tmp_path))
    with PSClient([s.address for s in servers]) as ps:
        train(ps, range(2))
        ps.checkpoint(7)
        train(ps, range(2, 4))
        live = infer(ps)
    results = [s.stop(grace=1) for s in servers]
    assert [r.step for r in results if r is not None] == [8, 8]
    back = shards(2, checkpoint_dir=str(tmp_path), restore="latest")
    for s in back:
        assert s.restored.wait(30) and s.restore_summary is not None
    with PSClient([s.address for s in back]) as ps:
        for t, rows in infer(ps).items():
            np.testing.assert_array_equal(rows, live[t])


# --------------------------------------------------------------------------
# Restore: UNAVAILABLE and NOT_SERVING while it runs
# --------------------------------------------------------------------------


def test_restoring_shard_answers_unavailable_then_serves(shards: Factory, tmp_path: Path) -> None:
    (src,) = shards(1, tables=TABLES, checkpoint_dir=str(tmp_path))
    with PSClient([src.address]) as ps:
        train(ps, range(3))
        ps.checkpoint(4)
        live = infer(ps)
    gate = threading.Event()
    (s,) = shards(1, start=False, checkpoint_dir=str(tmp_path), restore="latest", tables=TABLES)
    s.on_restore_progress = lambda ratio: gate.wait(30) if ratio > 0.3 else None  # hold it
    s.start()
    req = pb.PullRequest(table="user", keys=codec.encode_keys(KEYS), num_shards=1)
    with grpc.insecure_channel(s.address) as ch:
        stub = pb_grpc.ParameterServerStub(ch)
        wait_until(lambda: s._restore_ratio > 0.3, 20, "the restore to start")
        for call in (lambda: stub.Pull(req, timeout=5), lambda: stub.Stats(pb.StatsRequest())):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            msg = info.value.details()
            assert f"shard 0 is restoring from {tmp_path / '4'} (" in msg and "%)" in msg
        assert health_status(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert 0 < metric(s, "embps_restore_progress_ratio") < 1
        with PSClient([s.address], retry_deadline=0.3) as ps, pytest.raises(UnavailableError):
            ps.pull("user", KEYS, train=False)
        gate.set()
        assert s.restored.wait(30) and s.restore_error is None
        assert health_status(s.address) == health_pb2.HealthCheckResponse.SERVING
        assert metric(s, "embps_restore_progress_ratio") == 1
    with PSClient([s.address]) as ps:  # the config's tables equal the restored ones: fine
        for t, rows in infer(ps).items():
            np.testing.assert_array_equal(rows, live[t])


def test_restore_failures(shards: Factory, tmp_path: Path) -> None:
    (empty,) = shards(1, checkpoint_dir=str(tmp_path / "none"), restore="latest", tables=TABLES)
    assert empty.restored.wait(30) and empty.restore_error is None  # nothing yet: start empty
    assert [t.name for t in empty.engine.tables()] == ["item", "user"]
    (src,) = shards(1, tables=TABLES, checkpoint_dir=str(tmp_path))
    with PSClient([src.address]) as ps:
        train(ps, range(1))
        ps.checkpoint(1)
    other = (TableConfig.from_dict({"name": "user", "dim": 8}),)
    (bad,) = shards(1, checkpoint_dir=str(tmp_path), restore="latest", tables=other)
    assert bad.restored.wait(30)
    assert (
        bad.restore_error is not None and "table 'user' of the config differs" in bad.restore_error
    )
    assert not bad.serving
    (missing,) = shards(1, restore=str(tmp_path / "9"))
    assert missing.restored.wait(30)
    assert missing.restore_error is not None and str(tmp_path / "9") in missing.restore_error


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"checkpoint_every": 5}, "--checkpoint-every needs a checkpoint directory"),
        ({"restore": "latest"}, "--restore latest needs"),
        ({"checkpoint_on_exit": True}, "--checkpoint-on-exit"),
        ({"checkpoint_dir": "d", "checkpoint_every": -1}, "checkpoint_every"),
        ({"checkpoint_dir": "d", "checkpoint_incremental": -2}, "checkpoint_incremental"),
    ],
)
def test_durability_options_are_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShardConfig(**options)


# --------------------------------------------------------------------------
# Push idempotency across a restore
# --------------------------------------------------------------------------


def test_a_restored_shard_drops_replays_of_pushes_its_checkpoint_holds(
    shards: Factory, tmp_path: Path
) -> None:
    """The replay windows are checkpointed with their table: after a restore, a replay of
    a push the checkpoint holds changes nothing, a push the restore lost applies again,
    and an incremental checkpoint carries the windows too."""
    (s,) = shards(1, tables=TABLES, checkpoint_dir=str(tmp_path))
    keys = np.arange(20)

    def push(ps: PSClient, seq: int, table: str = "user", shard: int = 0) -> pb.PushResponse:
        """The bytes a 1-shard PSClient sends (num_shards=1), to ``shard`` of ``ps``."""
        req = codec.encode_push_request(table, keys, np.ones((20, 4), np.float32), 0, 1, None,
                                        client_id="trainer-0", sequence=seq)  # fmt: skip
        return ps._callable("Push", shard)(req, timeout=10)

    with PSClient([s.address]) as ps:
        ps.pull("user", keys)
        assert not push(ps, 1).replayed
        ps.checkpoint(1)
        assert not push(ps, 2).replayed
        ps.checkpoint(2, incremental=True)  # holds pushes 1 and 2
        assert not push(ps, 3).replayed  # lost by the restore below
        assert not push(ps, 1, table="item").replayed  # another table's window: its own
    (back,) = shards(1, checkpoint_dir=str(tmp_path), restore="latest")
    assert back.restored.wait(30) and back.restore_error is None
    with PSClient([back.address]) as ps:
        before = ps.pull("user", keys, train=False)
        assert push(ps, 1).replayed and push(ps, 2).replayed
        np.testing.assert_array_equal(ps.pull("user", keys, train=False), before)
        assert not push(ps, 3).replayed  # the restore lost it: applied again, once
        assert push(ps, 3).replayed
        assert not np.array_equal(ps.pull("user", keys, train=False), before)
        assert not push(ps, 1, table="item").replayed  # lost with the item table's push
    # onto another shard count the windows start empty (documented): the push applies
    two = shards(2, checkpoint_dir=str(tmp_path), restore="latest")
    for t in two:
        assert t.restored.wait(30) and t.restore_error is None
    assert all(len(t.engine.table("user").replay) == 0 for t in two)
    # ... and a retry of a push sent before cannot land there: its bytes carry the old
    # shard count, so each new shard refuses it and nothing changes
    with PSClient([t.address for t in two]) as ps:
        before = ps.pull("user", keys, train=False)
        for shard in range(2):
            with pytest.raises(grpc.RpcError) as err:
                push(ps, 1, shard=shard)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        np.testing.assert_array_equal(ps.pull("user", keys, train=False), before)
        assert all(len(t.engine.table("user").replay) == 0 for t in two)
