"""Facts of the wire contract that are not in the .proto: what client and server must
agree on, each spelled once (the server never imports the client, and the trainer
library imports only ``embps.protos``, so this is their common home).
"""

from __future__ import annotations

from embps.v1 import embps_pb2 as pb

# the gRPC service, as in method paths ("/embps.v1.ParameterServer/Pull")
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
METHOD_PREFIX = f"/{SERVICE_NAME}/"

# Request limits: the defaults of ``embps serve --max-keys-per-request`` and
# ``--max-message-bytes`` and of PSClient's matching arguments (a client splits what
# a shard would refuse). gRPC caps a message at 2 GiB - 1.
DEFAULT_MAX_KEYS_PER_REQUEST = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1

# Trailing metadata on every error a shard raises on purpose (validation, permissions,
# limits): ``embps-outcome: rejected`` means nothing was changed, so the client may
# retry a push without doubling it.
OUTCOME_KEY = "embps-outcome"
OUTCOME_REJECTED = "rejected"
