"""Two shards on two "hosts": Linux network namespaces joined to this one by veth pairs,
on private addresses the test creates. One host is cut off, then comes back.

    root namespace (client)                    namespace i (shard i)
    veth <prefix>-<i>r  10.213.X.(4i+1)/30 <-> veth <prefix>-<i>n  10.213.X.(4i+2)/30

Two shapes of cut. "no-route": the root end of host 1's veth goes down, its route
with it, and an ``unreachable`` route for the test's /24 (added at setup) answers "no
route to host" at once instead of letting packets leak to the default route.
"silent-drop": a ``blackhole`` queueing discipline (tc) on that veth drops every
packet to host 1 while the link stays up, as a partition far away would. The client
keeps gRPC keepalive pings on (options below), as README "Failure modes" advises for
trainers on other hosts, so that an open connection to a silent host is found dead.

What the trainer's client sees either way: calls to shard 1 raise UnavailableError
within the deadline; a client that never connected gets UNAVAILABLE at once from "no
route" and DEADLINE_EXCEEDED from a black hole. Calls to shard 0 go on, and once the
host is reachable again pulls of shard 1 succeed with the rows intact.

Needs root and iproute2 (``ip netns``, ``ip link``, ``tc``); skipped, naming what is missing,
only where a namespace cannot be created. Every namespace, veth and route is removed
at the end, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support.cluster import Cluster, start_shard, stop_all

from embps.client import PSClient, TableConfig
from embps.client.exceptions import DeadlineExceededError, UnavailableError
from embps.protos.routing import shard_of

PORT = 50051  # each shard is alone in its namespace
TABLE = TableConfig.from_dict({"name": "emb", "dim": 4, "optimizer": {"name": "sgd", "lr": 0.5}})
# Find a dead connection within ~2 s (a ping unanswered for 1 s), reconnect fast.
CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 500),
]


# --------------------------------------------------------------------------
# Namespaces, veth pairs, routes
# --------------------------------------------------------------------------


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (in namespace ``ns``); raises with ip's stderr when check fails."""
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def tc(*args: str) -> None:
    """Run ``tc ARGS`` (iproute2's traffic control); raises with its stderr on failure."""
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def free_subnet() -> str:
    """'10.213.X' with X free of any address or route on this host (starting at pid % 250)."""
    used = ip("-4", "addr").stdout + ip("-4", "route").stdout
    for i in range(250):
        x = (os.getpid() + i) % 250
        if not re.search(rf"\b10\.213\.{x}\.", used):
            return f"10.213.{x}"
    raise RuntimeError("no free 10.213.X.0/24 subnet for the test")


@dataclass
class Hosts:
    """Namespaces ``ns[i]``, root-side veths ``veth[i]``, shard addresses ``addr[i]``."""

    ns: list[str]
    veth: list[str]
    addr: list[str]
    subnet: str

    def cut(self, i: int, silent: bool) -> None:
        if silent:  # the link stays up; every packet sent to host i is dropped
            tc("qdisc", "add", "dev", self.veth[i], "root", "blackhole")
        else:  # the link goes down and its route with it: "no route to host"
            ip("link", "set", self.veth[i], "down")

    def heal(self, i: int, silent: bool) -> None:
        if silent:
            tc("qdisc", "del", "dev", self.veth[i], "root")
        else:
            ip("link", "set", self.veth[i], "up")  # the address stayed; the route comes back


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two namespaces, each with a veth pair to this namespace; removed at the end."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"iproute2 is not installed (no `{tool}` command): cannot build the hosts")
    tag = f"eb{os.getpid()}"  # veth names: at most 15 characters
    probe = f"embps-{tag}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace (needs root): {made.stderr.strip()}")
    ip("netns", "del", probe, check=False)
    subnet = free_subnet()
    h = Hosts(ns=[], veth=[], addr=[], subnet=subnet)
    try:
        ip("route", "add", "unreachable", f"{subnet}.0/24")
        for i in range(2):
            ns, root_end, ns_end = f"embps-{tag}-{i}", f"{tag}-{i}r", f"{tag}-{i}n"
            ip("netns", "add", ns)
            h.ns.append(ns)
            ip("link", "add", root_end, "type", "veth", "peer", "name", ns_end)
            h.veth.append(root_end)
            ip("link", "set", ns_end, "netns", ns)
            ip("addr", "add", f"{subnet}.{4 * i + 1}/30", "dev", root_end)
            ip("link", "set", root_end, "up")
            ip("addr", "add", f"{subnet}.{4 * i + 2}/30", "dev", ns_end, ns=ns)
            ip("link", "set", ns_end, "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
            h.addr.append(f"{subnet}.{4 * i + 2}")
        yield h
    finally:
        for v in h.veth:
            ip("link", "del", v, check=False)  # takes its peer with it
        for ns in h.ns:
            ip("netns", "del", ns, check=False)
        ip("route", "del", "unreachable", f"{subnet}.0/24", check=False)


@contextlib.contextmanager
def shards_in(hosts: Hosts, log_dir: Path) -> Iterator[list[Cluster]]:
    """Shard i of 2 in namespace i, listening on its own address; stopped at the end."""
    started: list[Cluster] = []
    try:
        for i in range(2):
            started.append(start_shard(i, 2, "--no-checkpoint-on-exit", host=hosts.addr[i],
                                       port=PORT, log_dir=log_dir,
                                       prefix=["ip", "netns", "exec", hosts.ns[i]]))  # fmt: skip
        yield started
    finally:
        stop_all(started)


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------


@pytest.mark.parametrize("silent", [False, True], ids=["no-route", "silent-drop"])
def test_cut_off_host_is_unavailable_then_recovers(
    hosts: Hosts, tmp_path: Path, silent: bool
) -> None:
    keys = np.arange(0, 300, dtype=np.int64)
    owner = shard_of(keys, 2)
    mine, other = keys[owner == 1], keys[owner == 0]
    with shards_in(hosts, tmp_path) as shards:
        addresses = [c.shards[0].address for c in shards]
        assert addresses == [f"{a}:{PORT}" for a in hosts.addr]
        with PSClient(addresses, timeout=5.0, retry_deadline=2.0,
                      grpc_options=CLIENT_OPTIONS) as ps:  # fmt: skip
            ps.create_table(TABLE)
            rows = ps.pull(TABLE.name, keys)
            ps.push(TABLE.name, keys, np.ones_like(rows))
            before = ps.pull(TABLE.name, keys, train=False)
            np.testing.assert_array_equal(before, rows - np.float32(0.5))

            hosts.cut(1, silent)
            t0 = time.monotonic()
            with pytest.raises((UnavailableError, DeadlineExceededError)) as first:
                ps.pull(TABLE.name, mine, train=False)
            # The open connection fails (no route), or keepalive finds it dead (silent
            # drop) before the 5 s deadline; a call caught on it would end at its deadline.
            assert first.value.shard == 1 and time.monotonic() - t0 < 5.0 + 2.0 + 5.0
            t0 = time.monotonic()
            with pytest.raises(UnavailableError) as info:
                ps.pull(TABLE.name, mine, train=False)
            assert time.monotonic() - t0 < 2.0 + 5.0  # retry_deadline, then the error
            assert info.value.shard == 1 and info.value.address == addresses[1]
            # A client that never connected: no route fails at once (UNAVAILABLE); a
            # black hole never answers its connection attempt (DEADLINE_EXCEEDED).
            with PSClient(addresses, timeout=3.0, retry_deadline=0.0) as fresh:
                t0 = time.monotonic()
                want = DeadlineExceededError if silent else UnavailableError
                with pytest.raises(want, match=rf"shard 1 \({addresses[1]}\)"):
                    fresh.pull(TABLE.name, mine, train=False)
                assert time.monotonic() - t0 < (3.0 + 2.0 if silent else 2.0)
            # The other host still answers, reads and writes.
            np.testing.assert_array_equal(
                ps.pull(TABLE.name, other, train=False), before[owner == 0]
            )

            hosts.heal(1, silent)
            deadline = time.monotonic() + 60.0
            while True:
                try:
                    got = ps.pull(TABLE.name, keys, train=False)
                    break
                except (UnavailableError, DeadlineExceededError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            np.testing.assert_array_equal(got, before)  # the cut changed nothing
            ps.push(TABLE.name, keys, np.ones_like(rows))
            np.testing.assert_array_equal(
                ps.pull(TABLE.name, keys, train=False), before - np.float32(0.5)
            )
        assert all(c.proc.poll() is None for c in shards)  # no shard died of the cut
