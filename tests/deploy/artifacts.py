"""Loaders for the deployment artifacts under test, and the tools that check them.

Paths of the artifacts (Dockerfile, deploy/...), external tools looked up on
PATH and beside the running interpreter (a venv's bin/), kustomize rendering,
and every PromQL expression of the dashboard and the alert rules, with Grafana
variables replaced by values that a real Prometheus accepts.

A test that needs a tool calls ``require(name)``: it skips with a message
naming the tool when, and only when, the tool is not installed.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = tuple(
    sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
)
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "embps.json"
PROMETHEUS_RULE = K8S / "components" / "prometheus-operator" / "prometheusrule.yaml"

# Kubernetes versions the manifests must validate against: the oldest the base
# supports (grpc probes GA in 1.27, the pod-index label from 1.28) and the
# newest kubernetes-validate knows.
K8S_MIN_VERSION = "1.28.0"

# Where the scrape job is named so, these are the labels Prometheus (or the
# operator's Kubernetes discovery) adds to every series of a target.
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
)
# Series Prometheus itself makes for every target.
SYNTHETIC_SERIES = {"up": frozenset()}

# Grafana variables and what the checks use for them (all shards, all tables).
GRAFANA_VARS = {
    "job": "embps",
    "instance": ".*",
    "table": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """Path of an executable on PATH or beside this interpreter (venv bin/), or None."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def require(name: str) -> str:
    """Path of the tool ``name``; skips the calling test if it is not installed."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed (CI installs it; see .ci/run)")
    return path


def require_module(name: str, package: str) -> ModuleType:
    """Import ``name``; skips the calling test if the PyPI package is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"Python package {package} is not installed (pip install {package})")


def run(
    argv: list[str], cwd: Path = ROOT, timeout: float = 60, input_text: str | None = None
) -> subprocess.CompletedProcess:
    """Run a tool (stdin: ``input_text``); output captured as text; no raise on a non-zero exit."""
    return subprocess.run(
        argv, cwd=cwd, input=input_text, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------


def kustomize(kubectl: str, path: Path) -> list[dict[str, Any]]:
    """Documents rendered by ``kubectl kustomize path`` (fails the test on an error)."""
    res = run([kubectl, "kustomize", str(path)])
    assert res.returncode == 0, f"kubectl kustomize {path} failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one document of ``kind`` (and ``name``); fails if there is not exactly one."""
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Does an equality label selector (matchLabels, a Service's selector) match ``labels``?"""
    return all(labels.get(k) == v for k, v in selector.items())


def container(sts: dict[str, Any], name: str = "embps") -> dict[str, Any]:
    """The named container of a StatefulSet's pod template."""
    for c in sts["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"StatefulSet {sts['metadata']['name']} has no container {name!r}")


def env_value(c: dict[str, Any], name: str) -> Any:
    """The literal ``value`` of env var ``name`` (fails if missing or valueFrom)."""
    for e in c.get("env", []):
        if e["name"] == name:
            assert "value" in e, f"env {name} has no literal value: {e}"
            return e["value"]
    raise AssertionError(f"container {c['name']} has no env {name}")


_K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_args(args: list[str], env: dict[str, str]) -> list[str]:
    """Container args with ``$(VAR)`` expanded as the kubelet does (unknown vars stay)."""
    return [_K8S_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction argument (CMD, ENTRYPOINT, HEALTHCHECK CMD)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


# --------------------------------------------------------------------------
# PromQL of the dashboard and the rules
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    """One PromQL expression, where it comes from, and Grafana's label_values label if any."""

    where: str
    promql: str
    label: str | None = None  # label_values(<selector>, label): the label that must exist


_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)


def substitute_grafana_vars(text: str) -> str:
    """Replace $var / ${var} with GRAFANA_VARS; an unknown variable is an AssertionError."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in GRAFANA_VARS, f"unknown Grafana variable ${name} in {text!r}"
        return GRAFANA_VARS[name]

    return _GRAFANA_VAR.sub(repl, text)


def walk_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, in order."""
    out = []
    for p in panels:
        out.append(p)
        out.extend(walk_panels(p.get("panels", [])))
    return out


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_exprs() -> list[Expr]:
    """Every PromQL expression of the dashboard: panel targets and query variables."""
    dash = dashboard()
    out: list[Expr] = []
    for p in walk_panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append(Expr(f"panel {p['title']!r} target {t['refId']}", t["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = _LABEL_VALUES.match(q)
        assert m, f"variable {v['name']}: only label_values(<selector>, <label>) is checked: {q!r}"
        out.append(Expr(f"variable {v['name']}", m.group(1), label=m.group(2)))
    return [Expr(e.where, substitute_grafana_vars(e.promql), e.label) for e in out]


def rule_exprs() -> list[Expr]:
    """Every expression of deploy/prometheus/alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [
        Expr(f"rule {r.get('alert') or r.get('record')}", r["expr"])
        for g in doc["groups"]
        for r in g["rules"]
    ]


def selectors(promql_parser: ModuleType, expr: str) -> tuple[list[Any], set[str]]:
    """(vector selectors, labels named in by/without/on/ignoring/group_x) of an expression."""
    found: list[Any] = []
    grouping: set[str] = set()
    p = promql_parser

    def visit(node: Any) -> bool:
        if isinstance(node, p.VectorSelector):
            found.append(node)
        elif isinstance(node, p.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, p.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                grouping.update(node.modifier.matching.labels)
            grouping.update(node.modifier.group_labels or [])
        return True

    p.walk(p.parse(expr), visit)
    return found, grouping


def selector_name(sel: Any) -> str | None:
    """Metric name of a vector selector (``name`` or a ``__name__="..."`` matcher)."""
    if sel.name:
        return str(sel.name)
    for m in sel.matchers.matchers:
        if m.name == "__name__":
            return str(m.value)
    return None
