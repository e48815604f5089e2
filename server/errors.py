"""Server errors. Each knows its gRPC status code; the service interceptor aborts with it.

Raise these from the engine and the service; never a bare ValueError for a
client's mistake. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

import grpc


class EmbpsServerError(Exception):
    """Root of every error a shard reports to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL  # the status the client receives
    # True when the request changed something before it failed (a multi-table Step
    # whose pushes were applied before a pull was refused): the answer then does
    # not say "rejected", so the client knows the pushes' outcome is not "nothing".
    changed: bool = False


class InvalidArgument(EmbpsServerError):
    """Malformed arrays, wrong dim or dtype, NaN/Inf gradients, a bad config."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TableNotFound(EmbpsServerError):
    """No table of that name on this shard."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EmbpsServerError):
    """A table of that name exists with a different config."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(EmbpsServerError):
    """The request's shard count differs from the server's (a misroute)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(EmbpsServerError):
    """A table is full with no eviction policy, or a request is over a size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EmbpsServerError):
    """The shard is restoring or shutting down; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(EmbpsServerError):
    """No credentials, or credentials that are not valid."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(EmbpsServerError):
    """Valid credentials without the permission this call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class CheckpointFailed(EmbpsServerError):
    """A checkpoint could not be written (the shard keeps serving; the previous one is intact)."""

    code = grpc.StatusCode.INTERNAL
