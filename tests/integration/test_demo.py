"""`embps demo --quick` end to end: a real 2-shard PS, training, report, clean shutdown.

The demo runs once per module (``python -m embps.client.demo.job --quick --out TMP`` in
a subprocess, stdout not a TTY); the tests read what it printed and wrote.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib)")

from support.cluster import pid_alive

DEMO_TIMEOUT_S = 110.0  # --quick is budgeted at 60 s on 2 cores (numba compile included)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class DemoRun:
    rc: int
    stdout: str
    stderr: str
    out: Path
    seconds: float

    @property
    def report(self) -> str:
        return (self.out / "report.md").read_text()

    @property
    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.out / "summary.json").read_text())
        return data

    def explain(self) -> str:
        return f"exit {self.rc}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr[-4000:]}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    out = tmp_path_factory.mktemp("demo") / "report"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "embps.client.demo.job", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    return DemoRun(proc.returncode, proc.stdout, proc.stderr, out, time.monotonic() - t0)


def test_demo_exits_zero_within_budget(demo: DemoRun) -> None:
    assert demo.rc == 0, demo.explain()
    assert demo.seconds < 60.0, f"--quick took {demo.seconds:.1f}s (budget 60 s)\n{demo.explain()}"


def test_progress_is_periodic_lines_without_a_tty(demo: DemoRun) -> None:
    steps = re.findall(
        r"^train step (\d+)/(\d+): [\d.]+k samples/s, loss [\d.]+", demo.stdout, re.M
    )
    assert len(steps) >= 5, demo.explain()
    assert "\r" not in demo.stdout
    assert steps[-1][0] == steps[-1][1], "the last progress line is the last step"


def test_report_metrics_beside_optimum_and_baseline(demo: DemoRun) -> None:
    report = demo.report
    row = re.search(
        r"\| \*\*DLRM on embps \(this run\)\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|", report
    )
    opt = re.search(r"\| planted model \(the optimum\) \| ([\d.]+) \| ([\d.]+) \|", report)
    base = re.search(
        r"\| trivial baseline: the training CTR [\d.]+ \| ([\d.]+) \| ([\d.]+) \|", report
    )
    assert row and opt and base, report
    auc, ll = float(row[1]), float(row[2])
    opt_auc, opt_ll = float(opt[1]), float(opt[2])
    assert auc > 0.55, f"the model did not learn: AUC {auc}"
    assert auc <= opt_auc + 0.01 and ll >= opt_ll - 0.01, "beat the Bayes optimum?"
    assert ll < float(base[2]), "log loss not better than predicting the base CTR"
    assert float(base[1]) == 0.5
    m = demo.summary["metrics"]
    assert m["model"]["auc"] == pytest.approx(auc, abs=1e-4)
    assert m["optimum"]["logloss"] == pytest.approx(opt_ll, abs=1e-4)
    # the same numbers on stdout
    assert re.search(rf"held-out AUC\s+{auc:.4f}\s+optimum {opt_auc:.4f}", demo.stdout)
    assert re.search(rf"held-out logloss\s+{ll:.4f}\s+optimum {opt_ll:.4f}", demo.stdout)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", f"{path.name} is truncated"
    return width, height


@pytest.mark.parametrize("name", ["loss.png", "memory.png"])
def test_plots_are_valid_pngs(demo: DemoRun, name: str) -> None:
    path = demo.out / name
    assert path.exists(), demo.explain()
    assert path.stat().st_size > 20_000, f"{name} is suspiciously small"
    width, height = _png_size(path)
    assert width >= 600 and height >= 300
    assert f"]({name})" in demo.report


def test_memory_per_table(demo: DemoRun) -> None:
    memory = demo.summary["memory"]
    assert sorted(memory) == [f"field_{f}" for f in range(8)]
    for name, t in memory.items():
        assert t["static_rows"] > 0 and t["keys"] > 0, (name, t)
        assert t["bytes"] >= t["static_bytes"] + t["dynamic_bytes"] > 0
        assert t["promotions"] >= t["keys"]  # every own row was a promotion (no eviction)
        row = re.search(
            rf"^\| {name} \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) MB", demo.report, re.M
        )
        assert row, f"no memory row for {name}"
        assert int(row[1].replace(",", "")) == t["static_rows"]
        assert int(row[2].replace(",", "")) == t["keys"]
    assert re.search(r"^\| \*\*all\*\* .*\*\*[\d.]+ MB\*\*", demo.report, re.M)
    assert "memory field_0:" in demo.stdout


def test_checkpoint_reported(demo: DemoRun) -> None:
    ckpt = demo.summary["checkpoint"]
    if isinstance(ckpt, str):  # a server without --checkpoint-dir
        assert ckpt.startswith("not available")
        assert "checkpoint: not available" in demo.report
        return
    steps = demo.summary["steps"]
    assert [c["shard_id"] for c in ckpt] == [0, 1]
    for c in ckpt:
        assert c["step"] == steps
        assert Path(c["path"]).is_dir()
        assert Path(c["path"]).parent == demo.out / "checkpoints" / str(steps)
    assert f"checkpoint: step {steps} -> " in demo.stdout


def test_ps_stopped_cleanly(demo: DemoRun) -> None:
    s = demo.summary
    assert s["ps_exit_code"] == 0 and s["shards_left"] == []
    pids = s["ps_pids"]
    assert len(pids) == 3 and all(p > 0 for p in pids)
    assert not [p for p in pids if pid_alive(p)], "PS processes outlived the demo"
    assert "ps: stopped (SIGTERM), exit code 0" in demo.stdout
    assert (demo.out / "serve.log").exists()
