"""Test helpers: free ports and real `embps serve` clusters (processes), with bounded waits.

Every process a helper starts is stopped by its caller (``Cluster.stop`` /
``kill_all``: SIGTERM, then SIGKILL by pid). The fixtures in tests/conftest.py
and the module-scoped fixtures of the integration tests build on these.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY_RE = re.compile(
    r"shard (\d+)/(\d+) listening on (\S+):(\d+), metrics on :(\d+) \(pid (\d+)\)$"
)
START_TIMEOUT_S = 150.0  # shard processes import numba and load cached kernels: slow on 2 cores
STOP_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(n: int, tries: int = 50) -> int:
    """First port P of n consecutive ports P..P+n-1 that were all free a moment ago."""
    for _ in range(tries):
        p = free_port()
        if p + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


# --------------------------------------------------------------------------
# `embps serve` clusters (real processes)
# --------------------------------------------------------------------------


@dataclass
class Shard:
    shard_id: int
    num_shards: int
    address: str
    metrics_port: int
    pid: int


@dataclass
class Cluster:
    """A running `embps serve` supervisor and its shards (from their readiness lines)."""

    proc: subprocess.Popen[str]
    log_path: Path
    shards: list[Shard] = field(default_factory=list)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.shards]

    def log(self) -> str:
        """Everything the supervisor and shards wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """The supervisor's exit code (fails the test if it does not exit in time)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"embps serve did not exit within {timeout}s; log:\n{self.log()}")

    def stop(self) -> int:
        """SIGTERM and wait; then make sure no shard outlives the test."""
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=STOP_TIMEOUT_S)
        finally:
            self.kill_all()
        return rc

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every shard still alive (by pid; only ours)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        for s in self.shards:
            if pid_alive(s.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(
    pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll ``pred()`` until true and return the seconds it took; fail the test after
    ``timeout`` seconds (every test's one polling loop: processes, pods, replicas)."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def launch(
    args: list[str], log_dir: str | Path | None = None, prefix: Sequence[str] = ()
) -> Cluster:
    """Start `embps serve ARGS` (python -m embps.client.cli) without waiting for readiness.

    prefix: a command that runs it, e.g. ``["ip", "netns", "exec", NS]`` (it must exec
    the server, so that the pid stays the server's).
    """
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="embps-test-"))
    log_path = log_dir / f"serve-{time.monotonic_ns()}.log"
    cmd = [*prefix, sys.executable, "-m", "embps.client.cli", "serve", *args]
    log_file = open(log_path, "w")  # noqa: SIM115 - handed to the child, closed below
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, bufsize=1,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    log_file.close()
    cluster = Cluster(proc=proc, log_path=log_path)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            cluster.lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return cluster


def _dump_stacks(cluster: Cluster) -> None:
    """Ask every shard still alive to write its threads' stacks into the log (SIGUSR1)."""
    m = re.search(r"started \d+ shards: pids \[([\d, ]+)\]", cluster.log())
    for pid in [int(p) for p in m.group(1).split(",")] if m else []:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)


def wait_ready(
    cluster: Cluster, n: int, timeout: float = START_TIMEOUT_S, ids: Sequence[int] | None = None
) -> Cluster:
    """Read readiness lines until n shards (or exactly the shards ``ids``) are listening;
    fail with the log otherwise."""
    want = list(range(n)) if ids is None else list(ids)
    deadline = time.monotonic() + timeout
    found: dict[int, Shard] = {}
    stdout: list[str] = []

    def take(line: str) -> None:
        m = READY_RE.search(line)
        if m:
            sid, num, host, port, mport, pid = m.groups()
            found[int(sid)] = Shard(int(sid), int(num), f"{host}:{port}", int(mport), int(pid))

    while not all(i in found for i in want):
        left = deadline - time.monotonic()
        try:
            line = cluster.lines.get(timeout=max(0.01, min(left, 0.5)))
        except queue.Empty:
            # The shards log the readiness line too: read it from the log as well, so a
            # stdout line that never reached the pipe reader cannot stall a start.
            for log_line in cluster.log().splitlines():
                if "listening on" in log_line:
                    take(log_line)
            if all(i in found for i in want):
                break
            if cluster.proc.poll() is not None or left <= 0:
                _dump_stacks(cluster)
                cluster.kill_all()
                pytest.fail(
                    f"embps serve: {len(found)} of {n} shards ready "
                    f"(exit code {cluster.proc.poll()}); stdout lines: {stdout!r}; "
                    f"log:\n{cluster.log()}"
                )
            continue
        stdout.append(line)
        take(line)
    cluster.shards = [found[i] for i in want]
    return cluster


def start_cluster(n: int, *extra: str, log_dir: str | Path | None = None) -> Cluster:
    """`embps serve --shards n` on 127.0.0.1, any free ports; returns once every shard listens."""
    args = ["--shards", str(n), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
    return wait_ready(launch([*args, *extra], log_dir), n)


def stop_all(clusters: Sequence[Cluster]) -> None:
    """SIGTERM every cluster at once, wait for each, then kill whatever is left."""
    for c in clusters:
        c.signal(signal.SIGTERM)
    for c in clusters:
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(timeout=STOP_TIMEOUT_S)
        c.kill_all()


def start_shard(
    shard_id: int,
    num_shards: int,
    *extra: str,
    host: str = "127.0.0.1",
    port: int = 0,
    log_dir: str | Path | None = None,
    prefix: Sequence[str] = (),
) -> Cluster:
    """One shard alone, `embps serve --shard-id i --shards n` (no supervisor: the way a
    Kubernetes pod runs it, so that a test can kill and restart it by itself); returns
    once it listens. ``proc`` is the shard; ``shards`` holds its one readiness line."""
    args = ["--shard-id", str(shard_id), "--shards", str(num_shards), "--host", host,
            "--port", str(port), "--metrics-port", "0"]  # fmt: skip
    cluster = launch([*args, *extra], log_dir, prefix)
    return wait_ready(cluster, num_shards, ids=[shard_id])


@contextlib.contextmanager
def running_cluster(n: int, *extra: str) -> Iterator[Cluster]:
    """A cluster for the duration of a ``with`` block (usable from module-scoped fixtures)."""
    cluster = start_cluster(n, *extra)
    try:
        yield cluster
    finally:
        cluster.stop()
