"""Security: TLS, mutual TLS and bearer tokens with read / write / admin permissions.

Real gRPC servers on 127.0.0.1 (in-process ``build_server`` shards, so the tests
read the engine directly), real certificates generated per run
(tests/support/certs.py), and one real ``embps serve`` process with the
flags. Every refused call is checked to change nothing in the tables.
"""

from __future__ import annotations

import hashlib
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.certs import Certs, make_certs
from support.cluster import wait_until

from embps.client import (
    SGD,
    PermissionDeniedError,
    PSClient,
    TLSConfig,
    UnauthenticatedError,
    UnavailableError,
)
from embps.protos.config import TableConfig
from embps.server.errors import PermissionDenied, Unauthenticated
from embps.server.service import ShardConfig, ShardServer, build_server
from embps.server.service.auth import (
    Authorizer,
    Permission,
    TokenFileError,
    load_token_file,
    required_permission,
)

TOKENS = {
    "read": "read-0123456789abcdef-TOKEN",
    "write": "write-0123456789abcdef-TOKEN",
    "admin": "admin-0123456789abcdef-TOKEN",
}
WRONG_TOKEN = "wrong-0123456789abcdef-NOT-A-TOKEN"
TABLE = TableConfig("t", dim=4, optimizer=SGD(lr=0.5), seed=7)
KEYS = np.arange(100, dtype=np.int64)
REFUSED = 0.3  # seconds a client keeps retrying a connection the TLS handshake refuses


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("auth") / "tokens"
    p.write_text(
        "# permission token\n"
        + "".join(f"{perm} {tok}   # {perm} client\n" for perm, tok in TOKENS.items())
        + "\n"
    )
    return str(p)


def _shard(**options: Any) -> ShardServer:
    shard = build_server(ShardConfig(port=0, tables=(TABLE,), **options))
    shard.start()
    # rows for KEYS exist before any test refuses anything
    shard.engine.table("t").pull(KEYS, train=True)
    return shard


@pytest.fixture(scope="module")
def tls_shard(certs: Certs) -> Iterator[ShardServer]:
    shard = _shard(tls_cert=certs.server_cert, tls_key=certs.server_key)
    yield shard
    shard.stop(grace=0)


@pytest.fixture(scope="module")
def mtls_shard(certs: Certs) -> Iterator[ShardServer]:
    shard = _shard(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca)
    yield shard
    shard.stop(grace=0)


@pytest.fixture(scope="module")
def auth_shard(
    certs: Certs, token_file: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ShardServer]:
    shard = _shard(
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        auth_token_file=token_file,
        metrics_port=0,
        checkpoint_dir=str(tmp_path_factory.mktemp("ckpt")),
        checkpoint_on_exit=False,
    )
    yield shard
    shard.stop(grace=0)


def checksum(shard: ShardServer) -> str:
    """Digest of every table of a shard: names, configs, arrays and counters."""
    h = hashlib.sha256()
    for table in shard.engine.tables():
        snap = table.snapshot()
        h.update(repr((snap.config, sorted(snap.state.items()))).encode())
        for name in sorted(snap.arrays):
            h.update(name.encode())
            h.update(np.ascontiguousarray(snap.arrays[name]).tobytes())
    return h.hexdigest()


def client(shard: ShardServer, **kw: Any) -> PSClient:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retry_deadline", REFUSED)
    return PSClient([shard.address], **kw)


def tls_client(shard: ShardServer, certs: Certs, token: str | None = None, **kw: Any) -> PSClient:
    return client(shard, tls=TLSConfig(ca=certs.ca), token=token, **kw)


# --------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------


def test_tls_pull_and_push_work(tls_shard: ShardServer, certs: Certs) -> None:
    with tls_client(tls_shard, certs) as ps:
        before = ps.pull("t", KEYS[:8], train=False)
        ps.push("t", KEYS[:8], np.ones((8, 4), dtype=np.float32))
        after = ps.pull("t", KEYS[:8], train=False)
    np.testing.assert_allclose(after, before - 0.5, rtol=1e-6)
    np.testing.assert_array_equal(after, tls_shard.engine.table("t").pull(KEYS[:8], train=False))


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param(None, id="plaintext"),
        pytest.param("other_ca", id="wrong-ca"),
        pytest.param("system-roots", id="system-roots"),
        pytest.param("wrong-name", id="wrong-server-name"),
    ],
)
def test_client_that_cannot_verify_the_tls_shard_fails(
    tls_shard: ShardServer, certs: Certs, tls: str | None
) -> None:
    cfg: bool | TLSConfig | None = {
        None: None,
        "other_ca": TLSConfig(ca=certs.other_ca),
        "system-roots": True,
        "wrong-name": TLSConfig(ca=certs.ca, server_name="not-the-shard.example"),
    }[tls]
    before = checksum(tls_shard)
    with client(tls_shard, tls=cfg) as ps:
        with pytest.raises(UnavailableError):
            ps.pull("t", KEYS[:4], train=True)
        with pytest.raises(UnavailableError):
            ps.push("t", KEYS[:4], np.ones((4, 4), dtype=np.float32))
    assert checksum(tls_shard) == before


def test_tls_server_name_override_accepts_the_certificates_name(
    tls_shard: ShardServer, certs: Certs
) -> None:
    # connect by "localhost" (in the SAN) while checking the name the certificate carries
    addr = f"localhost:{tls_shard.port}"
    with PSClient([addr], tls=TLSConfig(ca=certs.ca, server_name="127.0.0.1"), timeout=5) as ps:
        assert ps.pull("t", KEYS[:2], train=False).shape == (2, 4)


# --------------------------------------------------------------------------
# Mutual TLS
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cert", ["none", "other-ca"])
def test_mtls_refuses_a_client_without_a_certificate_of_the_ca(
    mtls_shard: ShardServer, certs: Certs, cert: str
) -> None:
    tls = (
        TLSConfig(ca=certs.ca)
        if cert == "none"
        else TLSConfig(ca=certs.ca, cert=certs.other_client_cert, key=certs.other_client_key)
    )
    before = checksum(mtls_shard)
    with client(mtls_shard, tls=tls) as ps:
        with pytest.raises(UnavailableError):
            ps.pull("t", KEYS[:4], train=True)
        with pytest.raises(UnavailableError):
            ps.push("t", KEYS[:4], np.ones((4, 4), dtype=np.float32))
    assert checksum(mtls_shard) == before


def test_mtls_accepts_a_certificate_of_the_ca(mtls_shard: ShardServer, certs: Certs) -> None:
    tls = TLSConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    with client(mtls_shard, tls=tls) as ps:
        before = ps.pull("t", KEYS[10:14], train=False)
        ps.push("t", KEYS[10:14], np.ones((4, 4), dtype=np.float32))
        np.testing.assert_allclose(ps.pull("t", KEYS[10:14], train=False), before - 0.5, rtol=1e-6)


# --------------------------------------------------------------------------
# Bearer tokens
# --------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, WRONG_TOKEN], ids=["none", "wrong"])
def test_missing_or_wrong_token_is_unauthenticated_and_changes_nothing(
    auth_shard: ShardServer, certs: Certs, token: str | None
) -> None:
    before = checksum(auth_shard)
    with tls_client(auth_shard, certs, token) as ps:
        calls = [
            lambda: ps.pull("t", KEYS[:4], train=False),
            lambda: ps.pull("t", KEYS[:4], train=True),
            lambda: ps.push("t", KEYS[:4], np.ones((4, 4), dtype=np.float32)),
            lambda: ps.create_table("u", dim=2),
            lambda: ps.drop_table("t"),
            lambda: ps.prune("t", 1e9),
            lambda: ps.stats(),
        ]
        for call in calls:
            with pytest.raises(UnauthenticatedError) as e:
                call()
            assert e.value.rejected  # the shard says: nothing was changed
            assert "token" in str(e.value)
    assert checksum(auth_shard) == before


def test_read_token_reads_but_cannot_write_or_administer(
    auth_shard: ShardServer, certs: Certs
) -> None:
    table = auth_shard.engine.table("t")
    values = table.snapshot().arrays
    with tls_client(auth_shard, certs, TOKENS["read"]) as ps:
        rows = ps.pull("t", KEYS[:8], train=False)
        np.testing.assert_array_equal(rows, table.pull(KEYS[:8], False))
        assert [c.name for c in ps.describe_tables()] == ["t"]
        assert ps.stats("t")[0].tables["t"]["keys"] == KEYS.shape[0]
        after = table.snapshot().arrays  # reads move only the pull counters
        assert all(np.array_equal(values[k], after[k]) for k in values)
        before = checksum(auth_shard)
        refused = {
            "push": lambda: ps.push("t", KEYS[:4], np.ones((4, 4), dtype=np.float32)),
            "training pull": lambda: ps.pull("t", np.arange(1000, 1004), train=True),
            "create_table": lambda: ps.create_table("u", dim=2),
            "drop_table": lambda: ps.drop_table("t"),
            "prune": lambda: ps.prune("t", 1e9),
            "checkpoint": lambda: ps.checkpoint(1),
        }
        for what, call in refused.items():
            with pytest.raises(Exception) as e:
                call()
            err = e.value
            codes = [err.code] + [x.code for x in getattr(err, "errors", [])]
            assert grpc.StatusCode.PERMISSION_DENIED in codes, (what, err)
            assert checksum(auth_shard) == before, what
        with pytest.raises(PermissionDeniedError, match="train=False"):
            ps.pull("t", np.arange(1000, 1004), train=True)


def test_write_token_trains_but_cannot_administer(auth_shard: ShardServer, certs: Certs) -> None:
    with tls_client(auth_shard, certs, TOKENS["write"]) as ps:
        before = ps.pull("t", KEYS[20:24], train=True)
        res = ps.push("t", KEYS[20:24], np.ones((4, 4), dtype=np.float32))
        assert res.applied == 4
        np.testing.assert_allclose(ps.pull("t", KEYS[20:24], train=False), before - 0.5, rtol=1e-6)
        snap = checksum(auth_shard)
        for call in (
            lambda: ps.create_table("u", dim=2),
            lambda: ps.drop_table("t"),
            lambda: ps.prune("t", 1e9),
        ):
            with pytest.raises(PermissionDeniedError, match="admin"):
                call()
        assert checksum(auth_shard) == snap


def test_admin_token_creates_checkpoints_and_drops(auth_shard: ShardServer, certs: Certs) -> None:
    with tls_client(auth_shard, certs, TOKENS["admin"]) as ps:
        assert ps.create_table("adm", dim=2)
        ps.push("adm", [1, 2], np.ones((2, 2), dtype=np.float32))  # admin implies write
        (res,) = ps.checkpoint(5)
        assert res.step == 5 and Path(res.path).is_dir()
        assert ps.prune("adm", 0.0).rows == 0
        assert ps.drop_table("adm")
    assert [t.name for t in auth_shard.engine.tables()] == ["t"]


def test_health_is_open_and_reflection_needs_a_token(auth_shard: ShardServer, certs: Certs) -> None:
    creds = TLSConfig(ca=certs.ca).channel_credentials()
    with grpc.secure_channel(auth_shard.address, creds) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ServerReflectionInfo(iter(ask), timeout=5))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {TOKENS['read']}"),)
        (answer,) = stub.ServerReflectionInfo(iter(ask), timeout=5, metadata=md)
        names = {s.name for s in answer.list_services_response.service}
        assert "embps.v1.ParameterServer" in names


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode(errors="replace")


def test_metrics_count_refusals_and_serve_no_table_data(
    auth_shard: ShardServer, certs: Certs
) -> None:
    with tls_client(auth_shard, certs, WRONG_TOKEN) as ps, pytest.raises(UnauthenticatedError):
        ps.pull("t", KEYS[:2], train=False)
    with tls_client(auth_shard, certs, TOKENS["read"]) as ps, pytest.raises(PermissionDeniedError):
        ps.push("t", KEYS[:2], np.ones((2, 4), dtype=np.float32))
    base = f"http://127.0.0.1:{auth_shard.metrics_port}"
    _, _, text = _get(base + "/metrics")
    assert re.search(r'embps_requests_total\{[^}]*code="UNAUTHENTICATED"[^}]*\} [1-9]', text)
    pd = r'embps_requests_total\{[^}]*code="PERMISSION_DENIED",method="Push"[^}]*\} [1-9]'
    assert re.search(pd, text), text
    # the metrics port is plain HTTP without tokens: it must serve metrics and nothing else
    rows = auth_shard.engine.table("t").pull(KEYS, train=False)
    row_values = {f"{v:.6g}" for v in rows.reshape(-1)[:64] if abs(v) > 1e-3}
    sample = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? \S+$")
    for path in ("/", "/metrics", "/embps.v1.ParameterServer/Pull", "/t?keys=1,2,3"):
        status, ctype, body = _get(base + path)
        if status != 200:
            continue
        assert ctype.startswith("text/plain"), (path, ctype)
        for line in body.splitlines():
            if line and not line.startswith("#"):
                assert sample.match(line), (path, line)
                assert (
                    line.split("{")[0].split(" ")[0].startswith(("embps_", "python_", "process_"))
                )
                value = line.rsplit(" ", 1)[1]
                assert value not in row_values or value in ("1", "0"), (path, line)


# --------------------------------------------------------------------------
# Token file, authorizer, configuration errors
# --------------------------------------------------------------------------


def test_token_file_permissions_and_constant_time_lookup(token_file: str) -> None:
    store = load_token_file(token_file)
    assert len(store) == 3
    for perm, tok in TOKENS.items():
        assert store.permission_of(tok.encode()) is Permission[perm.upper()]
    assert store.permission_of(WRONG_TOKEN.encode()) is None
    assert store.permission_of(b"") is None
    auth = Authorizer(store)
    pull = "/embps.v1.ParameterServer/Pull"
    auth.check("/grpc.health.v1.Health/Check", ())  # open
    with pytest.raises(Unauthenticated):
        auth.check(pull, ())
    with pytest.raises(Unauthenticated):
        auth.check(pull, (("authorization", "Basic " + TOKENS["admin"]),))
    auth.check(pull, (("authorization", "Bearer " + TOKENS["read"]),))
    with pytest.raises(PermissionDenied):
        auth.check(
            "/embps.v1.ParameterServer/Push", (("authorization", "Bearer " + TOKENS["read"]),)
        )
    assert required_permission("/embps.v1.ParameterServer/NewRpc") is Permission.ADMIN
    assert required_permission("/embps.v1.ParameterServer/Frequencies") is Permission.READ


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("read tok-0123456789abcdef\nsuper tok-abcdef0123456789\n", 2, "unknown permission"),
        ("# c\n\nwrite tok-0123456789abcdef extra\n", 3, "2 fields"),
        ("admin short\n", 1, "characters; use 16"),
        ("read tok-0123456789abcdef\nwrite tok-0123456789abcdef\n", 2, "same token is on line 1"),
        ("# only comments\n\n", None, "no tokens"),
    ],
)
def test_malformed_token_file_names_the_line_and_never_the_token(
    tmp_path: Path, text: str, line: int | None, why: str
) -> None:
    p = tmp_path / "tokens"
    p.write_text(text)
    with pytest.raises(TokenFileError) as e:
        load_token_file(p)
    msg = str(e.value)
    assert why in msg
    if line is not None:
        assert f"line {line}:" in msg
    for word in re.findall(r"\S+", text):
        if word.startswith("tok-") or word == "short":
            assert word not in msg


def test_bad_security_config_fails_at_start(tmp_path: Path, certs: Certs) -> None:
    missing = str(tmp_path / "missing.pem")
    bad = [
        (dict(tls_cert=certs.server_cert), "--tls-cert needs --tls-key"),
        (dict(tls_key=certs.server_key), "--tls-key needs --tls-cert"),
        (dict(tls_client_ca=certs.ca), "--tls-client-ca"),
        (dict(tls_cert=missing, tls_key=certs.server_key), "cannot read"),
        (dict(tls_cert=certs.server_cert, tls_key=certs.other_server_key), "its private key"),
        (dict(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=missing),
         "--tls-client-ca: cannot read"),
        (dict(auth_token_file=missing), "cannot read token file"),
    ]  # fmt: skip
    for opts, why in bad:
        with pytest.raises(ValueError, match=re.escape(why)):
            build_server(ShardConfig(port=0, **opts))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cert and key go together"):
        TLSConfig(ca=certs.ca, cert=certs.client_cert)


def test_plaintext_token_warns(auth_shard: ShardServer) -> None:
    with pytest.warns(UserWarning, match="plaintext"):
        PSClient([auth_shard.address], token=TOKENS["read"]).close()


# --------------------------------------------------------------------------
# Real `embps serve` processes
# --------------------------------------------------------------------------


def test_embps_serve_with_mtls_and_tokens(
    cluster_factory: Any, certs: Certs, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin {TOKENS['admin']}\n")
    cluster = cluster_factory(
        2,
        "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
        "--tls-client-ca", certs.ca, "--auth-token-file", str(tokens),
        "--log-level", "DEBUG",
    )  # fmt: skip
    tls = TLSConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    addrs = cluster.addresses
    grads = np.ones((KEYS.shape[0], 2), dtype=np.float32)
    with PSClient(addrs, tls=tls, token=TOKENS["admin"], timeout=30) as ps:
        ps.create_table("e", dim=2, optimizer=SGD(lr=1.0))
        before = ps.pull("e", KEYS)
        with PSClient(addrs, tls=tls, token=WRONG_TOKEN, timeout=30) as bad:
            with pytest.raises(UnauthenticatedError):
                bad.pull("e", KEYS, train=False)
            with pytest.raises(UnauthenticatedError):
                bad.push("e", KEYS, grads)
        np.testing.assert_array_equal(ps.pull("e", KEYS, train=False), before)
        ps.push("e", KEYS, grads)
        np.testing.assert_allclose(ps.pull("e", KEYS, train=False), before - 1.0, rtol=1e-6)
        no_cert = PSClient(addrs, tls=TLSConfig(ca=certs.ca), token=TOKENS["admin"],
                           retry_deadline=REFUSED)  # fmt: skip
        with no_cert, pytest.raises(UnavailableError):
            no_cert.pull("e", KEYS, train=False)
        # SIGHUP: every shard re-reads the token file; a new read token works at once
        tokens.write_text(f"admin {TOKENS['admin']}\nread {TOKENS['read']}\n")
        cluster.signal(signal.SIGHUP)
        with PSClient(addrs, tls=tls, token=TOKENS["read"], timeout=30) as reader:

            def reads() -> bool:
                try:
                    reader.pull("e", KEYS, train=False)
                except UnauthenticatedError:
                    return False
                return True

            wait_until(reads, timeout=30.0, what="the reloaded token file on every shard")
            with pytest.raises(PermissionDeniedError):
                reader.push("e", KEYS, grads)
    assert cluster.stop() == 0
    log = cluster.log()
    assert "token file" in log and "reloaded" in log
    for secret in (WRONG_TOKEN, *TOKENS.values()):
        assert secret not in log


def test_embps_serve_refuses_a_malformed_token_file(cluster_factory: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    secret = "s3cret-0123456789abcdef"
    tokens.write_text(f"admin {TOKENS['admin']}\nreed {secret}\n")
    cluster = cluster_factory(
        None, "--shards", "2", "--port", "0", "--metrics-port", "0",
        "--auth-token-file", str(tokens),
    )  # fmt: skip
    assert cluster.wait() == 2
    log = cluster.log()
    assert f"token file {tokens}, line 2: unknown permission 'reed'" in log
    assert secret not in log and TOKENS["admin"] not in log
