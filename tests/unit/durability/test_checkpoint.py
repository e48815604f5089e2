"""Checkpoints without servers: array files, the Checkpointer's full/incremental chain,
restore equal to the live tables for every kind and optimizer, refusals, export format.

Equality is exact: a restored table holds the same rows (by key), optimizer slots,
metadata, sketch and steps as the table it was written from.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from embps.client.serving import ExportedModel, ExportFormatError
from embps.protos.config import TableConfig
from embps.server.durability import (
    CheckpointConflict,
    Checkpointer,
    CheckpointError,
    ShardCheckpoint,
    crc32_combine,
    latest_step,
    list_steps,
    read_array,
    restore_tables,
    write_array,
    write_shard,
)
from embps.server.durability import crc as durability_crc
from embps.server.durability import write as durability_write
from embps.server.durability.export import ExportError, export
from embps.server.tables import BLOCK_FIELDS, Table, make_table
from embps.server.tables import dynamic as tables_dynamic

SEED = 1234
DIM = 4

CONFIGS = {
    "dyn_sgd": TableConfig.from_dict(
        {"name": "dyn_sgd", "dim": DIM, "optimizer": {"name": "sgd", "lr": 0.1}}
    ),
    "dyn_adam_adm": TableConfig.from_dict(
        {"name": "dyn_adam_adm", "dim": DIM, "optimizer": {"name": "adam", "lr": 0.01},
         "admission_threshold": 2}
    ),
    "dyn_lfu": TableConfig.from_dict(
        {"name": "dyn_lfu", "dim": DIM, "optimizer": {"name": "adagrad", "lr": 0.1},
         "max_rows": 150, "eviction": "lfu"}
    ),
    "static_adagrad": TableConfig.from_dict(
        {"name": "static_adagrad", "dim": DIM, "kind": "static", "hash_bucket_size": 32,
         "optimizer": {"name": "adagrad", "lr": 0.1}}
    ),
    "adaptive_ftrl": TableConfig.from_dict(
        {"name": "adaptive_ftrl", "dim": DIM, "kind": "adaptive", "hash_bucket_size": 16,
         "promote_threshold": 3, "sketch_width": 1024, "optimizer": {"name": "ftrl", "alpha": 0.1}}
    ),
    "qr_mult_adam": TableConfig.from_dict(
        {"name": "qr_mult_adam", "dim": DIM, "kind": "qr", "qr_quotient_buckets": 8,
         "qr_remainder_buckets": 5, "optimizer": {"name": "adam", "lr": 0.01}}
    ),
    "qr_concat_sgd": TableConfig.from_dict(
        {"name": "qr_concat_sgd", "dim": DIM, "kind": "qr", "qr_quotient_buckets": 4,
         "qr_remainder_buckets": 3, "qr_combiner": "concat", "optimizer": {"name": "sgd"}}
    ),
}  # fmt: skip


def train(tables: list[Table], rng: np.random.Generator, step: int, lo: int = 0, hi: int = 300):
    """One training step on every table: a pull of a batch with duplicates, then a push."""
    keys = rng.integers(lo, hi, 96)
    for t in tables:
        t.pull(keys)
        t.push(keys, rng.standard_normal((keys.shape[0], DIM)).astype(np.float32), step=step)


def canon(table: Table) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Layout-independent state: own rows sorted by key, shared blocks, sketch, steps."""
    snap = table.snapshot()
    a = snap.arrays
    out = {k: v for k, v in a.items() if not k.startswith("dynamic.")}
    if "dynamic.keys" in a:
        order = np.argsort(a["dynamic.keys"], kind="stable")
        for f in (*BLOCK_FIELDS, "keys"):
            out[f"dynamic.{f}"] = a[f"dynamic.{f}"][order]
    state = {k: snap.state[k] for k in ("step", "auto_step", "version")}
    return out, state


def assert_same(a: Table, b: Table) -> None:
    ca, sa = canon(a)
    cb, sb = canon(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=f"{a.name}: {k}")
    assert sa == sb


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


# --------------------------------------------------------------------------
# Array files
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arr",
    [
        np.empty(0, dtype=np.int64),
        np.empty((0, 4), dtype=np.float32),
        np.arange(7, dtype=np.uint32),
        np.random.default_rng(0).standard_normal((300_000, 8)).astype(np.float32),  # > 1 chunk
    ],
    ids=["empty-1d", "empty-2d", "small", "multi-chunk"],
)
def test_array_round_trip(tmp_path: Path, arr: np.ndarray) -> None:
    crc = write_array(tmp_path / "a.npy", arr)
    back = read_array(tmp_path / "a.npy", crc)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), arr)


def test_corrupt_and_truncated_files_are_refused_by_name(tmp_path: Path) -> None:
    arr = np.arange(1000, dtype=np.float32)
    p = tmp_path / "v.npy"
    crc = write_array(p, arr)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{p}.*corrupt"):
        read_array(p, crc)
    p.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=str(p)):
        read_array(p, crc)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_array(tmp_path / "missing.npy", crc)


def test_object_arrays_are_never_loaded(tmp_path: Path) -> None:
    p = tmp_path / "o.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    import zlib

    crc = f"{zlib.crc32(p.read_bytes()) & 0xFFFFFFFF:08x}"
    with pytest.raises(CheckpointError, match="not a valid array"):
        read_array(p, crc)


# --------------------------------------------------------------------------
# Full and incremental checkpoints of every table kind and optimizer
# --------------------------------------------------------------------------


def test_full_then_increments_restore_equal_to_live(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    tables = [make_table(c) for c in CONFIGS.values()]
    ck = Checkpointer(tmp_path, 0, 1, lambda: tables, full_every=3)
    kinds = []
    for step in range(4):
        train(tables, rng, step, hi=300 + 100 * step)  # new keys: evictions in dyn_lfu
        if step == 2:
            for t in tables:
                t.erase(np.arange(0, 40))  # deletions travel in the increment
                t.prune(0.03)  # and the rows pruned (compacted) too
        res = ck.checkpoint(step)
        kinds.append(res.kind)
        restored, summary = restore_tables(tmp_path, step, 0, 1)
        assert [t.name for t in restored] == sorted(CONFIGS)
        for live, back in zip(sorted(tables, key=lambda t: t.name), restored, strict=True):
            assert_same(live, back)
        assert summary["old_shards"] == 1
    assert kinds == ["full", "incremental", "incremental", "full"]
    lfu = next(t for t in tables if t.name == "dyn_lfu")
    assert lfu.stats().evictions > 0  # evicted rows travelled as deleted keys
    manifest = json.loads((ShardCheckpoint(tmp_path, 2, 0, 1).path / "manifest.json").read_text())
    assert manifest["kind"] == "incremental" and manifest["base_step"] == 1
    dyn = next(e for e in manifest["tables"] if e["config"]["name"] == "dyn_sgd")
    assert "deleted.keys" in dyn["arrays"]


def test_training_continues_identically_after_restore(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    tables = [make_table(c) for c in CONFIGS.values()]
    for step in range(3):
        train(tables, rng, step)
    Checkpointer(tmp_path, 0, 1, lambda: tables).checkpoint(5)
    restored, _ = restore_tables(tmp_path, 5, 0, 1)
    live = sorted(tables, key=lambda t: t.name)
    for step in range(3, 6):
        state = rng.bit_generator.state
        train(live, rng, step, hi=500)
        rng.bit_generator.state = state
        train(restored, rng, step, hi=500)
    for a, b in zip(live, restored, strict=True):
        assert_same(a, b)


def test_explicit_kinds_and_the_first_increment_is_full(tmp_path: Path, rng) -> None:
    tables = [make_table(CONFIGS["dyn_sgd"])]
    ck = Checkpointer(tmp_path, 0, 1, lambda: tables)  # policy: always full
    train(tables, rng, 0)
    assert ck.checkpoint(1, incremental=True).kind == "full"  # nothing to build on
    train(tables, rng, 1)
    res = ck.checkpoint(2, incremental=True)
    assert (res.kind, res.base_step) == ("incremental", 1)
    assert ck.checkpoint(3).kind == "full"
    assert ck.checkpoint(3, incremental=True).kind == "full"  # not over itself
    assert list_steps(tmp_path) == [1, 2, 3] and latest_step(tmp_path) == 3


def test_recreated_table_and_overflowing_deletion_log_are_written_whole(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = {n: make_table(CONFIGS[n]) for n in ("dyn_sgd", "static_adagrad")}
    ck = Checkpointer(tmp_path, 0, 1, lambda: list(tables.values()), full_every=10)
    train(list(tables.values()), rng, 0)
    ck.checkpoint(1)
    tables["static_adagrad"] = make_table(CONFIGS["static_adagrad"])  # dropped, created again
    monkeypatch.setattr(tables_dynamic, "DELETED_LOG_MAX", 4)
    tables["dyn_sgd"].erase(np.arange(300))  # more deletions than the log keeps
    res = ck.checkpoint(2)
    assert res.kind == "full"
    entries = json.loads((res.path / "manifest.json").read_text())["tables"]
    assert all(e["full"] for e in entries)
    restored, _ = restore_tables(tmp_path, 2, 0, 1)
    for a, b in zip(sorted(tables.values(), key=lambda t: t.name), restored, strict=True):
        assert_same(a, b)


def test_a_base_of_an_increment_is_not_overwritten(tmp_path: Path, rng) -> None:
    tables = [make_table(CONFIGS["dyn_sgd"])]
    ck = Checkpointer(tmp_path, 0, 1, lambda: tables, full_every=5)
    train(tables, rng, 0)
    ck.checkpoint(1)
    train(tables, rng, 1)
    ck.checkpoint(2)
    with pytest.raises(CheckpointConflict, match="base of the incremental checkpoint"):
        ck.checkpoint(1)
    # written behind the checkpointer's back: the chain check refuses the mix
    write_shard([tables[0].snapshot()], ShardCheckpoint(tmp_path, 1, 0, 1))
    with pytest.raises(CheckpointError, match="written again after the increment"):
        restore_tables(tmp_path, 2, 0, 1)


def test_missing_base_is_refused(tmp_path: Path, rng) -> None:
    tables = [make_table(CONFIGS["dyn_sgd"])]
    ck = Checkpointer(tmp_path, 0, 1, lambda: tables, full_every=5)
    train(tables, rng, 0)
    ck.checkpoint(1)
    train(tables, rng, 1)
    ck.checkpoint(2)
    shutil.rmtree(tmp_path / "1")
    with pytest.raises(CheckpointError, match=r"base checkpoint .*1/shard-0-of-1 .* is missing"):
        restore_tables(tmp_path, 2, 0, 1)


def test_write_failure_keeps_the_previous_checkpoint_and_the_chain(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    tables = [make_table(CONFIGS["dyn_sgd"])]
    ck = Checkpointer(tmp_path, 0, 1, lambda: tables, full_every=5)
    train(tables, rng, 0)
    ck.checkpoint(1)
    (tmp_path / "2").write_text("a file where the step directory belongs")
    train(tables, rng, 1)
    with pytest.raises(OSError):
        ck.checkpoint(2)
    assert latest_step(tmp_path) == 1
    res = ck.checkpoint(3)  # the increment still builds on step 1
    assert (res.kind, res.base_step) == ("incremental", 1)
    restored, _ = restore_tables(tmp_path, 3, 0, 1)
    assert_same(tables[0], restored[0])


def test_restore_progress_reaches_one(tmp_path: Path, rng) -> None:
    tables = [make_table(c) for c in CONFIGS.values()]
    train(tables, rng, 0)
    Checkpointer(tmp_path, 0, 1, lambda: tables).checkpoint(0)
    seen: list[float] = []
    restore_tables(tmp_path, 0, 0, 1, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and seen[0] < 1.0


def test_stale_temporary_directories_are_removed(tmp_path: Path, rng) -> None:
    tables = [make_table(CONFIGS["dyn_sgd"])]
    stale = tmp_path / "4" / ".tmp-shard-0-of-1-999-1"
    stale.mkdir(parents=True)
    (stale / "junk.npy").write_bytes(b"x")
    other = tmp_path / "4" / ".tmp-shard-1-of-2-999-1"  # another shard's: left alone
    other.mkdir()
    Checkpointer(tmp_path, 0, 1, lambda: tables).checkpoint(4)
    assert not stale.exists() and other.exists()


# --------------------------------------------------------------------------
# Resharding (tables only; the process-level test is in tests/integration)
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(2, 3), (3, 1)])
def test_reshard_moves_every_own_row_to_its_owner(tmp_path: Path, rng, n: int, m: int) -> None:
    from embps.protos.routing import shard_of

    cfg = CONFIGS["dyn_adam_adm"]
    keys = np.arange(500, dtype=np.int64)
    src = [make_table(cfg) for _ in range(n)]
    owner = shard_of(keys, n)
    for i, t in enumerate(src):
        mine = keys[owner == i]
        for _ in range(2):
            t.pull(mine)
        t.push(mine, np.ones((mine.shape[0], DIM), dtype=np.float32), step=0)
        Checkpointer(tmp_path, i, n, lambda t=t: [t]).checkpoint(7)
    want = np.empty((keys.shape[0], DIM), dtype=np.float32)
    for i, t in enumerate(src):
        want[owner == i] = t.pull(keys[owner == i], train=False)
    new_owner = shard_of(keys, m)
    total = 0
    for j in range(m):
        (t,), summary = restore_tables(tmp_path, 7, j, m)
        assert summary["old_shards"] == n
        total += t.stats().keys
        np.testing.assert_array_equal(
            t.pull(keys[new_owner == j], train=False), want[new_owner == j]
        )
    assert total == sum(t.stats().keys for t in src)


# --------------------------------------------------------------------------
# Export format (the process-level test compares with live pulls)
# --------------------------------------------------------------------------


def test_export_round_trip_and_refusals(tmp_path: Path, rng: np.random.Generator) -> None:
    tables = [make_table(c) for c in CONFIGS.values()]
    for step in range(3):
        train(tables, rng, step)
    Checkpointer(tmp_path / "ck", 0, 1, lambda: tables).checkpoint(3)
    manifest = export(tmp_path / "ck" / "3", tmp_path / "out")
    model = ExportedModel(tmp_path / "out", verify=True)
    assert model.tables == sorted(CONFIGS) and manifest["num_shards"] == 1
    probe = np.concatenate([np.arange(-20, 400), [-(2**63), 2**63 - 1]])
    for t in tables:
        np.testing.assert_array_equal(model.lookup(t.name, probe), t.pull(probe, train=False))
        assert model.lookup(t.name, []).shape == (0, DIM)
    with pytest.raises(ExportError, match="exists"):
        export(tmp_path / "ck" / "3", tmp_path / "out")
    big = make_table(CONFIGS["dyn_sgd"])
    big.pull([1])
    big.push([1], np.full((1, DIM), -1e6, dtype=np.float32))
    Checkpointer(tmp_path / "ck2", 0, 1, lambda: [big]).checkpoint(0)
    with pytest.raises(ExportError, match="float16"):
        export(tmp_path / "ck2" / "0", tmp_path / "out16", fp16=True)
    assert not (tmp_path / "out16").exists()
    with pytest.raises(KeyError, match="no table"):
        model.lookup("nope", [1])
    (tmp_path / "out" / "dyn_sgd" / "values.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ExportFormatError, match=r"values\.npy"):
        ExportedModel(tmp_path / "out")


# --------------------------------------------------------------------------
# Streamed writes (copy and write overlap), chunked CRC, the adopting restore
# --------------------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks and the streaming threshold scaled down, so small arrays take the big-array paths."""
    from embps.server.durability import arrayio as ck_mod

    monkeypatch.setattr(ck_mod, "_CHUNK", 1 << 14)
    monkeypatch.setattr(ck_mod, "_READ_CHUNK", 1 << 14)
    monkeypatch.setattr(durability_write, "_STREAM_MIN_BYTES", 1 << 12)
    monkeypatch.setattr(durability_crc, "_INLINE_CRC_BYTES", 1 << 10)  # CRC on the worker thread


def test_chunked_crc_finds_a_flipped_byte_in_the_middle_of_a_large_file(
    tmp_path: Path, small_chunks: None
) -> None:
    arr = np.random.default_rng(SEED).standard_normal((5000, 16)).astype(np.float32)  # 20 chunks
    p = tmp_path / "v.npy"
    crc = write_array(p, arr)
    np.testing.assert_array_equal(read_array(p, crc), arr)
    data = bytearray(p.read_bytes())
    data[len(data) // 2 + 3] ^= 0x40  # inside a middle chunk, not on a boundary
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{p}.*corrupt"):
        read_array(p, crc)


def test_streamed_checkpoint_is_one_moment_while_pushes_continue(
    tmp_path: Path, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every push adds 1 to every row (SGD, lr 1, grad -1): a consistent snapshot shows the
    same number of pushes in every row, although the files are written after the lock is
    released, while the pusher goes on."""
    import threading

    from embps.server.durability import arrayio as ck_mod

    n, dim = 20_000, 8
    cfg = TableConfig.from_dict(
        {"name": "t", "dim": dim, "optimizer": {"name": "sgd", "lr": 1.0}, "initial_capacity": n}
    )
    table = make_table(cfg)
    keys = np.arange(n, dtype=np.int64) * 13
    table.pull(keys)
    before = canon(table)[0]
    whole: list[str] = []  # files written by write_array, after the snapshot (not streamed)
    real = ck_mod.write_array

    def recording(path: Path, arr: np.ndarray) -> str:
        whole.append(path.name)
        return real(path, arr)

    monkeypatch.setattr(ck_mod, "write_array", recording)
    grads = -np.ones((n, dim), dtype=np.float32)
    stop = threading.Event()
    pushes = [0]

    def pusher() -> None:
        while not stop.is_set() and pushes[0] < 5000:
            table.push(keys, grads, step=pushes[0])
            pushes[0] += 1

    thread = threading.Thread(target=pusher)
    thread.start()
    try:
        while pushes[0] < 2:
            thread.join(0.01)
        ck = Checkpointer(tmp_path, 0, 1, lambda: [table])
        ck.checkpoint(1)
        at_checkpoint = pushes[0]
        ck.checkpoint(2)
    finally:
        stop.set()
        thread.join(60)
    assert "dynamic.values.npy" not in whole and "dynamic.version.npy" not in whole  # streamed
    assert pushes[0] > at_checkpoint  # pushes went on between and after the checkpoints
    for step in (1, 2):
        restored, _ = restore_tables(tmp_path, step, 0, 1)
        after = canon(restored[0])[0]
        np.testing.assert_array_equal(after["dynamic.keys"], before["dynamic.keys"])
        added = after["dynamic.values"] - before["dynamic.values"]
        count = float(np.round(added[0, 0]))
        assert count >= 2
        np.testing.assert_allclose(added, count, atol=1e-3 * count)  # every row, one moment
        assert len(set(after["dynamic.version"].tolist())) == 1
        assert len(set(after["dynamic.last_step"].tolist())) == 1


def test_a_failed_streamed_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A real write failure in the middle of a streamed file (the file-size limit: EFBIG)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import resource, signal, sys
        import numpy as np
        from embps.protos.config import TableConfig
        from embps.server.durability import Checkpointer
        from embps.server.tables import make_table

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        cfg = TableConfig.from_dict({"name": "t", "dim": 64, "initial_capacity": 40000})
        t = make_table(cfg)
        t.pull(np.arange(20000, dtype=np.int64))
        ck = Checkpointer(sys.argv[1], 0, 1, lambda: [t])
        ck.checkpoint(1)
        t.pull(np.arange(20000, 40000, dtype=np.int64))  # values: 10 MB, streamed
        resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, 6 << 20))
        try:
            ck.checkpoint(2)
        except OSError as e:
            print("failed", e.errno, e.filename)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("failed 27 ") and "dynamic.values.npy" in done.stdout  # EFBIG
    assert latest_step(tmp_path) == 1
    assert not (tmp_path / "2").exists() or list((tmp_path / "2").iterdir()) == []
    restored, _ = restore_tables(tmp_path, 1, 0, 1)
    assert restored[0].stats().keys == 20000


@pytest.mark.parametrize("initial_capacity", [100, 1024], ids=["buckets-reused", "new-buckets"])
def test_adopting_load_refuses_duplicate_keys_and_changes_nothing(initial_capacity: int) -> None:
    cfg = TableConfig.from_dict(
        {"name": "dyn_sgd", "dim": DIM, "initial_capacity": initial_capacity}
    )
    src = make_table(cfg)
    keys = np.arange(100, dtype=np.int64) * 7
    src.pull(keys)
    snap = src.snapshot()
    snap.arrays["dynamic.keys"][50] = snap.arrays["dynamic.keys"][10]
    table = make_table(cfg)
    with pytest.raises(ValueError, match=r"dynamic\.keys of table 'dyn_sgd' has duplicate keys"):
        table.load(snap, adopt=True)
    assert table.stats().keys == 0 and table.part.size == 0  # type: ignore[attr-defined]
    good = src.snapshot()
    table.load(good, adopt=True)  # the same table takes a good snapshot afterwards
    assert_same(src, table)


# --------------------------------------------------------------------------
# Reading in pieces: CRC-32 combination, direct I/O, the hash map built early
# --------------------------------------------------------------------------


def _cuts(n: int, pattern: str, rng: np.random.Generator) -> list[int]:
    """Piece boundaries over n bytes (ascending, may repeat: empty pieces)."""
    if pattern == "whole":
        return []
    if pattern == "empty-pieces":
        return [0, 0, n // 2, n // 2, n, n]
    if pattern == "one-byte-pieces":
        return list(range(1, n))
    return sorted(rng.integers(0, n + 1, 500).tolist())  # "many"


@pytest.mark.parametrize(
    ("n", "pattern"),
    [
        (n, pattern)
        for n in (0, 1, 7, 4096, 100_003)
        for pattern in ("whole", "empty-pieces", "one-byte-pieces", "many")
        if not (pattern == "one-byte-pieces" and n > 4096)  # the small sizes cover it
    ],
)
def test_crc32_combine_of_pieces_equals_zlib_of_the_whole(n: int, pattern: str) -> None:
    rng = np.random.default_rng(SEED + n)
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    bounds = [0, *_cuts(n, pattern, rng), n]
    crc = 0
    for lo, hi in itertools.pairwise(bounds):
        crc = crc32_combine(crc, zlib.crc32(data[lo:hi]), hi - lo)
    assert crc == zlib.crc32(data)
    # Combining is associative: (a + b) + c == a + (b + c), pieces combined in any grouping.
    a, b, c = data[: n // 3], data[n // 3 : n // 2], data[n // 2 :]
    bc = crc32_combine(zlib.crc32(b), zlib.crc32(c), len(c))
    assert crc32_combine(zlib.crc32(a), bc, len(b) + len(c)) == zlib.crc32(data)


def test_crc32_combine_refuses_a_negative_length() -> None:
    with pytest.raises(ValueError, match="len2"):
        crc32_combine(1, 2, -1)


def _drop_from_cache(*paths: Path) -> None:
    """fsync, then evict the files' pages, so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture
def small_direct(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Files of 4 KiB and more read with O_DIRECT, in 64 KiB pieces; skipped where the
    filesystem of tmp_path has no direct I/O (tmpfs on older kernels)."""
    from embps.server.durability import arrayio as ck_mod

    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * 8192)
    fd = ck_mod._open_direct(probe)
    if fd is None:
        pytest.skip("no O_DIRECT on the filesystem of tmp_path")
    os.close(fd)
    monkeypatch.setattr(ck_mod, "_DIRECT_MIN_BYTES", 1 << 12)
    monkeypatch.setattr(ck_mod, "_READ_CHUNK", 1 << 16)  # a multiple of _DIRECT_ALIGN


def test_direct_reads_give_the_same_bytes_and_refuse_a_flipped_byte(
    tmp_path: Path, small_direct: None
) -> None:
    from embps.server.durability import arrayio as ck_mod

    arr = np.random.default_rng(SEED).standard_normal((30_001, 3)).astype(np.float32)  # 6 pieces
    p = tmp_path / "v.npy"
    crc = write_array(p, arr)
    assert ck_mod._OpenFile(ck_mod._FileSpec(p, crc)).direct is False  # just written: cached
    _drop_from_cache(p)
    opened = ck_mod._OpenFile(ck_mod._FileSpec(p, crc))
    assert opened.direct and opened.buf.ctypes.data % ck_mod._DIRECT_ALIGN == 0
    opened.close()
    back = read_array(p, crc)
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable and back.flags.c_contiguous  # a table may adopt it
    data = bytearray(p.read_bytes())
    data[len(data) - 5] ^= 0x10  # in the last, partial block
    p.write_bytes(bytes(data))
    _drop_from_cache(p)
    with pytest.raises(CheckpointError, match=f"{p}.*corrupt"):
        read_array(p, crc)


def test_a_direct_read_the_kernel_refuses_falls_back_to_the_page_cache(
    tmp_path: Path, small_direct: None
) -> None:
    """O_DIRECT needs a block-aligned buffer: with one a byte off, the kernel answers
    EINVAL (checked first, for real), and read_piece reads the same bytes through the
    page cache instead, with the right CRC."""
    from embps.server.durability import arrayio as ck_mod

    arr = np.random.default_rng(SEED).standard_normal((30_001, 3)).astype(np.float32)
    p = tmp_path / "v.npy"
    crc = write_array(p, arr)
    _drop_from_cache(p)
    opened = ck_mod._OpenFile(ck_mod._FileSpec(p, crc))
    try:
        assert opened.direct
        size, align = len(opened.buf), ck_mod._DIRECT_ALIGN
        raw = np.empty(size + 2 * align, dtype=np.uint8)
        lead = -raw.ctypes.data % align + 1  # one byte past an aligned address
        opened.buf = raw[lead : lead + size]
        with pytest.raises(OSError) as refused:
            os.preadv(opened.dfd, [memoryview(opened.buf)[:align]], 0)  # type: ignore[arg-type]
        assert refused.value.errno == errno.EINVAL
        n, piece_crc = opened.read_piece(0, opened.size)
    finally:
        opened.close()
    data = p.read_bytes()
    assert n == len(data) == opened.size
    assert bytes(opened.buf[:n]) == data and piece_crc == zlib.crc32(data)


@pytest.mark.parametrize("config", ["dyn_adam_adm", "adaptive_ftrl"])
def test_restore_through_direct_reads_equals_live_and_names_a_bad_file(
    tmp_path: Path, small_direct: None, config: str
) -> None:
    """Full + increment, every file dropped from the cache: the direct path, the hash map
    built from the keys while the other files are read; then the largest file of the full
    checkpoint, corrupt and then truncated, refused by name (after the map was built from
    good keys)."""
    rng = np.random.default_rng(SEED)
    table = make_table(CONFIGS[config])
    for step in range(3):
        train([table], rng, step, hi=6000)
    ck = Checkpointer(tmp_path, 0, 1, lambda: [table])
    ck.checkpoint(1, incremental=False)
    train([table], rng, 3, hi=6000)
    ck.checkpoint(2, incremental=True)
    files = sorted(tmp_path.rglob("*.npy"))
    _drop_from_cache(*files)
    restored, summary = restore_tables(tmp_path, 2, 0, 1)
    assert_same(table, restored[0])
    assert summary["keys"] == table.stats().keys
    values = max((tmp_path / "1").rglob("*.npy"), key=lambda p: p.stat().st_size)
    assert values.stat().st_size > 8192  # read directly, in pieces
    data = bytearray(values.read_bytes())
    data[len(data) // 2] ^= 0x01
    values.write_bytes(bytes(data))
    _drop_from_cache(values)
    with pytest.raises(CheckpointError, match=f"{values}.*corrupt"):
        restore_tables(tmp_path, 2, 0, 1)
    values.write_bytes(bytes(data[: len(data) // 2]))
    _drop_from_cache(values)
    with pytest.raises(CheckpointError, match=f"{values}.*truncated"):
        restore_tables(tmp_path, 2, 0, 1)


def test_prepared_hash_map_is_adopted_and_a_repeat_is_refused_with_the_table_unchanged() -> None:
    cfg = TableConfig.from_dict({"name": "dyn_sgd", "dim": DIM, "initial_capacity": 100})
    src = make_table(cfg)
    src.pull(np.arange(100, dtype=np.int64) * 7)
    bad = src.snapshot()
    bad.arrays["dynamic.keys"][60] = bad.arrays["dynamic.keys"][3]
    table = make_table(cfg)
    n_buckets = table.part.n_buckets  # type: ignore[attr-defined]
    index = table.prepare_adopt(bad.arrays["dynamic.keys"])
    assert index is not None and index.taken and not index.distinct
    assert table.stats().keys == 0  # nothing visible before the load
    with pytest.raises(ValueError, match="duplicate keys"):
        table.load(bad, adopt=True, index=index)
    assert table.stats().keys == 0 and table.part.n_buckets == n_buckets  # type: ignore[attr-defined]
    good = src.snapshot()
    index = table.prepare_adopt(good.arrays["dynamic.keys"])
    assert index is not None and index.distinct
    table.load(good, adopt=True, index=index)
    assert table.part.buckets is index.buckets  # type: ignore[attr-defined]  # built once, adopted
    assert_same(src, table)
    assert table.prepare_adopt(good.arrays["dynamic.keys"]) is None  # not empty any more
    assert make_table(CONFIGS["static_adagrad"]).prepare_adopt(good.arrays["dynamic.keys"]) is None
