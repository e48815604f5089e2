"""``embps serve --shards N`` on loopback as a child process: the launcher the demo, the benchmarks and the examples use (any free ports, ready lines parsed, SIGTERM on exit)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

READY_RE = re.compile(
    r"shard (\d+)/(\d+) listening on (\S+):(\d+), metrics on :(\d+) \(pid (\d+)\)$"
)
START_TIMEOUT_S = 90.0  # shard processes import numba and load (or compile) kernels
STOP_TIMEOUT_S = 30.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if this process dies (no orphaned PS)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def serve_flags() -> set[str]:
    """The long flags ``embps serve --help`` lists (feature detection; imports the server)."""
    out = subprocess.run(
        [sys.executable, "-m", "embps.client.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]+", out))


def checkpoint_setup(
    flags: set[str], client_can: bool, directory: Path
) -> tuple[Path | None, list[str], str]:
    """(checkpoint dir or None, extra ``embps serve`` flags, note for the report).

    Checkpoints need both sides: ``PSClient.checkpoint`` (client_can) and ``embps
    serve --checkpoint-dir`` (in ``flags``, from ``serve_flags()``). The exit
    checkpoint is turned off where the server has that switch: the demo checkpoints
    explicitly, once.
    """
    if not client_can or "--checkpoint-dir" not in flags:
        missing = "PSClient.checkpoint" if not client_can else "embps serve --checkpoint-dir"
        return None, [], f"not available (no {missing} in this version)"
    extra = ["--checkpoint-dir", str(directory)]
    if "--checkpoint-on-exit" in flags:
        extra.append("--no-checkpoint-on-exit")
    return directory, extra, ""


@dataclass
class ShardInfo:
    shard_id: int
    address: str
    metrics_port: int
    pid: int


class LocalPS:
    """``embps serve --shards N`` on 127.0.0.1 (any free ports), stderr into ``log_path``.

    ``start()`` returns once every shard printed its ready line (RuntimeError with
    the log's tail otherwise); ``stop()`` sends SIGTERM and returns the exit code;
    leaving the ``with`` block stops (and, past the timeout, kills) it.
    """

    def __init__(self, num_shards: int, log_path: Path, extra: list[str] | None = None) -> None:
        self.num_shards = num_shards
        self.log_path = log_path
        self.argv = [
            sys.executable, "-m", "embps.client.cli", "serve", "--shards", str(num_shards),
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *(extra or []),
        ]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None
        self.shards: list[ShardInfo] = []
        self._lines: queue.Queue[str | None] = queue.Queue()

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.shards]

    @property
    def pid(self) -> int:
        """The supervisor's pid (0 before ``start``)."""
        return self.proc.pid if self.proc is not None else 0

    def __enter__(self) -> LocalPS:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.stop()
        self.kill_all()

    def start(self, timeout: float = START_TIMEOUT_S) -> list[ShardInfo]:
        """Launch and wait for the ready lines; returns the shards in shard-id order."""
        with open(self.log_path, "w") as log:
            # its own session: a Ctrl-C reaches the demo only, which then stops the PS
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                preexec_fn=_die_with_parent, start_new_session=True,
            )  # fmt: skip
        proc = self.proc

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._lines.put(line.rstrip("\n"))
            self._lines.put(None)

        threading.Thread(target=pump, name="embps-demo-serve-stdout", daemon=True).start()
        deadline = time.monotonic() + timeout
        found: dict[int, ShardInfo] = {}
        while len(found) < self.num_shards:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.01, min(left, 0.5)))
            except queue.Empty:
                line = ""
                # shards log the readiness line too: read it there as well, so a stdout
                # line that never reached the pipe reader cannot stall the start
                for log_line in self.log_tail(10_000).splitlines():
                    m = READY_RE.search(log_line)
                    if m and _in_session(int(m.group(6)), proc.pid):
                        sid, _num, host, port, mport, pid = m.groups()
                        found[int(sid)] = ShardInfo(
                            int(sid), f"{host}:{port}", int(mport), int(pid)
                        )
                if len(found) >= self.num_shards:
                    break
            if line is None or (not line and (proc.poll() is not None or left <= 0)):
                self.kill_all()
                raise RuntimeError(
                    f"embps serve: {len(found)} of {self.num_shards} shards ready after "
                    f"{timeout - max(left, 0):.0f}s (exit code {proc.poll()}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            m = READY_RE.match(line)
            if m:
                sid, _num, host, port, mport, pid = m.groups()
                found[int(sid)] = ShardInfo(int(sid), f"{host}:{port}", int(mport), int(pid))
        self.shards = [found[i] for i in range(self.num_shards)]
        return self.shards

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM the supervisor (it stops the shards) and wait; its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive_shards(self) -> list[int]:
        """Pids of shard processes that still exist (not zombies)."""
        return [s.pid for s in self.shards if _pid_alive(s.pid)]

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every shard still alive (by pid: only ours)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        for pid in self.alive_shards():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _in_session(pid: int, leader: int) -> bool:
    """Is ``pid`` in session ``leader`` (our supervisor's: it starts one)? A log shared
    with another LocalPS carries that one's ready lines too; they are not ours."""
    try:
        return os.getsid(pid) == leader
    except (ProcessLookupError, PermissionError):
        return False


def _pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (Linux: /proc; else kill 0)."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
