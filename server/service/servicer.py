"""The servicer: ``embps.v1.ParameterServer`` over one shard's ``Engine``, with its handlers registered on a gRPC server (the push and step handlers take the raw bytes, decoded without protobuf)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np

from embps.protos import codec
from embps.protos.config import NORM_FROM_PB, Norm, TableConfig
from embps.protos.limits import (
    SERVICE_NAME,
)
from embps.protos.routing import first_misrouted, shard_of
from embps.server.durability import (
    CheckpointConflict,
    Checkpointer,
    CheckpointError,
    CheckpointResult,
    is_disk_full,
)
from embps.server.engine import Engine
from embps.server.errors import (
    CheckpointFailed,
    EmbpsServerError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from embps.server.eviction import Evictor
from embps.server.replay import ReplayGuard
from embps.server.replica import Follower, page_message
from embps.server.service.config import ShardConfig
from embps.server.tables import as_grads
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

log = logging.getLogger("embps.server")

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
        return page_message(page)

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
