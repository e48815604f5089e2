"""Client exceptions: one root class, one subclass per gRPC status a shard can return.

``STATUS_TO_ERROR`` maps a ``grpc.StatusCode`` to its class; ``from_rpc_error``
turns a failed call into the matching exception. Every exception carries the
shard's id and address (``None`` when the client itself rejected the call
before sending anything) and the server's message.

Example::

    from embps.client import PSClient, TableNotFoundError

    with PSClient(["127.0.0.1:50051"]) as ps:
        try:
            ps.pull("missing", [1, 2, 3])
        except TableNotFoundError as e:
            print(e.shard, e.address, e.server_message)
"""

from __future__ import annotations

import grpc

from embps.protos.limits import OUTCOME_KEY, OUTCOME_REJECTED

# Trailing metadata a shard attaches to every error it raises on purpose: the
# request was rejected before anything changed (a push on that shard was NOT
# applied). An error without it (transport failure, INTERNAL) has an unknown outcome.


# --------------------------------------------------------------------------
# Root
# --------------------------------------------------------------------------


class EmbpsError(Exception):
    """Root of every error the embps client raises.

    Attributes: ``code`` (grpc.StatusCode or None for client-side errors),
    ``shard`` (int or None), ``address`` (str or None), ``server_message``
    (the shard's own text, or the client's), ``rejected`` (True when the shard
    said it changed nothing).
    """

    code: grpc.StatusCode | None = None

    def __init__(
        self,
        message: str,
        *,
        shard: int | None = None,
        address: str | None = None,
        code: grpc.StatusCode | None = None,
        rejected: bool = False,
    ) -> None:
        self.server_message = message
        self.shard = shard
        self.address = address
        self.rejected = rejected
        if code is not None:
            self.code = code
        where = f"shard {shard} ({address}): " if address is not None else ""
        status = f"{self.code.name}: " if self.code is not None else ""
        super().__init__(f"{where}{status}{message}")


# --------------------------------------------------------------------------
# One class per status code
# --------------------------------------------------------------------------


class InvalidArgumentError(EmbpsError, ValueError):
    """Malformed keys or gradients, wrong dim or dtype, NaN/Inf gradients, a bad table config.

    Nothing was applied. Fix the request; retrying it unchanged fails again.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT


class TableNotFoundError(EmbpsError):
    """No table of that name on the shard: create it first (or the shard restarted empty)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(EmbpsError):
    """A table of that name exists with a different config: drop it first or use another name."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ShardMismatchError(EmbpsError):
    """The shard count (or shard order) the client routes with differs from the server's.

    Give the client every shard address, in shard-id order.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


class ReadOnlyReplicaError(ShardMismatchError):
    """A write (push, training pull, table change) sent to a read-only replica shard
    (``embps serve --replica-of``). FAILED_PRECONDITION, as the shard-count checks; send
    writes to the training shards and only inference pulls to replicas."""


# The shard's words for a refusal because it is a replica (server/replica.py).
_READ_ONLY_MARK = "read-only replica"


class ResourceExhaustedError(EmbpsError):
    """A table is full with no eviction policy, or a request is over a size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(EmbpsError):
    """The shard cannot be reached, or is restoring or shutting down. Retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(EmbpsError):
    """Credentials (TLS client certificate or token) are missing or not valid."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(EmbpsError):
    """Valid credentials without the permission this call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceededError(EmbpsError):
    """The call did not finish within the client's timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(EmbpsError):
    """The call was cancelled (the client closed, or the server went away mid-call)."""

    code = grpc.StatusCode.CANCELLED


class UnimplementedError(EmbpsError):
    """The shard does not know this method: client and server versions differ."""

    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(EmbpsError):
    """A bug or an unexpected failure on the shard; its log has the traceback."""

    code = grpc.StatusCode.INTERNAL


# --------------------------------------------------------------------------
# Errors about several shards at once
# --------------------------------------------------------------------------


class PushOutcomeUnknownError(EmbpsError):
    """A push failed on some shards in a way that leaves its effect unknown or partial.

    Gradients are not idempotent, so the client never retries a push. Attributes
    (shard ids): ``applied`` (the push took effect there), ``rejected`` (the
    shard refused it and changed nothing), ``unknown`` (it may or may not have
    taken effect); ``errors`` holds the per-shard exceptions. Either skip the
    batch or push it again to the ``rejected`` shards only, knowing that the
    ``unknown`` ones may apply it twice.
    """

    def __init__(
        self,
        message: str,
        *,
        applied: list[int],
        rejected: list[int],
        unknown: list[int],
        errors: list[EmbpsError],
    ) -> None:
        first = errors[0] if errors else None
        super().__init__(message, code=first.code if first is not None else None)
        self.applied_shards = applied
        self.rejected_shards = rejected
        self.unknown_shards = unknown
        self.errors = errors


class CheckpointFailedError(EmbpsError):
    """A checkpoint was not written on every shard, so that step is not complete.

    ``written`` holds the results of the shards that wrote it (``CheckpointResult``),
    ``errors`` the per-shard exceptions; ``code`` is the first error's. The previous
    complete checkpoint is intact and stays the newest one ``--restore latest`` finds.
    Fix the cause (disk full: RESOURCE_EXHAUSTED; no --checkpoint-dir or a step that
    an increment builds on: FAILED_PRECONDITION) and checkpoint again.
    """

    def __init__(self, message: str, *, written: list[object], errors: list[EmbpsError]) -> None:
        first = errors[0] if errors else None
        super().__init__(message, code=first.code if first is not None else None)
        self.written = written
        self.errors = errors


class InconsistentShardsError(EmbpsError):
    """Shards disagree about their tables (a shard restarted empty, or a create half failed)."""


# --------------------------------------------------------------------------
# Status code -> exception
# --------------------------------------------------------------------------

STATUS_TO_ERROR: dict[grpc.StatusCode, type[EmbpsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: TableNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: ShardMismatchError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
    grpc.StatusCode.ABORTED: UnavailableError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
}


def from_rpc_error(err: grpc.RpcError, shard: int, address: str) -> EmbpsError:
    """The exception for a failed call to ``shard`` at ``address``."""
    code: grpc.StatusCode = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
    rejected = False
    if isinstance(err, grpc.Call):
        md = err.trailing_metadata() or ()
        rejected = any(k == OUTCOME_KEY and v == OUTCOME_REJECTED for k, v in md)
    cls = STATUS_TO_ERROR.get(code, EmbpsError)
    if cls is ShardMismatchError and _READ_ONLY_MARK in details:
        cls = ReadOnlyReplicaError
    return cls(details, shard=shard, address=address, code=code, rejected=rejected)
