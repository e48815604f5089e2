"""Faults with real processes: kill -9 of a shard in the middle of training, a disk that
fills up during a checkpoint (a small tmpfs), and what the client sees in each case.

Covered elsewhere, not repeated here: kill -9 *during a checkpoint write*
(test_checkpoint_cluster.py::test_kill_9_during_a_write_leaves_the_previous_checkpoint),
the supervisor stopping the cluster loudly when one of its shards dies
(test_serve.py::test_dead_shard_stops_the_cluster_loudly), and a network partition
between hosts (test_netns.py).

Shards run alone here (``embps serve --shard-id i --shards 2``, as Kubernetes runs
them): ``embps serve --shards N`` does not restart a dead shard, it stops the whole
cluster, so a restart is the orchestrator's job and the test plays it.

Expected rows come from in-process engines (``ShardedModel``) fed the same calls, and
are compared exactly. A shard restored from a checkpoint holds the checkpoint: the
pushes it acknowledged after it are gone, while the shard that stayed up keeps them.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.cluster import Cluster, start_shard, stop_all, wait_until
from support.sharded_model import ShardedModel

from embps.client import PSClient, TableConfig
from embps.client.exceptions import (
    CheckpointFailedError,
    PushOutcomeUnknownError,
    UnavailableError,
)
from embps.protos.routing import shard_of
from embps.server.durability import latest_step, list_steps, restore_tables

DIM = 4
TABLE = TableConfig.from_dict({"name": "emb", "dim": DIM, "optimizer": {"name": "sgd", "lr": 0.5}})
# Fast reconnects: a client that waits for a restarted shard sees it within ~0.5 s.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 500),
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@contextlib.contextmanager
def shards_alone(n: int, *extra: str, log_dir: Path) -> Iterator[list[Cluster]]:
    """n shards, each `embps serve --shard-id i --shards n EXTRA`; all stopped at the end."""
    started: list[Cluster] = []
    try:
        for i in range(n):
            started.append(start_shard(i, n, *extra, log_dir=log_dir))
        yield started
    finally:
        stop_all(started)


def scrape(metrics_port: int, name: str) -> float:
    """The value of an unlabelled sample on a shard's Prometheus endpoint (0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def expected(full: ShardedModel, lost: ShardedModel, keys: np.ndarray, train: bool) -> np.ndarray:
    """Rows of a 2-shard cluster whose shard 1 was restored from a checkpoint: shard 0's keys
    from ``full`` (every acknowledged call), shard 1's from ``lost`` (calls up to the
    checkpoint, then those after the restart)."""
    a = full.pull(TABLE.name, keys, train=train)
    b = lost.pull(TABLE.name, keys, train=train)
    return np.where((shard_of(keys, 2) == 0)[:, None], a, b)


def train_step(
    ps: PSClient, models: list[ShardedModel], rng: np.random.Generator, check: ShardedModel
) -> None:
    """One pull + push of 64 keys (duplicates) on the cluster and on every model;
    the pulled rows must equal ``check``'s."""
    keys = rng.integers(0, 400, 64)
    got = ps.pull(TABLE.name, keys)
    want = [m.pull(TABLE.name, keys) for m in models]
    np.testing.assert_array_equal(got, want[models.index(check)])
    grads = rng.standard_normal((keys.shape[0], DIM)).astype(np.float32)
    ps.push(TABLE.name, keys, grads)
    for m in models:
        m.push(TABLE.name, keys, grads)


# --------------------------------------------------------------------------
# kill -9 of a shard in the middle of training
# --------------------------------------------------------------------------


def test_kill_9_mid_training_restore_latest_and_resume(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    rng = np.random.default_rng(7)
    probe = np.arange(0, 400, dtype=np.int64)
    full, lost = ShardedModel(2), ShardedModel(2)
    for m in (full, lost):
        m.create(TABLE)
    args = ("--checkpoint-dir", str(ckpt), "--no-checkpoint-on-exit")
    with shards_alone(2, *args, log_dir=tmp_path) as shards:
        addresses = [c.shards[0].address for c in shards]
        ps = PSClient(addresses, timeout=10.0, retry_deadline=2.0, grpc_options=FAST_RECONNECT)
        with ps:
            ps.create_table(TABLE)
            for _ in range(4):
                train_step(ps, [full, lost], rng, check=full)
            assert [r.kind for r in ps.checkpoint(10)] == ["full", "full"]
            for _ in range(3):  # acknowledged after the checkpoint: shard 1 loses these
                train_step(ps, [full], rng, check=full)
            assert not np.array_equal(
                full.pull(TABLE.name, probe, train=False), lost.pull(TABLE.name, probe, train=False)
            )

            victim = shards[1]
            victim.signal(signal.SIGKILL)
            assert victim.proc.wait(timeout=30) == -signal.SIGKILL

            # The next push: applied on shard 0, outcome unknown on shard 1, never resent.
            keys = rng.integers(0, 400, 64)
            full.pull(TABLE.name, keys)  # shard 0 has rows for these keys (the models too)
            ps.pull(TABLE.name, keys[shard_of(keys, 2) == 0])
            grads = rng.standard_normal((64, DIM)).astype(np.float32)
            with pytest.raises(PushOutcomeUnknownError) as info:
                ps.push(TABLE.name, keys, grads)
            err = info.value
            assert (err.applied_shards, err.unknown_shards, err.rejected_shards) == ([0], [1], [])
            assert err.code == grpc.StatusCode.UNAVAILABLE
            assert f"shard 1 ({addresses[1]}): UNAVAILABLE" in str(err)
            full.push(TABLE.name, keys, grads)  # what shard 0 applied

            # A pull of shard 1's keys: retried for retry_deadline, then a clear error.
            mine = probe[shard_of(probe, 2) == 1]
            t0 = time.monotonic()
            with pytest.raises(UnavailableError) as pinfo:
                ps.pull(TABLE.name, mine, train=False)
            assert 1.0 <= time.monotonic() - t0 < 15.0
            assert pinfo.value.shard == 1 and pinfo.value.address == addresses[1]
            np.testing.assert_array_equal(  # shard 0 still answers
                ps.pull(TABLE.name, probe[shard_of(probe, 2) == 0], train=False),
                full.pull(TABLE.name, probe[shard_of(probe, 2) == 0], train=False),
            )

            # wait_for_ready: a pull issued while shard 1 is down completes once it is back,
            # although the shard stays down longer than retry_deadline.
            waiting = PSClient(addresses, timeout=120.0, retry_deadline=1.0, wait_for_ready=True,
                               grpc_options=FAST_RECONNECT)  # fmt: skip
            out: dict[str, object] = {}

            def pull_when_back() -> None:
                try:
                    out["rows"] = waiting.pull(TABLE.name, mine, train=False)
                except Exception as e:  # re-raised by the test thread below
                    out["error"] = e

            t = threading.Thread(target=pull_when_back, daemon=True)
            t.start()
            time.sleep(2.0)
            assert t.is_alive() and not out, out  # waiting, not failed
            port = addresses[1].rsplit(":", 1)[1]
            shards[1] = start_shard(1, 2, *args, "--restore", "latest", port=int(port),
                                    log_dir=tmp_path)  # fmt: skip
            t.join(timeout=150)
            waiting.close()
            assert "error" not in out, out.get("error")
            np.testing.assert_array_equal(out["rows"], lost.pull(TABLE.name, mine, train=False))
            assert "restored 1 tables" in shards[1].log(), shards[1].log()

            # Rows = checkpoint on the restored shard, checkpoint + later pushes on the other.
            np.testing.assert_array_equal(
                ps.pull(TABLE.name, probe, train=False), expected(full, lost, probe, False)
            )
            # Training resumes: pushes succeed on both and change rows exactly as modelled.
            for _ in range(3):
                keys = rng.integers(0, 400, 64)
                np.testing.assert_array_equal(
                    ps.pull(TABLE.name, keys), expected(full, lost, keys, True)
                )
                grads = rng.standard_normal((64, DIM)).astype(np.float32)
                res = ps.push(TABLE.name, keys, grads)
                assert (res.applied, res.dropped) == (np.unique(keys).size, 0)
                full.push(TABLE.name, keys, grads)
                lost.push(TABLE.name, keys, grads)
            np.testing.assert_array_equal(
                ps.pull(TABLE.name, probe, train=False), expected(full, lost, probe, False)
            )
    assert latest_step(ckpt) == 10  # nothing but the Checkpoint RPC wrote one


# --------------------------------------------------------------------------
# Disk full during a checkpoint (a small tmpfs)
# --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted at tmp_path/disk (unmounted at the end, even on failure)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "embps-test", str(disk)],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", b"") or b""
        pytest.skip(f"cannot mount a tmpfs (needs root and mount(8)): {e} {err.decode().strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def grow(ps: PSClient, n: int) -> None:
    """Rows for keys 0..n-1 (training pulls in batches)."""
    for a in range(0, n, 20000):
        ps.pull(TABLE.name, np.arange(a, min(a + 20000, n)))


def test_disk_full_checkpoint_keeps_serving_and_the_previous_one(
    small_disk: Path, tmp_path: Path
) -> None:
    small = np.arange(100, dtype=np.int64)
    args = ("--checkpoint-dir", str(small_disk), "--no-checkpoint-on-exit")
    with shards_alone(1, *args, log_dir=tmp_path) as (shard,):
        (info,) = shard.shards
        with PSClient([info.address], timeout=30.0) as ps:
            ps.create_table(TABLE)
            grow(ps, 100)
            ps.push(TABLE.name, small, np.ones((100, DIM), dtype=np.float32))
            before = ps.pull(TABLE.name, small, train=False)
            ps.checkpoint(1)  # small: fits
            grow(ps, 60000)  # ~60000 * 60 B of rows and metadata: more than 2 MiB
            with pytest.raises(CheckpointFailedError) as err:
                ps.checkpoint(2)
            e = err.value
            assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.written == []
            msg = str(e)
            assert "No space left on device writing " + str(small_disk / "2") in msg, msg
            assert "point --checkpoint-dir at a larger disk" in msg
            assert "the previous checkpoint is intact" in msg
            # Nothing half-written is left: the temporary directory is gone.
            assert [p.name for p in (small_disk / "2").iterdir()] == []
            assert list_steps(small_disk) == [1] and latest_step(small_disk) == 1
            # Still serving: pulls and pushes work, and the rows are all there.
            ps.push(TABLE.name, small, np.ones((100, DIM), dtype=np.float32))
            np.testing.assert_array_equal(ps.pull(TABLE.name, small, train=False), before - 0.5)
            assert ps.stats(TABLE.name)[0].tables[TABLE.name]["keys"] == 60000
            assert scrape(info.metrics_port, "embps_checkpoint_failures_total") == 1.0
            assert "checkpoint of step 2" in shard.log() and "No space left" in shard.log()
        # The previous checkpoint restores, in a fresh shard.
        again = (*args, "--restore", "latest")
        with (
            shards_alone(1, *again, log_dir=tmp_path) as (back,),
            PSClient(back.shards[0].address, timeout=30.0) as ps,
        ):
            ps.wait_ready()
            np.testing.assert_array_equal(ps.pull(TABLE.name, small, train=False), before)
            assert ps.stats(TABLE.name)[0].tables[TABLE.name]["keys"] == 100
    (emb,), _ = restore_tables(small_disk, 1, 0, 1)
    assert emb.stats().keys == 100


def test_periodic_checkpoints_survive_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    args = ("--checkpoint-dir", str(small_disk), "--checkpoint-every", "1",
            "--no-checkpoint-on-exit")  # fmt: skip
    with shards_alone(1, *args, log_dir=tmp_path) as (shard,):
        (info,) = shard.shards
        with PSClient([info.address], timeout=30.0) as ps:
            ps.create_table(TABLE)
            ps.pull(TABLE.name, np.arange(60000))  # too large for the disk

            def failures() -> float:
                return scrape(info.metrics_port, "embps_checkpoint_failures_total")

            wait_until(lambda: failures() >= 2, 60, "two failed periodic checkpoints")
            assert ps.pull(TABLE.name, np.arange(5), train=False).shape == (5, DIM)  # serving
            last = latest_step(small_disk)  # None, or a checkpoint taken before the pull
            ps.drop_table(TABLE.name)  # now a checkpoint fits: a next period writes one
            ps.create_table(TABLE)
            grow(ps, 100)

            def newer() -> bool:
                now = latest_step(small_disk)
                return now is not None and (last is None or now > last)

            wait_until(newer, 60, "a periodic checkpoint after the failures")
            assert scrape(info.metrics_port, "embps_checkpoint_last_success_timestamp_seconds") > 0
        assert shard.proc.poll() is None  # the failures never stopped the shard
