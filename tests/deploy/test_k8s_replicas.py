"""The replicas component (deploy/k8s/components/replicas): renders with the base and
with overlays/dev, validates strictly, and its groups follow the right training shards.

Group i must: run `embps serve` as replica shard i of the training StatefulSet's shard
count (its args parse with the real CLI and resolve to the headless DNS name of training
shard i on its gRPC port), probe /readyz (NOT_SERVING until synced or past --max-lag),
run as the shards do (non-root, read-only root, no capabilities), and have a Service that
selects exactly its own pods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from .artifacts import (
    K8S,
    K8S_MIN_VERSION,
    container,
    env_value,
    expand_args,
    kustomize,
    only,
    require_module,
    selects,
)

COMPONENT = K8S / "components" / "replicas"
OPERATOR = K8S / "components" / "prometheus-operator"
Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def replicas_rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Docs]:
    """``base+replicas``, ``dev+replicas`` and ``dev+replicas+operator`` (with the
    prometheus-operator component too) rendered."""
    work = tmp_path_factory.mktemp("replicas-kustomize")
    out = {}
    for name, target, extra in (
        ("base+replicas", K8S / "base", []),
        ("dev+replicas", K8S / "overlays" / "dev", []),
        ("dev+replicas+operator", K8S / "overlays" / "dev", [OPERATOR]),
    ):
        d = work / name
        d.mkdir()
        rel = Path(os.path.relpath(target, d))  # kustomize refuses absolute paths
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [str(rel)],
            "components": [os.path.relpath(c, d) for c in (COMPONENT, *extra)],
        }
        (d / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        out[name] = kustomize(kubectl, d)
    return out


def groups(docs: Docs) -> list[dict[str, Any]]:
    return sorted(
        (d for d in docs if d["kind"] == "Deployment"), key=lambda d: d["metadata"]["name"]
    )


@pytest.mark.parametrize("name", ["base+replicas", "dev+replicas"])
def test_replicas_validate_strictly(replicas_rendered: dict[str, Docs], name: str) -> None:
    kv = require_module("kubernetes_validate", "kubernetes-validate")
    problems = []
    for doc in replicas_rendered[name]:
        for version in (K8S_MIN_VERSION, kv.latest_version()):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: "
                                f"{where}: {e.message}")  # fmt: skip
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["base+replicas", "dev+replicas"])
def test_one_group_per_training_shard_following_it(
    replicas_rendered: dict[str, Docs], name: str
) -> None:
    from embps.client.cli import build_parser
    from embps.server.serve import resolve_options, shard_config

    docs = replicas_rendered[name]
    sts = only(docs, "StatefulSet", "embps")
    shards = sts["spec"]["replicas"]
    headless = sts["spec"]["serviceName"]
    train_port = next(
        int(p["containerPort"]) for p in container(sts)["ports"] if p["name"] == "grpc"
    )
    deps = groups(docs)
    assert [d["metadata"]["name"] for d in deps] == [f"embps-replica-{i}" for i in range(shards)]
    for i, dep in enumerate(deps):
        c = container(dep)
        assert env_value(c, "EMBPS_SHARDS") == str(shards), "the training shard count"
        argv = expand_args(c["args"], {e["name"]: e["value"] for e in c["env"] if "value" in e})
        args = build_parser(argv).parse_args(argv)
        opts, tables = resolve_options(args)
        cfg = shard_config(opts, tables, args.shard_id)
        assert (cfg.shard_id, cfg.num_shards) == (i, shards)
        assert cfg.replica_of == f"embps-{i}.{headless}:{train_port}"
        assert cfg.max_lag > 0 and cfg.host == "0.0.0.0"
        assert dep["spec"]["replicas"] >= 2, "a group is scaled for reads"
        svc = only(docs, "Service", f"embps-replica-{i}")
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        assert selects(svc["spec"]["selector"], pod_labels)
        for other in deps:  # no Service of a group selects another group's pods
            if other is not dep:
                labels = other["spec"]["template"]["metadata"]["labels"]
                assert not selects(svc["spec"]["selector"], labels)
        ports = {p["name"]: p for p in svc["spec"]["ports"]}
        assert ports["grpc"]["targetPort"] == "grpc"
        # the training shards' Services do not select replica pods
        for train_svc in ("embps-headless", "embps-metrics"):
            sel = only(docs, "Service", train_svc)["spec"]["selector"]
            assert not selects(sel, pod_labels)


def test_replica_pods_probe_readyz_and_run_as_the_shards(
    replicas_rendered: dict[str, Docs],
) -> None:
    for dep in groups(replicas_rendered["dev+replicas"]):
        spec = dep["spec"]["template"]["spec"]
        c = container(dep)
        metrics = next(p for p in c["ports"] if p["name"] == "metrics")
        for probe in ("startupProbe", "readinessProbe"):
            http = c[probe]["httpGet"]
            assert http["path"] == "/readyz" and http["port"] in (
                "metrics",
                metrics["containerPort"],
            )
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/tmp", "/var/cache/embps/numba"} <= mounts  # the image's writable paths
        assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"]


def test_the_operator_scrapes_every_replica_pod_as_job_embps(
    replicas_rendered: dict[str, Docs],
) -> None:
    """With the prometheus-operator component, the PodMonitor selects exactly the replica
    pods (every group's, no training shard's), on their metrics port, and names the job
    "embps", the job EmbpsReplicaLagging and the dashboard read."""
    docs = replicas_rendered["dev+replicas+operator"]
    pm = only(docs, "PodMonitor", "embps-replicas")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = pm["spec"]
    assert set(spec) <= {"jobLabel", "selector", "podMetricsEndpoints", "namespaceSelector"}
    sel = spec["selector"]["matchLabels"]
    pods = [(d["metadata"]["name"], d["spec"]["template"]) for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")]  # fmt: skip
    chosen = [n for n, t in pods if selects(sel, t["metadata"]["labels"])]
    assert sorted(chosen) == [d["metadata"]["name"] for d in groups(docs)]
    assert len(chosen) == only(docs, "StatefulSet", "embps")["spec"]["replicas"]
    for dep in groups(docs):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels[spec["jobLabel"]] == "embps"
        names = {p["name"] for p in container(dep)["ports"]}
        for ep in spec["podMetricsEndpoints"]:
            assert ep["port"] in names and ep.get("path", "/metrics") == "/metrics"
    # the ServiceMonitor still scrapes only the training shards (no replica twice)
    sm_sel = only(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    svc = [d for d in docs if d["kind"] == "Service" and selects(sm_sel, d["metadata"]["labels"])]
    assert [d["metadata"]["name"] for d in svc] == ["embps-metrics"]
