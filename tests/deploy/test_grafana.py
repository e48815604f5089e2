"""The Grafana dashboard: importable structure, variables, layout, and what it shows.

Its queries are checked against a live shard in test_promql.py; here the JSON
itself: schema version, a datasource variable every panel uses, job/shard/table
variables, unique ids, a layout on Grafana's 24-column grid without overlaps,
and a panel for each metric family a shard exports.
"""

from __future__ import annotations

import re
from typing import Any

from .artifacts import dashboard, dashboard_exprs, walk_panels
from .conftest import LiveMetrics

DASH = dashboard()
PANELS = walk_panels(DASH["panels"])
VARIABLES = {v["name"]: v for v in DASH["templating"]["list"]}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_schema_and_identity() -> None:
    assert DASH["schemaVersion"] >= 36
    assert DASH["uid"] and DASH["title"]
    assert "id" not in DASH or DASH["id"] is None, (
        "an exported id breaks import into other Grafanas"
    )


def test_variables() -> None:
    ds = VARIABLES["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance", "table"):
        v = VARIABLES[name]
        assert v["type"] == "query" and v["datasource"] == DATASOURCE, name
    shard = VARIABLES["instance"]
    assert shard["multi"] and shard["includeAll"] and shard["allValue"] == ".*"


def test_every_query_uses_the_datasource_variable() -> None:
    for p in PANELS:
        if p["type"] == "row":
            continue
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, p["title"]


def test_panels_filter_by_job_and_shard() -> None:
    for p in PANELS:
        for t in p.get("targets", []):
            for selector in re.findall(r"embps_\w+\{([^}]*)\}", t["expr"]):
                assert 'job="$job"' in selector and 'instance=~"$instance"' in selector, (
                    f"panel {p['title']!r}: {t['expr']}"
                )


def test_ids_unique_and_layout_without_overlaps() -> None:
    ids = [p["id"] for p in PANELS]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in PANELS:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def _exprs() -> list[str]:
    return [e.promql for e in dashboard_exprs()]


def test_required_views() -> None:
    text = "\n".join(_exprs())
    wanted = {
        "throughput": r"rate\(embps_rows_pulled_total",
        "push throughput": r"rate\(embps_rows_pushed_total",
        "requests by method": r"sum by \(method\) \(rate\(embps_requests_total",
        "p50": r"histogram_quantile\(0\.5, .*embps_request_duration_seconds_bucket",
        "p99": r"histogram_quantile\(0\.99, .*embps_request_duration_seconds_bucket",
        "errors": r'embps_requests_total\{[^}]*code!="OK"',
        "memory by part": r"sum by \(table, part\) \(embps_table_bytes",
        "promotions": r"rate\(embps_promotions_total",
        "evictions": r"rate\(embps_evictions_total",
        "checkpoint age": r"time\(\) - \(embps_checkpoint_last_success_timestamp_seconds",
    }
    missing = [k for k, pattern in wanted.items() if not re.search(pattern, text)]
    assert not missing, f"the dashboard lacks: {missing}"


def test_every_exported_metric_family_is_shown(live_metrics: LiveMetrics) -> None:
    """A metric added to server/metrics.py needs a panel (or an entry here saying why not)."""
    text = "\n".join(_exprs())
    families = {re.sub(r"_(total|created|bucket|count|sum)$", "", n) for n in live_metrics.labels}
    missing = sorted(f for f in families if not re.search(rf"\b{f}(_\w+)?\b", text))
    assert not missing, f"exported but on no panel: {missing}"


def _units(p: dict[str, Any]) -> str:
    return str(p.get("fieldConfig", {}).get("defaults", {}).get("unit", ""))


def test_panels_have_units_and_descriptions() -> None:
    for p in PANELS:
        if p["type"] in ("row", "table"):
            continue
        assert _units(p), f"panel {p['title']!r} has no unit"
        assert p.get("description"), f"panel {p['title']!r} has no description"
