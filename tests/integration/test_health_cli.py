"""`embps health`: real subprocesses against real in-process shards (build_server on port 0).

Plaintext, TLS and mutual-TLS shards with certificates generated per run
(tests/support/certs.py); a draining shard (health NOT_SERVING, as
``ShardServer.stop`` leaves it); a closed port. Exit codes: 0 SERVING, 1 not
serving, 2 unreachable or a bad option. stderr holds embps's own one line, not
gRPC's C-core log lines (unless the user set GRPC_VERBOSITY).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import Certs, make_certs

from embps.protos.limits import SERVICE_NAME
from embps.server.service import ShardConfig, ShardServer, build_server

TIMEOUT_S = 3.0  # --timeout of every check
RUN_LIMIT_S = 30.0  # a hung subprocess fails the test instead of hanging it


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _shard(**options: object) -> Iterator[ShardServer]:
    shard = build_server(ShardConfig(port=0, **options))  # type: ignore[arg-type]
    shard.start()
    yield shard
    shard.stop(grace=0)


@pytest.fixture(scope="module")
def plain_shard() -> Iterator[ShardServer]:
    yield from _shard()


@pytest.fixture(scope="module")
def tls_shard(certs: Certs) -> Iterator[ShardServer]:
    yield from _shard(tls_cert=certs.server_cert, tls_key=certs.server_key)


@pytest.fixture(scope="module")
def mtls_shard(certs: Certs) -> Iterator[ShardServer]:
    yield from _shard(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca)


def health(
    *args: str, port: int | None = None, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    """Run `embps health ARGS` (python -m embps.client.cli); EMBPS_PORT=port when given,
    plus ``env_vars``; without the caller's EMBPS_* and GRPC_VERBOSITY."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("EMBPS_") and k != "GRPC_VERBOSITY"
    }
    env.update(env_vars)
    if port is not None:
        env["EMBPS_PORT"] = str(port)
    cmd = [sys.executable, "-m", "embps.client.cli", "health", "--timeout", str(TIMEOUT_S), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S)


def closed_port() -> int:
    """A port bound but never listening: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------
# Plaintext
# --------------------------------------------------------------------------


def test_serving_plaintext_shard_exits_0_with_one_line(plain_shard: ShardServer) -> None:
    res = health(port=plain_shard.port)  # the default address: 127.0.0.1:$EMBPS_PORT
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"127.0.0.1:{plain_shard.port}: SERVING\n"


def test_service_option_checks_one_service(plain_shard: ShardServer) -> None:
    res = health("--address", plain_shard.address, "--service", SERVICE_NAME)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{plain_shard.address} {SERVICE_NAME}: SERVING\n"
    res = health("--address", plain_shard.address, "--service", "no.such.Service")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "SERVICE_UNKNOWN" in res.stdout


def test_tls_client_against_a_plaintext_shard_exits_2(
    plain_shard: ShardServer, certs: Certs
) -> None:
    res = health("--address", plain_shard.address, "--tls-ca", certs.ca)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "UNAVAILABLE" in res.stderr


def test_draining_shard_exits_1() -> None:
    """ShardServer.stop's first step: health NOT_SERVING for every service while calls drain."""
    shard = build_server(ShardConfig(port=0))
    shard.start()
    try:
        assert health("--address", shard.address).returncode == 0
        shard.health.enter_graceful_shutdown()  # what stop() does before the drain delay
        res = health("--address", shard.address)
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert res.stdout == f"{shard.address}: NOT_SERVING\n"
    finally:
        shard.stop(grace=0)


def test_closed_port_exits_2_within_the_timeout() -> None:
    port = closed_port()
    start = time.monotonic()
    res = health("--address", f"127.0.0.1:{port}")
    elapsed = time.monotonic() - start
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert f"127.0.0.1:{port}: unreachable: UNAVAILABLE" in res.stderr
    assert "Connection refused" in res.stderr
    assert elapsed < TIMEOUT_S + 10  # interpreter start + the deadline, not more


# --------------------------------------------------------------------------
# TLS and mutual TLS
# --------------------------------------------------------------------------


def test_tls_shard_with_the_right_ca_exits_0(tls_shard: ShardServer, certs: Certs) -> None:
    res = health("--address", tls_shard.address, "--tls-ca", certs.ca)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{tls_shard.address}: SERVING\n"


def test_server_name_checks_the_certificates_name(tls_shard: ShardServer, certs: Certs) -> None:
    addr = f"localhost:{tls_shard.port}"
    ok = health("--address", addr, "--tls-ca", certs.ca, "--server-name", "127.0.0.1")
    assert ok.returncode == 0, ok.stderr
    bad = health("--address", addr, "--tls-ca", certs.ca, "--server-name", "not-the-shard.example")
    assert bad.returncode == 2, (bad.stdout, bad.stderr)


@pytest.mark.parametrize("how", ["wrong-ca", "plaintext"])
def test_tls_shard_that_cannot_be_verified_exits_2(
    tls_shard: ShardServer, certs: Certs, how: str
) -> None:
    args = ["--tls-ca", certs.other_ca] if how == "wrong-ca" else []
    res = health("--address", tls_shard.address, *args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    assert f"{tls_shard.address}: unreachable: UNAVAILABLE" in res.stderr


def test_mtls_shard_with_a_client_certificate_exits_0(
    mtls_shard: ShardServer, certs: Certs
) -> None:
    res = health(
        "--address", mtls_shard.address, "--tls-ca", certs.ca,
        "--tls-cert", certs.client_cert, "--tls-key", certs.client_key,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{mtls_shard.address}: SERVING\n"


@pytest.mark.parametrize("cert", ["none", "other-ca"])
def test_mtls_shard_without_an_accepted_client_certificate_exits_2(
    mtls_shard: ShardServer, certs: Certs, cert: str
) -> None:
    client = [] if cert == "none" else [
        "--tls-cert", certs.other_client_cert, "--tls-key", certs.other_client_key,
    ]  # fmt: skip
    res = health("--address", mtls_shard.address, "--tls-ca", certs.ca, *client)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "UNAVAILABLE" in res.stderr


# --------------------------------------------------------------------------
# stderr: embps's own one line, no gRPC core log lines
# --------------------------------------------------------------------------

# a line of gRPC's C core log (absl format): "I1124 22:18:20.597866   22999 file.cc:2563] ..."
CORE_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ", re.MULTILINE)


@pytest.mark.parametrize("how", ["wrong-ca", "closed-port"])
def test_a_failed_check_prints_only_its_own_line(
    tls_shard: ShardServer, certs: Certs, how: str
) -> None:
    """A failed TLS handshake makes gRPC's C core log "Handshake failed" on stderr by
    itself; `embps health` turns that logging off: stderr is its own message alone."""
    if how == "wrong-ca":
        address, args = tls_shard.address, ["--tls-ca", certs.other_ca]
    else:
        address, args = f"127.0.0.1:{closed_port()}", []
    res = health("--address", address, *args)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert res.stderr == line + "\n"
    assert line.startswith(f"{address}: unreachable: UNAVAILABLE: "), line
    if how == "wrong-ca":
        assert "CERTIFICATE_VERIFY_FAILED" in line  # the reason is in embps's own line


def test_grpc_verbosity_set_by_the_user_wins(tls_shard: ShardServer, certs: Certs) -> None:
    res = health("--address", tls_shard.address, "--tls-ca", certs.other_ca, GRPC_VERBOSITY="INFO")
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert CORE_LOG_LINE.search(res.stderr), res.stderr  # gRPC logs as the user asked
    assert f"{tls_shard.address}: unreachable: UNAVAILABLE: " in res.stderr
    quiet = health("--address", tls_shard.address, "--tls-ca", certs.other_ca)
    assert not CORE_LOG_LINE.search(quiet.stderr), quiet.stderr


# --------------------------------------------------------------------------
# Bad options: exit 2 before connecting, with a message naming the option
# --------------------------------------------------------------------------


def test_bad_options_exit_2_with_a_precise_message(certs: Certs, tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("not a certificate\n")
    missing = str(tmp_path / "missing.pem")
    port = str(closed_port())
    bad = [
        (["--tls-cert", certs.client_cert], "--tls-cert needs --tls-key"),
        (["--tls-key", certs.client_key], "--tls-key needs --tls-cert"),
        (["--tls-ca", missing], f"--tls-ca: cannot read {missing}"),
        (["--tls-ca", str(not_pem)], f"--tls-ca: {not_pem} is not a PEM file"),
        (["--tls-ca", certs.ca, "--tls-cert", missing, "--tls-key", certs.client_key],
         f"--tls-cert: cannot read {missing}"),
        (["--timeout", "0"], "--timeout 0: must be more than 0 seconds"),
        (["--address", "no-port"], "--address 'no-port': expected HOST:PORT"),
    ]  # fmt: skip
    for args, why in bad:
        res = health("--address", f"127.0.0.1:{port}", *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith(f"embps health: {why}"), (args, res.stderr)
        assert "unreachable" not in res.stderr  # refused before any connection
    env = health(port=0)  # EMBPS_PORT=0 is no port either
    assert env.returncode == 2 and "EMBPS_PORT='0' is not a port number" in env.stderr


# --------------------------------------------------------------------------
# --readyz: the same status over HTTP, from the metrics port
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_shard(certs: Certs) -> Iterator[ShardServer]:
    """A mutual-TLS shard with a metrics port: gRPC refuses plaintext, /readyz does not."""
    yield from _shard(
        host="127.0.0.1", metrics_port=0, tls_cert=certs.server_cert, tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    )  # fmt: skip


def test_readyz_follows_the_health_status(metrics_shard: ShardServer) -> None:
    from grpc_health.v1 import health_pb2

    where = f"127.0.0.1:{metrics_shard.metrics_port}"
    res = health("--readyz", where)
    assert (res.returncode, res.stdout, res.stderr) == (0, f"{where}/readyz: SERVING\n", "")
    metrics_shard.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        res = health("--readyz", where)
    finally:
        metrics_shard.health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert (res.returncode, res.stdout) == (1, f"{where}/readyz: NOT_SERVING\n"), res.stderr


def test_readyz_against_the_wrong_port_or_nothing_exits_2(metrics_shard: ShardServer) -> None:
    res = health("--readyz", f"127.0.0.1:{closed_port()}")
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.splitlines()) == 1 and "ConnectionRefusedError" in res.stderr
    res = health("--readyz", metrics_shard.address)  # the gRPC (TLS) port speaks no HTTP
    assert res.returncode == 2 and res.stdout == "", res.stdout


def test_readyz_refuses_grpc_options() -> None:
    res = health("--readyz", "127.0.0.1:9091", "--tls-ca", "ca.pem", "--address", "h:1")
    assert res.returncode == 2
    assert res.stderr == "embps health: --readyz checks over HTTP: drop --address, --tls-ca\n"
    res = health("--readyz", "9091")
    assert res.returncode == 2 and "expected HOST:PORT" in res.stderr
