"""``embps export``: a checkpoint's values for serving, in files a reader can memory-map.

FORMAT (``embps-export`` version 1; docs/durability.md has the full page)
=========================================================================
    <out>/manifest.json
    <out>/<table>/keys.npy        int64 (n,) ascending: every dynamic key of every shard
    <out>/<table>/values.npy      float32 | float16 (n, dim): row i belongs to keys[i]
    <out>/<table>/static.npy      (num_shards, hash_bucket_size, dim)        static, adaptive
    <out>/<table>/quotient.npy    (num_shards, qr_quotient_buckets, part_dim)   qr
    <out>/<table>/remainder.npy   (num_shards, qr_remainder_buckets, part_dim)  qr

Values only: no optimizer slots, no per-row metadata, no sketch. Own rows
(dynamic parts) of all shards are merged and sorted by key, so one binary
search finds a key. Shared blocks (static parts, qr parts) exist once per
shard in the PS, so they are kept per shard (axis 0): a key reads the block of
the shard that owns it, ``shard = splitmix64(key) % num_shards``. Looking a
key up (what an inference pull, ``train=False``, returned at checkpoint time):

    dynamic   keys[i] == key ? values[i] : default_value
    static    static[shard, fmix64(key ^ fmix64(seed ^ 0x94D049BB133111EB)) % B]
    adaptive  keys[i] == key ? values[i] : the static row as above
    qr        h = key mod (Q*m) (non-negative); q = h // m; r = h % m;
              combine(quotient[shard, q], remainder[shard, r]) by mult, add or concat

(``fmix64`` is murmur3's 64-bit finalizer, ``splitmix64`` the routing hash of
``embps.protos.routing``; all arithmetic on uint64, wrapping.) The manifest
repeats these rules and the constants per table, with every file's dtype,
shape and CRC-32. ``--fp16`` stores float16 (values beyond its range are
refused, not clipped); ``--min-frequency K`` drops own rows pulled fewer than K
times in training (those keys read the default value, or their static row in
an adaptive table). Files are written into a hidden directory beside OUT,
fsynced and renamed into place: OUT is complete or absent.

Reader: ``embps.client.serving.ExportedModel``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from embps.protos.config import TableConfig, TableKind
from embps.protos.routing import STATIC_SEED
from embps.server.durability import (
    CheckpointError,
    resolve,
    restore_tables,
    shard_count_at,
    write_array,
)

log = logging.getLogger("embps.export")

FORMAT = "embps-export"
FORMAT_VERSION = 1
ROUTING = {
    "rule": "shard = splitmix64(key) % num_shards",
    "splitmix64": "z = key + 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; "
    "z = (z ^ (z >> 27)) * 0x94D049BB133111EB; z ^ (z >> 31)  (uint64, wrapping)",
}
FMIX64 = (
    "x ^= x >> 33; x *= 0xFF51AFD7ED558CCD; x ^= x >> 33; x *= 0xC4CEB9FE1A85EC53; "
    "x ^= x >> 33  (murmur3 finalizer, uint64, wrapping)"
)
# routing.static_rows, as the manifest states it
STATIC_ROW = f"fmix64(key ^ fmix64(seed ^ 0x{int(STATIC_SEED):016X})) % buckets"
_LOOKUP = {
    TableKind.DYNAMIC: "keys[i] == key ? values[i] : default_value",
    TableKind.STATIC: "static[shard, static_row(key)]",
    TableKind.ADAPTIVE: "keys[i] == key ? values[i] : static[shard, static_row(key)]",
    TableKind.QR: "h = key mod (Q*m) (non-negative); combine(quotient[shard, h // m], "
    "remainder[shard, h % m])",
}
_FP16_MAX = float(np.finfo(np.float16).max)


class ExportError(Exception):
    """An export that cannot be written (bad checkpoint, values out of float16 range, OUT exists)."""


class _TableParts:
    """One table's values gathered over the shards of a checkpoint."""

    def __init__(self, config: TableConfig, num_shards: int) -> None:
        self.config = config
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.blocks: dict[str, list[np.ndarray | None]] = {}
        self.num_shards = num_shards
        self.dropped = 0

    def add_shard(self, shard: int, arrays: dict[str, np.ndarray], min_frequency: int) -> None:
        if "dynamic.keys" in arrays:
            keep = arrays["dynamic.freq"] >= min_frequency
            self.dropped += int((~keep).sum())
            self.keys.append(arrays["dynamic.keys"][keep])
            self.values.append(arrays["dynamic.values"][keep])
        for part in ("static", "quotient", "remainder"):
            if f"{part}.values" in arrays:
                slot = self.blocks.setdefault(part, [None] * self.num_shards)
                slot[shard] = arrays[f"{part}.values"]


def export(
    step_dir: Path | str, out: Path | str, fp16: bool = False, min_frequency: int = 0
) -> dict[str, Any]:
    """Export the checkpoint ``<root>/<step>`` (every shard, increments applied) into ``out``.

    Returns the manifest written. Raises CheckpointError for a missing, incomplete or
    corrupt checkpoint, ExportError when ``out`` exists or a value exceeds float16.
    """
    if min_frequency < 0:
        raise ExportError(f"--min-frequency must be >= 0, got {min_frequency}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new path")
    root, step = resolve(str(step_dir))
    n = shard_count_at(root, step)
    dtype = np.dtype(np.float16 if fp16 else np.float32)
    t0 = time.monotonic()
    parts: dict[str, _TableParts] = {}
    for shard in range(n):
        tables, _ = restore_tables(root, step, shard, n)
        for table in tables:
            snap = table.snapshot()
            tp = parts.setdefault(table.name, _TableParts(table.config, n))
            if tp.config != table.config:
                raise CheckpointError(f"table {table.name!r} differs between shards of {root}")
            tp.add_shard(shard, snap.arrays, min_frequency)
        del tables
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": str(root / str(step)),
            "step": step,
            "num_shards": n,
            "dtype": dtype.name,
            "min_frequency": min_frequency,
            "routing": ROUTING,
            "fmix64": FMIX64,
            "created_unix": time.time(),
            "tables": {
                name: _write_table(tmp, tp, dtype, min_frequency)
                for name, tp in sorted(parts.items())
            },
        }
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "exported %s (%d shards) to %s in %.2fs", root / str(step), n, out, time.monotonic() - t0
    )
    return manifest


def _cast(arr: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    if dtype == np.float16 and arr.size and float(np.abs(arr).max()) > _FP16_MAX:
        raise ExportError(
            f"{what} holds values beyond the float16 range (|x| > {_FP16_MAX}); "
            "export without --fp16"
        )
    return arr.astype(dtype, copy=False)


def _write_table(tmp: Path, tp: _TableParts, dtype: np.dtype, min_frequency: int) -> dict:
    cfg = tp.config
    tdir = tmp / cfg.name
    tdir.mkdir()
    arrays: dict[str, np.ndarray] = {}
    if cfg.kind in (TableKind.DYNAMIC, TableKind.ADAPTIVE):
        keys = np.concatenate(tp.keys) if tp.keys else np.empty(0, dtype=np.int64)
        values = (
            np.concatenate(tp.values) if tp.values else np.empty((0, cfg.dim), dtype=np.float32)
        )
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        if keys.shape[0] > 1 and not (keys[1:] > keys[:-1]).all():
            raise CheckpointError(f"table {cfg.name!r}: a key is stored on two shards")
        arrays["keys"] = keys
        arrays["values"] = _cast(values[order], dtype, f"table {cfg.name!r}")
    for part, blocks in tp.blocks.items():
        if any(b is None for b in blocks):
            raise CheckpointError(f"table {cfg.name!r}: part {part} is missing on some shards")
        arrays[part] = _cast(np.stack(blocks), dtype, f"table {cfg.name!r} part {part}")  # type: ignore[arg-type]
    files = {}
    for name, arr in arrays.items():
        rel = f"{cfg.name}/{name}.npy"
        crc = write_array(tmp / rel, arr)
        files[name] = {"file": rel, "dtype": arr.dtype.str, "shape": list(arr.shape), "crc32": crc}
    entry: dict[str, Any] = {
        "kind": cfg.kind.value,
        "dim": cfg.dim,
        "config": cfg.to_dict(),
        "files": files,
        "lookup": _LOOKUP[cfg.kind],
        "dynamic_rows": int(arrays["keys"].shape[0]) if "keys" in arrays else 0,
        "dropped_rows": tp.dropped,
    }
    if cfg.kind == TableKind.DYNAMIC:
        entry["default_value"] = cfg.default_value
    if cfg.kind in (TableKind.STATIC, TableKind.ADAPTIVE):
        entry["static_row"] = {
            "rule": STATIC_ROW,
            "seed": cfg.seed,
            "buckets": cfg.hash_bucket_size,
        }
    if cfg.kind == TableKind.QR:
        entry["qr"] = {
            "quotient_buckets": cfg.qr_quotient_buckets,
            "remainder_buckets": cfg.qr_remainder_buckets,
            "combiner": cfg.qr_combiner.value,
        }
    return entry


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``embps export`` arguments."""
    parser.add_argument("checkpoint", metavar="CKPT_STEP_DIR",
                        help="a complete checkpoint step directory, <checkpoint-dir>/<step>")  # fmt: skip
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist, or be empty)")
    parser.add_argument("--fp16", action="store_true", help="store values as float16")
    parser.add_argument("--min-frequency", type=int, default=0, metavar="K",
                        help="drop own rows pulled fewer than K times in training (default 0)")  # fmt: skip
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def run(args: argparse.Namespace) -> int:
    """``embps export``: 0 on success, 1 if the checkpoint cannot be exported."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s embps[export] %(message)s",
        stream=sys.stderr,
    )
    try:
        manifest = export(args.checkpoint, args.out, args.fp16, args.min_frequency)
    except (CheckpointError, ExportError, OSError) as e:
        log.error("cannot export %s: %s", args.checkpoint, e)
        return 1
    for name, t in manifest["tables"].items():
        print(
            f"{name}: {t['kind']}, dim {t['dim']}, {t['dynamic_rows']} own rows"
            + (f" ({t['dropped_rows']} dropped)" if t["dropped_rows"] else "")
        )
    print(f"exported step {manifest['step']} ({manifest['num_shards']} shards) to {args.out}")
    return 0
