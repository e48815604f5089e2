"""`embps bench engine` at a tiny size: every JSON key is there and positive, the report reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embps.client.bench import engine as be
from embps.client.cli import main
from embps.server.kernels import hashmap as hm

pytest.importorskip("pandas")

REQUIRED = (
    # throughput (M keys/s, M rows/s) and memory
    "lookup_mkeys_s",
    "khash_lookup_mkeys_s",
    "typed_dict_lookup_mkeys_s",
    "pydict_lookup_mkeys_s",
    "lookup_zipf_mkeys_s",
    "khash_lookup_zipf_mkeys_s",
    "typed_dict_lookup_zipf_mkeys_s",
    "pydict_lookup_zipf_mkeys_s",
    "insert_mkeys_s",
    "khash_insert_mkeys_s",
    "insert_nohint_mkeys_s",
    "khash_insert_nohint_mkeys_s",
    "gather_mrows_s",
    "dense_gather_mrows_s",
    "gather_zipf_mrows_s",
    "dense_gather_zipf_mrows_s",
    "bytes_per_key",
    # ratios
    "lookup_vs_khash",
    "lookup_vs_typed_dict",
    "insert_vs_khash",
    "gather_vs_dense",
    "bytes_per_key_vs_raw",
    # configuration
    "keys",
    "batch",
    "zipf_a",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], str]:
    path = tmp_path_factory.mktemp("bench") / "engine.json"
    rc = main(
        ["bench", "engine", "--keys", "3000", "--batch", "1000", "--reps", "1", "--json", str(path)]
    )
    assert rc == 0
    return json.loads(path.read_text()), str(path)


def test_json_has_every_required_key_with_a_positive_number(tiny_run) -> None:
    r, _ = tiny_run
    for key in REQUIRED:
        assert key in r, key
        v = r[key]
        assert isinstance(v, int | float) and not isinstance(v, bool), (key, v)
        assert math.isfinite(v) and v > 0, (key, v)
    assert r["quick"] is False
    assert (r["keys"], r["batch"], r["zipf_a"]) == (3000, 1000, 1.1)
    assert 0 <= r["targets_met"] <= r["targets_total"] == len(be.TARGETS)


def test_bytes_per_key_counts_values_slots_and_index(tiny_run) -> None:
    r, _ = tiny_run
    # at least the raw payload (key + values + Adagrad slot) plus a 16-byte bucket
    assert r["bytes_per_key"] > be.RAW_BYTES_PER_KEY + 16
    assert r["bytes_per_key_vs_raw"] == pytest.approx(r["bytes_per_key"] / 264)


def test_report_shows_each_target_and_the_count(tiny_run) -> None:
    r, _ = tiny_run
    text = be.report(r)
    for t in be.TARGETS:
        assert t.text() in text
    assert f"targets met: {r['targets_met']} of {len(be.TARGETS)}" in text
    assert "khash" in text and "typed.Dict" in text and "np.take" in text


def test_keys_are_distinct_spread_and_never_the_sentinel() -> None:
    keys = be.make_keys(100_000, seed=7)
    assert keys.dtype == np.int64 and keys.shape == (100_000,)
    assert np.unique(keys).shape[0] == keys.shape[0]
    assert not (keys == hm.EMPTY).any()
    assert (keys < 0).mean() == pytest.approx(0.5, abs=0.01)  # the whole int64 range
    assert np.array_equal(keys, be.make_keys(100_000, seed=7))


def test_zipf_ranks_are_truncated_not_clipped() -> None:
    rng = np.random.default_rng(3)
    ranks = be.zipf_ranks(1000, 200_000, 1.1, rng)
    assert ranks.min() >= 0 and ranks.max() <= 999
    counts = np.bincount(ranks, minlength=1000)
    assert counts[0] > counts[1] > counts[9]  # rank 0 is the hottest
    assert counts[999] < counts[0] / 100  # no pile-up of the tail on the last rank


def test_workload_queries_are_inserted_keys() -> None:
    w = be.make_workload(5000, 2000, 1.1, seed=1)
    assert np.array_equal(w.uniform, w.keys[w.idx_uniform])
    assert np.array_equal(w.zipf, w.keys[w.idx_zipf])
    assert w.uniform.shape == w.zipf.shape == (2000,)
