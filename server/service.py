"""The gRPC service of one shard: ``embps.v1.ParameterServer`` over an ``Engine``.

Request path: interceptor (timing, errors -> status) -> servicer method (wire
checks: shard count, key ownership, byte lengths, size limit) -> ``Table``
(shape, dim, NaN/Inf checks, then the kernels). Every check runs before
anything changes, so a rejected request leaves the tables as they were; the
interceptor says so in the trailing metadata (``embps-outcome: rejected``),
which lets the client tell a refused push from one whose outcome is unknown.

``build_server(config)`` builds a ready-to-start shard (gRPC server, engine,
health and reflection services, metrics) apart from ``main``, so tests start
real servers in-process on port 0.

Example::

    from embps.server.service import ShardConfig, build_server

    shard = build_server(ShardConfig(port=0))
    shard.start()
    print("listening on", shard.address)
    shard.stop(grace=1.0)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embps.protos import codec
from embps.protos.config import NORM_FROM_PB, Norm, TableConfig
from embps.protos.limits import (
    DEFAULT_MAX_KEYS_PER_REQUEST,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_GRPC_MESSAGE_BYTES,
    METHOD_PREFIX,
    OUTCOME_KEY,
    OUTCOME_REJECTED,
    SERVICE_NAME,
)
from embps.protos.routing import first_misrouted, shard_of
from embps.server.auth import AuthInterceptor, Authorizer, load_token_file, server_credentials
from embps.server.checkpoint import (
    CheckpointConflict,
    Checkpointer,
    CheckpointError,
    CheckpointResult,
    is_disk_full,
    latest_step,
    resolve,
    restore_tables,
)
from embps.server.engine import Engine
from embps.server.errors import (
    AlreadyExists,
    EmbpsServerError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TableNotFound,
    Unavailable,
)
from embps.server.eviction import Evictor
from embps.server.metrics import ShardMetrics
from embps.server.replay import ReplayGuard
from embps.server.replica import Follower, ReplicaEngine, follower_credentials, read_token
from embps.server.tables import as_grads
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

log = logging.getLogger("embps.server")


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardConfig:
    """Everything one shard process needs. Validated in ``__post_init__``.

    Example::

        ShardConfig(shard_id=1, num_shards=3, host="0.0.0.0", port=50052,
                    tables=(TableConfig("item", dim=16),))
    """

    shard_id: int = 0  # this shard's id, in [0, num_shards)
    num_shards: int = 1  # shard count every data request must carry
    host: str = "127.0.0.1"  # interface to listen on ("0.0.0.0": all)
    port: int = 0  # gRPC port (0: any free port; see ShardServer.port)
    metrics_port: int | None = None  # Prometheus /metrics port (None: no HTTP server; 0: any)
    max_keys_per_request: int = DEFAULT_MAX_KEYS_PER_REQUEST  # more keys: RESOURCE_EXHAUSTED
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send and receive limit
    max_workers: int = 8  # threads handling RPCs
    grace_seconds: float = 10.0  # on stop: how long in-flight calls may run
    drain_delay_seconds: float = 0.0  # on stop: report NOT_SERVING this long before closing
    verify_routing: bool = True  # check that every key of a request belongs to this shard
    tables: tuple[TableConfig, ...] = field(default_factory=tuple)  # created at start
    checkpoint_dir: str | None = None  # checkpoints go to <dir>/<step>/shard-<i>-of-<n>/
    checkpoint_every: float = 0.0  # seconds between periodic checkpoints (0: none)
    checkpoint_incremental: int = 0  # K >= 2: every K-th checkpoint full, others incremental
    checkpoint_on_exit: bool | None = None  # after draining on stop (None: on with a dir)
    restore: str | None = None  # at start: "latest" (in checkpoint_dir) or a <dir>/<step> path
    # seconds between eviction sweeps (steps_to_live, l2_evict_threshold; 0: none). Sweeps
    # also run before every checkpoint and on the Evict RPC (server/eviction.py).
    evict_every: float = 60.0
    # a read-only replica of this training shard's address (server/replica.py; None: a
    # training shard): it follows the change feed every replica_poll_seconds and reports
    # NOT_SERVING while its lag exceeds max_lag seconds (0: never)
    replica_of: str | None = None
    replica_poll_seconds: float = 0.2
    max_lag: float = 0.0
    replica_token_file: str | None = None  # the bearer token a replica presents (read)
    replica_tls_ca: str | None = None  # a replica follows over TLS, trusting this CA
    replica_tls_cert: str | None = None  # and presents this client certificate (mTLS)
    replica_tls_key: str | None = None
    tls_cert: str | None = None  # PEM server certificate: serve TLS only (with tls_key)
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA: mutual TLS, clients need a cert it signed
    auth_token_file: str | None = None  # bearer tokens with permissions (server/auth.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", tuple(self.tables))
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {self.num_shards!r}")
        if not isinstance(self.shard_id, int) or not 0 <= self.shard_id < self.num_shards:
            raise ValueError(
                f"shard_id must be in [0, {self.num_shards}) for {self.num_shards} shards, "
                f"got {self.shard_id!r}"
            )
        for name in ("port", "metrics_port"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= 65535):
                raise ValueError(f"{name} must be an integer in [0, 65535], got {v!r}")
        if self.max_keys_per_request < 1:
            raise ValueError(
                f"max_keys_per_request must be >= 1, got {self.max_keys_per_request!r}"
            )
        if not 1 << 16 <= self.max_message_bytes <= MAX_GRPC_MESSAGE_BYTES:
            raise ValueError(
                f"max_message_bytes must be in [65536, {MAX_GRPC_MESSAGE_BYTES}], "
                f"got {self.max_message_bytes!r}"
            )
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers!r}")
        if self.grace_seconds < 0 or self.drain_delay_seconds < 0:
            raise ValueError("grace_seconds and drain_delay_seconds must be >= 0")
        names = [t.name for t in self.tables]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate table names in the config: {dups}")
        if not self.checkpoint_every >= 0:
            raise ValueError(
                f"checkpoint_every must be >= 0 seconds, got {self.checkpoint_every!r}"
            )
        if not (isinstance(self.evict_every, int | float) and self.evict_every >= 0):
            raise ValueError(f"evict_every must be >= 0 seconds, got {self.evict_every!r}")
        if not (self.replica_poll_seconds > 0 and self.max_lag >= 0):
            raise ValueError(
                f"replica_poll_seconds must be > 0 and max_lag >= 0, got "
                f"{self.replica_poll_seconds!r} and {self.max_lag!r}"
            )
        if self.replica_of is not None:
            clash = [n for n, on in (("tables", bool(self.tables)),
                                     ("checkpoint_dir", bool(self.checkpoint_dir)),
                                     ("restore", bool(self.restore))) if on]  # fmt: skip
            if not self.replica_of or clash:
                raise ValueError(
                    f"replica_of must be the training shard's host:port, and a replica takes "
                    f"no {', '.join(clash) or 'other state'}: it follows the training shard's "
                    "tables (checkpoint the training shards)"
                )
        if not isinstance(self.checkpoint_incremental, int) or self.checkpoint_incremental < 0:
            raise ValueError(
                f"checkpoint_incremental must be an integer >= 0, got {self.checkpoint_incremental!r}"
            )
        if not self.checkpoint_dir:
            needs = [
                flag
                for flag, on in (
                    ("--checkpoint-every", self.checkpoint_every > 0),
                    ("--checkpoint-incremental", self.checkpoint_incremental > 0),
                    ("--checkpoint-on-exit", self.checkpoint_on_exit is True),
                    ("--restore latest", self.restore == "latest"),
                )
                if on
            ]
            if needs:
                raise ValueError(
                    f"{', '.join(needs)} needs a checkpoint directory (--checkpoint-dir)"
                )
        if self.restore is not None and not self.restore:
            raise ValueError("restore must be 'latest' or a checkpoint path <dir>/<step>")
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("cert", "key") if self.tls_cert else ("key", "cert")
            raise ValueError(
                f"--tls-{given} needs --tls-{missing}: TLS needs the certificate and its key"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(
                "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: clients can only "
                "present certificates over TLS"
            )

    @property
    def exit_checkpoint(self) -> bool:
        """Whether stopping writes a checkpoint (default: yes when there is a directory)."""
        return bool(self.checkpoint_dir) and self.checkpoint_on_exit is not False


# --------------------------------------------------------------------------
# Errors -> status codes (one interceptor for every method)
# --------------------------------------------------------------------------


def _table_of(request: Any) -> str:
    """The table a request names ('' for none)."""
    if isinstance(request, pb.CreateTableRequest):
        return str(request.config.name)
    if isinstance(request, pb.DropTableRequest):
        return str(request.name)
    return str(getattr(request, "table", ""))


class ServingGate:
    """Whether the shard serves ParameterServer calls; while closed, why not.

    Closed while a restore runs: every call gets UNAVAILABLE with the reason
    (health and reflection are not gated).
    """

    def __init__(self) -> None:
        self._reason: Callable[[], str] | None = None

    def close(self, reason: Callable[[], str]) -> None:
        """Refuse calls; ``reason()`` is the message they get (evaluated per call)."""
        self._reason = reason

    def open(self) -> None:
        """Serve calls."""
        self._reason = None

    def reason(self) -> str | None:
        """None when open, else the message of the UNAVAILABLE answer."""
        r = self._reason
        return None if r is None else r()


class _Undecodable:
    """Stands for request bytes that do not parse as the method's message (see ``_lenient``)."""

    def __init__(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}"


def _lenient(
    deserialize: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    """The method's request parser, returning ``_Undecodable`` instead of raising.

    grpc answers a parser exception with INTERNAL ("Exception deserializing
    request!"); a malformed message is the client's mistake, so the
    interceptor answers it with INVALID_ARGUMENT instead.
    """
    if deserialize is None:
        return None
    parse = deserialize

    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:
            return _Undecodable(e)

    return lenient


MAX_DETAILS_CHARS = 2048  # status details travel in a header: keep them well under 8 KiB


def _clip(message: str) -> str:
    """``message`` cut to MAX_DETAILS_CHARS (a request may echo megabytes of a bad name)."""
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return f"{message[: MAX_DETAILS_CHARS - 40]}... ({len(message)} characters in all)"


class CheckpointFailed(EmbpsServerError):
    """A checkpoint could not be written (the shard keeps serving; the previous one is intact)."""

    code = grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns ``EmbpsServerError`` into its status and anything else into INTERNAL; times calls.

    Errors raised on purpose get the trailing metadata ``embps-outcome:
    rejected`` (nothing was changed). Unexpected exceptions are logged with
    their traceback. The metrics ``table`` label is the table's name only if
    the table exists, so clients cannot grow the label set without bound.
    """

    def __init__(
        self,
        engine: Engine,
        metrics: ShardMetrics | None,
        shard_id: int,
        gate: ServingGate | None = None,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._shard_id = shard_id
        self._gate = gate

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method_path: str = handler_call_details.method
        if (
            handler is None
            or handler.unary_unary is None
            or not method_path.startswith(METHOD_PREFIX)
        ):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method_path[len(METHOD_PREFIX) :], handler.unary_unary),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = "OK"
            # labelled before the call too, so that a dropped table keeps its name
            existed = self._label(request) if self._metrics is not None else ""
            try:
                closed = self._gate.reason() if self._gate is not None else None
                if closed is not None:
                    raise Unavailable(closed)
                if isinstance(request, _Undecodable):
                    raise InvalidArgument(
                        f"the request is not a valid {method} request message ({request.error}); "
                        "build it with the embps.v1 generated code"
                    )
                return behavior(request, context)
            except EmbpsServerError as e:
                code = e.code.name
                if not e.changed:
                    context.set_trailing_metadata(((OUTCOME_KEY, OUTCOME_REJECTED),))
                context.abort(e.code, _clip(str(e)))
            except Exception as e:
                code = "INTERNAL"
                log.exception("shard %d: %s failed unexpectedly", self._shard_id, method)
                context.abort(
                    grpc.StatusCode.INTERNAL,
                    _clip(
                        f"shard {self._shard_id}: {method} failed with {type(e).__name__}: {e}; "
                        "this is a bug, the shard's log has the traceback"
                    ),
                )
            finally:
                if self._metrics is not None:
                    label = existed if existed != "-" else self._label(request)
                    self._metrics.observe(method, label, code, time.perf_counter() - t0)

        return call

    def _label(self, request: Any) -> str:
        """Metrics label: the table's name if it exists, '-' if not, '' for no table."""
        name = _table_of(request)
        if not name:
            return ""
        try:
            self._engine.table(name)
        except TableNotFound:
            return "-"
        return name


# --------------------------------------------------------------------------
# The servicer
# --------------------------------------------------------------------------


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """``embps.v1.ParameterServer`` over one shard's ``Engine``.

    Raises ``EmbpsServerError`` subclasses; ``ErrorInterceptor`` maps them to
    status codes. The servicer does the wire-level checks; the tables check
    shapes, dims and values.
    """

    def __init__(
        self,
        engine: Engine,
        config: ShardConfig,
        checkpointer: Checkpointer | None = None,
        evictor: Evictor | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.checkpointer = checkpointer
        self.evictor = evictor if evictor is not None else Evictor(config.shard_id, engine.tables)
        self.follower: Follower | None = None  # a replica's (build_server sets it)

    # ---------------------------------------------------------------- data
    # Pull answers and Push requests skip protobuf objects (the rows are copied once, or not
    # at all): register the servicer with ``add_servicer_to_server``, which wires the
    # matching (de)serializers.
    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> bytes:
        """Rows of ``keys`` in the requested dtype: the bytes of a ``PullResponse`` whose
        values are (n, dim) in the wire dtype (``codec.PullResponseBuffer``)."""
        self._check_shards(request.num_shards)
        table = self.engine.table(request.table)
        keys = self._keys(request.keys)
        dtype = _dtype(request.dtype)
        try:
            mask = codec.decode_mask(request.mask, keys.shape[0])
        except codec.CodecError as e:
            raise InvalidArgument(f"table {request.table!r}: {e}") from None
        answer = codec.PullResponseBuffer(keys.shape[0], table.dim, dtype)
        if answer.rows.dtype == np.float32:  # gathered straight into the answer's bytes
            table.pull(keys, train=request.train, mask=mask, out=answer.rows)
        else:
            answer.fill(table.pull(keys, train=request.train, mask=mask))
        return answer.data

    def Push(
        self, request: codec.PushRequestView | codec.CodecError, context: grpc.ServicerContext
    ) -> pb.PushResponse:
        """Apply gradients (n, dim) to the rows of ``keys``; counts applied and dropped keys.

        request: read in place by ``_push_request`` (a CodecError if malformed). With a
        ``client_id``, a (client_id, sequence) pair already applied is dropped:
        ``replayed=true``, nothing changes (``ReplayGuard``).
        """
        if isinstance(request, codec.CodecError):
            raise InvalidArgument(f"{request}; send a PushRequest as embps.v1 defines it")
        self._check_shards(request.num_shards)
        table = self.engine.table(request.table)
        keys = self._keys(request.keys)
        dtype = _dtype(request.dtype)
        n = keys.shape[0]
        itemsize = codec.ITEMSIZE[dtype]
        if len(request.grads) != n * table.dim * itemsize:
            rows, rest = divmod(len(request.grads), table.dim * itemsize)
            got = f"{rows} rows" + (f" and {rest} stray bytes" if rest else "")
            raise InvalidArgument(
                f"table {request.table!r}: keys and grads do not match: {n} keys need "
                f"{n} x dim {table.dim} x {itemsize} bytes = {n * table.dim * itemsize} bytes "
                f"of gradients, got {len(request.grads)} bytes ({got} of dim {table.dim}); "
                "send one gradient row of the table's dim per key"
            )
        grads = codec.decode_values(request.grads, dtype, n, table.dim)
        ReplayGuard.check(request.client_id, request.sequence)
        res = table.push(keys, grads, request.step, request.client_id, request.sequence)
        if res.replayed:
            return pb.PushResponse(replayed=True)
        return pb.PushResponse(applied=res.applied, dropped=res.dropped)

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> bytes:
        """Many tables in one round trip: apply the push groups (one step), then answer
        the pull groups; the bytes of a ``StepResponse`` (rows gathered in place,
        ``codec.StepResponseBuffer``).

        The whole request is checked first (shard count, dtype, every table, key,
        gradient and mask, the request's total keys, the push sequence): one bad group
        refuses the request and nothing changes. Groups then run in request order,
        each holding only its own table's lock (pushes of one table, then the next),
        so concurrent multi-table calls cannot deadlock. A pull group refused after the
        pushes were applied (a full table) raises with ``changed`` set: the answer
        says nothing about "rejected" and names what was applied.
        """
        self._check_shards(request.num_shards)
        dtype = _dtype(request.dtype)
        itemsize = codec.ITEMSIZE[dtype]
        total = sum(len(g.keys) // 8 for g in request.push) + sum(
            len(g.keys) // 8 for g in request.pull
        )
        if total > self.config.max_keys_per_request:
            raise ResourceExhausted(
                f"request has {total} keys in all its groups, over this shard's "
                f"max_keys_per_request={self.config.max_keys_per_request}; split it "
                "(PSClient does) or raise the server's limit"
            )
        pushes = []
        for g in _unique_groups(request.push, "push"):
            table = self.engine.table(g.table)
            keys = self._keys(g.keys)
            n, dim = keys.shape[0], table.dim
            if len(g.grads) != n * dim * itemsize:
                raise InvalidArgument(
                    f"push group of table {g.table!r}: {n} keys need {n} x dim {dim} x "
                    f"{itemsize} bytes = {n * dim * itemsize} bytes of gradients, got "
                    f"{len(g.grads)}; send one gradient row of the table's dim per key"
                )
            grads = as_grads(codec.decode_values(g.grads, dtype, n, dim), n, dim, g.table)
            if g.mask:
                raise InvalidArgument(
                    f"push group of table {g.table!r} has a mask; masks are for pulls"
                )
            pushes.append((table, keys, grads))
        pulls = []
        for g in _unique_groups(request.pull, "pull"):
            table = self.engine.table(g.table)
            keys = self._keys(g.keys)
            if g.grads:
                raise InvalidArgument(f"pull group of table {g.table!r} has gradients")
            try:
                mask = table.check_mask(codec.decode_mask(g.mask, keys.shape[0]), keys.shape[0])
            except codec.CodecError as e:
                raise InvalidArgument(f"table {g.table!r}: {e}") from None
            pulls.append((table, keys, mask))
        step = request.step if request.HasField("step") else None
        if step is not None and step < 0:
            raise InvalidArgument(f"step must be >= 0 (or absent), got {step}")
        if pushes:
            ReplayGuard.check(request.client_id, request.sequence)
        applied, dropped, replayed = [], [], False
        for i, (table, keys, grads) in enumerate(pushes):
            try:
                res = table.push(keys, grads, step, request.client_id, request.sequence)
            except EmbpsServerError as e:
                if i:  # earlier tables were applied
                    e.changed = True
                    e.args = (f"{e}; the pushes to {[t.name for t, _, _ in pushes[:i]]} were "
                              "applied",)  # fmt: skip
                raise
            replayed |= res.replayed
            applied.append(res.applied)
            dropped.append(res.dropped)
        tail = pb.StepResponse(
            dims=[t.dim for t, _, _ in pulls], dtype=dtype, applied=applied, dropped=dropped,
            replayed=replayed,
        ).SerializeToString()  # fmt: skip
        answer = codec.StepResponseBuffer([(k.shape[0], t.dim) for t, k, _ in pulls], dtype, tail)
        for i, (table, keys, mask) in enumerate(pulls):
            try:
                if answer.rows[i].dtype == np.float32:
                    table.pull(keys, train=request.train, mask=mask, out=answer.rows[i])
                else:
                    answer.fill(i, table.pull(keys, train=request.train, mask=mask))
            except EmbpsServerError as e:
                if pushes or i:
                    e.changed = True
                    e.args = (f"{e}; this request's pushes were applied and the pulls before "
                              "this group were answered",)  # fmt: skip
                raise
        return answer.data

    def Changes(
        self, request: pb.ChangesRequest, context: grpc.ServicerContext
    ) -> pb.ChangesResponse:
        """One page of a table's change feed (``Table.changes``): read only, bounded."""
        self._check_shards(request.num_shards)
        table = self.engine.table(request.table)
        page = table.changes(
            int(request.since_version), int(request.cursor), int(request.max_rows or 1 << 16),
            request.epoch, request.follower,
        )  # fmt: skip
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

    # ---------------------------------------------------------------- tables
    def CreateTable(
        self, request: pb.CreateTableRequest, context: grpc.ServicerContext
    ) -> pb.CreateTableResponse:
        """Create a table; created=False if an identical one existed (ALREADY_EXISTS if different)."""
        try:
            cfg = TableConfig.from_proto(request.config)
        except ValueError as e:
            raise InvalidArgument(f"bad table config: {e}") from None
        created = self.engine.create_table(cfg)
        if created:
            log.info("shard %d: created table %r (%s)", self.config.shard_id, cfg.name, cfg.kind)
        return pb.CreateTableResponse(created=created)

    def DescribeTables(
        self, request: pb.DescribeTablesRequest, context: grpc.ServicerContext
    ) -> pb.DescribeTablesResponse:
        """Config of every table, in name order."""
        return pb.DescribeTablesResponse(tables=[t.config.to_proto() for t in self.engine.tables()])

    def DropTable(
        self, request: pb.DropTableRequest, context: grpc.ServicerContext
    ) -> pb.DropTableResponse:
        """Delete a table and its rows; dropped=False if there was none."""
        dropped = self.engine.drop_table(request.name)
        if dropped:
            log.info("shard %d: dropped table %r", self.config.shard_id, request.name)
        return pb.DropTableResponse(dropped=dropped)

    def Prune(self, request: pb.PruneRequest, context: grpc.ServicerContext) -> pb.PruneResponse:
        """Delete own rows whose norm is under the threshold; rows and bytes freed."""
        self._check_shards(request.num_shards)
        table = self.engine.table(request.table)
        if request.norm == pb.NORM_UNSPECIFIED:
            norm = Norm.L2
        elif request.norm in NORM_FROM_PB:
            norm = NORM_FROM_PB[request.norm]
        else:
            raise InvalidArgument(f"unknown norm {request.norm}; use NORM_L2, NORM_L1 or NORM_LINF")
        res = table.prune(request.threshold, norm)
        return pb.PruneResponse(rows_freed=res.rows, bytes_freed=res.bytes)

    def Narrow(self, request: pb.NarrowRequest, context: grpc.ServicerContext) -> pb.NarrowResponse:
        """Keep the first ``dim`` columns of every row and slot of a table (``Table.narrow``)."""
        self._check_shards(request.num_shards)
        table = self.engine.table(request.table)
        narrow = getattr(table, "narrow", None)
        if narrow is None:
            raise FailedPrecondition(
                f"table {request.table!r} is a replica's (read only): narrow it on the "
                "training shard, then start the replica again"
            )
        res = narrow(int(request.dim))
        return pb.NarrowResponse(old_dim=res.old_dim, dim=res.dim, bytes_freed=res.bytes)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        """Sizes and counters of one table (or every table if ``table`` is empty)."""
        tables = [self.engine.table(request.table)] if request.table else self.engine.tables()
        resp = pb.StatsResponse(
            shard_id=self.config.shard_id,
            num_shards=self.config.num_shards,
            tables=[pb.TableStats(**t.stats().as_dict()) for t in tables],
        )
        if self.follower is not None:
            resp.replica_of = self.follower.source
            resp.lag_seconds = self.follower.lag_seconds()
            resp.resyncs = self.follower.resyncs
        return resp

    def Evict(self, request: pb.EvictRequest, context: grpc.ServicerContext) -> pb.EvictResponse:
        """Run steps-to-live / L2 eviction now on one table (or every table if ``table`` is
        empty): rows, bytes and seconds per table (server/eviction.py)."""
        self._check_shards(request.num_shards)
        tables = [self.engine.table(request.table)] if request.table else None
        return pb.EvictResponse(
            tables=[
                pb.TableEviction(
                    table=r.table,
                    rows=r.rows,
                    bytes=r.bytes,
                    steps_to_live_rows=r.steps_to_live_rows,
                    l2_rows=r.l2_rows,
                    seconds=r.seconds,
                )
                for r in self.evictor.sweep(tables, "rpc")
            ]
        )

    # ---------------------------------------------------------------- durability
    def Checkpoint(
        self, request: pb.CheckpointRequest, context: grpc.ServicerContext
    ) -> pb.CheckpointResponse:
        """Write this shard's checkpoint of ``step`` into its checkpoint directory."""
        self._check_shards(request.num_shards)
        cfg = self.config
        ck = self.checkpointer
        if ck is None:
            raise FailedPrecondition(
                f"shard {cfg.shard_id} has no checkpoint directory: start it with "
                "--checkpoint-dir DIR to take checkpoints"
            )
        if request.kind not in _KIND_FROM_PB:
            raise InvalidArgument(
                f"unknown checkpoint kind {request.kind}; use CHECKPOINT_KIND_FULL, "
                "CHECKPOINT_KIND_INCREMENTAL or CHECKPOINT_KIND_UNSPECIFIED (the shard's policy)"
            )
        step = int(request.step)
        where = f"shard {cfg.shard_id}: checkpoint of step {step} into {ck.root} failed"
        try:
            res = ck.checkpoint(step, _KIND_FROM_PB[request.kind])
        except CheckpointConflict as e:
            raise FailedPrecondition(f"shard {cfg.shard_id}: {e}") from None
        except OSError as e:
            if is_disk_full(e):
                raise ResourceExhausted(
                    f"{where}: {e.strerror} writing {e.filename or 'the checkpoint'}; free disk "
                    "space (delete old checkpoints) or point --checkpoint-dir at a larger disk "
                    "(the previous checkpoint is intact)"
                ) from None
            raise CheckpointFailed(f"{where}: {e} (the previous checkpoint is intact)") from None
        except (CheckpointError, ValueError) as e:
            raise CheckpointFailed(f"{where}: {e} (the previous checkpoint is intact)") from None
        return _checkpoint_response(res)

    # ---------------------------------------------------------------- statistics
    def Frequencies(
        self, request: pb.FrequenciesRequest, context: grpc.ServicerContext
    ) -> pb.FrequenciesResponse:
        """Training sightings of ``keys`` (int64 (n,) as bytes), one per key in order.

        The row's own count for keys with a dynamic row, else the table's
        frequency sketch estimate (0 for a table without one). Read only.
        """
        self._check_shards(request.num_shards)
        table = self.engine.table(request.table)
        keys = self._keys(request.keys)
        return pb.FrequenciesResponse(counts=codec.encode_keys(table.frequencies(keys)))

    # ---------------------------------------------------------------- checks
    def _check_shards(self, num_shards: int) -> None:
        cfg = self.config
        if num_shards != cfg.num_shards:
            said = "does not say (0)" if num_shards == 0 else f"says {num_shards}"
            raise FailedPrecondition(
                f"shard count mismatch: the request {said} but this is shard {cfg.shard_id} "
                f"of {cfg.num_shards}; give the client all {cfg.num_shards} shard addresses "
                "in shard-id order (a mismatch would misroute keys)"
            )

    def _keys(self, data: bytes) -> np.ndarray:
        """Decode, bound and (optionally) route-check the keys: int64 (n,), read-only."""
        try:
            keys = codec.decode_keys(data)
        except codec.CodecError as e:
            raise InvalidArgument(str(e)) from None
        cfg = self.config
        if keys.shape[0] > cfg.max_keys_per_request:
            raise ResourceExhausted(
                f"request has {keys.shape[0]} keys, over this shard's max_keys_per_request="
                f"{cfg.max_keys_per_request}; split it (PSClient(max_keys_per_request=...) "
                "does) or raise the server's limit"
            )
        misrouted = (
            cfg.verify_routing
            and cfg.num_shards > 1
            and first_misrouted(keys, cfg.num_shards, cfg.shard_id) >= 0
        )
        if misrouted:
            owner = shard_of(keys, cfg.num_shards)
            wrong = np.flatnonzero(owner != cfg.shard_id)
            i = int(wrong[0])
            raise FailedPrecondition(
                f"key {int(keys[i])} belongs to shard {int(owner[i])} of {cfg.num_shards}, "
                f"not to this shard {cfg.shard_id} ({wrong.shape[0]} misrouted keys); "
                "list the shard addresses in shard-id order and route with "
                "embps.protos.routing.shard_of"
            )
        return keys


_KIND_FROM_PB: dict[int, bool | None] = {
    pb.CHECKPOINT_KIND_UNSPECIFIED: None,
    pb.CHECKPOINT_KIND_FULL: False,
    pb.CHECKPOINT_KIND_INCREMENTAL: True,
}


def _unique_groups(groups: Any, part: str) -> Any:
    """``groups`` (a repeated TableGroup), InvalidArgument if a table appears twice."""
    seen: set[str] = set()
    for g in groups:
        if g.table in seen:
            raise InvalidArgument(
                f"table {g.table!r} appears twice among the {part} groups; send each table "
                "once (its keys in one group)"
            )
        seen.add(g.table)
    return groups


def _checkpoint_response(res: CheckpointResult) -> pb.CheckpointResponse:
    return pb.CheckpointResponse(
        shard_id=res.shard,
        num_shards=res.num_shards,
        step=res.step,
        path=str(res.path),
        kind=pb.CHECKPOINT_KIND_INCREMENTAL
        if res.kind == "incremental"
        else pb.CHECKPOINT_KIND_FULL,
        base_step=res.base_step,
        tables=res.tables,
        bytes=res.bytes,
        seconds=res.seconds,
    )


def _dtype(dtype: pb.DType) -> pb.DType:
    """The wire dtype to use (UNSPECIFIED reads as FLOAT32); InvalidArgument if unknown."""
    if dtype == pb.DTYPE_UNSPECIFIED:
        return pb.DTYPE_FLOAT32
    if dtype not in codec.ITEMSIZE:
        raise InvalidArgument(
            f"unknown dtype {dtype}; use DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16"
        )
    return dtype


def _push_request(data: bytes) -> codec.PushRequestView | codec.CodecError:
    """Request deserializer of Push: keys and grads read in place; a malformed message
    becomes its CodecError (answered INVALID_ARGUMENT by ``Push``, not INTERNAL)."""
    try:
        return codec.decode_push_request(data)
    except codec.CodecError as e:
        return e


def _as_is(data: bytes) -> bytes:
    """Response serializer of Pull: the servicer already returns the message's bytes."""
    return data


class _Handlers:
    """Stands in for a grpc.Server to catch the generated registration's method handlers."""

    def __init__(self) -> None:
        self.methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, methods: dict) -> None:
        self.methods = dict(methods)


def add_servicer_to_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """Register ``servicer`` like ``add_ParameterServerServicer_to_server``, every method
    the generated code knows, with Pull answering raw bytes and Push reading its
    request in place (``codec.PullResponseBuffer``, ``codec.decode_push_request``)."""
    caught = _Handlers()
    pb_grpc.add_ParameterServerServicer_to_server(servicer, caught)
    methods = caught.methods
    methods["Pull"] = grpc.unary_unary_rpc_method_handler(
        servicer.Pull,
        request_deserializer=pb.PullRequest.FromString,
        response_serializer=_as_is,
    )
    methods["Step"] = grpc.unary_unary_rpc_method_handler(
        servicer.Step,
        request_deserializer=pb.StepRequest.FromString,
        response_serializer=_as_is,
    )
    methods["Push"] = grpc.unary_unary_rpc_method_handler(
        servicer.Push,
        request_deserializer=_push_request,
        response_serializer=pb.PushResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))
    server.add_registered_method_handlers(SERVICE_NAME, methods)


# --------------------------------------------------------------------------
# The shard server (factory)
# --------------------------------------------------------------------------


class _LocalCheck:
    """The one part of a ``grpc.ServicerContext`` that ``HealthServicer.Check`` uses
    (``set_code`` for an unknown service), for asking the servicer in-process."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code


class ShardServer:
    """One shard: gRPC server + engine + health + metrics (+ checkpoints). Build with
    ``build_server``.

    Lifecycle: ``start()`` binds nothing new (the port is bound by
    ``build_server``) and serves; with ``config.restore`` the gRPC server is up
    at once but answers UNAVAILABLE ("shard i is restoring from <path> (x%)")
    and health NOT_SERVING until a background restore finishes (``restored``
    is set; ``restore_error`` holds the reason if it failed). ``stop()``
    drains, stops periodic checkpoints and writes the exit checkpoint.
    """

    def __init__(
        self,
        config: ShardConfig,
        engine: Engine,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        metrics: ShardMetrics,
        gate: ServingGate | None = None,
        checkpointer: Checkpointer | None = None,
        evictor: Evictor | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.server = server
        self.port = port
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.gate = gate if gate is not None else ServingGate()
        self.checkpointer = checkpointer
        self.evictor = evictor if evictor is not None else Evictor(config.shard_id, engine.tables)
        self.follower: Follower | None = None  # a replica shard's (build_server sets it)
        self.restored = threading.Event()  # set once serving (restore finished or not needed)
        self.restore_error: str | None = None  # why the restore failed (the shard must exit)
        self.restore_summary: dict | None = None
        self.authorizer: Authorizer | None = None  # bearer tokens (reload() on SIGHUP)
        self.on_restore_progress: Callable[[float], None] | None = None  # observer (tests)
        self._restore_from = ""
        self._restore_ratio = 0.0

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (``127.0.0.1`` when listening on all interfaces)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def serving(self) -> bool:
        """True once the shard serves calls (after its restore, if any)."""
        return self.restored.is_set() and self.restore_error is None

    def start(self) -> None:
        """Serve: metrics HTTP server (if configured), gRPC, then health SERVING, or, with
        ``config.restore``, NOT_SERVING while the restore runs in the background."""
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(
                self.config.metrics_port, addr=self.config.host, readiness=self.health_status
            )
        if self.follower is not None:  # a replica: serving once every table is synced
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.server.start()
            self.follower.on_ready = self._serve
            self.follower.start()
        elif self.config.restore:
            self.gate.close(self._restoring_message)
            self.metrics.restore_progress.set(0.0)
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self.server.start()
            threading.Thread(
                target=self._restore_main, name=f"embps-restore-{self.config.shard_id}", daemon=True
            ).start()
        else:
            self.server.start()
            self._serve()

    def stop(
        self, grace: float | None = None, checkpoint: bool | None = None
    ) -> CheckpointResult | None:
        """Drain: health NOT_SERVING, wait ``drain_delay_seconds``, refuse new calls,
        let in-flight calls finish for up to ``grace`` seconds (default: the config's);
        then stop periodic checkpoints and write the exit checkpoint; last, close the
        metrics port (/metrics, /readyz).

        checkpoint: write the exit checkpoint (None: ``config.exit_checkpoint``). It is
        skipped when the shard never served (restore unfinished or failed). Returns what
        it wrote; raises (OSError, CheckpointError) if it failed.
        """
        try:
            return self._stop(grace, checkpoint)
        finally:
            self.metrics.close()  # after the exit checkpoint: its metrics were still served

    def _stop(self, grace: float | None, checkpoint: bool | None) -> CheckpointResult | None:
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        if self.config.drain_delay_seconds:
            time.sleep(self.config.drain_delay_seconds)
        self.server.stop(grace).wait()
        self.evictor.stop_periodic()
        if self.follower is not None:
            self.follower.stop()
        ck = self.checkpointer
        if ck is None:
            return None
        ck.stop_periodic()
        if not (self.config.exit_checkpoint if checkpoint is None else checkpoint):
            return None
        if not self.serving:
            log.warning(
                "shard %d: no exit checkpoint: the shard never served (restore %s)",
                self.config.shard_id,
                "failed" if self.restore_error else "unfinished",
            )
            return None
        return ck.checkpoint(ck.next_auto_step())

    def health_status(self) -> str:
        """The shard's overall health ("SERVING", "NOT_SERVING", ...): the answer a
        ``grpc.health.v1`` Check of service "" gets, read from the same servicer (its
        lock only, no table lock). The metrics port's ``/readyz`` serves it, so the HTTP
        probe and the gRPC health check cannot disagree."""
        call = _LocalCheck()
        reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), call)
        if call.code is not None:  # the servicer's NOT_FOUND for a service it never had
            return "SERVICE_UNKNOWN"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # ---------------------------------------------------------------- internals
    def _lag_health(self, lag: float) -> None:
        """A replica with max_lag: NOT_SERVING while its lag exceeds it, SERVING again after."""
        if not self.serving:
            return
        over = lag > self.config.max_lag
        self._set_health(
            health_pb2.HealthCheckResponse.NOT_SERVING
            if over
            else health_pb2.HealthCheckResponse.SERVING
        )

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _serve(self) -> None:
        self.gate.open()
        self.metrics.restore_progress.set(1.0)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.checkpointer is not None and self.config.checkpoint_every > 0:
            self.checkpointer.start_periodic(self.config.checkpoint_every)
        if self.config.evict_every > 0 and self.follower is None:
            self.evictor.start_periodic(self.config.evict_every)
        self.restored.set()

    def _restoring_message(self) -> str:
        src = self._restore_from or self.config.restore
        return (
            f"shard {self.config.shard_id} is restoring from {src} "
            f"({100 * self._restore_ratio:.0f}%); retry later"
        )

    def _progress(self, ratio: float) -> None:
        self._restore_ratio = ratio
        self.metrics.restore_progress.set(min(ratio, 0.999))  # 1 only once serving
        hook = self.on_restore_progress
        if hook is not None:
            hook(ratio)

    def _restore_main(self) -> None:
        cfg = self.config
        try:
            self._restore()
        except Exception as e:
            if isinstance(e, CheckpointError | AlreadyExists):
                self.restore_error = str(e)
            else:
                log.exception("shard %d: restore failed unexpectedly", cfg.shard_id)
                self.restore_error = f"{type(e).__name__}: {e}"
            log.error(
                "shard %d/%d: RESTORE FAILED: %s", cfg.shard_id, cfg.num_shards, self.restore_error
            )
            self.restored.set()
            return
        self._serve()

    def _restore(self) -> None:
        """Load the checkpoint ``config.restore`` names, then create the config's tables."""
        cfg = self.config
        assert cfg.restore is not None
        if cfg.restore == "latest":
            assert cfg.checkpoint_dir is not None
            step = latest_step(cfg.checkpoint_dir, cfg.shard_id, cfg.num_shards)
            if step is None:
                log.warning(
                    "shard %d: --restore latest: no complete checkpoint under %s; starting empty",
                    cfg.shard_id,
                    cfg.checkpoint_dir,
                )
                self._create_config_tables("")
                return
            root = Path(cfg.checkpoint_dir)
        else:
            root, step = resolve(cfg.restore, cfg.checkpoint_dir)
        src = root / str(step)
        self._restore_from = str(src)
        log.info("shard %d: restoring from %s", cfg.shard_id, src)
        t0 = time.monotonic()
        tables, summary = restore_tables(root, step, cfg.shard_id, cfg.num_shards, self._progress)
        self.engine.install(tables)
        self._create_config_tables(str(src))
        self.restore_summary = summary
        log.info(
            "shard %d: restored %d tables (%d keys, %.1f MB) from %s (%d shards) in %.2fs",
            cfg.shard_id,
            summary["tables"],
            summary["keys"],
            summary["bytes"] / 1e6,
            src,
            summary["old_shards"],
            time.monotonic() - t0,
        )

    def _create_config_tables(self, src: str) -> None:
        for tc in self.config.tables:
            try:
                self.engine.create_table(tc)
            except AlreadyExists as e:
                raise CheckpointError(
                    f"table {tc.name!r} of the config differs from the one restored from {src} "
                    f"({e}); remove it from the config or restore another checkpoint"
                ) from None


def build_server(config: ShardConfig, engine: Engine | None = None) -> ShardServer:
    """A shard ready to ``start()``: its tables created (after the restore, with
    ``config.restore``), its port bound, its checkpointer set up (with ``checkpoint_dir``).

    engine: an existing engine to serve (tests); None: a new one.
    Raises ValueError for a bad table config, certificate or token file (the message names
    the file), OSError if the port cannot be bound. With ``config.tls_cert`` the port
    serves TLS only (mutual TLS with ``tls_client_ca``); with ``auth_token_file`` every
    call but health needs a bearer token (server/auth.py).
    """
    # security first: a bad certificate or token file stops the shard before any work
    creds = None
    if config.tls_cert and config.tls_key:
        creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    authorizer = None
    if config.auth_token_file:
        authorizer = Authorizer(load_token_file(config.auth_token_file))
    if config.replica_of:
        engine = ReplicaEngine(config.replica_of)
    engine = Engine() if engine is None else engine
    if not config.restore:
        for cfg in config.tables:
            engine.create_table(cfg)
    metrics = ShardMetrics(config.shard_id, config.num_shards, engine.tables)
    evictor = Evictor(config.shard_id, engine.tables, metrics)
    checkpointer = None
    if config.checkpoint_dir:
        checkpointer = Checkpointer(
            config.checkpoint_dir,
            config.shard_id,
            config.num_shards,
            engine.tables,
            full_every=config.checkpoint_incremental,
            metrics=metrics,
            before_snapshot=evictor.before_checkpoint,
        )
    gate = ServingGate()
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix=f"embps-shard{config.shard_id}"
        ),
        # AuthInterceptor runs inside ErrorInterceptor: refusals are counted and answered there
        interceptors=[
            ErrorInterceptor(engine, metrics, config.shard_id, gate),
            *([AuthInterceptor(authorizer)] if authorizer is not None else []),
        ],
        options=options,
    )
    servicer = ParameterServerServicer(engine, config, checkpointer, evictor)
    add_servicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )  # fmt: skip
    target = (
        f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    )
    try:
        if creds is not None:
            port = server.add_secure_port(target, creds)
        else:
            port = server.add_insecure_port(target)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {target}: {e} (port in use?)") from None
    if port == 0:
        raise OSError(f"cannot listen on {target} (port in use?)")
    shard = ShardServer(
        config, engine, server, port, health_servicer, metrics, gate, checkpointer, evictor
    )
    shard.authorizer = authorizer
    if isinstance(engine, ReplicaEngine):
        follower = Follower(
            engine, engine.source, config.num_shards, f"replica-{config.shard_id}-{port}",
            config.replica_poll_seconds,
            credentials=follower_credentials(
                config.replica_tls_ca, config.replica_tls_cert, config.replica_tls_key
            ),
            token=read_token(config.replica_token_file),
        )  # fmt: skip
        shard.follower = follower
        servicer.follower = follower
        metrics.follow(follower, config.max_lag)
        if config.max_lag > 0:
            follower.on_lag = shard._lag_health
    # the servicer starts with "" SERVING: NOT_SERVING instead, until start() serves
    # (gRPC and /readyz)
    shard._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    return shard
