"""Shared fixtures: real `embps serve` clusters and in-process shards, stopped at the end.

Helpers (free ports, readiness parsing, bounded waits) live in
tests/support/cluster.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cluster import Cluster, launch, start_cluster, stop_all


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[object]:
    """``factory(n, *args)`` -> Cluster; every cluster is stopped (and killed) at the end.

    n: `embps serve --shards n` on 127.0.0.1 with any free ports plus ``args``,
    returned once all n shards listen. n=None: `embps serve ARGS` exactly as
    given, returned at once (read ``lines`` or ``wait()`` for the exit code).
    """
    started: list[Cluster] = []

    def factory(n: int | None, *args: str) -> Cluster:
        c = launch(list(args), tmp_path) if n is None else start_cluster(n, *args, log_dir=tmp_path)
        started.append(c)
        return c

    yield factory
    stop_all(started)


# --------------------------------------------------------------------------
# In-process shards (build_server on port 0)
# --------------------------------------------------------------------------


@pytest.fixture
def inproc_factory() -> Iterator[object]:
    """``factory(num_shards, **ShardConfig options)`` -> list of started ShardServer."""
    from embps.server.service import ShardConfig, build_server

    started = []

    def factory(num_shards: int = 1, **options: object) -> list[object]:
        options.setdefault("port", 0)
        shards = [
            build_server(ShardConfig(shard_id=i, num_shards=num_shards, **options))
            for i in range(num_shards)
        ]
        for s in shards:
            s.start()
        started.extend(shards)
        return shards

    yield factory
    for s in started:
        s.stop(grace=0)
