"""Read-only replica shards that follow a training shard's change feed.

DESIGN
======
``embps serve --replica-of ADDRESSES`` runs replica shard i as a follower of training
shard i. It serves the same ``ParameterServer`` service, but its engine is a
``ReplicaEngine``: inference pulls (``train=False``, Pull or Step) are answered, every
write (training pulls, pushes, table changes, prune, evict, checkpoints) is refused with
FAILED_PRECONDITION naming the shard read-only.

Storage. A ``ReplicaTable`` wraps a real table of the same kind, built from a serving
config: the training config with SGD (no optimizer slots) and no row caps (the training
shard enforces them; the replica mirrors what it keeps), stored without per-row training
metadata (``Storage(meta=False)``) and with the values in ``--replica-dtype``: float32
(the training rows' exact bits), float16, or int8 (uint8 codes with a float32 scale and
offset per row, FBGEMM's rowwise layout: each element within scale / 2 of the training
value). Inference pulls run the very code a training shard's inference pull runs, so a
replica answers every key exactly as the training shard did at the version it reflects
(to the dtype's rounding): own rows, default values, adaptive tables' static rows for
keys without their own, qr combinations (of the rounded parts).

Following (``Follower``, one thread). Every ``poll_seconds``: DescribeTables on the
training shard (tables created or dropped there are created or dropped here), then one
feed round per table (``Table.changes``: deletions first, then changed rows, page by
page). The first round of a table, or a round answered ``resync`` (the training shard
was restored, so its epoch changed, or the deletions since our version are gone), fills
a *fresh* table while the current one keeps serving, then swaps it in with one
assignment: an answer never mixes rows of two histories.

Freshness. A table reflects the training shard's state as of the start of its last
complete round (the version of that round's first page). ``lag_seconds`` is the time
since the oldest table's last complete round started (0 before none; the shard is
NOT_SERVING until every table finished its first round). When the training shard cannot
be reached, the replica keeps serving what it has and its lag grows; with ``max_lag``
the shard reports NOT_SERVING while the lag exceeds it.

Security. The follower connects like a client: TLS when given a CA (``--replica-tls-ca``,
plus a client certificate for mutual TLS), and a bearer token (``--replica-token-file``;
a ``read`` token suffices: DescribeTables and Changes are reads).

LIMITATIONS. Optimizer slots are not kept, so a replica cannot take over training. A
float16 replica turns values beyond 65504 into inf. A round reads each changed row once
per round, so a table under heavy churn costs the training shard about one scan of its
arena per ``poll_seconds`` (FEED_SCAN_ROWS rows per call, under the shared lock).
Starting from a checkpoint restores the training tables whole (slots and metadata
included) before copying their values: for a moment the replica holds both.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np

from embps.protos import codec
from embps.protos.config import SGD, Eviction, TableConfig, TableKind
from embps.server.durability import (
    latest_step,
    read_manifest,
    restore_tables,
    shard_dir_name,
)
from embps.server.engine import Engine
from embps.server.errors import FailedPrecondition
from embps.server.tables import (
    DynamicPart,
    EvictResult,
    FeedPage,
    Storage,
    Table,
    TableStats,
    make_table,
)
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

log = logging.getLogger("embps.server")


def follower_credentials(
    ca: str | None, cert: str | None, key: str | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials of a follower's channel (None without a CA: plaintext). ValueError
    names the file that cannot be read."""
    if not ca:
        if cert or key:
            raise ValueError("--replica-tls-cert / --replica-tls-key need --replica-tls-ca")
        return None
    if bool(cert) != bool(key):
        raise ValueError("--replica-tls-cert and --replica-tls-key go together (mutual TLS)")

    def read(path: str | None, what: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{what} {path}: cannot read it ({e.strerror or e})") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "--replica-tls-ca"),
        private_key=read(key, "--replica-tls-key"),
        certificate_chain=read(cert, "--replica-tls-cert"),
    )


def read_token(path: str | None) -> str | None:
    """The bearer token in ``path`` (its first non-empty line without comments; None: no
    file). ValueError names the file when it cannot be read or holds no token."""
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--replica-token-file {path}: cannot read it ({e})") from None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line
    raise ValueError(f"--replica-token-file {path} holds no token (one line: the token)")


FEED_PAGE_ROWS = 1 << 16


def serving_config(config: TableConfig) -> TableConfig:
    """The config of a replica's inner table: ``config`` without optimizer slots, row caps,
    a full-size sketch (inference never uses them) or a preallocated arena."""
    extra: dict[str, Any] = {}
    if config.kind == TableKind.ADAPTIVE or (
        config.kind == TableKind.DYNAMIC and config.admission_threshold > 1
    ):
        extra = {"sketch_width": 16, "sketch_depth": 1}
    if config.kind in (TableKind.DYNAMIC, TableKind.ADAPTIVE):
        extra.update(max_rows=0, eviction=Eviction.NONE, steps_to_live=0, l2_evict_threshold=0.0)
    # no preallocated arena: the feed fills it (it grows by 1.5x as rows arrive), so a
    # replica holds about what the training shard keeps, not what it reserved
    extra["initial_capacity"] = min(config.initial_capacity, 16)
    return dataclasses.replace(config, optimizer=SGD(), max_bytes=0, **extra)


class ReplicaTable:
    """A read-only table that mirrors one training table (see the module's DESIGN)."""

    evicts = False

    def __init__(self, config: TableConfig, source: str, storage: Storage) -> None:
        self.config = config  # the training table's (DescribeTables, Stats)
        self.name = config.name
        self.dim = config.dim
        self.source = source
        self.inner: Table = make_table(serving_config(config), storage)
        self.epoch = ""
        self.version = 0  # the training version this table reflects
        self.round_started = 0.0  # wall time its last complete round started (0: none)

    # ---------------------------------------------------------------- reads
    def pull(
        self, keys: object, train: bool = True, mask: object | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Inference rows, exactly as the training shard's inference pull answered."""
        if train:
            raise self._read_only("a training pull (train=True)")
        return self.inner.pull(keys, train=False, mask=mask, out=out)

    def check_mask(self, mask: object | None, n: int) -> np.ndarray | None:
        return self.inner.check_mask(mask, n)

    def stats(self) -> TableStats:
        return self.inner.stats()

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    @property
    def capacity_refusals(self) -> int:
        """Keys refused a row at the cap (the metrics read it): never, on a replica (it has
        no row cap: the training shard enforces it)."""
        return self.inner.capacity_refusals

    # ---------------------------------------------------------------- writes: refused
    def push(self, *args: object, **kwargs: object) -> None:
        raise self._read_only("Push")

    def prune(self, *args: object, **kwargs: object) -> None:
        raise self._read_only("Prune")

    def evict(self, *args: object, **kwargs: object) -> EvictResult:
        raise self._read_only("Evict")

    def frequencies(self, *args: object, **kwargs: object) -> None:
        raise FailedPrecondition(
            f"table {self.name!r} on a replica keeps no training counts; ask the training "
            f"shard {self.source}"
        )

    def changes(self, *args: object, **kwargs: object) -> None:
        raise FailedPrecondition(
            f"table {self.name!r} is a replica's: follow the training shard {self.source}"
        )

    def snapshot(self, *args: object, **kwargs: object) -> None:
        raise self._read_only("a checkpoint")

    def _read_only(self, what: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"{what} refused: this shard is a read-only replica of {self.source}; send "
            "writes and training pulls to the training shard"
        )

    # ---------------------------------------------------------------- following
    def fit(self) -> None:
        """Shrink the own rows' arena to what the first round filled, and 1/16 more (it grew
        by half as the feed filled it). Called on a fresh table before it serves."""
        part: DynamicPart | None = getattr(self.inner, "part", None)
        if part is not None:
            with self.inner._lock.write():
                part.compact(headroom=1 / 16)

    def apply(self, page: pb.ChangesResponse, dims: list[int]) -> None:
        """Apply one feed page: its deletions, then its rows (under the inner lock)."""
        inner = self.inner
        parts = inner.feed_parts()
        with inner._lock.write():
            if page.deleted:
                inner._erase(codec.decode_keys(page.deleted))
            if not page.rows:
                return
            rows = codec.decode_keys(page.rows)
            store = parts[page.part]
            dim = dims[page.part]
            values = np.frombuffer(page.values, dtype="<f4").reshape(rows.shape[0], dim)
            if isinstance(store, DynamicPart):
                store.put_values(codec.decode_keys(page.keys), values)
            else:
                store.set_values(rows, values)
            inner.step = max(inner.step, int(page.step))


def page_message(page: FeedPage) -> pb.ChangesResponse:
    """A change-feed page as the ``Changes`` answer carries it."""
    resp = pb.ChangesResponse(
        epoch=page.epoch, version=page.version, step=page.step, part=page.part,
        next_cursor=page.next_cursor, resync=page.resync,
    )  # fmt: skip
    if page.keys is not None:
        resp.keys = codec.encode_keys(page.keys)
    if page.rows is not None:
        resp.rows = codec.encode_keys(page.rows)
    if page.values is not None:
        resp.values = np.ascontiguousarray(page.values, dtype="<f4").tobytes()
    if page.deleted is not None:
        resp.deleted = codec.encode_keys(page.deleted)
    return resp


def load_checkpoint(
    engine: ReplicaEngine, root: str, shard: int, num_shards: int
) -> tuple[int, int] | None:
    """Fill ``engine`` from the newest complete checkpoint under ``root`` (the training
    shards' checkpoint directory) for replica ``shard`` of ``num_shards``: (step, tables),
    or None when there is none yet.

    Each restored table is copied into a replica table through its own change feed (the
    rows a follower would receive, in this process), stamped with the checkpoint's
    version and epoch: the follower then asks the training shard only for what changed
    since, or is told to resynchronise if the training shard restarted since (a new
    epoch; also after a reshard, whose versions are of several shards). Its lag counts
    from the checkpoint's writing. CheckpointError when the checkpoint is unreadable.
    """
    step = latest_step(root, shard, num_shards)
    if step is None:
        return None
    tables, summary = restore_tables(root, step, shard, num_shards)
    path = Path(root) / str(step) / shard_dir_name(shard, num_shards)
    same = summary["old_shards"] == num_shards
    entries = {e["config"]["name"]: e for e in read_manifest(path)["tables"]} if same else {}
    written = (Path(root) / str(step)).stat().st_mtime  # its shard directories' last rename
    for t in tables:
        rt = ReplicaTable(t.config, engine.source, engine.storage)
        dims = part_dims(t.config, rt.inner)
        cursor = 0
        while True:
            page = t.changes(0, cursor, FEED_PAGE_ROWS, "", "")
            rt.apply(page_message(page), dims)
            cursor = page.next_cursor
            if cursor == 0:
                break
        rt.fit()
        entry = entries.get(t.name, {})
        rt.version = int(t.version)
        rt.epoch = str(entry.get("epoch", ""))  # "" after a reshard: the feed resyncs
        rt.round_started = written
        engine.put(rt)
    return step, len(tables)


def part_dims(config: TableConfig, table: Table) -> list[int]:
    """Row width of each feed part of ``table``."""
    return [int(p.block.values.shape[1] if isinstance(p, DynamicPart) else p.values.shape[1])
            for p in table.feed_parts()]  # fmt: skip


class ReplicaEngine(Engine):
    """The tables of a replica shard: filled by its ``Follower``, refused to clients."""

    def __init__(self, source: str, dtype: str = "float32") -> None:
        super().__init__()
        self.source = source
        self.storage = Storage(dtype, meta=False)  # rows as serving needs them

    def create_table(self, config: TableConfig) -> bool:
        raise FailedPrecondition(
            f"CreateTable refused: this shard is a read-only replica of {self.source}; "
            "create tables on the training shard (the replica follows)"
        )

    def drop_table(self, name: str) -> bool:
        raise FailedPrecondition(
            f"DropTable refused: this shard is a read-only replica of {self.source}"
        )

    def put(self, table: ReplicaTable) -> None:
        """Install (or replace, in one assignment) a replica table."""
        with self._lock:
            self._tables[table.name] = table  # type: ignore[assignment]

    def remove(self, name: str) -> None:
        with self._lock:
            self._tables.pop(name, None)


class Follower:
    """Follows one training shard's tables into a ``ReplicaEngine`` (module DESIGN)."""

    def __init__(
        self,
        engine: ReplicaEngine,
        source: str,
        num_shards: int,
        name: str,
        poll_seconds: float = 0.2,
        on_ready: Callable[[], None] | None = None,
        timeout: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        checkpoint_dir: str | None = None,
        shard: int = 0,
    ) -> None:
        self.engine = engine
        self.checkpoint_dir = checkpoint_dir  # start from its newest checkpoint, if any
        self.shard = shard
        self.checkpoint_step: int | None = None  # the step it started from
        self.source = source
        self.num_shards = num_shards
        self.name = name
        self.poll_seconds = poll_seconds
        self.on_ready = on_ready
        self.timeout = timeout
        self.resyncs = 0
        self.last_pass = 0.0  # wall time the last complete pass started
        self.on_lag: Callable[[float], None] | None = None  # after each pass: the lag
        self.ready = threading.Event()
        self.last_error = ""
        self._stop = threading.Event()
        options = [("grpc.max_receive_message_length", 256 << 20)]
        self._channel = (
            grpc.secure_channel(source, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(source, options=options)
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        self._thread = threading.Thread(target=self._loop, name=f"embps-follow-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timeout + 5)
        self._channel.close()

    def lag_seconds(self) -> float:
        """Age of the oldest table's state (0 before the first sync: see ``ready``)."""
        tables = cast(list[ReplicaTable], self.engine.tables())  # only ReplicaTables here
        if not self.ready.is_set():
            return 0.0
        if not tables:  # nothing to follow: as fresh as the last pass
            return max(0.0, time.time() - self.last_pass)
        return max(0.0, time.time() - min(t.round_started for t in tables))

    # ---------------------------------------------------------------- loop
    def _start_from_checkpoint(self) -> None:
        """Serve the newest checkpoint at once (``load_checkpoint``); on any failure, say so
        and follow the feed from scratch instead."""
        assert self.checkpoint_dir
        t0 = time.monotonic()
        try:
            got = load_checkpoint(self.engine, self.checkpoint_dir, self.shard, self.num_shards)
        except Exception as e:
            self.last_error = f"checkpoint {self.checkpoint_dir}: {type(e).__name__}: {e}"
            log.warning("replica %s: %s; following the feed from scratch", self.name,
                        self.last_error)  # fmt: skip
            return
        if got is None:
            log.info("replica %s: no complete checkpoint under %s yet", self.name,
                     self.checkpoint_dir)  # fmt: skip
            return
        self.checkpoint_step = got[0]
        log.info("replica %s: serving checkpoint step %d (%d tables, %.2f s); following %s",
                 self.name, got[0], got[1], time.monotonic() - t0, self.source)  # fmt: skip
        self.ready.set()
        if self.on_ready is not None:
            self.on_ready()

    def _loop(self) -> None:
        if self.checkpoint_dir:
            self._start_from_checkpoint()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                started = time.time()
                self.sync_once()
                self.last_pass = started
                self.last_error = ""
                if not self.ready.is_set():
                    self.ready.set()
                    if self.on_ready is not None:
                        self.on_ready()
            except grpc.RpcError as e:
                self.last_error = f"{e.code().name}: {e.details()}"
                log.warning("replica %s: following %s: %s", self.name, self.source, self.last_error)
            except Exception as e:  # a bug: keep serving what we have, say so
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("replica %s: following %s failed", self.name, self.source)
            if self.on_lag is not None and self.ready.is_set():
                self.on_lag(self.lag_seconds())
            self._stop.wait(max(0.0, self.poll_seconds - (time.monotonic() - t0)))

    def sync_once(self) -> None:
        """One pass: the table list, then one feed round per table."""
        resp = self._stub.DescribeTables(
            pb.DescribeTablesRequest(), timeout=self.timeout, metadata=self._metadata
        )
        configs = {c.name: TableConfig.from_proto(c) for c in resp.tables}
        for name in [t.name for t in self.engine.tables()]:
            if name not in configs:
                self.engine.remove(name)
        for name, cfg in configs.items():
            if self._stop.is_set():
                return
            have = self._current(name)
            if have is None or have.config != cfg:
                self._bootstrap(cfg)
            elif not self._round(have):
                self.resyncs += 1
                log.info("replica %s: table %r: resynchronising from %s", self.name, name,
                         self.source)  # fmt: skip
                self._bootstrap(cfg)

    def _current(self, name: str) -> ReplicaTable | None:
        try:
            t = self.engine.table(name)
        except Exception:
            return None
        return t if isinstance(t, ReplicaTable) else None

    def _bootstrap(self, cfg: TableConfig) -> None:
        """Fill a fresh table from version 0, then swap it in (the old one serves till then)."""
        fresh = ReplicaTable(cfg, self.source, self.engine.storage)
        if not self._round(fresh):  # the epoch changed in the middle: once more
            fresh = ReplicaTable(cfg, self.source, self.engine.storage)
            if not self._round(fresh):
                raise RuntimeError(f"table {cfg.name!r} keeps changing its epoch; retrying later")
        fresh.fit()
        self.engine.put(fresh)

    def _round(self, table: ReplicaTable) -> bool:
        """One feed round into ``table``; False if the shard asks for a resync."""
        dims = part_dims(table.config, table.inner)
        cursor, started = 0, time.time()
        first: pb.ChangesResponse | None = None
        while True:
            page = self._stub.Changes(
                pb.ChangesRequest(
                    table=table.name, num_shards=self.num_shards,
                    since_version=table.version, cursor=cursor, max_rows=FEED_PAGE_ROWS,
                    epoch=table.epoch, follower=self.name,
                ),
                timeout=self.timeout,
                metadata=self._metadata,
            )  # fmt: skip
            if page.resync or (first is not None and page.epoch != first.epoch):
                return False
            if first is None:
                first = page
            table.apply(page, dims)
            cursor = page.next_cursor
            if cursor == 0:
                break
        table.epoch, table.version, table.round_started = first.epoch, first.version, started
        return True
