"""``PSClient``: the trainer's handle on a sharded embps cluster.

One call = one batch. ``pull`` and ``push`` take keys of any integer shape
(flattened), with duplicates:

    keys (n,) -> dedup (keep the inverse) -> shard = mix64(key) % N
    -> one RPC per shard, concurrently (chunks of <= max_keys_per_request keys)
    -> scatter the rows back by the inverse -> float32 (n, dim)

Hot path. Rows cross the client once each way: a pull reads the rows in place
from gRPC's response buffer (``codec.decode_pull_response``, no protobuf
object) and gathers them into the one array it returns; a push copies the
summed gradients once, into the request bytes (``codec.encode_push_request``).
Dedup and routing take one pass, no sort (``embps.protos.routing.dedup_route``, planned in ``embps.client.plan``): each shard
gets its distinct keys in the order of their first occurrence in the batch, so
distinct keys for one shard go out as they are and their rows come back in
place (a copy, no gather). A call to a single shard runs in the calling thread
(no future, no thread).

A push sums the gradients of duplicate keys on the client (in batch order,
float32, exactly as a shard sums them), checks them (dim, finite) and then
sends one push to *every* shard, empty ones included, so that each shard's
push counter (Adam's step when ``step`` is not given) advances once per call,
as a single in-process table's would.

Retries. ``pull`` and the table calls retry UNAVAILABLE (and CANCELLED, which a
shard that is shutting down answers) with exponential backoff until
``retry_deadline``; ``push`` is retried only with a client id (push idempotency:
each push carries (client_id, sequence) and a shard drops one it already applied,
server/replay.py); without one, if a shard fails
in a way that leaves the outcome unknown (or only some shards applied it),
``PushOutcomeUnknownError`` says which shards applied, refused or may have.

Example::

    import numpy as np
    from embps.client import PSClient, Adagrad

    with PSClient(["127.0.0.1:50051", "127.0.0.1:50052"]) as ps:
        ps.create_table("user", dim=8, optimizer=Adagrad(lr=0.1))
        ids = np.array([[3, 7], [7, 11]])           # any integer shape, duplicates allowed
        rows = ps.pull("user", ids)                 # float32 (4, 8), rows of 3, 7, 7, 11
        ps.push("user", ids, np.ones_like(rows))    # grads (4, 8) in the same order
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from embps.client.exceptions import (
    CancelledError,
    CheckpointFailedError,
    DeadlineExceededError,
    EmbpsError,
    InconsistentShardsError,
    InvalidArgumentError,
    PushOutcomeUnknownError,
    TableNotFoundError,
    UnavailableError,
    from_rpc_error,
)
from embps.client.plan import (
    Plan,
    as_grads,
    as_keys,
    assemble_rows,
    keyed_spans,
    pack_step,
    plan_groups,
    plan_keys,
    slices,
    sum_duplicates,
)
from embps.client.retry import retry_outcomes
from embps.client.security import TLSConfig, make_channel, warn_plaintext_token
from embps.protos import codec
from embps.protos.config import NORM_TO_PB, Norm, TableConfig
from embps.protos.limits import (
    DEFAULT_MAX_KEYS_PER_REQUEST,
    DEFAULT_MAX_MESSAGE_BYTES,
    SERVICE_NAME,
)
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

# Errors an idempotent call retries: the shard is unreachable, or it cancelled the call
# while shutting down (the client itself never cancels a call).
_RETRIABLE = (UnavailableError, CancelledError)
# Errors after which a push's outcome is unknown; retried only with a client id (idempotent).
_PUSH_RETRIABLE = (UnavailableError, CancelledError, DeadlineExceededError)
# Same defaults as the server (embps.server.service); the client never imports the server.
_MESSAGE_OVERHEAD = 4096  # bytes kept free in a message for fields other than the arrays
_SERVICE = SERVICE_NAME
_FINITE_MAX = {
    pb.DTYPE_FLOAT32: float(np.finfo(np.float32).max),
    pb.DTYPE_FLOAT16: float(np.finfo(np.float16).max),
    pb.DTYPE_BFLOAT16: 3.3895313892515355e38,  # largest finite bfloat16
}


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """Summed over shards. applied: keys whose gradient reached a row; dropped: keys with no row.

    With push idempotency (``PSClient(client_id=...)``): replayed: keys of the requests a
    shard had already applied (a retry of a push whose first answer was lost), and
    replayed_shards those shards, ascending; their keys count in neither applied nor dropped.
    """

    applied: int
    dropped: int
    replayed: int = 0
    replayed_shards: tuple[int, ...] = ()


class _Sequencer:
    """The push sequences of one client id (none: empty id, no idempotency). Thread-safe.

    Starts at the clock in microseconds, so a client restarted with the same id
    continues above every sequence it used before (shards refuse or drop old ones).
    """

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self._next = max(1, time.time_ns() // 1000)
        self._lock = threading.Lock()

    def take(self, count: int) -> int:
        """The first of ``count`` new consecutive sequences (0 without a client id)."""
        if not self.client_id:
            return 0
        with self._lock:
            first = self._next
            self._next += count
            return first


@dataclass(frozen=True)
class PruneResult:
    """Summed over shards: rows deleted and bytes returned."""

    rows: int
    bytes: int


@dataclass(frozen=True)
class NarrowResult:
    """A table narrowed on every shard: its old and new dim, bytes freed (summed)."""

    old_dim: int
    dim: int
    bytes: int


@dataclass(frozen=True)
class EvictResult:
    """One table's eviction, summed over shards: rows evicted (by reason), their bytes
    (returned to the tables' free lists) and the slowest shard's sweep in seconds."""

    rows: int
    bytes: int
    steps_to_live_rows: int
    l2_rows: int
    seconds: float


@dataclass(frozen=True)
class ShardStats:
    """One shard's view: its id, shard count, address and per-table stats (proto field names)."""

    shard_id: int
    num_shards: int
    address: str
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointResult:
    """What one shard's checkpoint wrote: its directory, kind ("full" or "incremental"
    over ``base_step``), table count, array bytes and seconds."""

    shard_id: int
    address: str
    step: int
    path: str
    kind: str
    base_step: int | None
    tables: int
    bytes: int
    seconds: float


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


def shard_addresses(pattern: str, num_shards: int) -> list[str]:
    """Addresses of shards 0..N-1 from a pattern with ``{i}``, e.g. a StatefulSet's DNS names.

    ``shard_addresses("embps-{i}.embps-headless:50051", 3)`` ->
    ``["embps-0.embps-headless:50051", "embps-1...", "embps-2..."]``.
    """
    if "{i}" not in pattern:
        raise ValueError(f"address pattern {pattern!r} has no {{i}} placeholder for the shard id")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")
    return [pattern.replace("{i}", str(i)) for i in range(num_shards)]


class PSClient:
    """Client of an embps cluster: routes keys, fans out one RPC per shard, merges results.

    addresses: "host:port" of every shard, in shard-id order (a list, or one
    comma-separated string). timeout: seconds per RPC. grpc_options: extra
    channel options. max_keys_per_request: keys per RPC (requests above it are
    split; keep it <= the server's limit). max_message_bytes: gRPC message limit
    (keep it equal to the server's). dtype: wire dtype of pulled values and
    pushed gradients ("float32", "float16", "bfloat16"). retry_deadline:
    seconds within which pulls and table calls retry UNAVAILABLE and CANCELLED.
    tls: None (plaintext), True (TLS, system CA roots) or a ``TLSConfig`` (own CA,
    client certificate for mutual TLS, server name). token: bearer token sent on
    every call (README "Security"); with tls=None it warns, as the token then
    crosses the network in clear. wait_for_ready: a call to a shard that cannot be
    reached (down, restarting, cut off) waits for it, up to the call's timeout, instead
    of failing at once with UNAVAILABLE (gRPC's ``wait_for_ready``): a push sent while a
    shard restarts is applied once it listens again, if that is within ``timeout``
    (pulls and table calls also retry a restoring shard's UNAVAILABLE for at least
    ``timeout``; a push is never retried). client_id: push idempotency (README "Push
    idempotency"): pushes carry (client_id, sequence), shards drop copies they already
    applied, and a push whose outcome is unknown is retried until ``retry_deadline``;
    idempotent_push=True picks a uuid4 client id. Thread-safe.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        timeout: float = 10.0,
        grpc_options: Sequence[tuple[str, Any]] | None = None,
        max_keys_per_request: int = DEFAULT_MAX_KEYS_PER_REQUEST,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        dtype: str = "float32",
        retry_deadline: float = 30.0,
        num_shards: int | None = None,
        tls: bool | TLSConfig | None = None,
        token: str | None = None,
        wait_for_ready: bool = False,
        client_id: str | None = None,
        idempotent_push: bool = False,
    ) -> None:
        if isinstance(addresses, str) and "{i}" in addresses:
            if num_shards is None:
                raise ValueError(f"the address pattern {addresses!r} needs num_shards=N")
            addresses = shard_addresses(addresses, num_shards)
        elif isinstance(addresses, str):
            addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        if num_shards is not None and len(addresses) != num_shards:
            raise ValueError(f"num_shards={num_shards} but {len(addresses)} addresses were given")
        self.addresses: list[str] = list(addresses)
        if not self.addresses:
            raise ValueError("PSClient needs at least one shard address")
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError(f"duplicate shard addresses: {self.addresses}")
        if max_keys_per_request < 1:
            raise ValueError(f"max_keys_per_request must be >= 1, got {max_keys_per_request}")
        self.num_shards = len(self.addresses)
        self.timeout = timeout
        self.max_keys_per_request = max_keys_per_request
        self.max_message_bytes = max_message_bytes
        self.dtype = codec.dtype_from_name(dtype)
        self.retry_deadline = retry_deadline
        self.wait_for_ready = bool(wait_for_ready)
        self._pushes = _Sequencer(client_id or (uuid.uuid4().hex if idempotent_push else ""))
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *(grpc_options or ()),
        ]
        warn_plaintext_token(tls, token)
        self._channels = [make_channel(a, options, tls, token) for a in self.addresses]
        self._stubs = [pb_grpc.ParameterServerStub(c) for c in self._channels]
        # Pull answers and push requests as raw bytes (codec reads and writes them)
        self._raw: dict[str, list[Any]] = {
            "Pull": [c.unary_unary(f"/{_SERVICE}/Pull",
                                   request_serializer=pb.PullRequest.SerializeToString)
                     for c in self._channels],
            "Push": [c.unary_unary(f"/{_SERVICE}/Push",
                                   response_deserializer=pb.PushResponse.FromString)
                     for c in self._channels],
            "Step": [c.unary_unary(f"/{_SERVICE}/Step",
                                   request_serializer=pb.StepRequest.SerializeToString,
                                   response_deserializer=pb.StepResponse.FromString)
                     for c in self._channels],
        }  # fmt: skip
        self._dims: dict[str, int] = {}
        self._lock = threading.Lock()
        self._rpcs = 0  # RPCs sent (every attempt), for rpcs_sent

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        for c in self._channels:
            c.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until every shard's channel is connected; UnavailableError after ``timeout``."""
        deadline = time.monotonic() + timeout
        for i, c in enumerate(self._channels):
            try:
                grpc.channel_ready_future(c).result(timeout=max(0.0, deadline - time.monotonic()))
            except grpc.FutureTimeoutError:
                raise UnavailableError(
                    f"not reachable within {timeout}s; is the shard running?",
                    shard=i,
                    address=self.addresses[i],
                ) from None

    # ---------------------------------------------------------------- tables
    def create_table(
        self,
        name_or_config: str | TableConfig,
        dim: int | None = None,
        kind: str = "dynamic",
        **options: Any,
    ) -> bool:
        """Create a table on every shard; True if any shard created it, False if all had it.

        Pass a ``TableConfig``, or a name, dim, kind and ``TableConfig`` options
        (``optimizer=Adagrad(lr=0.1)``, ``optimizer={"name": "adagrad", "lr": 0.1}`` or
        ``optimizer="adagrad"``; ``initializer="zeros"``: README "Shorthands"). A bad
        option raises InvalidArgumentError naming it, before anything is sent.
        An identical existing table is fine; a different one raises AlreadyExistsError.
        """
        if isinstance(name_or_config, TableConfig):
            if dim is not None or options or kind != "dynamic":
                raise InvalidArgumentError("pass either a TableConfig or name, dim and options")
            cfg = name_or_config
        else:
            if dim is None:
                raise InvalidArgumentError(f"table {name_or_config!r}: dim is required")
            if "name" in options:
                raise InvalidArgumentError(
                    f"table {name_or_config!r}: name is given twice (the first argument and "
                    f"name={options['name']!r}); pass it once"
                )
            try:
                cfg = TableConfig.from_dict({"name": name_or_config, "dim": dim, "kind": kind,
                                             **options})  # fmt: skip
            except (TypeError, ValueError) as e:
                raise InvalidArgumentError(str(e)) from None
        req = pb.CreateTableRequest(config=cfg.to_proto())
        resps = self._call_all("CreateTable", [(s, req) for s in range(self.num_shards)])
        with self._lock:
            self._dims[cfg.name] = cfg.dim
        return any(r.created for r in resps)

    def describe_tables(self) -> list[TableConfig]:
        """Config of every table, in name order. InconsistentShardsError if shards disagree."""
        req = pb.DescribeTablesRequest()
        resps = self._call_all("DescribeTables", [(s, req) for s in range(self.num_shards)])
        per_shard = [[TableConfig.from_proto(t) for t in r.tables] for r in resps]
        first = per_shard[0]
        for s, cfgs in enumerate(per_shard[1:], start=1):
            if cfgs != first:
                a = {c.name for c in first}
                b = {c.name for c in cfgs}
                raise InconsistentShardsError(
                    f"shards 0 and {s} hold different tables (only on 0: {sorted(a - b)}, only on "
                    f"{s}: {sorted(b - a)}, differing configs: {sorted(n for n in a & b if _cfg(first, n) != _cfg(cfgs, n))}); "
                    "a shard restarted empty or a create half failed: create the tables again"
                )
        with self._lock:
            self._dims.update({c.name: c.dim for c in first})
        return first

    def drop_table(self, name: str) -> bool:
        """Drop a table on every shard; True if any shard had it."""
        req = pb.DropTableRequest(name=name)
        resps = self._call_all("DropTable", [(s, req) for s in range(self.num_shards)])
        with self._lock:
            self._dims.pop(name, None)
        return any(r.dropped for r in resps)

    def prune(self, table: str, threshold: float, norm: str | Norm = "l2") -> PruneResult:
        """Delete rows with norm < threshold on every shard; rows and bytes freed, summed."""
        try:
            nm = NORM_TO_PB[Norm(norm)]
        except ValueError:
            raise InvalidArgumentError(f"unknown norm {norm!r}; use l2, l1 or linf") from None
        req = pb.PruneRequest(table=table, threshold=threshold, norm=nm, num_shards=self.num_shards)
        resps = self._call_all("Prune", [(s, req) for s in range(self.num_shards)], retry=False)
        return PruneResult(
            rows=sum(r.rows_freed for r in resps), bytes=sum(r.bytes_freed for r in resps)
        )

    def narrow(self, table: str, dim: int) -> NarrowResult:
        """Keep the first ``dim`` columns of every row and optimizer slot of ``table`` on
        every shard, freeing the rest (OptEmbed's narrowing, ``embps.client.optembed``).

        dim in [1, the table's dim] (else InvalidArgumentError); a qr table with the
        concat combiner is refused (FAILED_PRECONDITION: ``ShardMismatchError``, the
        client's class for that code). Later pulls return
        (n, dim). Needs admin permission. Not retried (a repeat of the same dim changes
        nothing, so calling it again is safe).
        """
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < 1 << 32:
            raise InvalidArgumentError(f"narrow dim must be an integer >= 1, got {dim!r}")
        req = pb.NarrowRequest(table=table, dim=dim, num_shards=self.num_shards)
        resps = self._call_all("Narrow", [(s, req) for s in range(self.num_shards)], retry=False)
        with self._lock:
            self._dims[table] = int(resps[0].dim)
        return NarrowResult(
            old_dim=int(resps[0].old_dim), dim=int(resps[0].dim),
            bytes=sum(int(r.bytes_freed) for r in resps),
        )  # fmt: skip

    def evict(self, table: str | None = None) -> dict[str, EvictResult]:
        """Run steps-to-live / L2-threshold eviction now on ``table`` (None: every table)
        on every shard; ``{table: EvictResult}`` summed over shards, in name order.

        Shards also evict before every checkpoint and every ``--evict-every`` seconds;
        this call is for doing it now (e.g. before reading memory in ``stats``). Needs
        admin permission. Not retried (a sweep is safe to repeat: call it again).
        """
        req = pb.EvictRequest(table=table or "", num_shards=self.num_shards)
        resps = self._call_all("Evict", [(s, req) for s in range(self.num_shards)], retry=False)
        sums: dict[str, list[float]] = {}
        for r in resps:
            for t in r.tables:
                acc = sums.setdefault(t.table, [0, 0, 0, 0, 0.0])
                acc[0] += t.rows
                acc[1] += t.bytes
                acc[2] += t.steps_to_live_rows
                acc[3] += t.l2_rows
                acc[4] = max(acc[4], t.seconds)
        return {
            name: EvictResult(int(a[0]), int(a[1]), int(a[2]), int(a[3]), float(a[4]))
            for name, a in sorted(sums.items())
        }

    def stats(self, table: str = "") -> list[ShardStats]:
        """Per-shard stats of one table (or all), in shard order."""
        req = pb.StatsRequest(table=table)
        resps = self._call_all("Stats", [(s, req) for s in range(self.num_shards)])
        out = []
        for s, r in enumerate(resps):
            tables = {
                t.name: {f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields} for t in r.tables
            }
            out.append(ShardStats(r.shard_id, r.num_shards, self.addresses[s], tables))
        return out

    def frequencies(self, table: str, keys: Any) -> np.ndarray:
        """Training sightings of ``keys``: int64 (n,), in the keys' order (n = keys.size).

        Per key: its row's own count where it has a dynamic row, else the table's
        count-min sketch estimate (adaptive tables, dynamic tables with admission),
        else 0 (static and qr tables keep no counts). Read only; retried like a pull.
        """
        k = as_keys(keys)
        n = k.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.int64)
        plan = plan_keys(k, self.num_shards)
        jobs: list[tuple[int, pb.FrequenciesRequest]] = []
        spans: list[tuple[int, int]] = []
        for s, a, b in keyed_spans(plan, self._chunk_keys(16)):
            req = pb.FrequenciesRequest(table=table, keys=codec.encode_keys(plan.keys[a:b]),
                                        num_shards=self.num_shards)  # fmt: skip
            jobs.append((s, req))
            spans.append((a, b))
        counts = np.empty(plan.keys.shape[0], dtype=np.int64)
        resps = self._call_all("Frequencies", jobs)
        for (s, _req), (a, b), r in zip(jobs, spans, resps, strict=True):
            try:
                counts[a:b] = codec.decode_keys(r.counts)
            except (codec.CodecError, ValueError) as e:
                raise EmbpsError(
                    f"malformed frequencies response ({b - a} keys asked): {e}",
                    shard=s,
                    address=self.addresses[s],
                ) from None
        return counts if plan.same else counts[plan.where]

    # ---------------------------------------------------------------- durability
    def checkpoint(
        self, step: int, incremental: bool | None = None, timeout: float | None = 600.0
    ) -> list[CheckpointResult]:
        """Write a checkpoint of ``step`` on every shard; per-shard results in shard order.

        Each shard writes ``<its --checkpoint-dir>/<step>/shard-<i>-of-<n>/``; the step is
        complete (restorable) once every shard wrote it. incremental: None follows each
        shard's ``--checkpoint-incremental`` policy, True writes the rows changed since
        the shard's last checkpoint (a full checkpoint where there is none to build on),
        False a full one. timeout: seconds per shard (checkpoints of large tables take
        a while). Shards that are restoring or unreachable are retried until
        ``retry_deadline``; any other failure raises CheckpointFailedError (with the
        shards that did write it), and the step stays incomplete.
        """
        if not isinstance(step, int | np.integer) or step < 0:
            raise InvalidArgumentError(f"step must be an integer >= 0, got {step!r}")
        kind = {
            None: pb.CHECKPOINT_KIND_UNSPECIFIED,
            False: pb.CHECKPOINT_KIND_FULL,
            True: pb.CHECKPOINT_KIND_INCREMENTAL,
        }[None if incremental is None else bool(incremental)]
        req = pb.CheckpointRequest(step=int(step), kind=kind, num_shards=self.num_shards)

        def send(shards: list[int]) -> list[Any]:
            with self._lock:
                self._rpcs += len(shards)
            futs = [self._stubs[s].Checkpoint.future(
                        req, timeout=timeout, wait_for_ready=self.wait_for_ready)
                    for s in shards]  # fmt: skip
            out: list[Any] = []
            for s, f in zip(shards, futs, strict=True):
                try:
                    out.append(f.result())
                except grpc.RpcError as e:
                    out.append(from_rpc_error(e, s, self.addresses[s]))
            return out

        outcomes = retry_outcomes(
            send,
            self.num_shards,
            lambda r: isinstance(r, _RETRIABLE),
            time.monotonic() + self.retry_deadline,
        )
        results: dict[int, CheckpointResult] = {}
        errors: dict[int, EmbpsError] = {}
        for s, r in enumerate(outcomes):
            if isinstance(r, EmbpsError):
                errors[s] = r
                continue
            results[s] = CheckpointResult(
                shard_id=r.shard_id,
                address=self.addresses[s],
                step=r.step,
                path=r.path,
                kind="incremental" if r.kind == pb.CHECKPOINT_KIND_INCREMENTAL else "full",
                base_step=r.base_step if r.HasField("base_step") else None,
                tables=r.tables,
                bytes=r.bytes,
                seconds=r.seconds,
            )
        if not errors:
            return [results[s] for s in range(self.num_shards)]
        first = errors[min(errors)]
        raise CheckpointFailedError(
            f"checkpoint of step {step} is incomplete: written on shards {sorted(results)}, "
            f"failed on {sorted(errors)}; first error: {first}",
            written=[results[s] for s in sorted(results)],
            errors=[errors[s] for s in sorted(errors)],
        )

    # ---------------------------------------------------------------- data
    def pull(
        self,
        table: str,
        keys: Any,  # integers, any shape: n keys, duplicates allowed
        train: bool = True,
        mask: Any = None,  # bool (n,): True promotes (adaptive tables)
    ) -> np.ndarray:  # float32 (n, dim)
        """Rows of ``keys``: float32 (n, dim), in the keys' order (n = keys.size).

        keys: integer array of any shape, duplicates allowed (flattened).
        train: True creates rows, counts sightings and promotes (training);
        False only reads (inference). mask: bool, same size as keys (adaptive
        tables): True promotes the key now (if any of its duplicates says so).
        """
        k = as_keys(keys)
        n = k.shape[0]
        dim = self._dim(table)
        if n == 0:
            return np.empty((0, dim), dtype=np.float32)
        plan = plan_keys(k, self.num_shards)
        u = plan.keys.shape[0]
        umask: np.ndarray | None = None
        if mask is not None:
            m = np.asarray(mask)
            if m.dtype != np.bool_ or m.size != n:
                raise InvalidArgumentError(
                    f"mask must be a bool array with one entry per key ({n}), got {m.dtype} {m.shape}"
                )
            umask = np.zeros(u, dtype=np.bool_)
            umask[plan.where[m.reshape(-1)]] = True
        per_key = 8 + dim * codec.ITEMSIZE[self.dtype] + (1 if umask is not None else 0)
        chunk = self._chunk_keys(per_key)
        jobs: list[tuple[int, pb.PullRequest]] = []
        spans: list[tuple[int, int]] = []
        for s, a, b in keyed_spans(plan, chunk):
            req = pb.PullRequest(table=table, keys=codec.encode_keys(plan.keys[a:b]),
                                 train=bool(train), num_shards=self.num_shards,
                                 dtype=self.dtype)  # fmt: skip
            if umask is not None:
                req.mask = codec.encode_mask(umask[a:b])
            jobs.append((s, req))
            spans.append((a, b))
        resps = self._call_all("Pull", jobs)  # PullResponse bytes
        parts: list[tuple[int, int, np.ndarray]] = []
        width = -1
        for (s, _req), (a, b), data in zip(jobs, spans, resps, strict=True):
            try:
                values, rdim, rdtype = codec.decode_pull_response(data)
                vals = codec.decode_values(values, rdtype, b - a, rdim)
            except codec.CodecError as e:
                raise EmbpsError(
                    f"malformed pull response: {e}", shard=s, address=self.addresses[s]
                ) from None
            if width < 0:
                width = rdim
            elif rdim != width:
                raise InconsistentShardsError(
                    f"table {table!r} has dim {rdim} on shard {s} but {width} elsewhere"
                )
            parts.append((a, b, vals))
        if width != dim:
            with self._lock:
                self._dims[table] = width
        return assemble_rows(plan, parts, width)

    def push(
        self,
        table: str,
        keys: Any,  # integers, any shape: n keys, duplicates allowed (summed)
        grads: Any,  # float (n, dim) or keys.shape + (dim,)
        step: int | None = None,
    ) -> PushResult:
        """Apply gradients: grads float (n, dim) (or keys.shape + (dim,)), one row per key.

        Duplicate keys' gradients are summed. step: the trainer's 0-based global
        step (Adam's bias correction, LRU and steps-to-live stamps); None: each
        shard's own push counter. Without a client id never retried (see
        PushOutcomeUnknownError); with one (``PSClient(client_id=...)`` or
        ``idempotent_push=True``) each request wave carries the client's next sequence, and
        a request whose outcome is unknown (UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED) is
        sent again with the same sequence until ``retry_deadline``: a shard that had
        applied it drops the copy (``PushResult.replayed``).
        """
        karr = np.asarray(keys)
        k = as_keys(karr)
        n = k.shape[0]
        dim = self._dim(table)
        g = as_grads(grads, karr.shape, n, dim)
        if g.shape[1] != dim:
            dim = self._dim(table, refresh=True)
            if g.shape[1] != dim:
                raise InvalidArgumentError(
                    f"table {table!r} has dim {dim}; gradients have dim {g.shape[1]}"
                )
        if step is not None and (not isinstance(step, int | np.integer) or step < 0):
            raise InvalidArgumentError(f"step must be an integer >= 0 or None, got {step!r}")
        plan = plan_keys(k, self.num_shards, first=True)
        ug = sum_duplicates(plan, g)
        if n:
            hi, lo = float(ug.max()), float(ug.min())  # NaN propagates; inf stays inf
            limit = _FINITE_MAX[self.dtype]
            if not (hi <= limit and -lo <= limit):
                raise InvalidArgumentError(
                    f"table {table!r}: gradients contain NaN or Inf (or exceed the range of the "
                    "wire dtype after summing duplicates); nothing was sent"
                )
        wire = codec.wire_values(ug, self.dtype)  # float32: ug itself
        chunk = self._chunk_keys(8 + g.shape[1] * codec.ITEMSIZE[self.dtype])
        # every shard, even without keys: one step each
        pieces = [slices(plan.bounds[s], plan.bounds[s + 1], chunk) for s in range(self.num_shards)]
        for s, p in enumerate(pieces):
            if len(p) > 1 and step is None:
                warnings.warn(
                    f"push to table {table!r} is split into {len(p)} requests on shard {s}: "
                    "without step= each advances the table's push counter; pass step=",
                    RuntimeWarning,
                    stacklevel=2,
                )
        cid = self._pushes.client_id
        first_seq = self._pushes.take(max(len(p) for p in pieces))  # one sequence per wave
        waves: list[list[tuple[int, bytes]]] = []  # PushRequest bytes
        sizes: list[list[int]] = []  # keys per request
        for s, p in enumerate(pieces):
            for w, (a, b) in enumerate(p):
                req = codec.encode_push_request(table, plan.keys[a:b], wire[a:b], self.dtype,
                                                self.num_shards, step, cid,
                                                first_seq + w if cid else 0)  # fmt: skip
                if w == len(waves):
                    waves.append([])
                    sizes.append([])
                waves[w].append((s, req))
                sizes[w].append(b - a)
        applied = dropped = replayed = 0
        done: list[int] = []
        replayed_shards: set[int] = set()
        deadline = time.monotonic() + self.retry_deadline
        for wave, wave_sizes in zip(waves, sizes, strict=True):
            outcomes, unsure = self._push_wave(wave, deadline if cid else None)
            errors = [e for e in outcomes if isinstance(e, EmbpsError)]
            for (s, _), size, r in zip(wave, wave_sizes, outcomes, strict=True):
                if isinstance(r, EmbpsError):
                    continue
                done.append(s)
                if r.replayed:
                    replayed += size
                    replayed_shards.add(s)
                applied += r.applied
                dropped += r.dropped
            if errors:
                rejected = sorted(
                    {e.shard for e in errors
                     if e.shard is not None and e.rejected and e.shard not in unsure}
                )  # fmt: skip
                unknown = sorted(
                    {e.shard for e in errors
                     if e.shard is not None and (not e.rejected or e.shard in unsure)}
                )  # fmt: skip
                if not done and not unknown:
                    raise errors[0]  # refused everywhere it was sent: nothing changed
                raise PushOutcomeUnknownError(
                    f"push to table {table!r} is incomplete: applied on shards {sorted(set(done))}, "
                    f"refused (nothing changed) on {rejected}, unknown on {unknown}; "
                    f"first error: {errors[0]}",
                    applied=sorted(set(done)),
                    rejected=rejected,
                    unknown=unknown,
                    errors=errors,
                )
        return PushResult(applied, dropped, replayed, tuple(sorted(replayed_shards)))

    # ---------------------------------------------------------------- many tables
    def pull_many(
        self, keys: Mapping[str, Any], train: bool = True, masks: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows of many tables in one round trip: one request per shard for all of them.

        keys: ``{table: integer keys of any shape}``. Returns ``{table: float32 (n, dim)}``
        in the keys' order, as ``pull`` does table by table. masks: ``{table: bool, the
        keys' size}`` for adaptive tables (True promotes). Retried like ``pull``.

        Example::

            rows = ps.pull_many({"user": user_ids, "item": item_ids})
            rows["item"].shape  # (item_ids.size, dim of "item")
        """
        return self._step({}, keys, None, train, masks)[1]

    def push_many(
        self, grads: Mapping[str, tuple[Any, Any]], step: int | None = None
    ) -> dict[str, PushResult]:
        """Gradients of many tables in one round trip: ``{table: (keys, grads)}``, each as
        ``push`` takes them, all with one ``step``. Returns ``{table: PushResult}``. The
        whole call is checked before anything is sent, and each shard checks its whole
        request before it changes anything. Retried only with a client id, as ``push``.
        """
        return self._step(grads, {}, step, True, None)[0]

    def push_pull(
        self,
        push: Mapping[str, tuple[Any, Any]],
        pull: Mapping[str, Any],
        step: int | None = None,
        train: bool = True,
        masks: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, PushResult], dict[str, np.ndarray]]:
        """The fused call of a synchronous training step: apply ``push`` (step t's
        gradients, as ``push_many``), then answer ``pull`` (step t+1's keys, as
        ``pull_many``) in the same round trip; the pulls see the pushes, so training
        with it is exactly synchronous. One request per shard (more only past the
        request limits: then every push request of a shard goes before its pulls).
        """
        return self._step(push, pull, step, train, masks)

    def _step(
        self,
        push: Mapping[str, tuple[Any, Any]],
        pull: Mapping[str, Any],
        step: int | None,
        train: bool,
        masks: Mapping[str, Any] | None,
    ) -> tuple[dict[str, PushResult], dict[str, np.ndarray]]:
        """Check, dedup and route every group, pack them into per-shard requests within
        the limits, send them in waves (a shard's requests in order, shards at once),
        and put the rows back per table."""
        if step is not None and (not isinstance(step, int | np.integer) or step < 0):
            raise InvalidArgumentError(f"step must be an integer >= 0 or None, got {step!r}")
        masks = dict(masks or {})
        unknown = sorted(set(masks) - set(pull))
        if unknown:
            raise InvalidArgumentError(f"masks for tables {unknown} that are not pulled")
        itemsize = codec.ITEMSIZE[self.dtype]
        # Check every group, then dedup and route them all in one numba pass (groups the
        # caller planned itself, given as a Plan, are taken as they are).
        given_plans: dict[int, Plan] = {}
        push_in: list[tuple[str, np.ndarray, np.ndarray, int]] = []  # table, keys, grads, dim
        for table, item in push.items():
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise InvalidArgumentError(
                    f"push[{table!r}] must be a (keys, grads) pair, got {type(item).__name__}"
                )
            given = item[0]
            karr = given.keys if isinstance(given, Plan) else np.asarray(given)
            k = as_keys(karr)
            dim = self._dim(table)
            g = as_grads(item[1], karr.shape, k.shape[0], dim)
            if g.shape[1] != dim and g.shape[1] != (dim := self._dim(table, refresh=True)):
                raise InvalidArgumentError(
                    f"table {table!r} has dim {dim}; gradients have dim {g.shape[1]}"
                )
            push_in.append((table, k, g, dim))
            if isinstance(given, Plan):
                given_plans[len(push_in) - 1] = given
        pull_in: list[tuple[str, np.ndarray]] = []
        for table, keys in pull.items():
            if isinstance(keys, Plan):
                given_plans[len(push) + len(pull_in)] = keys
                keys = keys.keys
            pull_in.append((table, as_keys(keys)))
        for table, k in pull_in:
            if table in masks and (
                (m := np.asarray(masks[table])).dtype != np.bool_ or m.size != k.shape[0]
            ):
                raise InvalidArgumentError(
                    f"masks[{table!r}] must be a bool array with one entry per key "
                    f"({k.shape[0]}), got {m.dtype} {m.shape}"
                )
        for p in given_plans.values():
            if len(p.bounds) != self.num_shards + 1:
                raise InvalidArgumentError(
                    f"a Plan for {len(p.bounds) - 1} shards given to a client of "
                    f"{self.num_shards}; plan the keys with this client's shard count"
                )
        groups = [k for _, k, _, _ in push_in] + [k for _, k in pull_in]
        todo = [i for i in range(len(groups)) if i not in given_plans]
        planned = plan_groups([groups[i] for i in todo], self.num_shards,
                              first=sum(1 for i in todo if i < len(push_in)))  # fmt: skip
        rest = iter(planned)
        plans = [given_plans[i] if i in given_plans else next(rest) for i in range(len(groups))]
        # (table, plan, wire gradients (u, dim), dim) and (table, plan, mask (u,) or None, dim)
        pushes: list[tuple[str, Plan, np.ndarray, int]] = []
        for (table, k, g, dim), plan in zip(push_in, plans, strict=False):
            ug = sum_duplicates(plan, g)
            if k.shape[0]:
                hi, lo = float(ug.max()), float(ug.min())
                limit = _FINITE_MAX[self.dtype]
                if not (hi <= limit and -lo <= limit):
                    raise InvalidArgumentError(
                        f"table {table!r}: gradients contain NaN or Inf (or exceed the range of "
                        "the wire dtype after summing duplicates); nothing was sent"
                    )
            pushes.append((table, plan, codec.wire_values(ug, self.dtype), dim))
        pulls: list[tuple[str, Plan, np.ndarray | None, int]] = []
        for (table, _k), plan in zip(pull_in, plans[len(push_in) :], strict=True):
            umask = None
            if table in masks:
                umask = np.zeros(plan.keys.shape[0], dtype=np.bool_)
                umask[plan.where[np.asarray(masks[table]).reshape(-1)]] = True
            pulls.append((table, plan, umask, self._dim(table)))
        per_shard, spans = pack_step(
            self.num_shards, pushes, pulls, self.dtype, bool(train), step,
            self.max_keys_per_request, self.max_message_bytes - _MESSAGE_OVERHEAD,
        )  # fmt: skip
        n_waves = max((len(r) for r in per_shard), default=0)
        if pushes and step is None and n_waves > 1:
            warnings.warn(
                f"a push to {len(pushes)} tables is split into {n_waves} requests on some shard: "
                "without step= each advances the tables' push counters; pass step=",
                RuntimeWarning,
                stacklevel=3,
            )
        cid = self._pushes.client_id if pushes else ""
        first_seq = self._pushes.take(n_waves) if cid else 0
        applied = [0] * len(pushes)
        dropped = [0] * len(pushes)
        replayed = [0] * len(pushes)
        replayed_shards: set[int] = set()
        index = {p[0]: i for i, p in enumerate(pushes)}
        parts: list[list[tuple[int, int, np.ndarray]]] = [[] for _ in pulls]
        widths = [-1] * len(pulls)
        done: list[int] = []
        deadline = time.monotonic() + self.retry_deadline
        for w in range(n_waves):
            wave = [(s, per_shard[s][w]) for s in range(self.num_shards) if w < len(per_shard[s])]
            wave_spans = [spans[s][w] for s, _ in wave]
            if any(r.push for _, r in wave):
                for _, r in wave:
                    if cid and r.push:
                        r.client_id, r.sequence = cid, first_seq + w
                outcomes, unsure = self._push_wave(wave, deadline if cid else None, "Step")
                errors = [e for e in outcomes if isinstance(e, EmbpsError)]
                if errors:
                    ok = sorted({s for (s, _), r in zip(wave, outcomes, strict=True)
                                 if not isinstance(r, EmbpsError)} | set(done))  # fmt: skip
                    rejected = sorted({e.shard for e in errors if e.shard is not None
                                       and e.rejected and e.shard not in unsure})  # fmt: skip
                    unsure_shards = sorted({e.shard for e in errors if e.shard is not None
                                            and (not e.rejected or e.shard in unsure)})  # fmt: skip
                    if not ok and not unsure_shards:
                        raise errors[0]  # refused everywhere: nothing changed
                    raise PushOutcomeUnknownError(
                        f"push to tables {[p[0] for p in pushes]} is incomplete: applied on "
                        f"shards {ok}, refused (nothing changed) on {rejected}, unknown on "
                        f"{unsure_shards}; first error: {errors[0]}",
                        applied=ok, rejected=rejected, unknown=unsure_shards, errors=errors,
                    )  # fmt: skip
            else:
                outcomes = self._call_all("Step", wave)
            for (s, req), sp, resp in zip(wave, wave_spans, outcomes, strict=True):
                done.append(s)
                if resp.replayed:
                    replayed_shards.add(s)
                for g, ap, dr in zip(req.push, resp.applied, resp.dropped, strict=True):
                    i = index[g.table]
                    applied[i] += ap
                    dropped[i] += dr
                    if resp.replayed and not ap and not dr:
                        replayed[i] += len(g.keys) // 8
                at = 0
                vals = memoryview(resp.values)
                for (gi, a, b), rdim in zip(sp, resp.dims, strict=True):
                    size = (b - a) * rdim * itemsize
                    try:
                        rows = codec.decode_values(vals[at : at + size], resp.dtype, b - a, rdim)
                    except codec.CodecError as e:
                        raise EmbpsError(f"malformed step response: {e}", shard=s,
                                         address=self.addresses[s]) from None  # fmt: skip
                    at += size
                    if widths[gi] >= 0 and widths[gi] != rdim:
                        raise InconsistentShardsError(
                            f"table {pulls[gi][0]!r} has dim {rdim} on shard {s} but "
                            f"{widths[gi]} elsewhere"
                        )
                    widths[gi] = rdim
                    parts[gi].append((a, b, rows))
        results = {
            table: PushResult(applied[i], dropped[i], replayed[i], tuple(sorted(replayed_shards)))
            for i, (table, _, _, _) in enumerate(pushes)
        }
        rows_out: dict[str, np.ndarray] = {}
        for gi, (table, plan, _, dim) in enumerate(pulls):
            width = widths[gi] if widths[gi] >= 0 else dim
            if width != dim:
                with self._lock:
                    self._dims[table] = width
            if plan.where.shape[0] == 0:
                rows_out[table] = np.empty((0, width), dtype=np.float32)
            else:
                rows_out[table] = assemble_rows(plan, parts[gi], width)
        return results, rows_out

    def _push_wave(
        self, wave: list[tuple[int, Any]], deadline: float | None, method: str = "Push"
    ) -> tuple[list[Any], set[int]]:
        """Send one wave of pushes; (per request its PushResponse or EmbpsError, the shards
        whose outcome was unknown at some attempt).

        deadline None: no retries (no client id). Else a request whose outcome is
        unknown (UNAVAILABLE, CANCELLED, DEADLINE_EXCEEDED, not refused) is sent
        again, the same bytes (the same sequence: a shard that applied it answers
        ``replayed``), with backoff, until ``deadline``.
        """
        unsure: set[int] = set()
        outcomes = retry_outcomes(
            lambda idx: self._call_outcomes(method, [wave[i] for i in idx]),
            len(wave),
            lambda r: isinstance(r, _PUSH_RETRIABLE) and not r.rejected,
            deadline,
            all_or_nothing=False,
            on_retry=lambda idx: unsure.update(wave[i][0] for i in idx),
        )
        return outcomes, unsure

    # ---------------------------------------------------------------- helpers
    def _chunk_keys(self, bytes_per_key: int) -> int:
        """Keys per request: the key limit, and the message limit for this row size."""
        by_bytes = (self.max_message_bytes - _MESSAGE_OVERHEAD) // max(1, bytes_per_key)
        return max(1, min(self.max_keys_per_request, by_bytes))

    def _dim(self, table: str, refresh: bool = False) -> int:
        """The table's dim (cached; DescribeTables on shard 0 on a miss)."""
        with self._lock:
            dim = self._dims.get(table)
        if dim is not None and not refresh:
            return dim
        (resp,) = self._call_all("DescribeTables", [(0, pb.DescribeTablesRequest())])
        dims = {t.name: int(t.dim) for t in resp.tables}
        with self._lock:
            self._dims.update(dims)
        if table not in dims:
            raise TableNotFoundError(
                f"no table {table!r} (tables: {', '.join(sorted(dims)) or 'none'}); create it first",
                shard=0,
                address=self.addresses[0],
                code=grpc.StatusCode.NOT_FOUND,
            )
        return dims[table]

    # ---------------------------------------------------------------- RPC fan-out
    def _callable(self, method: str, shard: int) -> Any:
        """The gRPC callable of ``method`` on a shard (raw bytes for Pull and Push)."""
        raw = self._raw.get(method)
        return raw[shard] if raw is not None else getattr(self._stubs[shard], method)

    @property
    def rpcs_sent(self) -> int:
        """RPCs this client has sent so far (every attempt, every method): a training
        step's count is the difference across it (one per shard with the multi-table
        calls, whatever the number of tables)."""
        return self._rpcs

    def _call_outcomes(self, method: str, jobs: list[tuple[int, Any]]) -> list[Any]:
        """Send every job concurrently; per job its response or its EmbpsError. No retries."""
        with self._lock:
            self._rpcs += len(jobs)
        if len(jobs) == 1:  # in this thread: a future would start a thread to wait on it
            ((s, req),) = jobs
            try:
                call = self._callable(method, s)
                return [call(req, timeout=self.timeout, wait_for_ready=self.wait_for_ready)]
            except grpc.RpcError as e:
                return [from_rpc_error(e, s, self.addresses[s])]
        futs = [
            self._callable(method, s).future(
                req, timeout=self.timeout, wait_for_ready=self.wait_for_ready
            )
            for s, req in jobs
        ]
        out: list[Any] = []
        for (s, _), f in zip(jobs, futs, strict=True):
            try:
                out.append(f.result())
            except grpc.RpcError as e:
                out.append(from_rpc_error(e, s, self.addresses[s]))
        return out

    def _call_all(self, method: str, jobs: list[tuple[int, Any]], retry: bool = True) -> list[Any]:
        """Responses of every job (in order); raises the first error.

        retry: resend the jobs that failed with UNAVAILABLE or CANCELLED, with
        exponential backoff and jitter, until ``retry_deadline`` (with ``wait_for_ready``,
        at least ``timeout``: a shard that is back but still restoring is waited for too).
        """
        budget = max(self.retry_deadline, self.timeout if self.wait_for_ready else 0.0)
        outcomes = retry_outcomes(
            lambda idx: self._call_outcomes(method, [jobs[i] for i in idx]),
            len(jobs),
            lambda r: isinstance(r, _RETRIABLE),
            time.monotonic() + budget if retry else None,
            last_at_deadline=True,
        )
        for r in outcomes:
            if isinstance(r, EmbpsError):
                raise r
        return outcomes


def _cfg(cfgs: list[TableConfig], name: str) -> TableConfig | None:
    return next((c for c in cfgs if c.name == name), None)
