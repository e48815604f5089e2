"""Shards whose checkpoint directories are their own (a StatefulSet's per-pod volumes):
each restores its rows from its own directory and numbers its next checkpoint after its
own newest one. A shared directory still needs every shard's part of a step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from support.cluster import start_shard

from embps.client import SGD, PSClient, TableConfig
from embps.server.durability import is_private, latest_step

DIM = 4
KEYS = np.arange(300)


def shards(tmp_path: Path, dirs: list[Path], *extra: str) -> list:
    return [start_shard(i, 2, "--checkpoint-dir", str(dirs[i]), "--evict-every", "0", *extra,
                        log_dir=tmp_path) for i in range(2)]  # fmt: skip


def test_each_shard_restores_from_its_own_volume(tmp_path: Path) -> None:
    dirs = [tmp_path / "pod-0", tmp_path / "pod-1"]
    first = shards(tmp_path, dirs)
    try:
        addresses = [c.shards[0].address for c in first]
        with PSClient(addresses) as ps:
            ps.create_table(TableConfig("t", DIM, optimizer=SGD(lr=1.0)))
            ps.pull("t", KEYS)
            ps.push("t", KEYS, np.ones((KEYS.size, DIM), np.float32), step=0)
            ps.checkpoint(1)
            ps.push("t", KEYS, np.ones((KEYS.size, DIM), np.float32), step=1)
            want = ps.pull("t", KEYS, train=False)
        for c in first:
            assert c.stop() == 0  # the exit checkpoint: the newest step of each volume + 1
    finally:
        for c in first:
            c.kill_all()
    for i, d in enumerate(dirs):
        assert is_private(d, i, 2) and latest_step(d, i, 2) == 2
        assert latest_step(d) is None  # no step is complete in one pod's directory
    again = shards(tmp_path, dirs, "--restore", "latest")
    try:
        with PSClient([c.shards[0].address for c in again], timeout=30) as ps:
            ps.wait_ready(timeout=30)
            got = ps.pull("t", KEYS, train=False)  # retried while the shards restore
            np.testing.assert_array_equal(got, want)
        for c in again:
            assert "no complete checkpoint" not in c.log()
    finally:
        for c in again:
            c.kill_all()


def test_a_shared_directory_still_needs_every_shard(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    for step, present in ((1, (0, 1)), (2, (0,))):  # step 2: shard 1's part is missing
        for i in present:
            d = root / str(step) / f"shard-{i}-of-2"
            d.mkdir(parents=True)
            (d / "manifest.json").write_text("{}")
    assert not is_private(root, 0, 2)
    assert latest_step(root, 0, 2) == 1 and latest_step(root) == 1
