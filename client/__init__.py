"""embps trainer-side client.

Example::

    from embps.client import PSClient, Adagrad

    with PSClient(["127.0.0.1:50051"]) as ps:
        ps.create_table("user", dim=8, optimizer=Adagrad(lr=0.1))
        rows = ps.pull("user", [1, 2, 3])
"""

import importlib
from typing import TYPE_CHECKING, Any

from embps.protos.config import FTRL, SGD, Adagrad, Adam, TableConfig

# The client modules import grpc, and gRPC's C core reads its log settings
# (GRPC_VERBOSITY) once, when grpc is first imported. They are imported on first
# use of one of their names (PEP 562 ``__getattr__``), so that the ``embps``
# command line (embps.client.cli) can choose gRPC's logging for a subcommand
# before that: ``embps health`` prints only its own one-line verdict.
if TYPE_CHECKING:
    from embps.client.exceptions import (
        STATUS_TO_ERROR,
        AlreadyExistsError,
        CancelledError,
        CheckpointFailedError,
        DeadlineExceededError,
        EmbpsError,
        InconsistentShardsError,
        InternalError,
        InvalidArgumentError,
        PermissionDeniedError,
        PushOutcomeUnknownError,
        ReadOnlyReplicaError,
        ResourceExhaustedError,
        ShardMismatchError,
        TableNotFoundError,
        UnauthenticatedError,
        UnavailableError,
        UnimplementedError,
    )
    from embps.client.ps_client import (
        CheckpointResult,
        EvictResult,
        PruneResult,
        PSClient,
        PushResult,
        ShardStats,
        shard_addresses,
    )
    from embps.client.security import TLSConfig

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("STATUS_TO_ERROR", "AlreadyExistsError", "CancelledError", "CheckpointFailedError",
         "DeadlineExceededError", "EmbpsError", "InconsistentShardsError", "InternalError",
         "InvalidArgumentError", "PermissionDeniedError", "PushOutcomeUnknownError",
         "ReadOnlyReplicaError",
         "ResourceExhaustedError", "ShardMismatchError", "TableNotFoundError",
         "UnauthenticatedError", "UnavailableError", "UnimplementedError"),
        "exceptions",
    ),
    **dict.fromkeys(
        ("CheckpointResult", "EvictResult", "PruneResult", "PSClient", "PushResult",
         "ShardStats", "shard_addresses"),
        "ps_client",
    ),
    "TLSConfig": "security",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """``embps.client.PSClient`` and the other names of ``__all__``, imported on first use."""
    module = _LAZY.get(name)
    if module is None:  # AttributeError: ``from embps.client import bench`` imports the module
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup finds it without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "FTRL",
    "SGD",
    "STATUS_TO_ERROR",
    "Adagrad",
    "Adam",
    "AlreadyExistsError",
    "CancelledError",
    "CheckpointFailedError",
    "CheckpointResult",
    "DeadlineExceededError",
    "EmbpsError",
    "EvictResult",
    "InconsistentShardsError",
    "InternalError",
    "InvalidArgumentError",
    "PSClient",
    "PermissionDeniedError",
    "PruneResult",
    "PushOutcomeUnknownError",
    "PushResult",
    "ReadOnlyReplicaError",
    "ResourceExhaustedError",
    "ShardMismatchError",
    "ShardStats",
    "TLSConfig",
    "TableConfig",
    "TableNotFoundError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "shard_addresses",
]
