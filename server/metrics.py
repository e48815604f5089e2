"""Prometheus metrics of one shard, served on its metrics port.

Request metrics are updated by the service on every call; table metrics are
read from ``Table.stats()`` at scrape time by a collector, so the data path
pays nothing for them. Names follow Prometheus conventions: ``embps_`` prefix,
base units in the name, ``_total`` for counters.

| metric | type | labels |
|---|---|---|
| embps_requests_total | counter | method, table, code |
| embps_request_duration_seconds | histogram | method, table, code |
| embps_rows_pulled_total / embps_rows_pushed_total | counter | table |
| embps_table_keys | gauge | table (keys with their own row) |
| embps_table_rows | gauge | table, part (static, dynamic) |
| embps_table_bytes | gauge | table, part (static, dynamic) |
| embps_table_max_rows | gauge | table (0 = unbounded) |
| embps_table_max_bytes | gauge | table (0 = no cap) |
| embps_capacity_refusals_total | counter | table (keys refused a row at max_rows / max_bytes) |
| embps_table_load_factor | gauge | table |
| embps_promotions_total, embps_admissions_rejected_total, embps_evictions_total, embps_pruned_rows_total | counter | table |
| embps_checkpoint_duration_seconds | histogram | kind (full, incremental) |
| embps_checkpoint_last_success_timestamp_seconds | gauge | |
| embps_checkpoint_failures_total | counter | |
| embps_restore_progress_ratio | gauge | (1 when serving) |
| embps_shard_info | gauge | shard, num_shards (always 1) |
| embps_memory_limit_bytes | gauge | (the process's cgroup memory limit; 0: none) |
| process_resident_memory_bytes, process_virtual_memory_bytes, process_cpu_seconds_total, process_open_fds, process_max_fds, process_start_time_seconds | gauge/counter | (prometheus_client's ProcessCollector, Linux) |
| python_info | gauge | implementation, major, minor, patchlevel, version |
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .tables import Table

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class TableCollector(Collector):
    """Reads every table's stats at scrape time."""

    def __init__(self, tables: Callable[[], list[Table]]) -> None:
        self._tables = tables

    def collect(self) -> Iterator[Metric]:
        keys = GaugeMetricFamily("embps_table_keys", "Keys with their own row.", labels=["table"])
        rows = GaugeMetricFamily(
            "embps_table_rows", "Rows held, by part.", labels=["table", "part"]
        )
        nbytes = GaugeMetricFamily(
            "embps_table_bytes", "Bytes held, by part.", labels=["table", "part"]
        )
        cap = GaugeMetricFamily(
            "embps_table_max_rows", "Row cap of the own rows (0: unbounded).", labels=["table"]
        )
        lf = GaugeMetricFamily(
            "embps_table_load_factor", "Hash-map keys per bucket.", labels=["table"]
        )
        cap_bytes = GaugeMetricFamily(
            "embps_table_max_bytes", "Byte cap of the table (0: none).", labels=["table"]
        )
        refused = CounterMetricFamily(
            "embps_capacity_refusals",
            "Keys refused an own row at max_rows / max_bytes (refused pulls, skipped promotions).",
            labels=["table"],
        )
        counters = {
            "pulled_rows": CounterMetricFamily(
                "embps_rows_pulled", "Keys served by pulls.", labels=["table"]
            ),
            "pushed_rows": CounterMetricFamily(
                "embps_rows_pushed", "Keys whose gradient reached a row.", labels=["table"]
            ),
            "promotions": CounterMetricFamily(
                "embps_promotions", "Keys promoted to own rows.", labels=["table"]
            ),
            "admissions_rejected": CounterMetricFamily(
                "embps_admissions_rejected",
                "Sightings below the admission threshold.",
                labels=["table"],
            ),
            "evictions": CounterMetricFamily(
                "embps_evictions", "Rows evicted (or demoted).", labels=["table"]
            ),
            "pruned_rows": CounterMetricFamily(
                "embps_pruned_rows", "Rows deleted by prune.", labels=["table"]
            ),
        }
        for t in self._tables():
            s = t.stats()
            keys.add_metric([s.name], s.keys)
            rows.add_metric([s.name, "dynamic"], s.dynamic_rows)
            rows.add_metric([s.name, "static"], s.static_rows)
            nbytes.add_metric([s.name, "dynamic"], s.dynamic_bytes)
            nbytes.add_metric([s.name, "static"], s.static_bytes)
            cap.add_metric([s.name], t.config.max_rows)
            lf.add_metric([s.name], s.load_factor)
            cap_bytes.add_metric([s.name], t.config.max_bytes)
            refused.add_metric([s.name], t.capacity_refusals)
            for field, fam in counters.items():
                fam.add_metric([s.name], getattr(s, field))
        yield from (keys, rows, nbytes, cap, lf, cap_bytes, refused, *counters.values())


_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def memory_limit_bytes() -> float:
    """The memory limit of this process's cgroup (a container's limit) in bytes; 0 when
    there is none ("max", the v1 "unlimited" value near 2**63, or no cgroup file)."""
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if not text.isdigit() or int(text) >= 1 << 60:
            return 0.0
        return float(int(text))
    return 0.0


class ShardMetrics:
    """Every metric of one shard, in its own registry."""

    def __init__(self, shard: int, num_shards: int, tables: Callable[[], list[Table]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "embps_requests", "RPCs handled.", ["method", "table", "code"], registry=r
        )
        self.latency = Histogram(
            "embps_request_duration_seconds",
            "RPC handling time.",
            ["method", "table", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.checkpoint_duration = Histogram(
            "embps_checkpoint_duration_seconds",
            "Time to write a checkpoint.",
            ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900),
            registry=r,
        )
        self.checkpoint_last_success = Gauge(
            "embps_checkpoint_last_success_timestamp_seconds",
            "Unix time of the last successful checkpoint (0: none yet).",
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "embps_checkpoint_failures", "Checkpoints that failed.", registry=r
        )
        self.restore_progress = Gauge(
            "embps_restore_progress_ratio", "Restore progress, 0..1 (1: serving).", registry=r
        )
        self.restore_progress.set(1.0)
        info = Gauge(
            "embps_shard_info",
            "This shard's id and the shard count.",
            ["shard", "num_shards"],
            registry=r,
        )
        info.labels(str(shard), str(num_shards)).set(1)
        r.register(TableCollector(tables))
        ProcessCollector(registry=r)  # resident memory, CPU seconds, open fds, start time
        PlatformCollector(registry=r)  # python_info
        limit = Gauge(
            "embps_memory_limit_bytes",
            "Memory limit of the shard's cgroup (the container's limit; 0: none).",
            registry=r,
        )
        limit.set_function(memory_limit_bytes)

    def observe(self, method: str, table: str, code: str, seconds: float) -> None:
        """Count one RPC and its latency."""
        self.requests.labels(method, table, code).inc()
        self.latency.labels(method, table, code).observe(seconds)

    def checkpoint_done(self, kind: str, seconds: float) -> None:
        """Record a successful checkpoint."""
        self.checkpoint_duration.labels(kind).observe(seconds)
        self.checkpoint_last_success.set(time.time())

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on ``port`` (0: any free port); returns the bound port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(server.server_address[1])
