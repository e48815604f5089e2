"""Reader of ``embps export`` output: embedding lookups for serving, without a PS.

The export (``embps.server.durability.export``, docs/durability.md) is a directory of .npy
files and a ``manifest.json``. ``ExportedModel`` memory-maps the files
(``np.load(mmap_mode="r", allow_pickle=False)``: nothing is read until a row is
looked up, several serving processes share the page cache, and loading never
executes data) and answers ``lookup(table, keys)`` with exactly what an
inference pull (``train=False``) on the live PS returned at checkpoint time
(within float16 precision for an ``--fp16`` export).

Example::

    from embps.client.serving import ExportedModel

    model = ExportedModel("/models/ctr-step-120000")
    rows = model.lookup("user", [3, 7, 7, 11])     # float32 (4, dim)

The static-row hash is reimplemented here in numpy (murmur3's fmix64, as the
manifest documents); a unit test holds it equal to the shard's numba kernel,
so the client needs neither numba nor the server package.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embps.protos.config import Combiner, TableConfig, TableKind
from embps.protos.routing import shard_of, static_rows

FORMAT = "embps-export"
FORMAT_VERSION = 1


class ExportFormatError(ValueError):
    """A directory that is not a readable embps export (the message names the file)."""


@dataclass(frozen=True)
class _Table:
    config: TableConfig
    arrays: dict[str, np.ndarray]  # memory-mapped: keys, values, static, quotient, remainder


class ExportedModel:
    """The tables of one export, memory-mapped; ``lookup`` them by key.

    path: an ``embps export`` output directory. verify=True reads every file once
    and checks its CRC-32 against the manifest (else files are only mapped).
    Raises ExportFormatError for a missing or foreign manifest or a file that does
    not match it. Thread-safe (read only).
    """

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise ExportFormatError(f"cannot read export manifest {mpath}: {e}") from e
        if (
            self.manifest.get("format") != FORMAT
            or self.manifest.get("format_version") != FORMAT_VERSION
        ):
            raise ExportFormatError(
                f"{mpath} is not an embps export of format version {FORMAT_VERSION}"
            )
        self.num_shards = int(self.manifest["num_shards"])
        self.step = int(self.manifest["step"])
        self._tables: dict[str, _Table] = {}
        for name, entry in self.manifest["tables"].items():
            arrays = {}
            for part, meta in entry["files"].items():
                fpath = self.path / meta["file"]
                try:
                    arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise ExportFormatError(f"cannot map export file {fpath}: {e}") from e
                if arr.dtype.str != meta["dtype"] or list(arr.shape) != meta["shape"]:
                    raise ExportFormatError(f"export file {fpath} does not match the manifest")
                if verify:
                    _verify(fpath, meta["crc32"])
                arrays[part] = arr
            self._tables[name] = _Table(TableConfig.from_dict(entry["config"]), arrays)

    @property
    def tables(self) -> list[str]:
        """Table names, sorted."""
        return sorted(self._tables)

    def config(self, table: str) -> TableConfig:
        """The table's config (as it was on the PS)."""
        return self._table(table).config

    def dim(self, table: str) -> int:
        """Row width of ``table``."""
        return self._table(table).config.dim

    def lookup(self, table: str, keys: Any) -> np.ndarray:
        """Rows of ``keys`` (any integer shape, flattened): float32 (n, dim).

        Equal to an inference pull (``train=False``) of the same keys on the PS at
        checkpoint time. KeyError for an unknown table, ValueError for non-integer keys.
        """
        t = self._table(table)
        k = np.asarray(keys)
        if k.size and k.dtype.kind not in "iu":
            raise ValueError(f"keys must be an integer array, got dtype {k.dtype}")
        k = np.ascontiguousarray(k.reshape(-1), dtype=np.int64)
        cfg = t.config
        out = np.empty((k.shape[0], cfg.dim), dtype=np.float32)
        if cfg.kind == TableKind.QR:
            out[:] = self._qr(t, k)
            return out
        rest = np.arange(k.shape[0])
        if cfg.kind in (TableKind.DYNAMIC, TableKind.ADAPTIVE):
            own = t.arrays["keys"]
            found = np.zeros(k.shape[0], dtype=np.bool_)
            if own.shape[0]:
                pos = np.minimum(np.searchsorted(own, k), own.shape[0] - 1)
                found = own[pos] == k
                out[found] = t.arrays["values"][pos[found]]
            rest = np.flatnonzero(~found)
            if cfg.kind == TableKind.DYNAMIC:
                out[rest] = np.float32(cfg.default_value)
                return out
        if rest.shape[0]:
            kr = k[rest]
            rows = static_rows(kr, cfg.hash_bucket_size, cfg.seed)
            out[rest] = t.arrays["static"][shard_of(kr, self.num_shards), rows]
        return out

    # ---------------------------------------------------------------- internals
    def _table(self, table: str) -> _Table:
        t = self._tables.get(table)
        if t is None:
            raise KeyError(
                f"no table {table!r} in the export {self.path} (tables: {', '.join(self.tables)})"
            )
        return t

    def _qr(self, t: _Table, k: np.ndarray) -> np.ndarray:
        cfg = t.config
        m = cfg.qr_remainder_buckets
        h = np.mod(k, np.int64(cfg.qr_quotient_buckets * m))
        shard = shard_of(k, self.num_shards)
        vq = np.asarray(t.arrays["quotient"][shard, h // m], dtype=np.float32)
        vr = np.asarray(t.arrays["remainder"][shard, h % m], dtype=np.float32)
        if cfg.qr_combiner == Combiner.MULT:
            return vq * vr
        if cfg.qr_combiner == Combiner.ADD:
            return vq + vr
        return np.concatenate([vq, vr], axis=1)


def _verify(path: Path, crc32: str) -> None:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    if f"{crc & 0xFFFFFFFF:08x}" != crc32:
        raise ExportFormatError(
            f"export file {path} is corrupt: its CRC-32 differs from the manifest"
        )
