"""Client side of shard security: TLS settings and the bearer token (README "Security").

``PSClient(addresses, tls=..., token=...)`` builds its channels with
``make_channel``:

* ``tls=None``: plaintext. ``tls=True``: TLS, shards' certificates checked
  against the system's CA roots. ``tls=TLSConfig(ca=..., cert=..., key=...,
  server_name=...)``: TLS with your own CA, a client certificate for mutual TLS,
  and the name to check the certificate against when it differs from the
  address's host (e.g. connecting to an IP).
* ``token="..."``: sent as ``authorization: Bearer <token>`` on every call, by a
  client interceptor in the calling thread (gRPC's ``access_token_call_credentials``
  runs a Python plugin on another thread per call: slower on the data path).
  Over plaintext the token crosses the network readable by anyone on the path;
  that is only sound where something else encrypts (a service mesh, a
  loopback address), so the client warns once per ``PSClient``.

Example::

    from embps.client import PSClient, TLSConfig

    tls = TLSConfig(ca="ca.pem", cert="trainer.pem", key="trainer.key")
    with PSClient(["ps-0.example:50051"], tls=tls, token=open("token").read().strip()) as ps:
        ps.pull("user", [1, 2, 3])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings of a client; every path is a PEM file.

    ca: CA that signed the shards' certificates (None: the system's roots).
    cert, key: the client's certificate and key, for shards started with
    ``--tls-client-ca`` (mutual TLS); both or neither.
    server_name: the name the shards' certificates must carry, when it is not the
    host of the address (None: the address's host).
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError(
                "TLSConfig: cert and key go together (the client certificate and its key)"
            )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """``grpc.ssl_channel_credentials`` of these files; ValueError names an unreadable one."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "ca"),
            private_key=_read(self.key, "key"),
            certificate_chain=_read(self.cert, "cert"),
        )


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"TLSConfig.{what}: cannot read {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"TLSConfig.{what}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _Details(_CallDetails, grpc.ClientCallDetails):
    """``grpc.ClientCallDetails`` with new metadata (the class itself is abstract)."""


class BearerToken(grpc.UnaryUnaryClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every unary call of a channel."""

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token or not all("!" <= c <= "~" for c in token):
            raise ValueError(
                "token must be a non-empty string of visible ASCII characters (no spaces)"
            )
        self._entry = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:  # never show the token
        return "BearerToken(<hidden>)"

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        d = client_call_details
        metadata = [*(d.metadata or ()), self._entry]
        details = _Details(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )
        return continuation(details, request)


def make_channel(
    address: str,
    options: Sequence[tuple[str, Any]],
    tls: bool | TLSConfig | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel to one shard: plaintext (tls None/False), TLS (True: system roots, or a
    TLSConfig), and the bearer token on every call when ``token`` is given."""
    opts = list(options)
    channel: grpc.Channel
    if tls is None or tls is False:
        channel = grpc.insecure_channel(address, options=opts)
    else:
        cfg = TLSConfig() if tls is True else tls
        if not isinstance(cfg, TLSConfig):
            raise ValueError(f"tls must be None, True or a TLSConfig, got {type(tls).__name__}")
        if cfg.server_name:
            opts.append(("grpc.ssl_target_name_override", cfg.server_name))
        channel = grpc.secure_channel(address, cfg.channel_credentials(), options=opts)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, BearerToken(token))


def warn_plaintext_token(tls: bool | TLSConfig | None, token: str | None) -> None:
    """Warn (once per caller) when a token would cross the network unencrypted."""
    if token is not None and (tls is None or tls is False):
        warnings.warn(
            "PSClient: the bearer token is sent over plaintext channels (tls=None); anyone "
            "on the network path can read it. Use tls=True or TLSConfig(...) unless a "
            "service mesh or loopback connection encrypts the traffic.",
            UserWarning,
            stacklevel=3,
        )
