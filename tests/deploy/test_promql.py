"""Alert rules and dashboard queries against what a shard really exports.

* promtool checks and unit-tests deploy/prometheus/alerts.yml;
* every PromQL expression (alert rules, dashboard panels and variables) parses
  (promtool, each written as a recording rule);
* every metric an expression names is in a live scrape of a real shard's
  ``ShardMetrics``, with the labels it matches on or groups by; promtool lints
  that scrape;
* a real Prometheus scraping the shard evaluates every rule without error and
  returns data for every dashboard query.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from .artifacts import (
    ALERTS,
    ALERTS_TEST,
    SYNTHETIC_SERIES,
    TARGET_LABELS,
    Expr,
    dashboard_exprs,
    require,
    require_module,
    rule_exprs,
    run,
    selector_name,
    selectors,
)
from .conftest import LiveMetrics, Prometheus

ALL_EXPRS = rule_exprs() + dashboard_exprs()
DATA_WAIT_S = 20.0


# --------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    promtool = require("promtool")
    res = run([promtool, "check", "rules", str(ALERTS)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_fire_and_hold_every_alert() -> None:
    promtool = require("promtool")
    res = run([promtool, "test", "rules", str(ALERTS_TEST)])
    assert res.returncode == 0, res.stdout + res.stderr
    # every alert has a case where it fires and one where it does not
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for name in (e.where.removeprefix("rule ") for e in rule_exprs()):
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"no test where {name} fires"
        assert any(not c["exp_alerts"] for c in mine), f"no test where {name} stays quiet"


def test_every_expression_parses(tmp_path: Path) -> None:
    promtool = require("promtool")
    rules = [{"record": f"check:expr_{i}", "expr": e.promql} for i, e in enumerate(ALL_EXPRS)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    res = run([promtool, "check", "rules", str(path)])
    if res.returncode != 0:
        where = "\n".join(f"  expr_{i}: {e.where}: {e.promql}" for i, e in enumerate(ALL_EXPRS))
        pytest.fail(f"promtool rejects an expression:\n{res.stdout}{res.stderr}\n{where}")
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout


def test_live_scrape_passes_promtool_check_metrics(live_metrics: LiveMetrics) -> None:
    promtool = require("promtool")
    res = run([promtool, "check", "metrics"], input_text=live_metrics.text)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


# --------------------------------------------------------------------------
# Names and labels against a live scrape
# --------------------------------------------------------------------------


@pytest.mark.parametrize("expr", ALL_EXPRS, ids=lambda e: e.where)
def test_expression_names_exported_metrics_and_labels(
    live_metrics: LiveMetrics, expr: Expr
) -> None:
    pp = require_module("promql_parser", "promql-parser")
    exported = {**{n: set(ls) for n, ls in live_metrics.labels.items()}, **SYNTHETIC_SERIES}
    found, grouping = selectors(pp, expr.promql)
    assert found, f"{expr.where}: names no metric"
    known_labels = set(TARGET_LABELS)
    for sel in found:
        name = selector_name(sel)
        assert name in exported, (
            f"{expr.where}: {name!r} is not exported by a shard; exported: {sorted(exported)}"
        )
        labels = exported[name] | TARGET_LABELS
        known_labels |= labels
        for m in sel.matchers.matchers:
            assert m.name == "__name__" or m.name in labels, (
                f"{expr.where}: {name} has no label {m.name!r} (it has {sorted(labels)})"
            )
    unknown = grouping - known_labels
    assert not unknown, f"{expr.where}: groups by labels no selected metric has: {sorted(unknown)}"
    if expr.label is not None:
        assert expr.label in known_labels, f"{expr.where}: label_values of unknown {expr.label!r}"


# --------------------------------------------------------------------------
# A real Prometheus
# --------------------------------------------------------------------------


def test_alert_rules_evaluate_on_a_live_prometheus(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + DATA_WAIT_S
    while True:
        res = prometheus.get("/api/v1/rules")
        rules = [r for g in res["data"]["groups"] for r in g["rules"]]
        evaluated = rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules)
        if evaluated or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(rules) == len(rule_exprs())
    bad = [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules]
    bad = [b for b, r in zip(bad, rules, strict=True) if r["health"] != "ok"]
    assert not bad, "\n".join(bad)


def test_dashboard_queries_return_data_from_a_live_prometheus(prometheus: Prometheus) -> None:
    """Every panel and variable query evaluates and returns series for a live shard."""
    pending = {e.where: e.promql for e in dashboard_exprs()}
    errors: dict[str, str] = {}
    deadline = time.monotonic() + DATA_WAIT_S
    while pending and time.monotonic() < deadline:
        for where, promql in list(pending.items()):
            res = prometheus.query(promql)
            if res["status"] != "success":
                errors[where] = f"{promql}\n    {res.get('errorType')}: {res.get('error')}"
                del pending[where]
            elif res["data"]["result"]:
                del pending[where]
        if pending:
            time.sleep(0.5)
    rejected = "\n".join(f"  {w}: {e}" for w, e in errors.items())
    assert not errors, f"queries Prometheus rejects:\n{rejected}"
    empty = "\n".join(f"  {w}: {q}" for w, q in pending.items())
    assert not pending, f"queries without data:\n{empty}"
