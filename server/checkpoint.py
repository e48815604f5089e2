"""Checkpoints on disk: crash-safe writes, verified reads, incremental chains, resharding.

LAYOUT
======
    <root>/<step>/shard-<i>-of-<n>/
        manifest.json                 format, step, shard, tables, files, checksums
        <table>/<part>.<field>.npy    one array per file (NumPy .npy, no pickle)

``<step>`` is a decimal integer directory. A shard directory is written as a
whole or not at all: arrays and the manifest go into a hidden temporary
directory beside it, every file is fsynced, the directory is renamed into
place and its parent fsynced. A crash or kill -9 at any moment leaves either
the old state or the new one; directories whose names start with "." are
never read. A checkpoint of step s is complete when all n shard directories
exist.

Manifest (format_version 1)::

    {"format": "embps-checkpoint", "format_version": 1, "step": 12, "shard": 0,
     "num_shards": 2, "kind": "full" | "incremental", "base_step": null | 10,
     "tables": [{"config": {...TableConfig.to_dict()...}, "state": {...},
                 "full": true, "base_version": null, "version": 57,
                 "arrays": {"dynamic.keys": {"file": "t/dynamic.keys.npy",
                            "dtype": "<i8", "shape": [n], "crc32": "1a2b3c4d"}, ...}}]}

An incremental checkpoint holds, per table, the rows changed since the
previous checkpoint (``base_step``) and the keys deleted since then; a table
created after the base is written whole (``"full": true``). Restoring step s
loads the chain from the last full entry of each table up to s, in order.

Reading verifies every file's CRC-32 before use and refuses (``CheckpointError``,
naming the file) a missing, truncated or corrupt file; arrays are parsed from
the .npy header with object dtypes rejected, so loading never executes data.

Resharding (N -> M): own rows (dynamic parts) go to the shard that owns their
key under M. Shared blocks (static and qr parts, which are per shard) are
copied when N == M and averaged over the N old shards otherwise; sketches are
summed (count-min sketches of disjoint key sets add up to a valid sketch).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embps.protos.config import TableConfig
from embps.protos.routing import shard_of

from .tables import BLOCK_FIELDS, Snapshot, Table, make_table

FORMAT = "embps-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 24


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file."""


@dataclass(frozen=True)
class ShardCheckpoint:
    """Where one shard's checkpoint of one step lives."""

    root: Path
    step: int
    shard: int
    num_shards: int

    @property
    def path(self) -> Path:
        """The shard's directory."""
        return self.root / str(self.step) / shard_dir_name(self.shard, self.num_shards)


def shard_dir_name(shard: int, num_shards: int) -> str:
    """``shard-<i>-of-<n>``."""
    return f"shard-{shard}-of-{num_shards}"


# --------------------------------------------------------------------------
# Array files
# --------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_array(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as .npy, fsync it, and return the CRC-32 (hex) of the file's bytes."""
    arr = np.ascontiguousarray(arr)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    header = head.getvalue()
    data = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b"")  # type: ignore[arg-type]
    crc = zlib.crc32(header)
    with open(path, "wb") as f:
        f.write(header)
        for off in range(0, len(data), _CHUNK):
            chunk = data[off : off + _CHUNK]
            crc = zlib.crc32(chunk, crc)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return f"{crc & 0xFFFFFFFF:08x}"


def read_array(path: Path, crc32: str) -> np.ndarray:
    """Read a .npy file written by ``write_array``, verifying its CRC-32 first.

    Raises CheckpointError naming the file when it is missing, truncated,
    corrupt or holds an object dtype.
    """
    try:
        size = path.stat().st_size
        buf = bytearray(size)
        with open(path, "rb") as f:
            got = f.readinto(buf)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
    if got != size:
        raise CheckpointError(f"checkpoint file {path} is truncated (read {got} of {size} bytes)")
    view = memoryview(buf)
    crc = 0
    for off in range(0, size, _CHUNK):
        crc = zlib.crc32(view[off : off + _CHUNK], crc)
    if f"{crc & 0xFFFFFFFF:08x}" != crc32:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: CRC-32 {crc & 0xFFFFFFFF:08x} != {crc32} "
            "in the manifest; restore an older checkpoint"
        )
    try:
        bio = io.BytesIO(view[: min(size, 65536)])
        major, _minor = np.lib.format.read_magic(bio)
        if major != 1:
            raise ValueError(f"npy format version {major} (expected 1)")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(bio)
        if dtype.hasobject or fortran:
            raise ValueError("object or Fortran-ordered arrays are not allowed")
        count = int(np.prod(shape)) if shape else 1
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=bio.tell())
    except ValueError as e:
        raise CheckpointError(f"checkpoint file {path} is not a valid array: {e}") from e
    return arr.reshape(shape)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def write_shard(
    snapshots: Iterable[Snapshot],
    ck: ShardCheckpoint,
    base_step: int | None = None,
) -> Path:
    """Write one shard's checkpoint atomically; returns its directory.

    snapshots: one per table, full ones (``base_version is None``) or
    increments over the checkpoint at ``base_step``.
    """
    final = ck.path
    step_dir = final.parent
    step_dir.mkdir(parents=True, exist_ok=True)
    tmp = step_dir / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        tables = []
        for snap in snapshots:
            tdir = tmp / snap.config.name
            tdir.mkdir()
            arrays = dict(snap.arrays)
            if snap.deleted is not None:
                arrays["deleted.keys"] = snap.deleted
            files = {}
            for name, arr in sorted(arrays.items()):
                rel = f"{snap.config.name}/{name}.npy"
                crc = write_array(tmp / rel, arr)
                files[name] = {
                    "file": rel,
                    "dtype": arr.dtype.str,
                    "shape": list(arr.shape),
                    "crc32": crc,
                }
            _fsync_dir(tdir)
            tables.append(
                {
                    "config": snap.config.to_dict(),
                    "state": snap.state,
                    "full": snap.base_version is None,
                    "base_version": snap.base_version,
                    "version": snap.version,
                    "arrays": files,
                }
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": ck.step,
            "shard": ck.shard,
            "num_shards": ck.num_shards,
            "kind": "full" if all(t["full"] for t in tables) else "incremental",
            "base_step": base_step,
            "created_unix": time.time(),
            "tables": tables,
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = step_dir / f".old-{final.name}-{time.monotonic_ns()}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(step_dir)
        _fsync_dir(ck.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


def list_steps(root: Path | str) -> list[int]:
    """Steps under ``root`` with at least one complete shard directory, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if (
            d.is_dir()
            and d.name.isdigit()
            and any((s / MANIFEST).is_file() for s in d.iterdir() if not s.name.startswith("."))
        ):
            steps.append(int(d.name))
    return sorted(steps)


def shard_count_at(root: Path | str, step: int) -> int:
    """The shard count N of the complete checkpoint at ``step``; CheckpointError if incomplete."""
    d = Path(root) / str(step)
    counts = set()
    for s in d.iterdir() if d.is_dir() else []:
        parts = s.name.split("-")
        if (
            len(parts) == 4
            and parts[0] == "shard"
            and parts[2] == "of"
            and (s / MANIFEST).is_file()
        ):
            counts.add(int(parts[3]))
    if len(counts) != 1:
        raise CheckpointError(
            f"checkpoint {d} has no complete shard set (found shard counts {sorted(counts)})"
        )
    n = counts.pop()
    missing = [i for i in range(n) if not (d / shard_dir_name(i, n) / MANIFEST).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {d} is incomplete: shards {missing} of {n} are missing")
    return n


def latest_step(root: Path | str) -> int | None:
    """The newest step whose every shard directory is present, or None."""
    for step in reversed(list_steps(root)):
        try:
            shard_count_at(root, step)
        except CheckpointError:
            continue
        return step
    return None


def resolve(spec: str, root: Path | str | None = None) -> tuple[Path, int]:
    """``latest`` (needs ``root``) or a path ``<root>/<step>`` -> (root, step)."""
    if spec == "latest":
        if root is None:
            raise CheckpointError(
                "--restore latest needs a checkpoint directory (--checkpoint-dir)"
            )
        step = latest_step(root)
        if step is None:
            raise CheckpointError(f"no complete checkpoint under {root}")
        return Path(root), step
    p = Path(spec)
    if p.name.startswith("shard-"):
        p = p.parent
    if not p.name.isdigit():
        raise CheckpointError(f"{spec} is not a checkpoint step directory (<dir>/<step>)")
    return p.parent, int(p.name)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The parsed, checked manifest of a shard directory."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint manifest {mpath}: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mpath} is not an embps checkpoint of format version {FORMAT_VERSION} "
            f"(format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    return manifest


def _load_entry(path: Path, entry: dict) -> Snapshot:
    arrays = {}
    for name, meta in entry["arrays"].items():
        arr = read_array(path / meta["file"], meta["crc32"])
        if arr.dtype.str != meta["dtype"] or list(arr.shape) != meta["shape"]:
            raise CheckpointError(
                f"checkpoint file {path / meta['file']} does not match its manifest entry"
            )
        arrays[name] = arr
    deleted = arrays.pop("deleted.keys", None)
    try:
        config = TableConfig.from_dict(entry["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path / MANIFEST}: bad config for table {entry['config'].get('name')!r}: {e}"
        ) from e
    return Snapshot(config, arrays, dict(entry["state"]), entry["base_version"], deleted)


def load_chain(root: Path, step: int, shard: int, num_shards: int) -> dict[str, list[Snapshot]]:
    """Per table (of the manifest at ``step``), its snapshots from the last full one to ``step``."""
    path = ShardCheckpoint(root, step, shard, num_shards).path
    manifest = read_manifest(path)
    chains: dict[str, list[Snapshot]] = {}
    pending = {e["config"]["name"] for e in manifest["tables"]}
    cur_path, cur = path, manifest
    while pending:
        for entry in cur["tables"]:
            name = entry["config"]["name"]
            if name in pending:
                chains.setdefault(name, []).insert(0, _load_entry(cur_path, entry))
                if entry["full"]:
                    pending.discard(name)
        if not pending:
            break
        base = cur.get("base_step")
        if base is None:
            raise CheckpointError(
                f"{cur_path / MANIFEST}: incremental tables {sorted(pending)} have no base checkpoint"
            )
        cur_path = ShardCheckpoint(root, int(base), shard, num_shards).path
        if not (cur_path / MANIFEST).is_file():
            raise CheckpointError(
                f"base checkpoint {cur_path} of {path} is missing; the increment cannot be restored"
            )
        cur = read_manifest(cur_path)
    return chains


def restore_tables(
    root: Path | str, step: int, shard: int, num_shards: int
) -> tuple[list[Table], dict]:
    """Rebuild shard ``shard`` of ``num_shards`` from the checkpoint at ``step``.

    The checkpoint may have any shard count N (resharding when N != num_shards).
    Returns the tables and a summary (``old_shards``, ``tables``, ``keys``, ``bytes``).
    """
    root = Path(root)
    old_n = shard_count_at(root, step)
    tables: dict[str, Table] = {}
    block_sums: dict[str, dict[str, np.ndarray]] = {}
    states: dict[str, dict[str, int]] = {}
    sources = [shard] if old_n == num_shards else list(range(old_n))
    for old in sources:
        for name, chain in load_chain(root, step, old, old_n).items():
            table = tables.get(name)
            if table is None:
                table = tables[name] = make_table(chain[-1].config)
            elif table.config != chain[-1].config:
                raise CheckpointError(
                    f"table {name!r} has different configs on different shards of {root / str(step)}"
                )
            if old_n == num_shards:
                for snap in chain:
                    table.load(snap)
                continue
            scratch = make_table(chain[-1].config)  # materialise the old shard's shared blocks
            for snap in chain:
                scratch.load(_without_dynamic(snap))
                table.load(_only_owned(snap, shard, num_shards))
            full = scratch.snapshot()
            sums = block_sums.setdefault(name, {})
            for key, arr in full.arrays.items():
                if key.startswith("dynamic."):
                    continue
                if key == "sketch.counters":
                    acc = sums.get(key, np.zeros(arr.shape, dtype=np.uint64))
                    sums[key] = acc + arr.astype(np.uint64)
                elif key.split(".")[1] in ("values", "slots"):
                    sums[key] = sums.get(key, 0) + arr.astype(np.float64)
                else:
                    sums[key] = np.maximum(sums.get(key, arr), arr)
            st = states.setdefault(name, {})
            for k, v in chain[-1].state.items():
                st[k] = max(st.get(k, 0), int(v))
    for name, sums in block_sums.items():
        table = tables[name]
        merged = table.snapshot()
        for key, acc in sums.items():
            if key == "sketch.counters":
                merged.arrays[key] = np.minimum(acc, np.iinfo(np.uint32).max).astype(np.uint32)
            elif key.split(".")[1] in ("values", "slots"):
                merged.arrays[key] = (acc / len(sources)).astype(np.float32)
            else:
                merged.arrays[key] = acc
        for key in [k for k in merged.arrays if k.startswith("dynamic.")]:
            del merged.arrays[key]  # the own rows are already in place
        # Per-shard counters do not survive a reshard; steps and versions take the maximum.
        merged.state = {
            k: v for k, v in states[name].items() if k in ("step", "auto_step", "version")
        }
        table.load(merged)
    out = [tables[n] for n in sorted(tables)]
    stats = [t.stats() for t in out]
    summary = {
        "old_shards": old_n,
        "tables": len(out),
        "keys": sum(s.keys for s in stats),
        "bytes": sum(s.bytes for s in stats),
    }
    return out, summary


def _only_owned(snap: Snapshot, shard: int, num_shards: int) -> Snapshot:
    """The snapshot's own rows owned by ``shard`` under ``num_shards``; shared blocks dropped."""
    arrays: dict[str, np.ndarray] = {}
    if "dynamic.keys" in snap.arrays:
        mine = shard_of(snap.arrays["dynamic.keys"], num_shards) == shard
        arrays["dynamic.keys"] = snap.arrays["dynamic.keys"][mine]
        for f in BLOCK_FIELDS:
            arrays[f"dynamic.{f}"] = snap.arrays[f"dynamic.{f}"][mine]
    deleted = snap.deleted
    if deleted is not None:
        deleted = deleted[shard_of(deleted, num_shards) == shard]
    return _partial(snap, arrays, deleted)


def _without_dynamic(snap: Snapshot) -> Snapshot:
    """The snapshot's shared blocks and sketch only."""
    arrays = {k: v for k, v in snap.arrays.items() if not k.startswith("dynamic.")}
    return _partial(snap, arrays, None)


def _partial(snap: Snapshot, arrays: dict[str, np.ndarray], deleted: np.ndarray | None) -> Snapshot:
    return Snapshot(
        snap.config,
        arrays,
        snap.state,
        snap.base_version if snap.base_version is not None else -1,
        deleted,
    )
