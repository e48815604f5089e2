"""Checkpoints on disk: crash-safe writes, verified reads, incremental chains, resharding.

Modules: ``crc`` (CRC-32 and its combine), ``arrayio`` (array files: written with fsync,
read in parallel pieces), ``manifest`` (the format, directory names, discovery),
``write`` (one shard's checkpoint, streamed), ``restore`` (chains, resharding),
``checkpoint`` (the Checkpointer: policy and the periodic thread), ``export`` (a
checkpoint's values for serving). This package's names are its public face.

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
Files are read in pieces on parallel threads, each piece checksummed by its
reader and the CRCs combined (``crc32_combine``), large uncached files with
direct I/O (see "Reading" below). A restore onto the same shard count builds a
table's hash map from its keys, read first, while the large arrays are still
arriving; the table gets its rows only after every file passed its check.

Resharding (N -> M): own rows (dynamic parts) go to the shard that owns their
key under M. Shared blocks (static and qr parts, which are per shard) are
copied when N == M and averaged over the N old shards otherwise; sketches are
summed (count-min sketches of disjoint key sets add up to a valid sketch).
"""

from __future__ import annotations

from embps.server.durability.arrayio import read_array, write_array
from embps.server.durability.checkpoint import (
    CheckpointConflict,
    Checkpointer,
    CheckpointResult,
    is_disk_full,
)
from embps.server.durability.crc import crc32_combine
from embps.server.durability.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    ShardCheckpoint,
    is_private,
    latest_step,
    list_steps,
    read_manifest,
    resolve,
    shard_count_at,
    shard_dir_name,
)
from embps.server.durability.restore import chain_entries, load_chain, restore_tables
from embps.server.durability.write import SnapshotSource, write_shard

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "CheckpointConflict",
    "CheckpointError",
    "CheckpointResult",
    "Checkpointer",
    "ShardCheckpoint",
    "SnapshotSource",
    "chain_entries",
    "crc32_combine",
    "is_disk_full",
    "is_private",
    "latest_step",
    "list_steps",
    "load_chain",
    "read_array",
    "read_manifest",
    "resolve",
    "restore_tables",
    "shard_count_at",
    "shard_dir_name",
    "write_array",
    "write_shard",
]
