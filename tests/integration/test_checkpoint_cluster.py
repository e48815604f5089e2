"""Durability with real `embps serve` processes: checkpoint -> restore round trips of every
table kind and optimizer, N -> M resharding, export for serving, SIGTERM, a corrupt
checkpoint, and kill -9 in the middle of a checkpoint write.

One trained 2-shard cluster (module fixture) is checkpointed at step 10; its inference
pulls at that moment are the reference every restored cluster and the export must equal.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support.cluster import Cluster, launch, start_cluster

from embps.client.ps_client import PSClient
from embps.client.serving import ExportedModel
from embps.protos.config import TableConfig
from embps.protos.routing import shard_of
from embps.server.durability import CheckpointError, latest_step, list_steps, restore_tables
from embps.server.durability.export import export

ROOT = Path(__file__).resolve().parents[2]
DIM = 8
TABLES = [
    {"name": "dyn_sgd", "dim": DIM, "optimizer": {"name": "sgd", "lr": 0.1}},
    {"name": "dyn_adam_adm", "dim": DIM, "optimizer": {"name": "adam", "lr": 0.01},
     "admission_threshold": 2},
    {"name": "dyn_lfu", "dim": DIM, "optimizer": {"name": "adagrad", "lr": 0.1},
     "max_rows": 250, "eviction": "lfu"},
    {"name": "static_adagrad", "dim": DIM, "kind": "static", "hash_bucket_size": 64,
     "optimizer": {"name": "adagrad", "lr": 0.1}},
    {"name": "adaptive_ftrl", "dim": DIM, "kind": "adaptive", "hash_bucket_size": 32,
     "promote_threshold": 3, "sketch_width": 4096, "optimizer": {"name": "ftrl", "alpha": 0.1}},
    {"name": "qr_mult_adam", "dim": DIM, "kind": "qr", "qr_quotient_buckets": 16,
     "qr_remainder_buckets": 8, "optimizer": {"name": "adam", "lr": 0.01}},
    {"name": "qr_concat_sgd", "dim": DIM, "kind": "qr", "qr_quotient_buckets": 8,
     "qr_remainder_buckets": 4, "qr_combiner": "concat", "optimizer": {"name": "sgd"}},
]  # fmt: skip
NAMES = [t["name"] for t in TABLES]
OWN_ROWS = ("dyn_sgd", "dyn_adam_adm", "dyn_lfu", "adaptive_ftrl")
PROBE = np.concatenate([np.arange(-60, 700), [-(2**63), 2**63 - 1]])


def train(ps: PSClient, steps: range, seed: int, hi: int = 600) -> None:
    """Pulls (train) and pushes with duplicates on every table, one batch per step."""
    rng = np.random.default_rng(seed)
    for step in steps:
        keys = rng.integers(-50, hi, 200)
        for name in NAMES:
            ps.pull(name, keys)
            ps.push(name, keys, rng.standard_normal((keys.shape[0], DIM)), step=step)


def infer(ps: PSClient) -> dict[str, np.ndarray]:
    return {name: ps.pull(name, PROBE, train=False) for name in NAMES}


def own_rows(root: Path, step: int, n: int) -> dict[str, dict[int, int]]:
    """Per table, key -> training frequency of every own row in the checkpoint (all shards,
    increments applied)."""
    out: dict[str, dict[int, int]] = {}
    for i in range(n):
        tables, _ = restore_tables(root, step, i, n)
        for t in tables:
            a = t.snapshot().arrays
            if "dynamic.keys" in a:
                d = out.setdefault(t.name, {})
                d.update(zip(a["dynamic.keys"].tolist(), a["dynamic.freq"].tolist(), strict=True))
    return out


@dataclass
class Trained:
    cluster: Cluster
    ckpt: Path  # --checkpoint-dir of the cluster; step 10 holds the reference
    live: dict[str, np.ndarray]  # inference pulls of PROBE at step 10
    freq: dict[str, dict[int, int]]  # own rows: key -> frequency
    tmp: Path

    @property
    def own(self) -> dict[str, np.ndarray]:
        return {n: np.array(sorted(f), dtype=np.int64) for n, f in self.freq.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    tmp = tmp_path_factory.mktemp("ckpt-cluster")
    ckpt = tmp / "ckpt"
    cluster = start_cluster(2, "--checkpoint-dir", str(ckpt), "--checkpoint-incremental", "2",
                            log_dir=tmp)  # fmt: skip
    try:
        with PSClient(cluster.addresses) as ps:
            for t in TABLES:
                ps.create_table(TableConfig.from_dict(t))
            train(ps, range(0, 3), seed=1)
            assert {r.kind for r in ps.checkpoint(9)} == {"full"}
            train(ps, range(3, 6), seed=2, hi=900)  # new keys: LFU evictions after the base
            ps.prune("dyn_sgd", 0.02)
            res = ps.checkpoint(10)
            assert {(r.kind, r.base_step) for r in res} == {("incremental", 9)}
            live = infer(ps)
        yield Trained(cluster, ckpt, live, own_rows(ckpt, 10, 2), tmp)
    finally:
        cluster.stop()


def assert_equal_pulls(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name in NAMES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --------------------------------------------------------------------------
# Round trip, same shard count
# --------------------------------------------------------------------------


def test_restore_answers_and_trains_identically(trained: Trained) -> None:
    restored = start_cluster(2, "--restore", str(trained.ckpt / "10"), log_dir=trained.tmp)
    try:
        with PSClient(restored.addresses) as back, PSClient(trained.cluster.addresses) as orig:
            back.wait_ready()
            assert_equal_pulls(infer(back), trained.live)
            for ps in (orig, back):  # the same training on both
                train(ps, range(6, 9), seed=3, hi=1200)
            a, b = infer(orig), infer(back)
            assert_equal_pulls(b, a)
            assert sum(s.tables["dyn_lfu"]["evictions"] for s in back.stats()) > 0
        assert "restored 7 tables" in restored.log()
    finally:
        restored.stop()


# --------------------------------------------------------------------------
# Resharding N -> M
# --------------------------------------------------------------------------


def check_resharded(ps: PSClient, trained: Trained, m: int, names: list[str]) -> None:
    got = {name: ps.pull(name, PROBE, train=False) for name in names}
    for name in ("dyn_sgd", "dyn_adam_adm", "dyn_lfu"):  # own rows only: equal everywhere
        if name in names:
            np.testing.assert_array_equal(got[name], trained.live[name], err_msg=name)
    own = trained.own["adaptive_ftrl"]
    at = np.flatnonzero(np.isin(PROBE, own))
    np.testing.assert_array_equal(got["adaptive_ftrl"][at], trained.live["adaptive_ftrl"][at])
    stats = ps.stats()
    for name in (n for n in OWN_ROWS if n in names):
        per_shard = [s.tables[name]["keys"] for s in stats]
        assert sum(per_shard) == trained.own[name].shape[0], name
        owners = np.bincount(shard_of(trained.own[name], m), minlength=m)
        assert per_shard == owners.tolist(), name  # every key sits on its owner under M


def test_reshard_2_to_3_to_1(trained: Trained) -> None:
    ck3 = trained.tmp / "ckpt3"
    three = start_cluster(3, "--restore", str(trained.ckpt / "10"), "--checkpoint-dir", str(ck3),
                          log_dir=trained.tmp)  # fmt: skip
    try:
        with PSClient(three.addresses) as ps:
            check_resharded(ps, trained, 3, NAMES)
            # max_rows is per shard: 3 shards' LFU rows do not fit one shard
            ps.drop_table("dyn_lfu")
            assert {r.kind for r in ps.checkpoint(20)} == {"full"}  # no base of 3 shards yet
    finally:
        assert three.stop() == 0
    one = start_cluster(1, "--restore", str(ck3 / "20"), log_dir=trained.tmp)
    try:
        with PSClient(one.addresses) as ps:
            check_resharded(ps, trained, 1, [n for n in NAMES if n != "dyn_lfu"])
    finally:
        one.stop()
    assert "(3 shards)" in one.log()
    with pytest.raises(CheckpointError, match="'dyn_lfu': this shard would hold more than its"):
        restore_tables(trained.ckpt, 10, 0, 1)


# --------------------------------------------------------------------------
# Export for serving
# --------------------------------------------------------------------------


def test_export_equals_live_inference_pulls(trained: Trained) -> None:
    out = trained.tmp / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "embps.client.cli", "export", str(trained.ckpt / "10"), str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "exported step 10 (2 shards)" in proc.stdout
    model = ExportedModel(out, verify=True)
    assert model.tables == sorted(NAMES) and model.num_shards == 2
    for name in NAMES:
        np.testing.assert_array_equal(model.lookup(name, PROBE), trained.live[name], err_msg=name)
        assert not any(f.name.startswith("slots") for f in (out / name).iterdir())
    own = np.load(out / "dyn_sgd" / "keys.npy", mmap_mode="r", allow_pickle=False)
    np.testing.assert_array_equal(own, trained.own["dyn_sgd"])

    half = export(trained.ckpt / "10", trained.tmp / "export16", fp16=True)
    assert half["dtype"] == "float16"
    model16 = ExportedModel(trained.tmp / "export16")
    for name in NAMES:
        got = model16.lookup(name, PROBE)
        assert got.dtype == np.float32
        want = trained.live[name]
        tol = 2e-3 if name != "qr_mult_adam" else 4e-3  # a product of two rounded halves
        np.testing.assert_allclose(got, want, rtol=tol, atol=1e-6, err_msg=name)


def test_export_min_frequency_drops_rare_rows(trained: Trained) -> None:
    out = trained.tmp / "export-k5"
    manifest = export(trained.ckpt / "10", out, min_frequency=5)
    model = ExportedModel(out)
    freq = trained.freq
    for name in OWN_ROWS:
        kept = {k for k, f in freq[name].items() if f >= 5}
        dropped = set(freq[name]) - kept
        assert manifest["tables"][name]["dropped_rows"] == len(dropped) > 0, name
        own = np.load(out / name / "keys.npy", allow_pickle=False)
        assert set(own.tolist()) == kept
        rows = model.lookup(name, PROBE)
        is_kept = np.isin(PROBE, list(kept))
        np.testing.assert_array_equal(rows[is_kept], trained.live[name][is_kept])
        gone = np.isin(PROBE, list(dropped))
        if name == "adaptive_ftrl":  # falls back to its static row
            assert not np.array_equal(rows[gone], trained.live[name][gone])
        else:
            assert (rows[gone] == 0.0).all()  # the default value


# --------------------------------------------------------------------------
# SIGTERM, corrupt files, kill -9 during a write
# --------------------------------------------------------------------------


def test_sigterm_writes_a_checkpoint_after_draining(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    cluster = start_cluster(2, "--checkpoint-dir", str(ckpt), log_dir=tmp_path)
    try:
        with PSClient(cluster.addresses) as ps:
            ps.create_table(TableConfig.from_dict(TABLES[1]))
            ps.create_table(TableConfig.from_dict(TABLES[4]))
            rng = np.random.default_rng(5)
            for step in range(3):
                keys = rng.integers(0, 300, 100)
                for name in ("dyn_adam_adm", "adaptive_ftrl"):
                    ps.pull(name, keys)
                    ps.push(name, keys, rng.standard_normal((100, DIM)), step=step)
            live = {n: ps.pull(n, PROBE, train=False) for n in ("dyn_adam_adm", "adaptive_ftrl")}
        cluster.signal(signal.SIGTERM)
        assert cluster.wait() == 0, cluster.log()
    finally:
        cluster.kill_all()
    assert latest_step(ckpt) == 0 and list_steps(ckpt) == [0]
    back = []
    for i in range(2):
        tables, _ = restore_tables(ckpt, 0, i, 2)
        back.append({t.name: t for t in tables})
    owner = shard_of(PROBE, 2)
    for name, want in live.items():
        got = np.empty_like(want)
        for i in range(2):
            got[owner == i] = back[i][name].pull(PROBE[owner == i], train=False)
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert "full checkpoint written to" in cluster.log()


def test_corrupt_checkpoint_is_refused_naming_the_file(trained: Trained, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(trained.ckpt / "9", root / "9")
    shutil.copytree(trained.ckpt / "10", root / "10")
    victim = root / "9" / "shard-1-of-2" / "dyn_sgd" / "dynamic.values.npy"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x40
    victim.write_bytes(bytes(data))
    cluster = launch(["--shards", "2", "--port", "0", "--metrics-port", "0",
                      "--restore", str(root / "10")], tmp_path)  # fmt: skip
    try:
        assert cluster.wait() == 1
    finally:
        cluster.kill_all()
    log = cluster.log()
    assert f"checkpoint file {victim} is corrupt" in log
    assert "SHARD FAILED: shard 1/2" in log and "restore failed" in log


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import embps.server.durability as ck
    from embps.server.durability import arrayio
    from embps.protos.config import TableConfig
    from embps.server.tables import make_table

    root, step, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
    cfg = TableConfig.from_dict({"name": "big", "dim": 64, "optimizer": {"name": "adam"},
                                 "initial_capacity": 60000})
    t = make_table(cfg)
    keys = np.arange(60000, dtype=np.int64) * 3 + step
    t.pull(keys)
    t.push(keys, np.ones((keys.shape[0], 64), dtype=np.float32), step=step)
    if slow:  # a slow disk: the writer is still busy when the test kills it
        real = arrayio.write_array
        def write_array(path, arr):
            crc = real(path, arr)
            print("wrote", path, flush=True)
            time.sleep(30)
            return crc
        arrayio.write_array = write_array
    ck.Checkpointer(root, 0, 1, lambda: [t]).checkpoint(step)
    print("done", flush=True)
    """
)


def test_kill_9_during_a_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    cmd = [sys.executable, "-c", KILL_SCRIPT, str(root)]
    done = subprocess.run([*cmd, "1", "fast"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    proc = subprocess.Popen([*cmd, "2", "slow"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("wrote"), line
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = list((root / "2").iterdir())
    assert len(partial) == 1 and partial[0].name.startswith(".tmp-shard-0-of-1-")
    assert list_steps(root) == [1] and latest_step(root) == 1
    (big,), _ = restore_tables(root, 1, 0, 1)
    assert big.stats().keys == 60000
    np.testing.assert_array_equal(big.pull([1, 4], train=False).shape, (2, 64))
    done = subprocess.run([*cmd, "2", "fast"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (root / "2").iterdir()] == ["shard-0-of-1"]  # the leftover is gone
    assert latest_step(root) == 2
