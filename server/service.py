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
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from numba import njit

from embps.protos import codec
from embps.protos.config import NORM_FROM_PB, Norm, TableConfig
from embps.protos.routing import shard_of
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

from .engine import Engine
from .errors import (
    EmbpsServerError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    TableNotFound,
)
from .metrics import ShardMetrics

log = logging.getLogger("embps.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
_METHOD_PREFIX = f"/{SERVICE_NAME}/"

# Defaults shared with the client (embps.client.ps_client keeps the same values).
DEFAULT_MAX_KEYS_PER_REQUEST = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1

# Trailing metadata on every error raised on purpose: nothing was changed.
# (embps.client.exceptions reads the same key; the server never imports the client.)
OUTCOME_KEY = "embps-outcome"
OUTCOME_REJECTED = "rejected"


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


# --------------------------------------------------------------------------
# Routing check (a numba twin of embps.protos.routing.shard_of)
# --------------------------------------------------------------------------

_MIX_C1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_C2 = np.uint64(0x94D049BB133111EB)
_MIX_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(nogil=True, cache=True)
def first_misrouted(keys, num_shards, shard):
    """Index of the first key not owned by ``shard``, or -1. keys: int64 (n,).

    Same splitmix64 finalizer as ``routing.mix64`` (a unit test holds them
    equal), in one pass without temporaries: ~5x faster than the numpy form,
    so verifying ownership costs a fraction of a pull.
    """
    n = np.uint64(num_shards)
    me = np.uint64(shard)
    for i in range(keys.shape[0]):
        z = np.uint64(keys[i]) + _MIX_GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_C1
        z = (z ^ (z >> np.uint64(27))) * _MIX_C2
        z = z ^ (z >> np.uint64(31))
        if z % n != me:
            return i
    return -1


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


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns ``EmbpsServerError`` into its status and anything else into INTERNAL; times calls.

    Errors raised on purpose get the trailing metadata ``embps-outcome:
    rejected`` (nothing was changed). Unexpected exceptions are logged with
    their traceback. The metrics ``table`` label is the table's name only if
    the table exists, so clients cannot grow the label set without bound.
    """

    def __init__(self, engine: Engine, metrics: ShardMetrics | None, shard_id: int) -> None:
        self._engine = engine
        self._metrics = metrics
        self._shard_id = shard_id

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
            or not method_path.startswith(_METHOD_PREFIX)
        ):
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method_path[len(_METHOD_PREFIX) :], handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.perf_counter()
            code = "OK"
            # labelled before the call too, so that a dropped table keeps its name
            existed = self._label(request) if self._metrics is not None else ""
            try:
                return behavior(request, context)
            except EmbpsServerError as e:
                code = e.code.name
                context.set_trailing_metadata(((OUTCOME_KEY, OUTCOME_REJECTED),))
                context.abort(e.code, str(e))
            except Exception as e:
                code = "INTERNAL"
                log.exception("shard %d: %s failed unexpectedly", self._shard_id, method)
                context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"shard {self._shard_id}: {method} failed with {type(e).__name__}: {e}; "
                    "this is a bug, the shard's log has the traceback",
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

    def __init__(self, engine: Engine, config: ShardConfig) -> None:
        self.engine = engine
        self.config = config

    # ---------------------------------------------------------------- data
    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext) -> pb.PullResponse:
        """Rows of ``keys`` in the requested dtype: values (n, dim) as bytes."""
        self._check_shards(request.num_shards)
        table = self.engine.table(request.table)
        keys = self._keys(request.keys)
        dtype = _dtype(request.dtype)
        try:
            mask = codec.decode_mask(request.mask, keys.shape[0])
        except codec.CodecError as e:
            raise InvalidArgument(f"table {request.table!r}: {e}") from None
        values = table.pull(keys, train=request.train, mask=mask)
        return pb.PullResponse(
            values=codec.encode_values(values, dtype), dim=table.dim, dtype=dtype
        )

    def Push(self, request: pb.PushRequest, context: grpc.ServicerContext) -> pb.PushResponse:
        """Apply gradients (n, dim) to the rows of ``keys``; counts applied and dropped keys."""
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
        step = request.step if request.HasField("step") else None
        res = table.push(keys, grads, step=step)
        return pb.PushResponse(applied=res.applied, dropped=res.dropped)

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

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        """Sizes and counters of one table (or every table if ``table`` is empty)."""
        tables = [self.engine.table(request.table)] if request.table else self.engine.tables()
        return pb.StatsResponse(
            shard_id=self.config.shard_id,
            num_shards=self.config.num_shards,
            tables=[pb.TableStats(**t.stats().as_dict()) for t in tables],
        )

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


def _dtype(dtype: int) -> int:
    """The wire dtype to use (UNSPECIFIED reads as FLOAT32); InvalidArgument if unknown."""
    if dtype == pb.DTYPE_UNSPECIFIED:
        return int(pb.DTYPE_FLOAT32)
    if dtype not in codec.ITEMSIZE:
        raise InvalidArgument(
            f"unknown dtype {dtype}; use DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16"
        )
    return dtype


# --------------------------------------------------------------------------
# The shard server (factory)
# --------------------------------------------------------------------------


class ShardServer:
    """One shard: gRPC server + engine + health + metrics. Build with ``build_server``."""

    def __init__(
        self,
        config: ShardConfig,
        engine: Engine,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        metrics: ShardMetrics,
    ) -> None:
        self.config = config
        self.engine = engine
        self.server = server
        self.port = port
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (``127.0.0.1`` when listening on all interfaces)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def start(self) -> None:
        """Serve: metrics HTTP server (if configured), gRPC, then health SERVING."""
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, addr=self.config.host)
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, wait ``drain_delay_seconds``, refuse new calls,
        let in-flight calls finish for up to ``grace`` seconds (default: the config's)."""
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        if self.config.drain_delay_seconds:
            time.sleep(self.config.drain_delay_seconds)
        self.server.stop(grace).wait()


def build_server(config: ShardConfig, engine: Engine | None = None) -> ShardServer:
    """A shard ready to ``start()``: its tables created, its port bound.

    engine: an existing engine to serve (tests, restore); None: a new one.
    Raises ValueError for a bad table config, OSError if the port cannot be bound.
    """
    engine = Engine() if engine is None else engine
    for cfg in config.tables:
        engine.create_table(cfg)
    metrics = ShardMetrics(config.shard_id, config.num_shards, engine.tables)
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix=f"embps-shard{config.shard_id}"
        ),
        interceptors=[ErrorInterceptor(engine, metrics, config.shard_id)],
        options=options,
    )
    pb_grpc.add_ParameterServerServicer_to_server(ParameterServerServicer(engine, config), server)
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
        port = server.add_insecure_port(target)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {target}: {e} (port in use?)") from None
    if port == 0:
        raise OSError(f"cannot listen on {target} (port in use?)")
    return ShardServer(config, engine, server, port, health_servicer, metrics)
