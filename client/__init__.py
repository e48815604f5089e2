"""embps trainer-side client.

Example::

    from embps.client import PSClient, Adagrad

    with PSClient(["127.0.0.1:50051"]) as ps:
        ps.create_table("user", dim=8, optimizer=Adagrad(lr=0.1))
        rows = ps.pull("user", [1, 2, 3])
"""

from embps.protos.config import FTRL, SGD, Adagrad, Adam, TableConfig

from .exceptions import (
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
    ResourceExhaustedError,
    ShardMismatchError,
    TableNotFoundError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from .ps_client import (
    CheckpointResult,
    PruneResult,
    PSClient,
    PushResult,
    ShardStats,
    shard_addresses,
)
from .security import TLSConfig

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
    "InconsistentShardsError",
    "InternalError",
    "InvalidArgumentError",
    "PSClient",
    "PermissionDeniedError",
    "PruneResult",
    "PushOutcomeUnknownError",
    "PushResult",
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
