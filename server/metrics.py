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
| embps_promotions_total, embps_admissions_rejected_total, embps_pruned_rows_total | counter | table |
| embps_evictions_total | counter | table, reason (steps_to_live, l2, capacity) |
| embps_eviction_sweep_duration_seconds | histogram | trigger (checkpoint, periodic, rpc) |
| embps_replica_lag_seconds, embps_replica_resyncs, embps_replica_max_lag_seconds | gauge | (replica shards only) |
| embps_replica_version | gauge | table (replica shards only) |
| embps_checkpoint_duration_seconds | histogram | kind (full, incremental) |
| embps_checkpoint_last_success_timestamp_seconds | gauge | |
| embps_checkpoint_failures_total | counter | |
| embps_restore_progress_ratio | gauge | (1 when serving) |
| embps_shard_info | gauge | shard, num_shards (always 1) |
| embps_memory_limit_bytes | gauge | (the process's cgroup memory limit; 0: none) |
| process_resident_memory_bytes, process_virtual_memory_bytes, process_cpu_seconds_total, process_open_fds, process_max_fds, process_start_time_seconds | gauge/counter | (prometheus_client's ProcessCollector, Linux) |
| python_info | gauge | implementation, major, minor, patchlevel, version |

The same HTTP server answers ``GET /readyz`` (for Kubernetes probes of TLS shards,
whose gRPC port the kubelet's ``grpc`` probe cannot reach): 200 ``SERVING`` when the
shard's ``grpc.health.v1`` status (service "") is SERVING, else 503 and the status name
(``NOT_SERVING`` while restoring or draining). Any other path is 404.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from embps.server.tables import Table

# The ``reason`` label of embps_evictions_total; each is a TableStats field evictions_<reason>.
EVICTION_REASONS = ("steps_to_live", "l2", "capacity")

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
            "pruned_rows": CounterMetricFamily(
                "embps_pruned_rows", "Rows deleted by prune.", labels=["table"]
            ),
        }
        evictions = CounterMetricFamily(
            "embps_evictions",
            "Rows evicted (adaptive: demoted), by reason: steps_to_live, l2 (sweeps) and "
            "capacity (lfu/lru at the row cap).",
            labels=["table", "reason"],
        )
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
            for reason in EVICTION_REASONS:
                evictions.add_metric([s.name, reason], getattr(s, f"evictions_{reason}"))
        yield from (keys, rows, nbytes, cap, lf, cap_bytes, refused, evictions,
                    *counters.values())  # fmt: skip


class _ReplicaVersions(Collector):
    """``embps_replica_version{table}``: the training version each replica table reflects."""

    def __init__(self, follower: Any) -> None:
        self._follower = follower

    def collect(self) -> Iterator[Metric]:
        fam = GaugeMetricFamily(
            "embps_replica_version", "Training version a replica's table reflects.",
            labels=["table"],
        )  # fmt: skip
        for t in self._follower.engine.tables():
            fam.add_metric([t.name], float(getattr(t, "version", 0)))
        yield fam


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
        self._httpd: list[WSGIServer] = []  # the HTTP servers ``serve`` started
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
        self.eviction_sweep_duration = Histogram(
            "embps_eviction_sweep_duration_seconds",
            "Time of one table's eviction sweep (steps_to_live, l2), by trigger.",
            ["trigger"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=r,
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

    def follow(self, follower: Any, max_lag: float) -> None:
        """A replica shard: its freshness gauges, read from ``follower`` at scrape time."""
        r = self.registry
        lag = Gauge("embps_replica_lag_seconds", "How old the state a replica serves may be "
                    "(since its oldest table's last complete feed round started).", registry=r)  # fmt: skip
        lag.set_function(follower.lag_seconds)
        resyncs = Gauge("embps_replica_resyncs", "Full resynchronisations of a replica (a "
                        "restored training shard, a lost deletion log).", registry=r)  # fmt: skip
        resyncs.set_function(lambda: follower.resyncs)
        limit = Gauge("embps_replica_max_lag_seconds", "A replica's max_lag (0: none).",
                      registry=r)  # fmt: skip
        limit.set(max_lag)
        r.register(_ReplicaVersions(follower))

    def eviction_sweep_done(self, trigger: str, seconds: float) -> None:
        """Record one table's eviction sweep (trigger: checkpoint, periodic, rpc)."""
        self.eviction_sweep_duration.labels(trigger).observe(seconds)

    def checkpoint_done(self, kind: str, seconds: float) -> None:
        """Record a successful checkpoint."""
        self.checkpoint_duration.labels(kind).observe(seconds)
        self.checkpoint_last_success.set(time.time())

    def serve(
        self, port: int, addr: str = "0.0.0.0", readiness: Callable[[], str] | None = None
    ) -> int:
        """Serve /metrics (and /readyz, given ``readiness``) on ``port`` (0: any free port)
        from a daemon thread; returns the bound port.

        readiness: the shard's health status name ("SERVING", "NOT_SERVING", ...), called
        once per /readyz request; None: /readyz is 404 like any other path.
        """
        family, host = _address_family(addr, port)

        class Server(ThreadingWSGIServer):  # prometheus_client's, with this address family
            address_family = family

        app = http_app(self.registry, readiness)
        httpd: WSGIServer = make_server(host, port, app, Server, handler_class=_QuietHandler)
        threading.Thread(target=httpd.serve_forever, name="embps-metrics-http", daemon=True).start()
        self._httpd.append(httpd)
        return int(httpd.server_address[1])

    def close(self) -> None:
        """Stop serving HTTP and release the port(s) ``serve`` bound (idempotent)."""
        while self._httpd:
            httpd = self._httpd.pop()
            httpd.shutdown()
            httpd.server_close()


# --------------------------------------------------------------------------
# The metrics port's HTTP server: /metrics, /readyz
# --------------------------------------------------------------------------
#
# One WSGI app on prometheus_client's own threading WSGI server (what its
# start_http_server runs): /metrics goes to prometheus_client's app unchanged
# (content negotiation, gzip, name[] filters, 405 for other methods), so the
# exposition stays exactly what it was. /readyz reads only the health status
# (the health servicer's own lock, no table lock), so a probe every few seconds
# costs one small HTTP request and stays answerable while a table is busy.

METRICS_PATH = "/metrics"
READYZ_PATH = "/readyz"
READY = "SERVING"  # the health status /readyz answers 200 to

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def http_app(registry: CollectorRegistry, readiness: Callable[[], str] | None = None) -> WSGIApp:
    """The metrics port's WSGI app: ``/metrics`` (prometheus_client's exposition of
    ``registry``), ``/readyz`` (200 ``SERVING\\n`` or 503 ``<status>\\n``, GET or HEAD;
    only with ``readiness``), 404 for any other path."""
    metrics = make_wsgi_app(registry)

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == METRICS_PATH:
            return metrics(environ, start_response)
        if path == READYZ_PATH and readiness is not None:
            return _readyz(environ, start_response, readiness)
        return _plain(start_response, "404 Not Found", f"no such path: use {METRICS_PATH}\n")

    return app


def _readyz(
    environ: Environ, start_response: StartResponse, readiness: Callable[[], str]
) -> Iterable[bytes]:
    method = environ.get("REQUEST_METHOD", "GET")
    if method not in ("GET", "HEAD"):
        body = f"{method} {READYZ_PATH}: use GET or HEAD\n"
        return _plain(start_response, "405 Method Not Allowed", body, allow="GET, HEAD")
    status = readiness()
    code = "200 OK" if status == READY else "503 Service Unavailable"
    return _plain(start_response, code, f"{status}\n", head=method == "HEAD")


def _plain(
    start_response: StartResponse, code: str, body: str, allow: str = "", head: bool = False
) -> list[bytes]:
    """Answer ``code`` with a plain-text ``body`` (not sent for HEAD; its length is)."""
    data = body.encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
    ]
    if allow:
        headers.append(("Allow", allow))
    start_response(code, headers)
    return [] if head else [data]


class _QuietHandler(WSGIRequestHandler):
    """Logs no request line (a probe every few seconds would fill stderr)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _address_family(addr: str, port: int) -> tuple[socket.AddressFamily, str]:
    """(family, host) to bind ``addr`` with: IPv6 for "::" and IPv6 literals (as
    prometheus_client's start_http_server picks it)."""
    infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])
