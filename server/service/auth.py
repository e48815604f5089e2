"""Shard security: bearer tokens with read / write / admin permissions, TLS credentials.

TOKEN FILE (``embps serve --auth-token-file FILE``)
    One token per line, ``PERMISSION TOKEN``; ``#`` starts a comment, blank
    lines are ignored::

        # trainers
        write  3f9c0a1e6b2d4c8e9a7f5b1d2c3e4f5a
        # dashboards, evaluation jobs
        read   8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d
        admin  0a1b2c3d4e5f60718293a4b5c6d7e8f9

    PERMISSION is ``read``, ``write`` or ``admin``; each implies the ones
    before it (write = read + push; admin = write + table and durability
    calls). TOKEN is 16 to 4096 visible ASCII characters (no spaces; a ``#``
    starts a comment, so not that either), e.g.
    ``python -c "import secrets; print(secrets.token_hex(32))"``. A token may
    appear once. A malformed file stops the shard at start with the line number
    of the fault; the error never repeats the token.

WHAT EACH PERMISSION ALLOWS (``METHOD_PERMISSION``)
    read:  Pull with train=False (inference), DescribeTables, Stats, Frequencies,
           Changes (the change feed a replica follows), server reflection
    write: Push, Pull with train=True (a training pull creates rows and counts
           sightings: it changes the table, so it is not a read), Step with push
           groups or train=True (read: a Step of inference pulls only)
    admin: CreateTable, DropTable, Prune, Checkpoint, Evict, Narrow (restore is a start flag)
    none:  grpc.health.v1.Health (Kubernetes probes carry no token)
    A method missing from the table needs admin (deny by default).

CHECK
    Clients send ``authorization: Bearer <token>``. The presented token and
    every configured token are hashed (SHA-256) and compared with
    ``hmac.compare_digest`` against *all* configured tokens, without stopping
    at a match: the time taken says neither which token matched nor how long
    the tokens are. Missing or unknown token -> UNAUTHENTICATED; a known token
    without the method's permission -> PERMISSION_DENIED. ``AuthInterceptor``
    runs inside ``service.ErrorInterceptor``: a refusal is raised as an
    ``EmbpsServerError`` there, so it is counted in ``embps_requests_total``
    with its code and carries ``embps-outcome: rejected``; the servicer (and
    so every table) never sees the request.

TLS
    ``server_credentials`` reads the certificate, key and (for mutual TLS)
    client CA, checks them with the standard ``ssl`` module first (a key that
    does not match its certificate is a clear start error, not a failed
    handshake later) and returns ``grpc.ssl_server_credentials``; with a
    client CA, a client without a certificate signed by it fails the handshake.

Example::

    from embps.server.service.auth import Authorizer, load_token_file

    auth = Authorizer(load_token_file("/etc/embps/tokens"))
    auth.check("/embps.v1.ParameterServer/Push", (("authorization", "Bearer ..."),))
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from embps.protos.limits import METHOD_PREFIX
from embps.server.errors import EmbpsServerError, PermissionDenied, Unauthenticated

log = logging.getLogger("embps.server")

_PS = METHOD_PREFIX
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_PULL = _PS + "Pull"
_STEP = _PS + "Step"
TOKEN_MIN_CHARS, TOKEN_MAX_CHARS = 16, 4096


# --------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------


class Permission(enum.IntEnum):
    """What a token may do; a higher permission implies every lower one."""

    READ = 1  # pull rows, describe tables, stats, frequencies, reflection
    WRITE = 2  # read + push gradients
    ADMIN = 3  # write + create/drop tables, prune, checkpoint

    @property
    def label(self) -> str:
        """The name used in token files and messages ("read", "write", "admin")."""
        return self.name.lower()


# full method path -> permission it needs (None: open to every client)
METHOD_PERMISSION: dict[str, Permission | None] = {
    _PS + "Pull": Permission.READ,
    _PS + "DescribeTables": Permission.READ,
    _PS + "Stats": Permission.READ,
    _PS + "Frequencies": Permission.READ,
    _PS + "Changes": Permission.READ,  # the change feed replicas follow: values only
    _PS + "Push": Permission.WRITE,
    _PS + "Step": Permission.READ,  # write with push groups or training pulls
    _PS + "CreateTable": Permission.ADMIN,
    _PS + "DropTable": Permission.ADMIN,
    _PS + "Prune": Permission.ADMIN,
    _PS + "Checkpoint": Permission.ADMIN,
    _PS + "Evict": Permission.ADMIN,
    _PS + "Narrow": Permission.ADMIN,
}


def required_permission(method: str, request: Any = None) -> Permission | None:
    """Permission a full method path (``/pkg.Service/Method``) needs for ``request``
    (None: the least any request of the method needs); None: no token needed."""
    if method == _PULL and request is not None and getattr(request, "train", False):
        return Permission.WRITE
    if (
        method == _STEP
        and request is not None
        and (
            len(getattr(request, "push", ()))
            or (getattr(request, "train", False) and len(request.pull))
        )
    ):
        return Permission.WRITE
    if method in METHOD_PERMISSION:
        return METHOD_PERMISSION[method]
    if method.startswith(_HEALTH_PREFIX):
        return None
    if method.startswith(_REFLECTION_PREFIXES):
        return Permission.READ
    return Permission.ADMIN  # an RPC added later without an entry: deny by default


# --------------------------------------------------------------------------
# Token file
# --------------------------------------------------------------------------


class TokenFileError(ValueError):
    """The token file cannot be read or is malformed (the message never holds a token)."""


@dataclass(frozen=True)
class TokenStore:
    """SHA-256 digests of the configured tokens and the permission of each (same order)."""

    digests: tuple[bytes, ...]
    permissions: tuple[Permission, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.digests) != len(self.permissions):
            raise ValueError("TokenStore: one permission per digest")

    def __len__(self) -> int:
        return len(self.digests)

    def permission_of(self, token: bytes) -> Permission | None:
        """The permission of ``token`` or None. Constant time in the token's value: every
        configured digest is compared, whatever matched before."""
        d = _digest(token)
        found = 0
        for i, ref in enumerate(self.digests):
            hit = hmac.compare_digest(d, ref)
            found = max(found, int(hit) * int(self.permissions[i]))
        return Permission(found) if found else None


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _parse_permission(word: str) -> Permission:
    try:
        return Permission[word.upper()]
    except KeyError:
        raise ValueError(f"unknown permission {word!r}; use read, write or admin") from None


def _check_token(token: str, where: str) -> None:
    """ValueError if the token is not 16..4096 visible ASCII characters (message without it)."""
    if not TOKEN_MIN_CHARS <= len(token) <= TOKEN_MAX_CHARS:
        raise ValueError(
            f"{where}: the token has {len(token)} characters; use {TOKEN_MIN_CHARS} to "
            f"{TOKEN_MAX_CHARS} (e.g. secrets.token_hex(32))"
        )
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(
            f"{where}: the token has characters other than visible ASCII; "
            "use e.g. secrets.token_hex(32)"
        )


def load_token_file(path: str | Path) -> TokenStore:
    """Parse a token file (format in the module docstring). TokenFileError says which line
    is wrong and why, never what the token was."""
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii")
    except UnicodeDecodeError as e:
        bad_line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise TokenFileError(
            f"token file {p}, line {bad_line}: non-ASCII byte; tokens and permissions are ASCII"
        ) from None
    except OSError as e:
        raise TokenFileError(f"cannot read token file {p}: {e.strerror or e}") from None
    digests: list[bytes] = []
    perms: list[Permission] = []
    seen: dict[bytes, int] = {}
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"token file {p}, line {no}"
        parts = line.split()
        if len(parts) != 2:
            raise TokenFileError(
                f"{where}: expected 'PERMISSION TOKEN' (2 fields), got {len(parts)} fields"
            )
        try:
            perm = _parse_permission(parts[0])
            _check_token(parts[1], where)
        except ValueError as e:
            msg = str(e) if str(e).startswith(where) else f"{where}: {e}"
            raise TokenFileError(msg) from None
        d = _digest(parts[1].encode("ascii"))
        if d in seen:
            raise TokenFileError(
                f"{where}: the same token is on line {seen[d]}; give each token one line"
            )
        seen[d] = no
        digests.append(d)
        perms.append(perm)
    if not digests:
        raise TokenFileError(
            f"token file {p} has no tokens: every call would be refused; "
            "add lines 'PERMISSION TOKEN' (read, write or admin)"
        )
    return TokenStore(tuple(digests), tuple(perms), str(p))


# --------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> bytes | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            v = value.encode("latin-1") if isinstance(value, str) else bytes(value)
            scheme, _, token = v.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class Authorizer:
    """Decides whether a call may run; thread-safe; ``reload()`` swaps the tokens atomically."""

    def __init__(self, tokens: TokenStore) -> None:
        self._tokens = tokens
        self._lock = threading.Lock()

    @property
    def tokens(self) -> TokenStore:
        return self._tokens

    def reload(self) -> bool:
        """Re-read the token file the store came from. On an error the old tokens stay
        and the error is logged; returns whether the new file was taken."""
        src = self._tokens.source
        if not src:
            return False
        try:
            store = load_token_file(src)
        except TokenFileError as e:
            log.error("token file not reloaded, the previous tokens stay: %s", e)
            return False
        with self._lock:
            self._tokens = store
        log.info("token file %s reloaded: %d tokens", src, len(store))
        return True

    def check(
        self, method: str, metadata: Iterable[tuple[str, Any]] | None, request: Any = None
    ) -> None:
        """Raise Unauthenticated / PermissionDenied unless the call's token allows ``method``
        (for ``request``: a training Pull needs write)."""
        need = required_permission(method, request)
        if need is None:
            return
        token = bearer_token(metadata)
        name = method.rsplit("/", 1)[-1]
        if token is None:
            raise Unauthenticated(
                f"{name} needs a bearer token (metadata 'authorization: Bearer <token>'); "
                "pass PSClient(token=...)"
            )
        have = self._tokens.permission_of(token)
        if have is None:
            raise Unauthenticated(
                f"{name}: the bearer token is not one of this shard's tokens; check the "
                "token or the shard's --auth-token-file"
            )
        if have < need:
            what = name
            hint = f"use a token with {need.label} (see the README's Security section)"
            if method == _PULL and need is Permission.WRITE:
                what = "a training Pull (train=True creates rows and counts sightings)"
                hint = "pull with train=False (inference) or use a token with write"
            elif method == _STEP and need is Permission.WRITE:
                what = "a Step with pushes or training pulls (they change tables)"
                hint = "pull with train=False and no pushes (inference) or use a token with write"
            raise PermissionDenied(
                f"{what} needs the {need.label} permission; this token has {have.label}; {hint}"
            )


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call's token before its handler runs. Place it *after*
    ``ErrorInterceptor`` in ``grpc.server(interceptors=...)`` (it then runs inside it):
    refused ParameterServer calls raise there and are counted and answered like every
    other error; other services (reflection) are aborted here. Health is open.
    """

    def __init__(self, authorizer: Authorizer) -> None:
        self._auth = authorizer

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or required_permission(method) is None:
            return handler
        check = self._auth.check
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary
            raising = method.startswith(_PS)  # ErrorInterceptor turns the error into a status

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                _guard(check, method, context, raising, request)
                return inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream is not None:
            inner_ss = handler.stream_stream

            def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                _guard(check, method, context, False, None)
                yield from inner_ss(requests, context)

            return grpc.stream_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return _refuse_handler(method)  # no such service uses the other kinds today


def _guard(
    check: Callable[[str, Any, Any], None],
    method: str,
    context: grpc.ServicerContext,
    raising: bool,
    request: Any,
) -> None:
    try:
        check(method, context.invocation_metadata(), request)
    except EmbpsServerError as e:
        if raising:
            raise
        context.abort(e.code, str(e))


def _refuse_handler(method: str) -> grpc.RpcMethodHandler:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to tokens")

    return grpc.unary_unary_rpc_method_handler(refuse)


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def _read(path: str, what: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read the {what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag}: {path} is not a PEM file (no '-----BEGIN' line); {what}")
    return data


def server_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    """TLS credentials of a shard; with ``client_ca``, clients must present a certificate
    signed by it (mutual TLS). ValueError names the file and what is wrong with it."""
    cert_pem = _read(cert, "server certificate (PEM)", "--tls-cert")
    key_pem = _read(key, "private key of the server certificate (PEM)", "--tls-key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ValueError(
            f"--tls-cert {cert} / --tls-key {key}: not a certificate and its private key "
            f"({e.reason or e}); pass the PEM certificate and the key it was issued for"
        ) from None
    ca_pem = None
    if client_ca:
        ca_pem = _read(
            client_ca, "CA certificate that signs client certificates", "--tls-client-ca"
        )
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as e:
            raise ValueError(
                f"--tls-client-ca {client_ca}: not a PEM CA certificate ({e.reason or e})"
            ) from None
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )
