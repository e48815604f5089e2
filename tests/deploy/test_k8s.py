"""Kubernetes manifests: every overlay renders, validates strictly, and starts real shards.

Rendered with ``kubectl kustomize``; built-in kinds validated with
kubernetes-validate --strict (unknown fields are errors) against the oldest
supported and the newest known Kubernetes. The Prometheus operator's custom
resources (ServiceMonitor, PodMonitor, PrometheusRule) have no schema there: their
structure is checked here against the objects they point at.
"""

from __future__ import annotations

import copy
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from .artifacts import (
    ALERTS,
    DOCKERFILE,
    K8S,
    K8S_MIN_VERSION,
    OVERLAYS,
    PROMETHEUS_RULE,
    ROOT,
    container,
    dockerfile_instructions,
    env_value,
    expand_args,
    kustomize,
    only,
    require_module,
    selects,
)

CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # monitoring.coreos.com/v1
CHECKPOINT_DIR = "/var/lib/embps/checkpoints"
POD_INDEX_LABEL = "metadata.labels['apps.kubernetes.io/pod-index']"
Docs = dict[str, list[dict[str, Any]]]


def statefulset(rendered: Docs, name: str) -> dict[str, Any]:
    return only(rendered[name], "StatefulSet", "embps")


def pod_spec(rendered: Docs, name: str) -> dict[str, Any]:
    return statefulset(rendered, name)["spec"]["template"]["spec"]


def port_of(c: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for p in c["ports"] if p["name"] == name)


# --------------------------------------------------------------------------
# Rendering and schema validation
# --------------------------------------------------------------------------


def test_the_documented_overlays_exist() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_manifests_validate_strictly(rendered: Docs, name: str) -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    versions = (K8S_MIN_VERSION, kv.latest_version())
    problems = []
    for doc in rendered[name]:
        if doc["kind"] in CRD_KINDS:
            continue  # checked below: test_service_monitor..., test_prometheus_rule...
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                what = f"{doc['kind']}/{doc['metadata']['name']}"
                problems.append(f"{what} @ {version}: {where}: {e.message}")
    assert not problems, "\n".join(problems)
    kinds = {d["kind"] for d in rendered[name]}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds


def test_strict_validation_rejects_an_unknown_field(rendered: Docs) -> None:
    """The validator would catch a typo (so a pass above means something)."""
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    sts = copy.deepcopy(statefulset(rendered, "dev"))
    container(sts)["readinesProbes"] = container(sts).pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, K8S_MIN_VERSION, strict=True)


# --------------------------------------------------------------------------
# Shard count = replicas, shard id = ordinal
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_shard_count_equals_replicas(rendered: Docs, name: str) -> None:
    sts = statefulset(rendered, name)
    assert env_value(container(sts), "EMBPS_SHARDS") == str(sts["spec"]["replicas"])


def test_changing_replicas_in_an_overlay_changes_the_shard_count(
    kubectl: str, overlay: str, tmp_path: Path
) -> None:
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    kfile = copy_root / "overlays" / overlay / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    (entry,) = [r for r in k["replicas"] if r["name"] == "embps"]
    entry["count"] += 3
    kfile.write_text(yaml.safe_dump(k))
    sts = only(kustomize(kubectl, copy_root / "overlays" / overlay), "StatefulSet", "embps")
    assert sts["spec"]["replicas"] == entry["count"]
    assert env_value(container(sts), "EMBPS_SHARDS") == str(entry["count"])


def test_shard_id_is_the_pod_ordinal(rendered: Docs, overlay: str) -> None:
    c = container(statefulset(rendered, overlay))
    (shard_id,) = [e for e in c["env"] if e["name"] == "EMBPS_SHARD_ID"]
    assert shard_id["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX_LABEL
    assert "--shard-id=$(EMBPS_SHARD_ID)" in c["args"]
    assert "--shards=$(EMBPS_SHARDS)" in c["args"]


def test_container_args_start_the_last_shard(rendered: Docs, overlay: str, tmp_path: Path) -> None:
    """The args, as the kubelet expands them, parse with the real `embps serve` and its config file."""
    from embps.client.cli import build_parser
    from embps.server.serve import resolve_options, shard_config

    docs = rendered[overlay]
    sts = statefulset(rendered, overlay)
    spec = sts["spec"]["template"]["spec"]
    c = container(sts)
    replicas = sts["spec"]["replicas"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    env["EMBPS_SHARD_ID"] = str(replicas - 1)
    argv = expand_args(c["args"], env)
    assert "$(" not in " ".join(argv), argv

    # --config points into the mounted ConfigMap: write its file where the flag says
    (config_flag,) = [a for a in argv if a.startswith("--config=")]
    config_path = Path(config_flag.split("=", 1)[1])
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    cm = only(docs, "ConfigMap", volume["configMap"]["name"])
    local = tmp_path / config_path.name
    local.write_text(cm["data"][config_path.name])
    argv = [a if a != config_flag else f"--config={local}" for a in argv]

    args = build_parser(argv).parse_args(argv)
    assert args.command == "serve" and args.shard_id == replicas - 1
    opts, tables = resolve_options(args)
    cfg = shard_config(opts, tables, args.shard_id)
    assert cfg.num_shards == replicas
    assert cfg.host == "0.0.0.0"
    assert cfg.port == port_of(c, "grpc")
    assert cfg.metrics_port == port_of(c, "metrics")
    assert cfg.tables, "the ConfigMap declares no tables"


# --------------------------------------------------------------------------
# Pods: probes, security, storage, resources
# --------------------------------------------------------------------------


def test_probes(rendered: Docs, overlay: str) -> None:
    c = container(statefulset(rendered, overlay))
    grpc_port = port_of(c, "grpc")
    ready, startup, live = c["readinessProbe"], c["startupProbe"], c["livenessProbe"]
    # readiness and startup: grpc.health.v1 of the server (SERVING), on the gRPC port
    assert ready["grpc"] == {"port": grpc_port}
    assert startup["grpc"] == {"port": grpc_port}
    # numba's first compilation (and a restore) must fit in the startup budget
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # liveness: not the health status (NOT_SERVING while draining must not restart the pod)
    assert "grpc" not in live
    assert live["httpGet"]["port"] in ("metrics", port_of(c, "metrics"))
    assert live["periodSeconds"] * live["failureThreshold"] >= 120


def test_security_context(rendered: Docs, overlay: str) -> None:
    spec = pod_spec(rendered, overlay)
    c = container(statefulset(rendered, overlay))
    pod_sc, sc = spec["securityContext"], c["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert spec["automountServiceAccountToken"] is False
    # the pod's uid is the image's USER
    (user,) = [a for w, a in dockerfile_instructions(DOCKERFILE.read_text()) if w == "USER"]
    assert str(pod_sc["runAsUser"]) == user.split(":")[0]


def test_writable_paths_are_volumes(rendered: Docs, overlay: str) -> None:
    """With a read-only root, /tmp and the numba cache are emptyDirs."""
    spec = pod_spec(rendered, overlay)
    c = container(statefulset(rendered, overlay))
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/tmp", env_value(c, "NUMBA_CACHE_DIR")):
        assert path in mounts, f"{path} is not mounted (the root filesystem is read-only)"
        assert "emptyDir" in volumes[mounts[path]["name"]], path
        assert not mounts[path].get("readOnly", False)


def test_checkpoint_volume(rendered: Docs, overlay: str) -> None:
    sts = statefulset(rendered, overlay)
    c = container(sts)
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == pvc["metadata"]["name"]]
    assert mount["mountPath"] == CHECKPOINT_DIR and not mount.get("readOnly", False)
    assert sts["spec"]["template"]["spec"]["securityContext"]["fsGroup"] > 0  # writable
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }


def test_resources_and_termination(rendered: Docs, overlay: str) -> None:
    spec = pod_spec(rendered, overlay)
    c = container(statefulset(rendered, overlay))
    res = c["resources"]
    for kind in ("cpu", "memory"):
        assert res["requests"][kind] and res["limits"][kind]
    assert res["requests"]["memory"] == res["limits"]["memory"], "memory limit = request"
    flags = dict(a.removeprefix("--").split("=", 1) for a in c["args"] if "=" in a)
    drain = float(flags["drain-delay-seconds"]) + float(flags["grace-seconds"])
    assert spec["terminationGracePeriodSeconds"] >= drain + 10


def test_statefulset_and_services(rendered: Docs, overlay: str) -> None:
    docs = rendered[overlay]
    sts = statefulset(rendered, overlay)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selects(sts["spec"]["selector"]["matchLabels"], pod_labels)
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "OnDelete"

    headless = only(docs, "Service", "embps-headless")
    assert sts["spec"]["serviceName"] == "embps-headless"  # DNS: embps-<i>.embps-headless
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert selects(headless["spec"]["selector"], pod_labels)
    (grpc,) = headless["spec"]["ports"]
    assert grpc["port"] == 50051 and grpc["targetPort"] == "grpc"

    metrics = only(docs, "Service", "embps-metrics")
    assert selects(metrics["spec"]["selector"], pod_labels)
    ann = metrics["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == port_of(container(sts), "metrics")
    assert ann["prometheus.io/path"] == "/metrics"

    pdb = only(docs, "PodDisruptionBudget", "embps")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)


def test_image_tag_is_the_project_version(rendered: Docs, overlay: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = container(statefulset(rendered, overlay))["image"]
    assert image.rsplit(":", 1)[1] == version, image


def test_prod_is_bigger_and_spread_over_nodes(rendered: Docs) -> None:
    dev, prod = statefulset(rendered, "dev"), statefulset(rendered, "prod")
    assert 1 <= dev["spec"]["replicas"] <= 2 < prod["spec"]["replicas"]
    anti = prod["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    terms = [t["podAffinityTerm"] for t in anti["preferredDuringSchedulingIgnoredDuringExecution"]]
    pod_labels = prod["spec"]["template"]["metadata"]["labels"]
    assert any(
        t["topologyKey"] == "kubernetes.io/hostname"
        and selects(t["labelSelector"]["matchLabels"], pod_labels)
        for t in terms
    )

    def gib(q: str) -> float:
        units = {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}
        return float(q[:-2]) * units[q[-2:]]

    mem = [gib(container(s)["resources"]["limits"]["memory"]) for s in (dev, prod)]
    assert mem[0] < mem[1]
    assert only(rendered["prod"], "PodDisruptionBudget")["spec"]["maxUnavailable"] == 0


# --------------------------------------------------------------------------
# Prometheus operator resources (custom resources: no schema to validate against)
# --------------------------------------------------------------------------


def operator_resources(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in CRD_KINDS]


def test_only_prod_needs_the_operator_crds(rendered: Docs) -> None:
    assert not operator_resources(rendered["base"])
    assert not operator_resources(rendered["dev"])
    assert {d["kind"] for d in operator_resources(rendered["prod"])} == CRD_KINDS


def test_service_monitor_scrapes_the_metrics_service_as_job_embps(rendered: Docs) -> None:
    docs = rendered["prod"]
    sm = only(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    spec = sm["spec"]
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}
    wanted = spec["selector"]["matchLabels"]
    services = [
        s for s in docs if s["kind"] == "Service" and selects(wanted, s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == ["embps-metrics"]
    svc = services[0]
    assert sm["metadata"].get("namespace") == svc["metadata"].get("namespace")
    # job label = the value of the Service label named by jobLabel: "embps" (alerts.yml's job)
    assert svc["metadata"]["labels"][spec["jobLabel"]] == "embps"
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert spec["endpoints"], "no endpoints"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
        assert ep["port"] in port_names
        assert ep.get("path", "/metrics") == "/metrics"


def test_prometheus_rule_carries_the_alerts_of_alerts_yml(rendered: Docs) -> None:
    rule = only(rendered["prod"], "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    alerts = yaml.safe_load(ALERTS.read_text())
    assert rule["spec"]["groups"] == alerts["groups"], (
        f"{PROMETHEUS_RULE.relative_to(ROOT)} is out of date: copy the groups of "
        f"{ALERTS.relative_to(ROOT)} into its spec.groups"
    )
