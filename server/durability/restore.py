"""Restoring tables from a checkpoint: a chain of full and incremental entries read in order, resharded (only the keys this shard owns) when the shard count changed."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path

import numpy as np

from embps.protos.config import TableConfig
from embps.protos.routing import shard_of
from embps.server.durability.arrayio import _FileSpec, _io_pool, _read_arrays
from embps.server.durability.manifest import (
    MANIFEST,
    CheckpointError,
    OnRead,
    Progress,
    ShardCheckpoint,
    _entry_config,
    is_private,
    read_manifest,
    shard_count_at,
    shard_dir_name,
)
from embps.server.tables import (
    BLOCK_FIELDS,
    RowIndex,
    Snapshot,
    Table,
    make_table,
)


def _load_entry(
    path: Path, entry: dict, progress: Progress | None = None, on_read: OnRead | None = None
) -> Snapshot:
    """Read and verify one manifest entry's arrays (all files at once); its snapshot.

    on_read(name, array): called as soon as each array is read and verified, while the
    others are still being read; ``dynamic.keys`` is read first (1% of a table's bytes),
    so a restore can build the hash map from it while the large arrays arrive.
    """
    config = _entry_config(path, entry)
    metas = entry["arrays"]
    names = sorted(metas, key=lambda n: n != "dynamic.keys")  # stable: the keys first
    specs = [
        _FileSpec(
            path / metas[n]["file"],
            metas[n]["crc32"],
            metas[n]["dtype"],
            tuple(int(d) for d in metas[n]["shape"]),
        )
        for n in names
    ]
    loaded = _read_arrays(
        specs, progress, None if on_read is None else lambda i, arr: on_read(names[i], arr)
    )
    by_name = dict(zip(names, loaded, strict=True))
    arrays = {n: by_name[n] for n in metas}  # manifest order
    deleted = arrays.pop("deleted.keys", None)
    return Snapshot(config, arrays, dict(entry["state"]), entry["base_version"], deleted,
                    str(entry.get("epoch", "")))  # fmt: skip


def chain_entries(
    root: Path, step: int, shard: int, num_shards: int
) -> dict[str, list[tuple[Path, dict]]]:
    """Per table (of the manifest at ``step``), the (shard directory, manifest entry) pairs
    from its last full entry to ``step``, oldest first. Reads manifests only.

    Raises CheckpointError when a base is missing, lacks a table, or was overwritten
    after the increment was taken (its table version differs from the increment's base).
    """
    path = ShardCheckpoint(root, step, shard, num_shards).path
    manifest = read_manifest(path)
    chains: dict[str, list[tuple[Path, dict]]] = {}
    want: dict[str, int | None] = {e["config"]["name"]: None for e in manifest["tables"]}
    cur_path, cur = path, manifest
    while True:
        entries = {e["config"]["name"]: e for e in cur["tables"]}
        for name, version in list(want.items()):
            entry = entries.get(name)
            if entry is None:
                raise CheckpointError(
                    f"{cur_path / MANIFEST} lacks table {name!r}, which a later increment "
                    "builds on; restore an older full checkpoint"
                )
            if version is not None and int(entry["version"]) != version:
                raise CheckpointError(
                    f"{cur_path / MANIFEST}: table {name!r} is at version {entry['version']} but "
                    f"the increment over it was taken over version {version}: this step was "
                    f"written again after the increment; restore step {cur['step']} instead"
                )
            chains.setdefault(name, []).insert(0, (cur_path, entry))
            if entry["full"]:
                del want[name]
            else:
                want[name] = int(entry["base_version"])
        if not want:
            return chains
        base = cur.get("base_step")
        if base is None:
            raise CheckpointError(
                f"{cur_path / MANIFEST}: incremental tables {sorted(want)} have no base checkpoint"
            )
        base_path = ShardCheckpoint(root, int(base), shard, num_shards).path
        if not (base_path / MANIFEST).is_file():
            raise CheckpointError(
                f"base checkpoint {base_path} of {cur_path} is missing; "
                "the increment cannot be restored"
            )
        cur_path, cur = base_path, read_manifest(base_path)


def _entry_bytes(entry: dict) -> int:
    return sum(
        np.dtype(m["dtype"]).itemsize * math.prod(m["shape"]) for m in entry["arrays"].values()
    )


def load_chain(
    root: Path, step: int, shard: int, num_shards: int, progress: Progress | None = None
) -> dict[str, list[Snapshot]]:
    """Per table (of the manifest at ``step``), its snapshots from the last full one to ``step``."""
    return {
        name: [_load_entry(path, entry, progress) for path, entry in chain]
        for name, chain in chain_entries(root, step, shard, num_shards).items()
    }


def restore_tables(
    root: Path | str,
    step: int,
    shard: int,
    num_shards: int,
    progress: Callable[[float], None] | None = None,
) -> tuple[list[Table], dict]:
    """Rebuild shard ``shard`` of ``num_shards`` from the checkpoint at ``step``.

    The checkpoint may have any shard count N (resharding when N != num_shards).
    progress: called with the fraction (0..1) of the array bytes read so far.
    Returns the tables and a summary (``old_shards``, ``tables``, ``keys``, ``bytes``).
    """
    root = Path(root)
    try:
        old_n = shard_count_at(root, step)
    except CheckpointError:
        own = root / str(step) / shard_dir_name(shard, num_shards) / MANIFEST
        if not (is_private(root, shard, num_shards) and own.is_file()):
            raise
        old_n = num_shards  # a private volume: this shard's own directory is the checkpoint
    tables: dict[str, Table] = {}
    block_sums: dict[str, dict[str, np.ndarray]] = {}
    states: dict[str, dict[str, int]] = {}
    sources = [shard] if old_n == num_shards else list(range(old_n))
    plans = {old: chain_entries(root, step, old, old_n) for old in sources}
    total = sum(_entry_bytes(e) for p in plans.values() for c in p.values() for _, e in c)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(min(done / total, 1.0) if total else 1.0)

    for old in sources:
        for name, entries in plans[old].items():
            config = _entry_config(*entries[-1])
            if old_n == num_shards:  # one source shard: every table is new here
                made, chain, index = _read_chain_indexed(config, entries, advance)
                tables[name] = made
                for i, snap in enumerate(chain):
                    _load(made, snap, entries, index if i == 0 else None)
                continue
            table = tables.get(name)
            if table is None:
                table = tables[name] = make_table(config)
            elif table.config != config:
                raise CheckpointError(
                    f"table {name!r} has different configs on different shards of {root / str(step)}"
                )
            chain = [_load_entry(path, entry, advance) for path, entry in entries]
            scratch = make_table(chain[-1].config)  # materialise the old shard's shared blocks
            for snap in chain:
                _load(scratch, _without_dynamic(snap), entries)
                _load(table, _only_owned(snap, shard, num_shards), entries)
            full = scratch.snapshot()
            sums = block_sums.setdefault(name, {})
            for key, arr in full.arrays.items():
                if key.startswith(("dynamic.", "replay.")):
                    continue  # own rows are in place; replay windows do not survive a reshard
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
        for key in [k for k in merged.arrays if k.startswith(("dynamic.", "replay."))]:
            del merged.arrays[key]  # the own rows are already in place
        # Per-shard counters do not survive a reshard; steps and versions take the maximum.
        merged.state = {
            k: v for k, v in states[name].items() if k in ("step", "auto_step", "version")
        }
        table.load(merged)
    if progress is not None:
        progress(1.0)
    out = [tables[n] for n in sorted(tables)]
    stats = [t.stats() for t in out]
    summary = {
        "old_shards": old_n,
        "tables": len(out),
        "keys": sum(s.keys for s in stats),
        "bytes": sum(s.bytes for s in stats),
    }
    return out, summary


def _read_chain_indexed(
    config: TableConfig, entries: list[tuple[Path, dict]], progress: Progress
) -> tuple[Table, list[Snapshot], RowIndex | None]:
    """A new table of ``config`` and its chain, read and verified (``_load_entry`` of each
    entry), for a restore onto the same shard count. The table is made on the I/O pool
    while the files are read; once the first (full) entry's ``dynamic.keys`` are read and
    verified, their hash map is built there too (``Table.prepare_adopt``), while the large
    arrays are still arriving. Returns the table, the snapshots and that map (None if there
    is none) for ``Table.load(chain[0], adopt=True, index=...)``. Nothing is published
    here: the table gets its rows in ``load``, after every file of the chain passed its
    CRC check."""
    pool = _io_pool()
    made = pool.submit(make_table, config)
    building: list[Future[RowIndex | None]] = []

    def prepare(keys: np.ndarray) -> RowIndex | None:
        return made.result().prepare_adopt(keys)

    def on_read(name: str, arr: np.ndarray) -> None:
        if name == "dynamic.keys":
            building.append(pool.submit(prepare, arr))

    try:
        chain = [
            _load_entry(path, entry, progress, on_read if i == 0 and entry["full"] else None)
            for i, (path, entry) in enumerate(entries)
        ]
    finally:
        wait(building)  # nothing outlives a failed read
        wait([made])
    return made.result(), chain, building[0].result() if building else None


def _load(
    table: Table,
    snap: Snapshot,
    entries: list[tuple[Path, dict]],
    index: RowIndex | None = None,
) -> None:
    """``table.load(snap, adopt=True, index=index)``; a snapshot that does not fit is a
    CheckpointError naming the files."""
    part = getattr(table, "part", None)
    cap = table.config.max_rows
    keys = snap.arrays.get("dynamic.keys")
    if part is not None and cap and keys is not None and keys.shape[0]:
        size = part.size
        present = part.find(keys) >= 0
        if snap.deleted is not None and snap.deleted.shape[0]:  # erased before the upsert
            size -= int((part.find(snap.deleted) >= 0).sum())
            present &= ~np.isin(keys, snap.deleted)
        if size + int((~present).sum()) > cap:
            raise CheckpointError(
                f"table {table.name!r}: this shard would hold more than its max_rows={cap} own "
                f"rows (max_rows is per shard; the checkpoint {entries[-1][0]} has more on "
                "fewer shards): restore onto more shards, or raise max_rows"
            )
    try:
        # Fresh from disk, used once: the table may keep its arrays.
        table.load(snap, adopt=True, index=index)
    except ValueError as e:
        where = ", ".join(sorted({str(p / MANIFEST) for p, _ in entries}))
        raise CheckpointError(f"checkpoint {where} does not fit table {table.name!r}: {e}") from e


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
    arrays = {k: v for k, v in snap.arrays.items() if not k.startswith(("dynamic.", "replay."))}
    return _partial(snap, arrays, None)


def _partial(snap: Snapshot, arrays: dict[str, np.ndarray], deleted: np.ndarray | None) -> Snapshot:
    return Snapshot(
        snap.config,
        arrays,
        snap.state,
        snap.base_version if snap.base_version is not None else -1,
        deleted,
    )
