"""LocalPS (client/demo/localps.py), the loopback launcher of the demo, the benchmarks and
the examples: it reads each shard's ready line from the supervisor's stdout, and from
the log as a fallback. A log that another launcher writes too (two runs given the same
path) must not hand it that launcher's shards: it would train against them, and
``kill_all`` would kill them."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from embps.client import PSClient
from embps.client.demo.localps import LocalPS


def test_ready_lines_of_another_launcher_in_a_shared_log_are_ignored(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    other = subprocess.Popen(["sleep", "60"])  # a live process outside the launcher's session
    try:
        _start_beside_foreign_lines(log, other.pid)
        assert other.poll() is None  # the other launcher's "shard" was not killed either
    finally:
        other.kill()
        other.wait()
    assert f"(pid {other.pid})" in log.read_text()  # the foreign lines were there to misread


def _start_beside_foreign_lines(log: Path, foreign_pid: int) -> None:
    stop = threading.Event()

    def foreign_lines() -> None:  # what a second launcher's shards print into the same log
        while not stop.is_set():
            with open(log, "a") as f:
                for sid in range(2):
                    f.write(f"shard {sid}/2 listening on 127.0.0.1:{9 + sid}, metrics on :1 "
                            f"(pid {foreign_pid})\n")  # fmt: skip
            time.sleep(0.05)

    writer = threading.Thread(target=foreign_lines, daemon=True)
    with LocalPS(2, log) as local:
        writer.start()
        try:
            shards = local.start()
        finally:
            stop.set()
            writer.join()
        assert foreign_pid not in [s.pid for s in shards]
        assert all(os.getsid(s.pid) == local.pid for s in shards)  # its own shards
        with PSClient(local.addresses, timeout=10.0) as ps:
            ps.wait_ready(timeout=30.0)  # and they answer
        assert local.stop() == 0
