"""The rendered manifests, run: each overlay's StatefulSet as its pods under `podman kube play`.

``kubectl kustomize`` renders the overlay; tests/deploy/containers.py turns
its StatefulSet into the N pods the controller would make (ordinal, hostname,
pod-index label, a volume per claim, the ConfigMap mounted) and does what the
kubelet does that podman does not (``$(VAR)`` in args, Secret files, the
probes, the stop grace period): its docstring lists each, and what cannot be
checked this way (scheduler, kubelet, the headless Service's DNS, the PDB).
The pods run the image this tree builds, with the args, env, ports, probes,
volumes, resources and security context that the overlay really produces; a
PSClient reaches them through the address form clients use in Kubernetes,
``embps-{i}.embps-headless:50051`` (a hosts file maps those names to the pods'
loopback addresses).

- dev: 2 pods start (startup, readiness and liveness probes pass), run as uid
  10001 with a read-only root filesystem, no capabilities and the memory
  limit; a client creates a table, trains, checkpoints to each pod's volume;
  `podman stop` with the pod's grace period drains them. Pods re-created on
  the same volumes restore the rows (each from its own volume: a checkpoint is
  never complete in one pod's directory, server/durability/ ``is_private``).
- dev with the TLS component, its Secrets written as the kubelet would: the
  /readyz probes pass, a client with a certificate of the CA and a token
  trains over mutual TLS (the shards' certificate verified against the DNS
  names), a client without a certificate gets no answer.
- prod: 8 pods with prod's resources start and serve one training step.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .artifacts import K8S, kustomize
from .containers import (
    Image,
    Podman,
    PodPlan,
    built_image,
    delete_pods,
    play,
    probe,
    run_client,
    statefulset_pods,
    wait_started,
)

pytestmark = pytest.mark.container

UID = 10001
KEYS = list(range(0, 600, 7))
TABLE = {"name": "kube", "dim": 8, "kind": "dynamic", "optimizer": {"name": "adagrad", "lr": 0.1}}
CONFIG_TABLES = {"user_id", "item_id", "category", "user_item_cross"}  # k8s/base/embps.yaml
TOKEN = "tok-0123456789abcdef-admin"
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def image() -> Image:
    return built_image()


@pytest.fixture(scope="module")
def podman(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    p = Podman(tmp_path_factory.mktemp("kube"))
    p.remove_stale()
    try:
        yield p
    finally:
        p.cleanup()


def _memory_bytes(q: str) -> int:
    units = {"Mi": 2**20, "Gi": 2**30}
    return int(q[:-2]) * units[q[-2:]]


def check_pods(podman: Podman, plans: list[PodPlan]) -> None:
    """Probes pass; the containers run what the pod spec asks (user, root fs, caps, limits,
    env resolved by podman from the pod's labels)."""
    for plan in plans:
        for which in ("readinessProbe", "livenessProbe"):
            ok, detail = probe(plan, which, podman)
            assert ok, f"{plan.name} {which}: {detail}"
        info = podman.inspect(plan.container_name)
        host, config = info["HostConfig"], info["Config"]
        assert config["User"] == f"{UID}:{UID}", config["User"]
        assert host["ReadonlyRootfs"] is True
        assert "no-new-privileges" in host["SecurityOpt"], host["SecurityOpt"]
        assert not host["CapAdd"] and "CAP_NET_RAW" in host["CapDrop"], host["CapDrop"]
        limit = plan.container["resources"]["limits"]["memory"]
        assert host["Memory"] == _memory_bytes(limit), (host["Memory"], limit)
        env = dict(e.split("=", 1) for e in config["Env"])
        assert env["EMBPS_SHARD_ID"] == str(plan.ordinal), "podman's fieldRef differs"
        assert config["Hostname"] == plan.name
        assert f"--shard-id={plan.ordinal}" in config["Cmd"], config["Cmd"]


def train_steps() -> list[list[Any]]:
    return [
        ["wait_ready", 60],
        ["describe"],
        ["create", TABLE],
        ["pull", "kube", KEYS, True],
        ["push", "kube", KEYS, 0.5],
        ["pull", "kube", KEYS, False],
    ]


# --------------------------------------------------------------------------
# dev
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev(podman: Podman, rendered: dict[str, list[dict[str, Any]]]) -> list[PodPlan]:
    return statefulset_pods(rendered["dev"], podman, "dev")


def test_dev_overlay_pods_start_serve_checkpoint_and_drain(
    podman: Podman, dev: list[PodPlan], tmp_path: Path
) -> None:
    play(podman, dev)
    wait_started(podman, dev)
    check_pods(podman, dev)
    steps = [*train_steps(), ["checkpoint", 3]]
    _, tables, _, _, _, trained, checkpoints = run_client(dev, steps, tmp_path)
    assert {t[0] for t in tables} == CONFIG_TABLES  # the ConfigMap's, before "create"
    assert checkpoints == [
        [i, f"/var/lib/embps/checkpoints/3/shard-{i}-of-{len(dev)}", "full"]
        for i in range(len(dev))
    ]
    STATE["dev_rows"] = trained
    podman.stop([p.container_name for p in dev], max(p.grace_s for p in dev))
    for plan in dev:
        log = podman.logs(plan.container_name)
        assert podman.exit_code(plan.container_name) == 0, log
        assert "SIGTERM received, draining" in log and "exiting" in log, log


def test_dev_pods_recreated_on_their_volumes_start(podman: Podman, dev: list[PodPlan]) -> None:
    """What the StatefulSet controller does after `kubectl delete pod`: the same pods on
    the same claims (no new claim is made)."""
    assert "dev_rows" in STATE, "the previous test did not train"
    delete_pods(podman, dev)
    play(podman, dev)
    wait_started(podman, dev)
    check_pods(podman, dev)


def test_dev_pods_recreated_on_their_volumes_restore_the_rows(
    podman: Podman, dev: list[PodPlan], tmp_path: Path
) -> None:
    try:
        for plan in dev:
            log = podman.logs(plan.container_name)
            assert "no complete checkpoint" not in log, f"{plan.name} started empty:\n{log}"
        (rows,) = run_client(dev, [["pull", "kube", KEYS, False]], tmp_path)
        assert rows == STATE["dev_rows"]
    finally:
        delete_pods(podman, dev)  # the next tests need the CPUs


# --------------------------------------------------------------------------
# TLS component
# --------------------------------------------------------------------------


def write_tls_secret(root: Path, dns_names: list[str]) -> dict[str, Path]:
    """What a cert-manager Certificate with a CA issuer puts in the Secret: ca.crt,
    tls.crt (server and client auth, ``dns_names``), tls.key; their paths by key."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(cn: str, key: Any, issuer: Any, issuer_key: Any, ca: bool) -> Any:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            sans = [x509.DNSName(n) for n in dns_names]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("embps CA", ca_key, None, ca_key, True)
    pem = serialization.Encoding.PEM
    files = {
        "ca.crt": ca.public_bytes(pem),
        "tls.crt": cert("embps", key, ca, ca_key, False).public_bytes(pem),
        "tls.key": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in files}


@pytest.fixture(scope="module")
def tls_pods(
    podman: Podman, kubectl: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[PodPlan], dict[str, Path]]:
    """dev + components/tls, added the way deploy/README.md says; the Secrets' files:
    a certificate with the DNS names of deploy/README.md's cert-manager example."""
    work = tmp_path_factory.mktemp("tls-overlay")
    tree = work / "k8s"
    shutil.copytree(K8S, tree)
    kfile = tree / "overlays" / "dev" / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    k.setdefault("components", []).append("../../components/tls")
    kfile.write_text(yaml.safe_dump(k))
    docs = kustomize(kubectl, tree / "overlays" / "dev")
    ns = next(d for d in docs if d["kind"] == "StatefulSet")["metadata"]["namespace"]
    names = ["*.embps-headless", f"*.embps-headless.{ns}.svc"]
    names += [f"*.embps-headless.{ns}.svc.cluster.local", "localhost"]
    tls = write_tls_secret(work / "embps-tls", names)
    secrets = {
        "embps-tls": {key: path.read_bytes() for key, path in tls.items()},
        "embps-tokens": {"tokens": f"admin {TOKEN}\n".encode()},
    }
    return statefulset_pods(docs, podman, "tls", secrets), tls


def test_tls_component_pods_serve_mutual_tls_and_answer_their_probes(
    podman: Podman, tls_pods: tuple[list[PodPlan], Path], tmp_path: Path
) -> None:
    plans, tls = tls_pods
    for plan in plans:
        for which in ("startupProbe", "readinessProbe"):
            assert plan.container[which]["httpGet"]["path"] == "/readyz", which
    play(podman, plans)
    try:
        wait_started(podman, plans)  # GET /readyz on the metrics port
        check_pods(podman, plans)
        cert = {"ca": str(tls["ca.crt"]), "cert": str(tls["tls.crt"]), "key": str(tls["tls.key"])}
        # The namespace-qualified names: gRPC refuses to match a wildcard over a single
        # label, so `*.embps-headless` does not verify embps-0.embps-headless.
        results = run_client(plans, train_steps(), tmp_path, fqdn=True, tls=cert, token=TOKEN)
        assert {t[0] for t in results[1]} == CONFIG_TABLES
        assert results[-1] != results[3], "the push changed no row"
        fail_fast = {"timeout": 5, "retry_deadline": 5}
        describe = [["expect_error", ["describe"]]]
        (no_cert,) = run_client(
            plans, describe, tmp_path, fqdn=True, tls={"ca": cert["ca"]}, token=TOKEN, **fail_fast
        )
        assert no_cert in ("UnavailableError", "DeadlineExceededError"), no_cert
        (no_token,) = run_client(plans, describe, tmp_path, fqdn=True, tls=cert, **fail_fast)
        assert no_token == "UnauthenticatedError", no_token
        podman.stop([p.container_name for p in plans], max(p.grace_s for p in plans))
        for plan in plans:
            assert podman.exit_code(plan.container_name) == 0, podman.logs(plan.container_name)
    finally:
        delete_pods(podman, plans)


# --------------------------------------------------------------------------
# prod
# --------------------------------------------------------------------------


def test_prod_overlay_pods_start_and_serve(
    podman: Podman, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    plans = statefulset_pods(rendered["prod"], podman, "prod")
    assert len(plans) == 8
    play(podman, plans)
    try:
        wait_started(podman, plans)
        check_pods(podman, plans)
        results = run_client(plans, train_steps(), tmp_path)
        assert {t[0] for t in results[1]} == CONFIG_TABLES
        assert results[-1] != results[3], "the push changed no row"
        podman.stop([p.container_name for p in plans], max(p.grace_s for p in plans))
        for plan in plans:
            assert podman.exit_code(plan.container_name) == 0, podman.logs(plan.container_name)
    finally:
        delete_pods(podman, plans)
