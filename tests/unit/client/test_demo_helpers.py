"""The parts of `embps demo` that need no PS: table planning, progress, feature detection."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest

from embps.client import ShardStats
from embps.client.data import SyntheticCTR
from embps.client.demo.job import (
    Progress,
    add_arguments,
    config_for,
    expected_ids,
    plan_tables,
    table_memory,
)
from embps.client.demo.localps import checkpoint_setup


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_presets_and_overrides() -> None:
    quick, full = config_for(_args("--quick")), config_for(_args())
    assert quick.quick and not full.quick
    assert quick.train_samples < full.train_samples
    assert quick.max_train_seconds < full.max_train_seconds < 180
    assert quick.staleness == 1 and quick.sync_steps > 0
    custom = config_for(_args("--steps", "10", "--batch-size", "64", "--staleness", "0"))
    assert (custom.steps, custom.batch_size, custom.staleness, custom.sync_steps) == (10, 64, 0, 0)


@pytest.mark.parametrize("threshold", [1, 4])
def test_expected_ids_match_generated_data(threshold: int) -> None:
    # fresh ids: the estimate assumes runs much longer than an id's lifetime, as in the demo
    gen = SyntheticCTR(num_fields=2, vocab_sizes=(300, 20_000), zipf_exponents=(0.8, 1.1),
                       new_id_rate=0.02, new_id_lifetime=2_000, seed=5)  # fmt: skip
    n = 60_000
    sparse = gen.generate(0, n).sparse
    for f in range(2):
        _, counts = np.unique(sparse[:, f], return_counts=True)
        seen, promoted = expected_ids(gen, f, n, threshold)
        assert seen == pytest.approx(len(counts), rel=0.05)
        assert promoted == pytest.approx(int((counts >= threshold).sum()), rel=0.05)


def test_plan_tables_sizes_parts_for_the_data() -> None:
    gen = SyntheticCTR(seed=0)
    cfg = config_for(_args("--quick"))
    plans = plan_tables(gen, cfg, num_shards=2)
    assert [p.table for p in plans] == [f"field_{f}" for f in range(gen.num_fields)]
    for p in plans:
        c = p.config
        assert c.kind == "adaptive" and c.dim == cfg.dim
        assert c.promote_threshold == cfg.promote_threshold
        assert 64 <= c.hash_bucket_size <= 1 << 16 and c.hash_bucket_size % 64 == 0
        assert c.sketch_width & (c.sketch_width - 1) == 0
        assert 0 < p.expected_promoted <= p.expected_ids
    big, small = plans[0], plans[7]  # vocabularies 10^7 and 100
    assert big.config.hash_bucket_size > small.config.hash_bucket_size
    assert big.config.sketch_width > small.config.sketch_width


def test_checkpoint_setup_detects_both_sides(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    flags = {"--shards", "--checkpoint-dir", "--checkpoint-on-exit"}
    assert checkpoint_setup(flags, True, d) == (
        d,
        ["--checkpoint-dir", str(d), "--no-checkpoint-on-exit"],
        "",
    )
    assert checkpoint_setup({"--checkpoint-dir"}, True, d)[1] == ["--checkpoint-dir", str(d)]
    none, extra, note = checkpoint_setup({"--shards"}, True, d)
    assert none is None and extra == [] and note.startswith("not available")
    assert "PSClient.checkpoint" in checkpoint_setup(flags, False, d)[2]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_without_a_tty() -> None:
    out = io.StringIO()
    p = Progress(20, out, lines=4)
    for step in range(1, 21):
        p.update(step, 12_345.0, 0.5)
    lines = out.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines] == [f"train step {s}/20" for s in (5, 10, 15, 20)]
    assert "12.3k samples/s, loss 0.5000" in lines[0]


def test_progress_redraws_in_place_on_a_tty() -> None:
    out = _Tty()
    p = Progress(3, out)
    for step in (1, 2, 3):
        p.update(step, 1000.0, 0.25)
    text = out.getvalue()
    assert text.startswith("\rtrain [") and text.endswith("\n") and text.count("\n") == 1
    assert "3/3" in text


class _FakePS:
    def stats(self) -> list[ShardStats]:
        t = {"keys": 3, "static_rows": 10, "bytes": 100, "promotions": 3}
        return [ShardStats(i, 2, f"s{i}", {"b": dict(t), "a": dict(t)}) for i in range(2)]


def test_table_memory_sums_shards() -> None:
    mem = table_memory(_FakePS())
    assert list(mem) == ["a", "b"]
    assert mem["a"]["keys"] == 6 and mem["a"]["static_rows"] == 20 and mem["a"]["bytes"] == 200
    assert mem["a"]["evictions"] == 0
