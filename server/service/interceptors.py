"""Errors -> status codes: one interceptor for every method (``ErrorInterceptor``: an ``EmbpsServerError`` becomes its status code with the ``embps-outcome: rejected`` trailer, anything else INTERNAL), and the serving gate that answers UNAVAILABLE while a restore runs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from embps.protos.limits import (
    METHOD_PREFIX,
    OUTCOME_KEY,
    OUTCOME_REJECTED,
)
from embps.server.engine import Engine
from embps.server.errors import (
    EmbpsServerError,
    InvalidArgument,
    TableNotFound,
    Unavailable,
)
from embps.server.metrics import ShardMetrics
from embps.v1 import embps_pb2 as pb

log = logging.getLogger("embps.server")

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
