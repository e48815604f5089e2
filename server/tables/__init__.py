"""Embedding tables: each owns its arrays, a lock, growth and memory accounting.

Modules: ``block`` (the arrays of rows and their bytes), ``part`` (a table's own rows:
hash map + block), ``base`` (the ``Table`` every kind shares: locking, steps, pulls,
pushes, snapshots, the change feed; validation at its boundary), one module per kind
(``dynamic``, ``static``, ``adaptive``, ``qr``), ``sketch`` (admission counts). This
package's names are the tables' public face; ``TABLE_CLASSES`` is the registry of kinds.

Kinds (``embps.protos.config.TableKind``):
  dynamic   one collision-free row per admitted key (``DynamicPart``)
  static    ``hash_bucket_size`` rows; row = h(key) % B, colliding keys share
  adaptive  static part for rare keys + dynamic rows for frequent keys + a
            count-min sketch; promotion copies the static row *and its
            optimizer slots* into the new dynamic row, so learning carries over;
            eviction demotes a key back to the static part
  qr        quotient-remainder: rows Q[h // m] and R[h % m] (h = key mod Q*m)
            combined by mult, add or concat; both parts get their gradient

Lock discipline. Every public method validates and converts its input *before*
taking the table's lock (nothing is changed by a bad request), then holds the
lock for the whole operation, so a pull or push is atomic with respect to
every other. The lock is a readers-writer lock (``server/rwlock.py``): calls that
only read (inference pulls, ``frequencies``, ``stats``, ``snapshot``'s copy) share
it, every change (training pulls, pushes, prune, evict, erase, load) holds it
alone, and a waiting change goes before new readers. Kernels release the GIL:
other tables, readers of the same table, and the gRPC threads (de)serialising
other requests, run in parallel.

Steps. ``push(step=s)`` records the trainer's 0-based global step; without it
the table counts its own pushes. The table's step is the largest seen; pulls
stamp rows with it (LRU, steps-to-live). Adam's bias correction uses t = s + 1.

Memory. ``stats().bytes`` is the sum of ``nbytes`` of every array the table
owns (index, arena, slots, metadata, free list, sketch): exact, not estimated.
``max_bytes`` bounds it: ``row_limit`` turns the cap into a row count whose
worst-case arrays fit, growth stops at that count (the last arena step is
clipped), and at the limit a new key evicts (lfu/lru) or its batch is refused
(RESOURCE_EXHAUSTED, nothing changed); an adaptive table under max_bytes
skips the promotion instead, and the key keeps training its static row.
"""

from __future__ import annotations

from embps.protos.config import TableConfig, TableKind
from embps.server.errors import ResourceExhausted
from embps.server.kernels import hashmap as hm
from embps.server.tables.adaptive import AdaptiveTable
from embps.server.tables.base import (
    DELETED_LOG_MAX,
    EVICT_PAGE_ROWS,
    FEED_CURSOR_PART,
    FEED_SCAN_ROWS,
    FOLLOWER_TTL_S,
    EvictResult,
    FeedPage,
    NarrowResult,
    PruneResult,
    PushResult,
    Snapshot,
    Table,
    TableStats,
    _physical_memory,
    as_grads,
    as_keys,
    copy_rows,
    row_limit,
)
from embps.server.tables.block import (
    BLOCK_FIELDS,
    ROW_DTYPES,
    TRAINING,
    Block,
    CopyRows,
    RowIndex,
    Storage,
)
from embps.server.tables.dynamic import DynamicTable
from embps.server.tables.part import DynamicPart
from embps.server.tables.qr import QRTable
from embps.server.tables.sketch import FrequencySketch
from embps.server.tables.static import StaticTable

__all__ = [
    "BLOCK_FIELDS",
    "DELETED_LOG_MAX",
    "EVICT_PAGE_ROWS",
    "FEED_CURSOR_PART",
    "FEED_SCAN_ROWS",
    "FOLLOWER_TTL_S",
    "ROW_DTYPES",
    "TABLE_CLASSES",
    "TRAINING",
    "AdaptiveTable",
    "Block",
    "CopyRows",
    "DynamicPart",
    "DynamicTable",
    "EvictResult",
    "FeedPage",
    "FrequencySketch",
    "NarrowResult",
    "PruneResult",
    "PushResult",
    "QRTable",
    "RowIndex",
    "Snapshot",
    "StaticTable",
    "Storage",
    "Table",
    "TableStats",
    "as_grads",
    "as_keys",
    "copy_rows",
    "create_bytes",
    "make_table",
    "row_limit",
]


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------

TABLE_CLASSES: dict[TableKind, type[Table]] = {
    TableKind.DYNAMIC: DynamicTable,
    TableKind.STATIC: StaticTable,
    TableKind.ADAPTIVE: AdaptiveTable,
    TableKind.QR: QRTable,
}


def make_table(config: TableConfig, storage: Storage = TRAINING) -> Table:
    """A new, empty table of ``config.kind``.

    Raises ResourceExhausted, allocating nothing, when the arrays the table
    needs at creation (``create_bytes``) exceed this machine's memory, and
    when an allocation fails: a config is never an out-of-memory kill.
    """
    need, have = create_bytes(config), _physical_memory()
    if need > have:
        raise ResourceExhausted(
            f"table {config.name!r} needs {need} bytes at creation, more than this machine's "
            f"{have} bytes of memory; lower hash_bucket_size, the qr buckets, sketch_width or "
            "initial_capacity (or set max_bytes)"
        )
    try:
        return TABLE_CLASSES[config.kind](config, storage)
    except MemoryError as e:
        raise ResourceExhausted(
            f"table {config.name!r}: its {need} bytes could not be allocated ({e}); "
            "make it smaller or free memory on the shard"
        ) from None


def create_bytes(config: TableConfig) -> int:
    """Bytes a new table of ``config`` allocates: its fixed parts and its first arena."""
    need = config.fixed_bytes
    if config.kind in (TableKind.DYNAMIC, TableKind.ADAPTIVE):
        rows = max(int(config.initial_capacity), 16)
        limit = row_limit(config)
        if limit is not None:
            rows = min(rows, limit)
        need += rows * (config.row_bytes + 8) + 16 * (hm.capacity_for(rows) - hm.MIN_CAPACITY)
    return need
