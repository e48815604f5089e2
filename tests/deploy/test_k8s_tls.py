"""The TLS component (deploy/k8s/components/tls): renders, validates strictly, and its probe works.

Rendered with ``kubectl kustomize`` twice: the base with the component (a
kustomization in tmp_path, pointing at both by relative path), and the prod
overlay with the component added to its ``components:`` exactly as
deploy/README.md tells an operator to. Both validate with kubernetes-validate
--strict. Then the rendered pieces run for real: a shard started with the
rendered serve flags, its Secret files written where the mounts put them (in
tmp_path), answers the rendered probes (HTTP GET of their path on their port:
/readyz on the metrics port) with 200, and with 503 while it drains, when its
gRPC health check over mutual TLS says NOT_SERVING too; `embps health` with the
pod's own certificate (the documented check for humans) works while a check
without a client certificate gets no answer.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .artifacts import (
    K8S,
    K8S_MIN_VERSION,
    container,
    env_value,
    kustomize,
    only,
    require_module,
)

COMPONENT = K8S / "components" / "tls"
TLS_SECRET, TOKEN_SECRET = "embps-tls", "embps-tokens"
TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file")
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
POD_INDEX_LABEL = "metadata.labels['apps.kubernetes.io/pod-index']"
Docs = list[dict[str, Any]]


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Docs]:
    """``base+tls`` and ``prod+tls`` rendered, and ``base`` / ``prod`` without the component."""
    work = tmp_path_factory.mktemp("tls-kustomize")
    base_tls = work / "base-tls"
    base_tls.mkdir()
    rel = Path(os.path.relpath(K8S, base_tls))  # kustomize refuses absolute resource paths
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(rel / "base")],
        "components": [str(rel / "components" / "tls")],
    }
    (base_tls / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))

    tree = work / "k8s"  # prod + the component, the way deploy/README.md says to enable it
    shutil.copytree(K8S, tree)
    kfile = tree / "overlays" / "prod" / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    k.setdefault("components", []).append("../../components/tls")
    kfile.write_text(yaml.safe_dump(k))
    return {
        "base": kustomize(kubectl, K8S / "base"),
        "base+tls": kustomize(kubectl, base_tls),
        "prod": kustomize(kubectl, K8S / "overlays" / "prod"),
        "prod+tls": kustomize(kubectl, tree / "overlays" / "prod"),
    }


def sts_of(docs: Docs) -> dict[str, Any]:
    return only(docs, "StatefulSet", "embps")


def flags(argv: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as {"--name": "value"}."""
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def mounted_file(c: dict[str, Any], spec: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that the container's mounts put at ``path``."""
    p = Path(path)
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == p.parent]
    assert mount.get("readOnly") is True, mount
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    (item,) = [i for i in secret["items"] if i["path"] == p.name]
    return secret["secretName"], item["key"]


# --------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base+tls", "prod+tls"])
def test_tls_manifests_validate_strictly(tls_rendered: dict[str, Docs], name: str) -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    problems = []
    for doc in tls_rendered[name]:
        if doc["kind"] in CRD_KINDS:
            continue  # tests/deploy/test_k8s.py checks those
        for version in (K8S_MIN_VERSION, kv.latest_version()):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {where}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["base", "prod"])
def test_component_appends_the_tls_flags_and_keeps_the_shard_command(
    tls_rendered: dict[str, Docs], name: str
) -> None:
    plain, tls = (
        container(sts_of(tls_rendered[name])),
        container(sts_of(tls_rendered[f"{name}+tls"])),
    )
    # the base's args unchanged and first (shard count, shard id from the ordinal), then TLS
    assert tls["args"][: len(plain["args"])] == plain["args"]
    added = tls["args"][len(plain["args"]) :]
    assert sorted(flags(added)) == sorted(TLS_FLAGS), added
    assert "--shard-id=$(EMBPS_SHARD_ID)" in tls["args"]
    assert "--shards=$(EMBPS_SHARDS)" in tls["args"]
    (shard_id,) = [e for e in tls["env"] if e["name"] == "EMBPS_SHARD_ID"]
    assert shard_id["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX_LABEL
    sts = sts_of(tls_rendered[f"{name}+tls"])
    assert env_value(tls, "EMBPS_SHARDS") == str(sts["spec"]["replicas"])
    # everything else of the container (resources, security context, env) is the base's
    for key in ("env", "resources", "securityContext", "livenessProbe", "ports", "image"):
        assert tls[key] == plain[key], key


def test_serve_flags_read_the_mounted_secrets(tls_rendered: dict[str, Docs]) -> None:
    sts = sts_of(tls_rendered["base+tls"])
    c, spec = container(sts), sts["spec"]["template"]["spec"]
    f = flags(c["args"])
    assert mounted_file(c, spec, f["--tls-cert"]) == (TLS_SECRET, "tls.crt")
    assert mounted_file(c, spec, f["--tls-key"]) == (TLS_SECRET, "tls.key")
    assert mounted_file(c, spec, f["--tls-client-ca"]) == (TLS_SECRET, "ca.crt")
    assert mounted_file(c, spec, f["--auth-token-file"]) == (TOKEN_SECRET, "tokens")
    # readable by the pod's group only (the shard runs as uid/gid 10001, fsGroup 10001)
    for v in spec["volumes"]:
        if "secret" in v:
            assert v["secret"]["defaultMode"] == 0o440, v
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", ["base+tls", "prod+tls"])
def test_probes_get_readyz_on_the_metrics_port(tls_rendered: dict[str, Docs], name: str) -> None:
    plain_sts, sts = sts_of(tls_rendered[name.removesuffix("+tls")]), sts_of(tls_rendered[name])
    plain, c = container(plain_sts), container(sts)
    metrics_port = next(int(p["containerPort"]) for p in c["ports"] if p["name"] == "metrics")
    assert int(flags(c["args"])["--metrics-port"]) == metrics_port
    for which in ("startupProbe", "readinessProbe"):
        probe = c[which]
        assert "grpc" not in probe, f"{which}: the kubelet's grpc probe cannot speak TLS"
        assert "exec" not in probe, f"{which}: a process per probe is what /readyz avoids"
        assert probe["httpGet"] == {"path": "/readyz", "port": "metrics"}, probe
        assert probe.get("httpGet", {}).get("scheme", "HTTP") == "HTTP"
        # the base's thresholds and budget (its grpc probes): only the mechanism differs
        for key in ("periodSeconds", "failureThreshold", "timeoutSeconds"):
            assert probe[key] == plain[which][key], (which, key)
        assert "grpc" in plain[which]  # the base keeps the kubelet's native grpc probes
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    live = c["livenessProbe"]  # unchanged: plain HTTP /metrics, not the health status
    assert live == plain["livenessProbe"] and live["httpGet"]["path"] == "/metrics"


# --------------------------------------------------------------------------
# The rendered flags and probe against a real shard
# --------------------------------------------------------------------------


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: Any, issuer: tuple[Any, Any] | None, usages: list[Any]) -> Any:
    """A certificate of ``key`` signed by ``issuer`` (cert, key), or a CA when None."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False).add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("*.embps-headless"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


def write_secret_files(root: Path, client_auth: bool) -> None:
    """What a cert-manager Certificate (CA issuer) puts in ``embps-tls``, and a token file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key = _key()
    ca = _cert("embps CA", ca_key, None, [])
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    key = _key()
    cert = _cert("embps", key, (ca, ca_key), usages)
    pem = serialization.Encoding.PEM
    tls = root / "embps-tls"
    tls.mkdir(parents=True)
    (tls / "ca.crt").write_bytes(ca.public_bytes(pem))
    (tls / "tls.crt").write_bytes(cert.public_bytes(pem))
    (tls / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (root / "embps-auth").mkdir()
    (root / "embps-auth" / "tokens").write_text("admin tok-0123456789abcdef-admin\n")


def local(path: str, root: Path) -> str:
    """A path the pod's mounts give (/etc/embps-tls/tls.crt) under ``root`` instead."""
    return str(root / Path(path).parent.name / Path(path).name)


@pytest.fixture(scope="module", params=[True, False], ids=["client-auth", "server-auth-only"])
def tls_pod(
    request: pytest.FixtureRequest,
    tls_rendered: dict[str, Docs],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, dict[str, Any], Path, bool]]:
    """(shard started with the rendered TLS flags, container, secret root, client auth usage)."""
    client_auth: bool = request.param
    root = tmp_path_factory.mktemp("secrets")
    write_secret_files(root, client_auth)
    c = container(sts_of(tls_rendered["base+tls"]))
    shard = rendered_shard(c, root)
    shard.start()
    yield shard, c, root, client_auth
    shard.stop(grace=0)


def rendered_shard(c: dict[str, Any], root: Path, **options: Any) -> Any:
    """A shard (not started) with the container's TLS flags (files under ``root``), on
    127.0.0.1 with any free gRPC and metrics ports."""
    from embps.server.service import ShardConfig, build_server

    f = {k: local(v, root) for k, v in flags(c["args"]).items() if k in TLS_FLAGS}
    return build_server(
        ShardConfig(
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            tls_cert=f["--tls-cert"],
            tls_key=f["--tls-key"],
            tls_client_ca=f["--tls-client-ca"],
            auth_token_file=f["--auth-token-file"],
            **options,
        )
    )


def http_probe(c: dict[str, Any], which: str, shard: Any) -> tuple[int, str]:
    """What the kubelet's httpGet ``which`` probe gets from ``shard``: (status, body). The
    probe's named port is resolved through the container's ports to the metrics port,
    which the test shard serves on ``shard.metrics_port`` instead of the pod's."""
    get = c[which]["httpGet"]
    (port,) = [p for p in c["ports"] if p["name"] == get["port"]]
    assert f"--metrics-port={port['containerPort']}" in c["args"], "the probe checks metrics"
    url = f"{get.get('scheme', 'HTTP').lower()}://127.0.0.1:{shard.metrics_port}{get['path']}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def embps_health(c: dict[str, Any], shard: Any, root: Path, client_cert: bool = True) -> Any:
    """`embps health` as deploy/README.md tells a human to run it in the pod: over mutual TLS
    with the pod's own certificate (the rendered serve flags), checking the name localhost."""
    f = {k: local(v, root) for k, v in flags(c["args"]).items() if k in TLS_FLAGS}
    argv = ["embps", "health", f"--address=127.0.0.1:{shard.port}", "--timeout=3",
            f"--tls-ca={f['--tls-client-ca']}", "--server-name=localhost"]  # fmt: skip
    if client_cert:
        argv += [f"--tls-cert={f['--tls-cert']}", f"--tls-key={f['--tls-key']}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBPS_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("which", ["startupProbe", "readinessProbe"])
def test_rendered_probe_passes_on_the_shard_it_checks(
    tls_pod: tuple[Any, Any, Path, bool], which: str
) -> None:
    shard, c, _, _ = tls_pod  # the certificate's usages do not matter to an HTTP probe
    assert http_probe(c, which, shard) == (200, "SERVING\n")


def test_rendered_probe_fails_while_the_shard_drains(
    tls_rendered: dict[str, Docs], tmp_path: Path
) -> None:
    """stop()'s drain delay (SIGTERM in the pod): readiness 503 while the gRPC health check
    over mutual TLS, asked at that moment, says NOT_SERVING."""
    from embps.client.health import check
    from embps.client.security import TLSConfig

    write_secret_files(tmp_path, client_auth=True)
    c = container(sts_of(tls_rendered["base+tls"]))
    shard = rendered_shard(c, tmp_path, drain_delay_seconds=4.0)
    shard.start()
    f = {k: local(v, tmp_path) for k, v in flags(c["args"]).items() if k in TLS_FLAGS}
    tls = TLSConfig(
        ca=f["--tls-client-ca"], cert=f["--tls-cert"], key=f["--tls-key"], server_name="localhost"
    )
    stopper = threading.Thread(target=shard.stop, kwargs={"grace": 0})
    try:
        assert http_probe(c, "readinessProbe", shard) == (200, "SERVING\n")
        assert check(f"127.0.0.1:{shard.port}", tls=tls) == 0  # SERVING over mutual TLS
        stopper.start()
        deadline = time.monotonic() + 3
        while http_probe(c, "readinessProbe", shard)[0] != 503:
            assert time.monotonic() < deadline, "readiness still 200 after stop()"
            time.sleep(0.02)
        assert http_probe(c, "readinessProbe", shard) == (503, "NOT_SERVING\n")
        assert check(f"127.0.0.1:{shard.port}", tls=tls) == 1  # NOT_SERVING, still answering
    finally:
        if stopper.ident is None:  # failed before stop() began
            shard.stop(grace=0)
        else:
            stopper.join(30)


def test_embps_health_with_the_pods_own_certificate(tls_pod: tuple[Any, Any, Path, bool]) -> None:
    shard, c, root, client_auth = tls_pod
    res = embps_health(c, shard, root)
    if client_auth:
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout == f"127.0.0.1:{shard.port}: SERVING\n"
    else:
        # a certificate for "server auth" only cannot serve as a client certificate:
        # deploy/README.md asks for both usages so that this check works in the pod
        assert res.returncode == 2, res.stdout + res.stderr
        assert "UNAVAILABLE" in res.stderr


def test_embps_health_without_a_client_certificate_gets_no_answer(
    tls_pod: tuple[Any, Any, Path, bool],
) -> None:
    shard, c, root, _ = tls_pod
    res = embps_health(c, shard, root, client_cert=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "UNAVAILABLE" in res.stderr
