"""The gRPC service of one shard: ``embps.v1.ParameterServer`` over an ``Engine``.

Modules: ``config`` (``ShardConfig``, the one home of server options), ``auth``
(tokens, permissions, TLS), ``interceptors`` (errors -> status codes, the serving
gate), ``servicer`` (the RPC methods), ``server`` (``ShardServer``, ``build_server``).

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

from embps.server.service.config import ShardConfig
from embps.server.service.interceptors import ErrorInterceptor, ServingGate
from embps.server.service.server import ShardServer, build_server
from embps.server.service.servicer import ParameterServerServicer, add_servicer_to_server

__all__ = [
    "ErrorInterceptor",
    "ParameterServerServicer",
    "ServingGate",
    "ShardConfig",
    "ShardServer",
    "add_servicer_to_server",
    "build_server",
]
