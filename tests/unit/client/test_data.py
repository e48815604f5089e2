"""Data layer (client/data.py): synthetic CTR generator, metrics, Criteo TSV loader.

Metrics are checked against brute-force definitions, the Criteo parser against a
plain-Python reference parser, the Zipf sampler against its own pmf.
"""

from __future__ import annotations

import gzip
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embps.client.data import (
    CRITEO_NUM_DENSE,
    CRITEO_NUM_SPARSE,
    FIELD_SHIFT,
    MISSING_LOCAL,
    Batch,
    SyntheticCTR,
    auc,
    criteo_batches,
    field_of,
    logloss,
    tag_ids,
)

SMALL = {"num_fields": 3, "vocab_sizes": (50, 1000, 100_000), "num_dense": 2, "seed": 11}


def _equal(a: Batch, b: Batch) -> None:
    np.testing.assert_array_equal(a.sparse, b.sparse)
    np.testing.assert_array_equal(a.dense, b.dense)
    np.testing.assert_array_equal(a.labels, b.labels)
    if a.probs is None or b.probs is None:
        assert a.probs is None and b.probs is None
    else:
        np.testing.assert_array_equal(a.probs, b.probs)


def _ranks_of(gen: SyntheticCTR, f: int, vocab: int, ids: np.ndarray) -> np.ndarray:
    """1-based ranks of Zipf (non-fresh) ids of field f, by inverting id_of_rank."""
    all_ids = gen.id_of_rank(f, np.arange(1, vocab + 1))
    order = np.argsort(all_ids)
    pos = np.searchsorted(all_ids[order], ids)
    ranks = order[np.minimum(pos, vocab - 1)] + 1
    assert (all_ids[ranks - 1] == ids).all(), "an id is not in the vocabulary"
    return ranks


# --------------------------------------------------------------------------
# Edge cases and validation
# --------------------------------------------------------------------------


def test_empty_requests() -> None:
    gen = SyntheticCTR(**SMALL)
    b = gen.generate(5, 0)
    assert b.sparse.shape == (0, 3) and b.sparse.dtype == np.int64
    assert b.dense.shape == (0, 2) and b.dense.dtype == np.float32
    assert b.labels.shape == (0,) and b.probs is not None and b.probs.shape == (0,)
    assert list(gen.batches(16, 0)) == []


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"num_fields": 0}, "num_fields"),
        ({"num_fields": 2, "vocab_sizes": (10, 20, 30)}, "vocab_sizes"),
        ({"vocab_sizes": 0}, r"vocab_sizes\[0\]"),
        ({"num_fields": 2, "vocab_sizes": (10, 2**40)}, r"vocab_sizes\[1\]"),
        ({"num_fields": 2, "zipf_exponents": (1.0, -0.5)}, r"zipf_exponents\[1\]"),
        ({"zipf_exponents": math.nan}, r"zipf_exponents\[0\]"),
        ({"num_dense": -1}, "num_dense"),
        ({"new_id_rate": 1.0}, "new_id_rate"),
        ({"new_id_reuse": 0.0}, "new_id_reuse"),
        ({"new_id_lifetime": 0}, "new_id_lifetime"),
        ({"bias": math.inf}, "bias"),
        ({"weight_scale": -1.0}, r"weight_scale\[0\]"),
        ({"interactions": [(0, 0)]}, r"interactions\[0\]"),
        ({"num_fields": 2, "interactions": [(0, 1), (1, 2)]}, r"interactions\[1\]"),
        ({"interaction_dim": 0}, "interaction_dim"),
        ({"interaction_scale": -0.1}, "interaction_scale"),
        ({"dense_scale": math.nan}, "dense_scale"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_config_errors_name_the_option(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=rf"SyntheticCTR\.{option}"):
        SyntheticCTR(**kwargs)


def test_config_normalises_per_field_options() -> None:
    gen = SyntheticCTR(num_fields=10, vocab_sizes=77, zipf_exponents=None, weight_scale=0.2)
    assert gen.vocab_sizes == (77,) * 10
    assert gen.zipf_exponents == (1.05, 1.1, 1.0, 0.9, 1.2, 1.0, 0.8, 0.6, 1.05, 1.1)
    assert gen.weight_scale == (0.2,) * 10
    assert gen.interactions == ((0, 1), (2, 3), (4, 5))
    assert SyntheticCTR(num_fields=3).interactions == ((0, 1),)


def test_bad_generation_arguments() -> None:
    gen = SyntheticCTR(**SMALL)
    with pytest.raises(ValueError, match="batch_size"):
        gen.batches(0, 1)
    with pytest.raises(ValueError, match="num_batches"):
        gen.batches(4, -1)
    with pytest.raises(ValueError, match="start"):
        gen.generate(-1, 4)


def test_batch_concat_keeps_probs_or_refuses() -> None:
    b = SyntheticCTR(**SMALL).generate(0, 10)
    crit = Batch(b.sparse, b.dense, b.labels, None)
    assert Batch.concat([crit, crit]).probs is None
    _equal(Batch.concat([b.slice(0, 4), b.slice(4, 10)]), b)
    with pytest.raises(ValueError, match="probs"):
        Batch.concat([b, crit])


def test_tag_ids_and_field_of() -> None:
    ids = tag_ids(5, np.array([0, 1, (1 << 40) - 1]))
    np.testing.assert_array_equal(field_of(ids), [5, 5, 5])
    np.testing.assert_array_equal(ids & ((1 << 40) - 1), [0, 1, (1 << 40) - 1])
    with pytest.raises(ValueError, match="local ids"):
        tag_ids(0, np.array([1 << 40]))
    with pytest.raises(ValueError, match="field_index"):
        tag_ids(-1, np.array([1]))


# --------------------------------------------------------------------------
# SyntheticCTR: determinism, shapes
# --------------------------------------------------------------------------


def test_shapes_dtypes_and_values() -> None:
    gen = SyntheticCTR()
    (b,) = gen.batches(1000, 1)
    assert b.sparse.shape == (1000, 8) and b.sparse.dtype == np.int64
    assert b.dense.shape == (1000, 4) and b.dense.dtype == np.float32
    assert b.labels.dtype == np.float32 and set(np.unique(b.labels)) <= {0.0, 1.0}
    assert b.probs is not None and b.probs.dtype == np.float32
    assert ((b.probs > 0) & (b.probs < 1)).all()
    assert (b.sparse >= 0).all()
    assert abs(float(b.dense.mean())) < 0.1 and abs(float(b.dense.std()) - 1.0) < 0.1


@pytest.mark.parametrize("batch_size", [1, 7, 1000, 20_000])
def test_same_samples_whatever_the_batch_size(batch_size: int) -> None:
    gen = SyntheticCTR(**SMALL)
    n = 40_000
    ref = gen.generate(0, n)
    got = Batch.concat(list(gen.batches(batch_size, n // batch_size)))
    _equal(got, ref.slice(0, len(got)))
    assert len(got) == (n // batch_size) * batch_size


def test_start_offset_and_reproducible() -> None:
    gen = SyntheticCTR(**SMALL)
    ref = gen.generate(0, 30_000)
    (b,) = gen.batches(10_000, 1, start=12_345)
    _equal(b, ref.slice(12_345, 22_345))
    _equal(SyntheticCTR(**SMALL).generate(100, 500), ref.slice(100, 600))
    other = SyntheticCTR(**{**SMALL, "seed": 12}).generate(0, 30_000)
    assert (other.sparse != ref.sparse).mean() > 0.5


def test_endless_batches() -> None:
    gen = SyntheticCTR(**SMALL)
    it = gen.batches(5000, None)
    got = Batch.concat([next(it) for _ in range(5)])
    _equal(got, gen.generate(0, 25_000))


# --------------------------------------------------------------------------
# SyntheticCTR: id distribution
# --------------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.8, 1.0, 1.2])
def test_zipf_head_ratio(a: float) -> None:
    gen = SyntheticCTR(
        num_fields=1, vocab_sizes=10_000_000, zipf_exponents=a, num_dense=0, new_id_rate=0.0
    )
    ids = gen.generate(0, 1_000_000).sparse[:, 0]
    top = gen.id_of_rank(0, np.array([1, 10]))
    c1, c10 = int((ids == top[0]).sum()), int((ids == top[1]).sum())
    # c10 is ~1e4 * 10^-a / H(1e7, a): its relative std is below 2.5%, a 10% band is > 4 sigma
    assert c1 / c10 == pytest.approx(10**a, rel=0.1)
    p = gen.rank_pmf(0, np.array([1, 10]))
    assert p[0] / p[1] == pytest.approx(10**a, rel=1e-12)


@pytest.mark.parametrize("a", [0.0, 0.7, 1.0, 1.3])
def test_zipf_matches_pmf_head_and_tail(a: float) -> None:
    vocab = 5000  # head: ranks 1..1024 exact, tail: 1025..5000 continuous
    gen = SyntheticCTR(num_fields=1, vocab_sizes=vocab, zipf_exponents=a, new_id_rate=0.0)
    n = 400_000
    ranks = _ranks_of(gen, 0, vocab, gen.generate(0, n).sparse[:, 0])
    counts = np.bincount(ranks, minlength=vocab + 1)[1:]
    expected = gen.rank_pmf(0, np.arange(1, vocab + 1)) * n
    assert expected.sum() == pytest.approx(n, rel=1e-12)
    np.testing.assert_array_equal(gen.rank_pmf(0, np.array([0, vocab + 1])), [0.0, 0.0])
    edges = np.array([0, 1, 2, 5, 10, 50, 200, 1000, 1024, 1100, 2000, 3500])
    obs, exp = np.add.reduceat(counts, edges), np.add.reduceat(expected, edges)
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < 40, (obs, exp)  # 11 degrees of freedom: P(chi2 > 40) < 1e-4


def test_fields_never_collide() -> None:
    gen = SyntheticCTR(num_fields=6, vocab_sizes=200, new_id_rate=0.05, seed=3)
    sp = gen.generate(0, 50_000).sparse
    np.testing.assert_array_equal(field_of(sp), np.broadcast_to(np.arange(6), sp.shape))
    uniq = [set(np.unique(sp[:, f]).tolist()) for f in range(6)]
    for f in range(6):
        for g in range(f + 1, 6):
            assert not uniq[f] & uniq[g]
    # ranks map to distinct ids, scattered over the 40-bit local space
    ids = gen.id_of_rank(0, np.arange(1, 100_001))
    assert np.unique(ids).shape[0] == 100_000
    assert (ids & ((1 << FIELD_SHIFT) - 1)).max() > 2**39


def test_new_ids_keep_appearing() -> None:
    # tiny vocabularies: every Zipf id is seen early, so late novelty is fresh ids
    gen = SyntheticCTR(
        num_fields=2,
        vocab_sizes=100,
        zipf_exponents=0.5,
        new_id_rate=0.02,
        new_id_reuse=4.0,
        new_id_lifetime=20_000,
        seed=5,
    )
    window, n_windows = 25_000, 8
    sp = gen.generate(0, window * n_windows).sparse
    lam = gen.fresh_per_sample  # fresh ids created per sample and field
    for f in range(2):
        vocab_ids = set(gen.id_of_rank(f, np.arange(1, 101)).tolist())
        seen: set[int] = set()
        new_per_window = []
        for w in range(n_windows):
            col = set(sp[w * window : (w + 1) * window, f].tolist())
            new = col - seen
            if w >= 1:
                assert not new & vocab_ids
                new_per_window.append(len(new))
            seen |= col
        # about lam * window ids are created per window and most get drawn
        assert min(new_per_window) > 0.6 * lam * window, new_per_window
        assert max(new_per_window) < 1.2 * lam * window, new_per_window
        fresh = np.array(sorted(seen - vocab_ids))
        assert (field_of(fresh) == f).all()


def test_fresh_ids_are_reused_then_retired() -> None:
    gen = SyntheticCTR(
        num_fields=1, vocab_sizes=10, new_id_rate=0.1, new_id_reuse=5.0, new_id_lifetime=5000
    )
    col = gen.generate(0, 200_000).sparse[:, 0]
    vocab_ids = gen.id_of_rank(0, np.arange(1, 11))
    is_fresh = ~np.isin(col, vocab_ids)
    assert is_fresh.mean() == pytest.approx(0.1, abs=0.005)
    pos = np.flatnonzero(is_fresh)
    ids, inverse, counts = np.unique(col[pos], return_inverse=True, return_counts=True)
    assert counts.mean() == pytest.approx(5.0, rel=0.1)  # new_id_reuse
    # an id is drawn only within its lifetime
    first = np.full(ids.shape[0], pos[-1], dtype=np.int64)
    last = np.zeros(ids.shape[0], dtype=np.int64)
    np.minimum.at(first, inverse, pos)
    np.maximum.at(last, inverse, pos)
    assert (last - first).max() <= 5000 + 1 / gen.fresh_per_sample


# --------------------------------------------------------------------------
# SyntheticCTR: planted model and optimum
# --------------------------------------------------------------------------


def test_default_optimum_in_documented_range() -> None:
    gen = SyntheticCTR()
    opt = gen.optimum(200_000)
    assert 0.75 <= opt["auc"] <= 0.80
    assert 0.03 <= opt["ctr"] <= 0.20
    b = gen.generate(0, 200_000)
    assert b.probs is not None
    assert auc(b.labels, b.probs) == pytest.approx(opt["auc"], abs=1e-12)
    assert logloss(b.labels, b.probs) == pytest.approx(opt["logloss"], abs=1e-9)
    # labels follow the planted probabilities: calibration per decile
    order = np.argsort(b.probs)
    for part in np.array_split(order, 10):
        assert b.labels[part].mean() == pytest.approx(b.probs[part].mean(), abs=0.02)
    # a random scorer gets 0.5, a degraded one less than the optimum
    rng = np.random.default_rng(0)
    assert auc(b.labels, rng.random(len(b))) == pytest.approx(0.5, abs=0.01)
    noisy = np.log(b.probs) + rng.normal(0, 1.0, len(b))
    assert auc(b.labels, noisy) < opt["auc"] - 0.02
    base = float(b.labels.mean())
    assert logloss(b.labels, np.full(len(b), base)) > opt["logloss"] + 0.02


def test_signal_is_in_the_ids() -> None:
    """With weights only (no dense, no interactions), the planted logit is per-id additive."""
    gen = SyntheticCTR(
        num_fields=2, vocab_sizes=20, num_dense=0, interactions=[], new_id_rate=0.0, seed=2
    )
    b = gen.generate(0, 5000)
    assert b.probs is not None
    logit = np.log(b.probs / (1 - b.probs)).astype(np.float64)
    # logit(id0, id1) = bias + w(id0) + w(id1): a sum, so mixed differences vanish
    key = {(int(x), int(y)): v for (x, y), v in zip(b.sparse, logit, strict=True)}
    (a0, a1), (b0, b1) = (gen.id_of_rank(f, np.array([1, 2])) for f in range(2))
    d = key[(a0, b0)] - key[(a0, b1)] - key[(a1, b0)] + key[(a1, b1)]
    assert abs(d) < 1e-5


# --------------------------------------------------------------------------
# Metrics against brute force
# --------------------------------------------------------------------------


def _auc_brute(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins) / (pos.size * neg.size)


def _logloss_brute(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    total = 0.0
    for yi, pi in zip(y, p, strict=True):
        q = min(max(float(pi), eps), 1 - eps)
        total -= math.log(q) if yi else math.log(1 - q)
    return total / len(y)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [3, 20, 0])  # 0: continuous scores, no ties
def test_auc_against_brute_force(seed: int, levels: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    s = rng.integers(0, levels, n).astype(np.float64) if levels else rng.normal(size=n)
    s += 0.3 * y * rng.random(n)
    assert auc(y, s) == pytest.approx(_auc_brute(y, s), abs=1e-12)
    assert auc(y.astype(np.float32), s.astype(np.float32)) == pytest.approx(
        _auc_brute(y, s.astype(np.float32)), abs=1e-12
    )


def test_auc_edge_cases() -> None:
    assert auc(np.array([0, 1]), np.array([0.0, 1.0])) == 1.0
    assert auc(np.array([1, 0]), np.array([0.0, 1.0])) == 0.0
    assert auc(np.array([0, 1, 0, 1]), np.full(4, 0.3)) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auc(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="0 or 1"):
        auc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="entries"):
        auc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="finite"):
        auc(np.array([0, 1]), np.array([0.1, np.nan]))


@pytest.mark.parametrize("seed", range(4))
def test_logloss_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    y = rng.integers(0, 2, n)
    p = rng.random(n)
    p[:3] = [0.0, 1.0, 0.5]  # clipped to [eps, 1 - eps]
    assert logloss(y, p) == pytest.approx(_logloss_brute(y, p), rel=1e-12)
    assert logloss(y, p, eps=1e-3) == pytest.approx(_logloss_brute(y, p, 1e-3), rel=1e-12)


def test_logloss_errors() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        logloss(np.array([]), np.array([]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        logloss(np.array([0, 1]), np.array([0.5, 1.5]))


# --------------------------------------------------------------------------
# Criteo TSV
# --------------------------------------------------------------------------


def _criteo_rows(n: int, seed: int) -> list[list[str]]:
    """Random rows in the Criteo format, with missing values, negatives, upper-case hex."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row = [str(int(rng.integers(0, 2)))]
        for _ in range(CRITEO_NUM_DENSE):
            r = rng.random()
            if r < 0.2:
                row.append("")
            elif r < 0.3:
                row.append(str(-int(rng.integers(0, 3))))
            else:
                row.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 10))))))
        for _ in range(CRITEO_NUM_SPARSE):
            r = rng.random()
            if r < 0.2:
                row.append("")
            else:
                h = f"{int(rng.integers(0, 2**32)):08x}"
                row.append(h.upper() if r < 0.3 else h)
        rows.append(row)
    return rows


def _reference(rows: list[list[str]]) -> Batch:
    """The expected batch, parsed value by value in plain Python."""
    labels = np.array([float(r[0]) for r in rows], dtype=np.float32)
    dense = np.array(
        [[math.log1p(max(int(v), 0)) if v else 0.0 for v in r[1:14]] for r in rows],
        dtype=np.float32,
    ).reshape(len(rows), CRITEO_NUM_DENSE)
    sparse = np.array(
        [
            [(k << 40) | (int(v, 16) if v else MISSING_LOCAL) for k, v in enumerate(r[14:])]
            for r in rows
        ],
        dtype=np.int64,
    ).reshape(len(rows), CRITEO_NUM_SPARSE)
    return Batch(sparse, dense, labels, None)


def _write(
    path: Path, rows: list[list[str]], newline: str = "\n", final_newline: bool = True
) -> Path:
    text = newline.join("\t".join(r) for r in rows) + (newline if final_newline else "")
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(text.encode())
    else:
        path.write_bytes(text.encode())
    return path


def test_criteo_empty_file(tmp_path: Path) -> None:
    stream = criteo_batches(_write(tmp_path / "empty.tsv", [], final_newline=False), 4)
    assert list(stream) == []
    assert stream.lines == 0 and stream.samples == 0


def test_criteo_known_line(tmp_path: Path) -> None:
    row = ["1", "5", "", "-3", "0", *[""] * 9, "0000000a", "", "FFFFFFFF", *["68fd1e64"] * 23]
    (b,) = criteo_batches(_write(tmp_path / "one.tsv", [row]), 8)
    assert b.labels.tolist() == [1.0] and b.probs is None
    assert b.dense.dtype == np.float32 and b.dense.shape == (1, 13)
    assert b.dense[0, :4].tolist() == [np.float32(math.log(6)), 0.0, 0.0, 0.0]
    assert b.sparse[0, :4].tolist() == [
        10,
        (1 << 40) | MISSING_LOCAL,
        (2 << 40) | 0xFFFFFFFF,
        (3 << 40) | 0x68FD1E64,
    ]


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 1 << 22])
@pytest.mark.parametrize("batch_size", [1, 7, 500])
def test_criteo_round_trip(tmp_path: Path, chunk_bytes: int, batch_size: int) -> None:
    rows = _criteo_rows(123, seed=1)
    path = _write(tmp_path / "train.txt", rows)
    batches = list(criteo_batches(path, batch_size, chunk_bytes=chunk_bytes))
    assert all(len(b) == batch_size for b in batches[:-1])
    _equal(Batch.concat(batches), _reference(rows))


@pytest.mark.parametrize("variant", ["gzip", "crlf", "no_final_newline"])
def test_criteo_variants(tmp_path: Path, variant: str) -> None:
    rows = _criteo_rows(40, seed=2)
    rows[-1][-1] = ""  # last column empty: the line ends in a tab
    if variant == "gzip":
        path = _write(tmp_path / "train.txt.gz", rows)
    elif variant == "crlf":
        path = _write(tmp_path / "train.txt", rows, newline="\r\n")
    else:
        path = _write(tmp_path / "train.txt", rows, final_newline=False)
    stream = criteo_batches(path, 16, chunk_bytes=300)
    _equal(Batch.concat(list(stream)), _reference(rows))
    assert stream.lines == 40 and stream.samples == 40 and stream.bad_lines == 0


def test_criteo_drop_last_and_max_samples(tmp_path: Path) -> None:
    rows = _criteo_rows(50, seed=3)
    path = _write(tmp_path / "train.txt", rows)
    assert [len(b) for b in criteo_batches(path, 16, drop_last=True)] == [16, 16, 16]
    got = list(criteo_batches(path, 16, max_samples=20, chunk_bytes=200))
    assert [len(b) for b in got] == [16, 4]
    _equal(Batch.concat(got), _reference(rows[:20]))


def _good_row() -> list[str]:
    return ["0", *["1"] * CRITEO_NUM_DENSE, *["0123abcd"] * CRITEO_NUM_SPARSE]


BAD_ROWS = [
    (lambda r: r[:-1], "expected 40 tab-separated columns, got 39"),
    (lambda r: [*r, "x"], "expected 40 tab-separated columns, got 41"),
    (lambda r: [""], "expected 40 tab-separated columns, got 1"),
    (lambda r: ["2", *r[1:]], "column 1 (label): expected 0 or 1, got '2'"),
    (lambda r: ["", *r[1:]], "column 1 (label)"),
    (lambda r: ["01", *r[1:]], "column 1 (label)"),
    (lambda r: [*r[:3], "1.5", *r[4:]], "column 4 (I3): expected an integer"),
    (lambda r: [*r[:3], "-", *r[4:]], "column 4 (I3)"),
    (lambda r: [*r[:3], "+4", *r[4:]], "column 4 (I3)"),
    (lambda r: [*r[:13], "1" * 19, *r[14:]], "column 14 (I13)"),
    (lambda r: [*r[:14], "0123abc", *r[15:]], "column 15 (C1): expected 8 hex digits"),
    (lambda r: [*r[:14], "0123abcg", *r[15:]], "column 15 (C1)"),
    (lambda r: [*r[:39], "0123abcd0"], "column 40 (C26)"),
    (lambda r: [*r[:39], " 0123abc"], "column 40 (C26)"),
]


@pytest.mark.parametrize(("corrupt", "reason"), BAD_ROWS)
def test_criteo_malformed_line_names_line_and_column(
    tmp_path: Path, corrupt: Callable[[list[str]], list[str]], reason: str
) -> None:
    rows = [_good_row() for _ in range(10)]
    rows[6] = corrupt(rows[6])
    path = _write(tmp_path / "bad.tsv", rows)
    with pytest.raises(ValueError, match=r"bad\.tsv line 7: ") as exc:
        list(criteo_batches(path, 4))
    assert reason in str(exc.value)


def test_criteo_error_line_number_across_chunks(tmp_path: Path) -> None:
    rows = _criteo_rows(300, seed=7)
    rows[249] = rows[249][:-2]
    path = _write(tmp_path / "train.txt", rows)
    seen = 0
    with pytest.raises(ValueError, match="line 250: expected 40 tab-separated columns, got 38"):
        for b in criteo_batches(path, 10, chunk_bytes=500):
            seen += len(b)
    assert 200 <= seen < 250  # batches before the bad line came out first


def test_criteo_line_too_long(tmp_path: Path) -> None:
    path = tmp_path / "long.tsv"
    path.write_bytes("\t".join(_good_row()).encode() + b"\n" + b"1" * (2 << 20))
    with pytest.raises(ValueError, match="line 2: longer than"):
        list(criteo_batches(path, 4, chunk_bytes=1 << 16))


@pytest.mark.parametrize("chunk_bytes", [100, 1 << 22])
def test_criteo_skip_bad_counts(tmp_path: Path, chunk_bytes: int) -> None:
    rows = _criteo_rows(30, seed=4)
    bad = {3: ["1", "x"], 17: ["7", *rows[17][1:]], 29: [*rows[29][:20], "zz", *rows[29][21:]]}
    all_rows = [bad.get(i, r) for i, r in enumerate(rows)]
    path = _write(tmp_path / "train.txt", all_rows)
    stream = criteo_batches(path, 8, skip_bad=True, chunk_bytes=chunk_bytes)
    got = Batch.concat(list(stream))
    _equal(got, _reference([r for i, r in enumerate(rows) if i not in bad]))
    assert stream.bad_lines == 3 and stream.lines == 30 and stream.samples == 27
    assert [n for n, _ in stream.bad_examples] == [4, 18, 30]
    assert "got 2" in stream.bad_examples[0][1]
    assert "column 1 (label)" in stream.bad_examples[1][1]
    assert "column 21 (I20)" not in stream.bad_examples[2][1]
    assert "column 21 (C7)" in stream.bad_examples[2][1]


_TOKENS = st.sampled_from(
    ["", "0", "1", "-", "-0", "7", "-12", "+3", "1.5", "123456789012345678", "1234567890123456789",
     "0123abcd", "DEADBEEF", "0123abc", "0123abcg", "0123abcd0", " ", "x", "\r"]
)  # fmt: skip


def _ref_ok(cols: list[str]) -> bool:
    """Plain-Python acceptance rule of one line (its columns)."""
    if len(cols) != 40 or cols[0] not in ("0", "1"):
        return False
    ints_ok = all(re.fullmatch(r"-?[0-9]{1,18}", c) or c == "" for c in cols[1:14])
    hex_ok = all(re.fullmatch(r"[0-9a-fA-F]{8}", c) or c == "" for c in cols[14:])
    return ints_ok and hex_ok


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_criteo_parser_agrees_with_reference(tmp_path: Path, data: st.DataObject) -> None:
    """Random lines mixing good and bad tokens: same verdicts and values as plain Python."""
    n = data.draw(st.integers(1, 12))
    rows = []
    for _ in range(n):
        ncols = data.draw(st.sampled_from([40, 40, 40, 39, 41]))
        good = data.draw(st.booleans())
        row = _criteo_rows(1, seed=data.draw(st.integers(0, 99)))[0] if good else []
        row = (row + data.draw(st.lists(_TOKENS, min_size=ncols, max_size=ncols)))[:ncols]
        if data.draw(st.booleans()):
            k = data.draw(st.integers(0, ncols - 1))
            row[k] = data.draw(_TOKENS)
        rows.append(row)
    path = _write(tmp_path / "fuzz.tsv", rows)
    stream = criteo_batches(
        path, 5, skip_bad=True, chunk_bytes=data.draw(st.sampled_from([50, 4096]))
    )
    batches = list(stream)
    # a CR ending the last column is a CRLF terminator, not part of the value
    expect_ok = [_ref_ok([*r[:-1], r[-1][:-1]] if r[-1].endswith("\r") else r) for r in rows]
    bad = [i + 1 for i, ok in enumerate(expect_ok) if not ok]
    assert stream.bad_lines == len(bad)
    assert [line for line, _ in stream.bad_examples] == bad[:10]
    assert all(reason != "malformed line" for _, reason in stream.bad_examples)
    good_rows = [
        [*r[:-1], r[-1].removesuffix("\r")] for r, ok in zip(rows, expect_ok, strict=True) if ok
    ]
    if good_rows:
        _equal(Batch.concat(batches), _reference(good_rows))
    else:
        assert batches == []


def test_criteo_stream_closes(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.txt", _criteo_rows(20, seed=5))
    with criteo_batches(path, 4) as stream:
        assert len(next(stream)) == 4
    with pytest.raises(StopIteration):
        next(stream)
    with pytest.raises(ValueError, match="batch_size"):
        criteo_batches(path, 0)


# --------------------------------------------------------------------------
# Throughput (printed, not asserted: speed is for benchmarks)
# --------------------------------------------------------------------------


def test_throughput_report(tmp_path: Path) -> None:
    gen = SyntheticCTR()
    t0 = time.perf_counter()
    n = sum(len(b) for b in gen.batches(4096, 49))
    dt = time.perf_counter() - t0
    print(
        f"\nSyntheticCTR default (F=8): {n} samples in {dt:.3f} s, {n / dt / 1e6:.2f} M samples/s"
    )
    rows = _criteo_rows(2000, seed=6)
    path = _write(tmp_path / "train.txt", rows * 10)
    t0 = time.perf_counter()
    m = sum(len(b) for b in criteo_batches(path, 4096))
    dt = time.perf_counter() - t0
    print(f"criteo_batches: {m} lines in {dt:.3f} s, {m / dt / 1e3:.0f} k lines/s")
    assert n == 49 * 4096 and m == 20_000
