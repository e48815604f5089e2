"""`embps bench checkpoint` at a tiny size: the JSON keys are there and positive, the report reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embps.client.cli import main

KEYS = (
    "write_gb_s",
    "restore_gb_s",
    "npsave_gb_s",
    "npload_gb_s",
    "write_vs_npsave",
    "restore_vs_npload",
    "snapshot_gb_s",
    "read_verify_gb_s",
    "read_verify_vs_npload",
)


def test_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r" / "ckpt.json"
    args = ["bench", "checkpoint", "--rows", "3000", "--reps", "1", "--dir", str(tmp_path)]
    assert main([*args, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in KEYS:
        assert r[key] > 0, key
    assert r["rows"] == 3000 and r["targets_total"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # the scratch directory is gone
    text = capsys.readouterr().out
    assert "np.save+fsync" in text and "np.load" in text and "targets met" in text
