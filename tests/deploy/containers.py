"""Containers for the deploy tests: the image, built once per run, and podman to run it.

``built_image()`` runs deploy/image/build.py (what `make image` runs) once per
test session; build.py skips the build when an image of the same inputs
exists (its hash of the Dockerfile, the build context and the base). A test
that needs containers calls ``require_podman()``: it skips, naming the reason,
only where podman is missing or cannot run a container at all; a failed build
is a failure.

``Podman`` runs podman with the host settings build.py chose (CONTAINERS_CONF:
runc on cgroup v1, ulimits within the host's hard limits) and remembers every
container, pod and volume it made, under one run id, so that ``cleanup()``
removes exactly those, by name.

``statefulset_pods()`` turns a rendered StatefulSet into the Pods the
StatefulSet controller and the kubelet would run, for ``podman kube play``:

- name ``<sts>-<i>`` (prefixed with the run id for podman; the hostname is
  ``<sts>-<i>``, the subdomain the ``serviceName``), the template's labels plus
  ``apps.kubernetes.io/pod-index`` and ``statefulset.kubernetes.io/pod-name``;
- each ``volumeClaimTemplate`` a PersistentVolumeClaim ``<claim>-<sts>-<i>``,
  mounted through the template's volume name (played only when the volume does
  not exist yet: the controller never re-creates a claim);
- the ConfigMaps as they are rendered, one volume per pod and ConfigMap (as the
  kubelet projects a ConfigMap into each pod): podman 4.3's ``kube play``
  rewrites a ConfigMap's volume in place (truncate, then write) whenever a pod
  that mounts it is played, so a volume shared by the pods let a shard started
  a moment earlier read an empty config file (it then served no tables; an
  empty config file is now an error, server/serve.py).

and does, explicitly, what the kubelet does that podman 4.3 does not:

- ``$(VAR)`` in args is expanded from the container's env (literal values and
  the fieldRefs, resolved against the pod's metadata); podman passes it on
  verbatim, and the shard would get ``--shards=$(EMBPS_SHARDS)``;
- emptyDir volumes get one volume per pod (podman names the volume after the
  pod's volume name, so two pods would share one ``tmp``);
- Secret volumes are written as files (``items`` paths, ``defaultMode``, group
  = the pod's fsGroup) into a directory mounted read-only (hostPath); podman 4.3
  ignores items and defaultMode and crashes on a secret volume without
  ``optional``;
- probes are run by the test (``probe()``): podman turns only the liveness
  probe into a healthcheck, with a named port resolved to 0 and a curl the
  image does not have; grpc probes it drops;
- ``terminationGracePeriodSeconds`` is the stop timeout the tests pass to
  ``podman stop`` (podman's own is 10 s);
- ports are published on a loopback address per pod (hostIP, hostPort = the
  container port), the pod's stand-in IP: a client reaches ``embps-<i>`` at
  ``<its address>:50051``.

What it cannot check: the scheduler, the kubelet itself (probe timing and
restarts, eviction, the pod's cgroup accounting of ephemeral storage), the
headless Service's DNS (``run_client`` maps the pods' DNS names to their
loopback addresses with a hosts file in a private mount namespace), fsGroup's
chown of volumes (podman copies the image's ownership of the mount point into
a new volume instead), the seccomp profile (podman applies its default one),
PodDisruptionBudgets, the StatefulSet controller's ordering and update policy.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from .artifacts import ROOT

BUILD_SCRIPT = ROOT / "deploy" / "image" / "build.py"
DRIVER = Path(__file__).with_name("ps_driver.py")
BUILD_TIMEOUT_S = 1500.0  # a cold build: stand-in base (~1-2 min) + pip install (~1-2 min)
READY_TIMEOUT_S = 180.0  # cap on a startup probe's budget (the manifests allow 10 minutes)
CLIENT_TIMEOUT_S = 300.0
GRPC_PORT, METRICS_PORT = 50051, 9091
RUN_PREFIX = "embps-test-"  # every name a test run gives: embps-test-<pid>-<4 hex>-...
_RUN_NAME = re.compile(r"^embps-test-(\d+)-[0-9a-f]{4}-")
_K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_FIELD_LABEL = re.compile(r"^metadata\.labels\['([^']+)'\]$")


# --------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------


@functools.cache
def build_module() -> ModuleType:
    """deploy/image/build.py, imported (its .dockerignore matcher, engine settings)."""
    spec = importlib.util.spec_from_file_location("embps_image_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Image:
    """build.py's --json answer."""

    image: str
    id: str
    engine: str
    base: str
    base_kind: str
    size: int
    base_size: int
    inputs: str
    cached: bool
    seconds: float


@functools.cache
def _podman_problem() -> str | None:
    """Why containers cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (CI installs it: .ci/run)"
    env, _ = build_module().engine_env()
    res = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return f"podman cannot run here: {res.stderr.strip()[-300:]}"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def require_podman() -> None:
    """Skip the calling test, with the reason, where containers cannot run at all."""
    problem = _podman_problem()
    if problem:
        pytest.skip(problem)


@functools.cache
def built_image() -> Image:
    """The image of this tree, built (or found cached) once per test session."""
    require_podman()
    res = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--engine", "podman", "--json"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert res.returncode == 0, f"make image failed:\n{res.stderr[-6000:]}"
    return Image(**json.loads(res.stdout))


# --------------------------------------------------------------------------
# podman
# --------------------------------------------------------------------------


class Podman:
    """podman with this host's settings; remembers what it made under ``run`` for cleanup."""

    def __init__(self, tmp: Path) -> None:
        self.env, _ = build_module().engine_env()
        self.run_id = f"{RUN_PREFIX}{os.getpid()}-{random.randrange(16**4):04x}"
        self.tmp = tmp
        self.containers: list[str] = []
        self.pods: list[str] = []
        self.volumes: list[str] = []

    def name(self, what: str) -> str:
        """A name unique to this run: ``<run id>-<what>``."""
        return f"{self.run_id}-{what}"

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert res.returncode == 0, f"podman {' '.join(args)}:\n{res.stderr[-3000:]}"
        return res

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self("inspect", container).stdout)[0]

    def logs(self, container: str) -> str:
        res = self("logs", container, check=False)
        return res.stdout + res.stderr

    def exit_code(self, container: str) -> int:
        return int(self.inspect(container)["State"]["ExitCode"])

    def volume_exists(self, name: str) -> bool:
        return self("volume", "exists", name, check=False).returncode == 0

    def run_container(self, name: str, argv: list[str]) -> str:
        """``podman run -d --name name argv...``; the container's name."""
        self.containers.append(name)
        self("run", "-d", "--name", name, *argv)
        return name

    def play(self, docs: list[dict[str, Any]], pod: str, volumes: list[str]) -> None:
        """``podman kube play`` of ``docs`` (pod ``pod``, creating ``volumes``)."""
        self.pods.append(pod)
        self.volumes.extend(v for v in volumes if v not in self.volumes)
        path = self.tmp / f"{pod}.yaml"
        path.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
        self("kube", "play", str(path), timeout=180)

    def stop(self, containers: list[str], grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (as the kubelet stops a pod)."""
        self("stop", "--time", str(int(grace_s)), *containers, timeout=grace_s + 60)

    def remove_stale(self) -> None:
        """Remove what runs whose process is gone left behind (a run killed by a timeout):
        pods, containers and volumes named embps-test-<pid>-... with no process <pid>."""

        def stale(name: str) -> bool:
            m = _RUN_NAME.match(name)
            return bool(m) and not Path(f"/proc/{m.group(1)}").exists()

        for kind, fmt in (("pod", "{{.Name}}"), ("container", "{{.Names}}")):
            listed = self(kind, "ps", "--all", "--format", fmt, check=False).stdout.split()
            for name in filter(stale, listed):
                self(kind, "rm", "--force", name, check=False, timeout=120)
        listed = self("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
        for name in filter(stale, listed):
            self("volume", "rm", "--force", name, check=False)

    def cleanup(self) -> None:
        """Remove what this run made (by name), whatever state it is in."""
        for pod in self.pods:
            self("pod", "rm", "--force", pod, check=False, timeout=120)
        for c in self.containers:
            self("rm", "--force", "--time", "0", c, check=False, timeout=120)
        for v in self.volumes:
            self("volume", "rm", "--force", v, check=False)


# --------------------------------------------------------------------------
# Addresses, waits, probes
# --------------------------------------------------------------------------


def loopback_addresses(n: int, ports: tuple[int, ...] = (GRPC_PORT, METRICS_PORT)) -> list[str]:
    """n loopback addresses 127.x.y.1..n whose ``ports`` were free a moment ago."""
    for _ in range(50):
        prefix = f"127.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        addrs = [f"{prefix}.{i + 1}" for i in range(n)]
        try:
            for a in addrs:
                for p in ports:
                    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                        s.bind((a, p))
        except OSError:
            continue
        return addrs
    raise AssertionError(f"no block of {n} loopback addresses with ports {ports} free")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, repr(e)


def grpc_health(address: str, timeout: float = 3.0) -> str:
    """grpc.health.v1 status name of service "" at ``address`` (plaintext), or the error code."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as e:
            return str(e.code().name)  # type: ignore[attr-defined]
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


# --------------------------------------------------------------------------
# A StatefulSet's pods for podman kube play
# --------------------------------------------------------------------------


@dataclass
class PodPlan:
    """One pod of a StatefulSet as podman plays it, and how to reach it."""

    ordinal: int
    name: str  # Kubernetes' pod name: <sts>-<i> (also the hostname)
    podman_name: str  # the podman pod: <run>-<sts>-<i>
    address: str  # loopback address its ports are published on
    docs: list[dict[str, Any]]  # ConfigMaps + Pod
    claims: list[dict[str, Any]]  # PersistentVolumeClaims (played on first start only)
    volumes: list[str]  # podman volumes it makes (claims, ConfigMaps, emptyDirs)
    container: dict[str, Any]  # the shard container, as played (args expanded)
    grace_s: float
    dns_name: str  # <sts>-<i>.<serviceName>
    namespace: str
    env: dict[str, str] = field(default_factory=dict)  # the container's env, resolved
    container_name: str = ""  # podman's: <podman_name>-<container name> (kube play)

    def __post_init__(self) -> None:
        self.container_name = self.container_name or f"{self.podman_name}-{self.container['name']}"

    def port(self, name_or_number: str | int) -> int:
        """A probe's port: a number, or a container port's name."""
        if isinstance(name_or_number, int) or str(name_or_number).isdigit():
            return int(name_or_number)
        (p,) = [p for p in self.container["ports"] if p.get("name") == name_or_number]
        return int(p["containerPort"])


def expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` expanded from ``env`` as the kubelet does (an unknown one stays as it is)."""
    return _K8S_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _field_ref(path: str, meta: dict[str, Any]) -> str:
    """A downward-API fieldRef against the pod's metadata (the paths the manifests use)."""
    m = _FIELD_LABEL.match(path)
    if m:
        assert m.group(1) in meta["labels"], f"fieldRef {path}: the pod has no such label"
        return str(meta["labels"][m.group(1)])
    if path in ("metadata.name", "metadata.namespace"):
        return str(meta[path.split(".")[1]])
    raise AssertionError(f"fieldRef {path} is not emulated by the tests")


def _write_secret(volume: dict[str, Any], data: dict[str, bytes], target: Path, gid: int) -> None:
    """A Secret volume's files as the kubelet writes them: items, defaultMode, fsGroup."""
    secret = volume["secret"]
    mode = int(secret.get("defaultMode", 0o644))
    target.mkdir(parents=True)
    items = secret.get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        assert item["key"] in data, f"Secret {secret['secretName']} has no key {item['key']}"
        f = target / item["path"]
        f.write_bytes(data[item["key"]])
        os.chown(f, 0, gid)
        f.chmod(int(item.get("mode", mode)))
    os.chown(target, 0, gid)
    target.chmod(0o755)


def statefulset_pods(
    docs: list[dict[str, Any]],
    podman: Podman,
    group: str,
    secrets: dict[str, dict[str, bytes]] | None = None,
) -> list[PodPlan]:
    """The pods of the one StatefulSet in ``docs`` (see the module docstring); podman's
    names of its pods and volumes start with ``<run id>-<group>-``."""
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    name = sts["metadata"]["name"]
    replicas = int(sts["spec"]["replicas"])
    service = sts["spec"]["serviceName"]
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    addresses = loopback_addresses(replicas)
    plans = []
    for i in range(replicas):
        pod_name = f"{name}-{i}"
        podman_name = podman.name(f"{group}-{pod_name}")
        tpl = copy.deepcopy(sts["spec"]["template"])
        meta = tpl["metadata"]
        meta["labels"] = {
            **meta.get("labels", {}),
            "apps.kubernetes.io/pod-index": str(i),
            "statefulset.kubernetes.io/pod-name": pod_name,
        }
        meta["name"] = pod_name
        meta["namespace"] = sts["metadata"].get("namespace", "default")
        k8s_meta = copy.deepcopy(meta)  # what fieldRefs read: the pod's Kubernetes name
        meta["name"] = podman_name  # podman's pod name (unique per run); hostname below
        spec = tpl["spec"]
        spec["hostname"], spec["subdomain"] = pod_name, service
        fs_group = int(spec.get("securityContext", {}).get("fsGroup", 0))
        volumes: list[str] = []
        out_docs: list[dict[str, Any]] = []
        claims = []
        renamed: dict[str, str] = {}
        for vct in sts["spec"].get("volumeClaimTemplates", []):
            claim = podman.name(f"{group}-{vct['metadata']['name']}-{pod_name}")
            pvc = copy.deepcopy(vct)
            pvc.update(apiVersion="v1", kind="PersistentVolumeClaim")
            pvc["metadata"]["name"] = claim
            claims.append(pvc)
            volumes.append(claim)
            spec["volumes"].append(
                {"name": vct["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim}}
            )
        for v in spec["volumes"]:
            if "configMap" in v:
                cm = copy.deepcopy(config_maps[v["configMap"]["name"]])
                cm["metadata"]["name"] = v["configMap"]["name"] = podman.name(
                    f"{group}-{pod_name}-{cm['metadata']['name']}"
                )
                out_docs.append(cm)
                volumes.append(cm["metadata"]["name"])
            elif "emptyDir" in v:
                renamed[v["name"]] = podman.name(f"{group}-{pod_name}-{v['name']}")
                v["name"] = renamed[v["name"]]
                volumes.append(v["name"])
            elif "secret" in v:
                wanted = v["secret"]["secretName"]
                assert secrets and wanted in secrets, f"the test gives no Secret {wanted}"
                target = podman.tmp / "secrets" / pod_name / v["name"]
                _write_secret(v, secrets[wanted], target, fs_group)
                del v["secret"]
                v["hostPath"] = {"path": str(target), "type": "Directory"}
        plan_container: dict[str, Any] = {}
        env: dict[str, str] = {}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                m["name"] = renamed.get(m["name"], m["name"])
            env = {}
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = expand(e["value"], env)
                else:
                    env[e["name"]] = _field_ref(e["valueFrom"]["fieldRef"]["fieldPath"], k8s_meta)
            for key in ("command", "args"):
                if key in c:
                    c[key] = [expand(a, env) for a in c[key]]
            for p in c.get("ports", []):
                p["hostIP"], p["hostPort"] = addresses[i], p["containerPort"]
            plan_container, plan_env = c, env
        (shard,) = [c for c in spec["containers"] if c["name"] == plan_container["name"]]
        out_docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec})
        plans.append(
            PodPlan(
                ordinal=i,
                name=pod_name,
                podman_name=podman_name,
                address=addresses[i],
                docs=out_docs,
                claims=claims,
                volumes=volumes,
                container=shard,
                grace_s=float(spec.get("terminationGracePeriodSeconds", 30)),
                dns_name=f"{pod_name}.{service}",
                namespace=k8s_meta["namespace"],
                env=plan_env,
            )
        )
    return plans


def play(podman: Podman, plans: list[PodPlan]) -> None:
    """Start the pods (claims first where their volume does not exist yet)."""
    for p in plans:
        claims = [c for c in p.claims if not podman.volume_exists(c["metadata"]["name"])]
        podman.play([*claims, *p.docs], p.podman_name, p.volumes)


def delete_pods(podman: Podman, plans: list[PodPlan]) -> None:
    """Remove the pods and their emptyDir volumes; claims and ConfigMaps stay."""
    for p in plans:
        podman("pod", "rm", "--force", p.podman_name, timeout=120)
        for v in p.docs[-1]["spec"]["volumes"]:
            if "emptyDir" in v:
                podman("volume", "rm", "--force", v["name"], check=False)


def probe(plan: PodPlan, which: str, podman: Podman | None = None) -> tuple[bool, str]:
    """Run the container's ``which`` probe (startupProbe, readinessProbe, livenessProbe)
    once, as the kubelet would, against the pod's published ports: (passed, detail)."""
    p = plan.container[which]
    if "grpc" in p:
        status = grpc_health(f"{plan.address}:{plan.port(p['grpc']['port'])}", p["timeoutSeconds"])
        return status == "SERVING", f"grpc health {status}"
    if "httpGet" in p:
        g = p["httpGet"]
        assert g.get("scheme", "HTTP") == "HTTP", g
        url = f"http://{plan.address}:{plan.port(g['port'])}{g['path']}"
        code, body = http_get(url, p["timeoutSeconds"])
        return 200 <= code < 400, f"GET {url}: {code} {body[:60]!r}"
    if "exec" in p:
        assert podman is not None, "an exec probe needs podman"
        res = podman("exec", plan.container_name, *p["exec"]["command"], check=False)
        return res.returncode == 0, f"exec: exit {res.returncode}"
    if "tcpSocket" in p:
        try:
            socket.create_connection((plan.address, plan.port(p["tcpSocket"]["port"])), 3).close()
        except OSError as e:
            return False, repr(e)
        return True, "tcp connect"
    raise AssertionError(f"{which}: a probe kind the tests do not run: {p}")


def wait_probe(podman: Podman, plan: PodPlan, which: str, cap_s: float = READY_TIMEOUT_S) -> float:
    """Run ``which`` every half second until it passes, within its budget
    (initialDelay + period x failureThreshold, capped at ``cap_s``); seconds it took.
    Fails at once, with the log, when the container exits."""
    p = plan.container[which]
    budget = p.get("initialDelaySeconds", 0) + p["periodSeconds"] * p["failureThreshold"]
    deadline = time.monotonic() + min(budget, cap_s)
    t0 = time.monotonic()
    while True:
        state = podman.inspect(plan.container_name)["State"]
        if not state["Running"]:
            log = podman.logs(plan.container_name)
            raise AssertionError(f"{plan.name} exited ({state['ExitCode']}):\n{log}")
        ok, detail = probe(plan, which, podman)
        if ok:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            log = podman.logs(plan.container_name)
            raise AssertionError(f"{plan.name} {which} failing: {detail}\n{log}")
        time.sleep(0.5)


def wait_started(podman: Podman, plans: list[PodPlan]) -> float:
    """Wait until every pod's startupProbe passes (``wait_probe``); seconds it took."""
    t0 = time.monotonic()
    for plan in plans:
        wait_probe(podman, plan, "startupProbe")
    return time.monotonic() - t0


# --------------------------------------------------------------------------
# The client, through the pods' DNS names
# --------------------------------------------------------------------------


def run_client(
    plans: list[PodPlan], steps: list[list[Any]], tmp: Path, fqdn: bool = False, **client: Any
) -> list[Any]:
    """Run ``steps`` with a PSClient of ``<sts>-{i}.<service>:<grpc port>`` (fqdn:
    ``<sts>-{i}.<service>.<namespace>.svc.cluster.local``; tests/deploy/ps_driver.py) in
    a process whose /etc/hosts maps each pod's DNS name to its address (a private mount
    namespace: the host's /etc/hosts is untouched); the step results."""
    suffix = f".{plans[0].namespace}.svc.cluster.local" if fqdn else ""
    hosts = tmp / f"hosts-{random.randrange(16**6):06x}"
    lines = ["127.0.0.1 localhost"] + [f"{p.address} {p.dns_name}{suffix}" for p in plans]
    hosts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    sts = plans[0].name.rsplit("-", 1)[0]
    pattern = plans[0].dns_name.replace(plans[0].name, sts + "-{i}") + suffix
    port = plans[0].port("grpc")
    request = {"address": f"{pattern}:{port}", "num_shards": len(plans), "steps": steps, **client}
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    argv += [str(hosts), sys.executable, str(DRIVER)]
    env = {**os.environ, "GRPC_DNS_RESOLVER": "native", "GRPC_VERBOSITY": "ERROR"}
    res = subprocess.run(
        argv, input=json.dumps(request), capture_output=True, text=True, env=env,
        timeout=CLIENT_TIMEOUT_S,
    )  # fmt: skip
    assert res.returncode == 0, f"client failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return list(json.loads(res.stdout))
