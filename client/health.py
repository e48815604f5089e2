"""``embps health``: one ``grpc.health.v1`` check of a shard, for probes and scripts.

People and scripts run it (in a TLS pod: ``kubectl exec``, see deploy/README.md).
``--readyz HOST:PORT`` asks the same status over plain HTTP instead (``GET
/readyz`` on the shard's metrics port, server/metrics.py): no gRPC, no TLS, so
the image's HEALTHCHECK uses it for plaintext and TLS shards alike. Kubernetes
probes start no process: the base uses the kubelet's ``grpc`` probe, and the TLS
component, whose port that probe cannot reach, an ``httpGet`` of /readyz.
Health needs no bearer token (README "Security"), so there is no token option;
over mutual TLS the gRPC check must present a client certificate.

Its output is its own one line: run as ``embps health``, gRPC's C-core logging
(e.g. "Handshake failed" lines) is off unless ``GRPC_VERBOSITY`` is set
(client/cli.py).

Exit codes (one line of output either way):

==  =============================================================================
0   SERVING (stdout: ``127.0.0.1:50051: SERVING``)
1   the shard answered but does not serve: NOT_SERVING (draining, restoring),
    UNKNOWN, or SERVICE_UNKNOWN (``--service`` names a service it does not have)
2   no answer: nothing listens, the TLS handshake failed (wrong CA, plaintext
    against TLS, no client certificate for mutual TLS), the deadline passed, or
    a bad option (``--tls-cert`` without ``--tls-key``, an unreadable CA file);
    stderr says which, with the gRPC status code and details
==  =============================================================================

Example::

    embps health                                  # 127.0.0.1:$EMBPS_PORT, plaintext
    embps health --address embps-0.embps-headless:50051 --tls-ca ca.crt \\
        --tls-cert tls.crt --tls-key tls.key      # mutual TLS
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from embps.client.security import TLSConfig, make_channel

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1  # the shard answered: NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN
EXIT_ERROR = 2  # no answer (connection, TLS, deadline) or a bad option

DEFAULT_PORT = 50051  # when EMBPS_PORT is not set (the image sets it)
DEFAULT_TIMEOUT_S = 3.0
READYZ_PATH = "/readyz"  # server/metrics.py serves it on the metrics port

_STATUS = health_pb2.HealthCheckResponse.ServingStatus
_GRPC_ONLY = ("address", "service", "tls", "tls_ca", "tls_cert", "tls_key", "server_name")
_FLAGS = {"ca": "--tls-ca", "cert": "--tls-cert", "key": "--tls-key"}  # TLSConfig field -> option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps health`` (see the module docstring for the exit codes)."""
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="the shard to check (default: 127.0.0.1:$EMBPS_PORT, EMBPS_PORT default "
        f"{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--readyz",
        metavar="HOST:PORT",
        help="check over HTTP instead: GET /readyz on the shard's metrics port (plain HTTP, "
        "so it works for TLS shards too; no gRPC, no TLS options); the image's HEALTHCHECK "
        "uses 127.0.0.1:$EMBPS_METRICS_PORT",
    )
    parser.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help='health of one service, e.g. embps.v1.ParameterServer (default "": the server)',
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of the check, connecting included (default {DEFAULT_TIMEOUT_S:g})",
    )
    tls = parser.add_argument_group(
        "TLS", "--tls-ca, --tls-cert/--tls-key and --server-name imply --tls; none: plaintext"
    )
    tls.add_argument(
        "--tls", action="store_true", help="TLS, checked against the system's CA roots"
    )
    tls.add_argument(
        "--tls-ca", metavar="FILE", help="CA (PEM) that signed the shard's certificate"
    )
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="client certificate (PEM) for shards with --tls-client-ca (needs --tls-key)",
    )
    tls.add_argument("--tls-key", metavar="FILE", help="private key (PEM) of --tls-cert")
    tls.add_argument(
        "--server-name",
        metavar="NAME",
        help="name the shard's certificate must carry (default: the host of --address)",
    )


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    """The TLS settings of the options (None: plaintext); ValueError says what is wrong."""
    if args.tls_cert and not args.tls_key:
        raise ValueError("--tls-cert needs --tls-key (the client certificate's private key)")
    if args.tls_key and not args.tls_cert:
        raise ValueError("--tls-key needs --tls-cert (the client certificate of that key)")
    if not (args.tls or args.tls_ca or args.tls_cert or args.server_name):
        return None
    tls = TLSConfig(
        ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.server_name
    )
    try:
        tls.channel_credentials()  # read every file now: a bad one is an option error
    except ValueError as e:  # "TLSConfig.ca: cannot read ..." -> "--tls-ca: cannot read ..."
        msg = str(e)
        for field, flag in _FLAGS.items():
            msg = msg.replace(f"TLSConfig.{field}:", f"{flag}:")
        raise ValueError(msg) from None
    return tls


def _host_port(flag: str, value: str) -> tuple[str, int]:
    """(host, port) of ``value``; ValueError naming ``flag`` unless it is HOST:PORT."""
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise ValueError(f"{flag} {value!r}: expected HOST:PORT")
    return host, int(port)


def _address(args: argparse.Namespace) -> str:
    """``--address``, or 127.0.0.1:$EMBPS_PORT; ValueError on a malformed one."""
    if args.address:
        _host_port("--address", args.address)
        return str(args.address)
    port = os.environ.get("EMBPS_PORT", "").strip() or str(DEFAULT_PORT)
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"EMBPS_PORT={port!r} is not a port number (1..65535)")
    return f"127.0.0.1:{port}"


def check(
    address: str,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT_S,
    tls: TLSConfig | None = None,
) -> int:
    """Ask ``address`` for the health of ``service`` once; print one line; return the exit code.

    Raises ValueError for an unreadable or non-PEM TLS file (before any connection).
    """
    what = f"{address}{' ' + service if service else ''}"
    channel = make_channel(address, options=(), tls=tls)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
        if code == grpc.StatusCode.NOT_FOUND:  # the health servicer's answer for a service
            print(f"{what}: SERVICE_UNKNOWN ({details})")  # it has never heard of
            return EXIT_NOT_SERVING
        hint = {
            grpc.StatusCode.UNAVAILABLE: "nothing listens there, or the TLS handshake failed: "
            "plaintext vs TLS, wrong CA or server name, client certificate missing or refused",
            grpc.StatusCode.DEADLINE_EXCEEDED: f"no answer within {timeout:g}s",
            grpc.StatusCode.UNIMPLEMENTED: "the server has no grpc.health.v1 service",
        }.get(code, "the health check failed")
        print(f"{what}: unreachable: {code.name}: {details} [{hint}]", file=sys.stderr)
        return EXIT_ERROR
    finally:
        channel.close()
    status = _STATUS.Name(reply.status)
    print(f"{what}: {status}")
    return (
        EXIT_SERVING if reply.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SERVING
    )


def check_readyz(address: str, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """GET http://``address``/readyz once (a shard's metrics port); print one line; return
    the exit code: 200 -> 0, 503 -> 1 (the body names the status), anything else -> 2."""
    host, port = _host_port("address", address)
    what = f"{address}{READYZ_PATH}"
    conn = http.client.HTTPConnection(host.strip("[]"), port, timeout=timeout)
    try:
        conn.request("GET", READYZ_PATH)
        reply = conn.getresponse()
        body = reply.read(256).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as e:
        print(f"{what}: unreachable: {type(e).__name__}: {e} [nothing listens there, or it "
              "is not a shard's metrics port]", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    finally:
        conn.close()
    if reply.status == 200:
        print(f"{what}: {body or 'SERVING'}")
        return EXIT_SERVING
    if reply.status == 503:
        print(f"{what}: {body or 'NOT_SERVING'}")
        return EXIT_NOT_SERVING
    print(f"{what}: HTTP {reply.status} {reply.reason} [not a shard's /readyz: check the "
          "port is --metrics-port]", file=sys.stderr)  # fmt: skip
    return EXIT_ERROR


def run(args: argparse.Namespace) -> int:
    """``embps health``: 0 SERVING, 1 answered but not serving, 2 no answer or a bad option."""
    try:
        if not args.timeout > 0:
            raise ValueError(f"--timeout {args.timeout:g}: must be more than 0 seconds")
        if args.readyz is not None:
            if not 0 < _host_port("--readyz", args.readyz)[1] < 65536:
                raise ValueError(f"--readyz {args.readyz!r}: expected HOST:PORT")
            grpc_only = [f"--{k.replace('_', '-')}" for k in _GRPC_ONLY if getattr(args, k)]
            if grpc_only:
                raise ValueError(f"--readyz checks over HTTP: drop {', '.join(grpc_only)}")
            return check_readyz(args.readyz, args.timeout)
        address = _address(args)
        tls = _tls(args)
        return check(address, args.service, args.timeout, tls)
    except ValueError as e:
        print(f"embps health: {e}", file=sys.stderr)
        return EXIT_ERROR
