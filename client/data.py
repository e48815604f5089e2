"""Training data for CTR models: a synthetic click log with a planted model, and Criteo TSV.

Both sources yield the same ``Batch``: one categorical id per field, already tagged by
field (``id = field << FIELD_SHIFT | local_id``, so the ids of two fields never collide
and one PS table can hold every field), dense features and 0/1 labels.

Id layout
=========
``id = field << 40 | local``, ``local`` in ``[0, 2^40)``, ``field`` in ``[0, 2^23)``:
every id is a non-negative int64 and ``field_of(ids) = ids >> 40``. Fields are
single-valued (one id per field per sample); a multi-valued field (a bag) is out of
scope here: model it as several fields, or pool on the trainer side.

SyntheticCTR: the generative model
==================================
Everything is a pure function of ``(seed, sample index)``: sample ``i`` is computed from
counter-based hashes ``h(i, stream) = mix64(i * GOLDEN + key(seed, stream))`` (the
splitmix64 step; one stream per field, per dense feature and for the label), so it is
the same whatever batch it lands in, and generation never keeps state.

1. Ranks. Field ``f`` has a vocabulary of ``N_f`` ids, ranked by popularity, with Zipf
   frequencies ``P(r) ∝ r^-a_f`` (``a_f`` = ``zipf_exponents[f]``), drawn from one
   uniform ``u``:

   * ranks ``1..H`` (``H = min(N_f, 1024)``, the head) exactly, by the alias method on
     the table ``r^-a / Z``;
   * ranks ``H+1..N_f`` (the tail) by inverting the continuous power law on
     ``[H + 1/2, N_f + 1/2)`` and rounding: ``x = (x0^b + t (x1^b - x0^b))^(1/b)`` with
     ``b = 1 - a`` (``x = x0 (x1/x0)^t`` when ``a = 1``). Rank ``r`` then has mass
     ``∫_{r-1/2}^{r+1/2} x^-a dx / Z``, within ``a(a+1)/(24 r^2)`` (relative) of
     ``r^-a / Z``: below 3e-7 for ``a <= 2``. ``rank_pmf`` gives these masses. No
     per-batch table, O(1) per draw, any ``N_f`` up to ``2^36``.

2. New ids over time. With probability ``new_id_rate`` a draw is *fresh* instead: fresh
   ids are created at ``lam = new_id_rate / new_id_reuse`` per sample; at sample ``i``
   the live ones are the last ``W = max(1, round(lam * new_id_lifetime))`` created
   (``c(i) = floor(i * lam)`` is the newest), and a fresh draw picks one uniformly.
   Each fresh id is drawn about ``new_id_reuse`` times within ``new_id_lifetime``
   samples, then never again, so a PS meets never-seen ids all through training (on
   top of those from the Zipf tail). Fresh id ``j`` has rank ``N_f + 1 + j``.

3. Ids. ``local = perm_f(rank - 1)``, ``perm_f`` a seeded bijection of ``[0, 2^40)``
   (add a key, multiply by an odd constant, xor-shift, twice, mod ``2^40``): hot ids
   are scattered over the id space, ranks ``<=> ids`` one to one (``id_of_rank``).

4. Labels from a planted model. Per id a latent weight ``z(id) ≈ N(0, 1)`` (the sum of
   four 16-bit chunks of ``mix64(id ^ key)``, standardised: Irwin-Hall, in ``±3.46``)
   and, for fields in ``interactions``, a latent vector ``v(id)`` of
   ``interaction_dim`` entries uniform in ``±√3`` (unit variance). Dense features are
   ``x_d ≈ N(0, 1)`` (Irwin-Hall again) with fixed coefficients ``β_d`` (seeded,
   ``≈ N(0, dense_scale²)``). Then::

       logit = bias + Σ_f  weight_scale_f · z(id_f)
                    + Σ_(f,g) interaction_scale / √k · <v(id_f), v(id_g)>
                    + Σ_d β_d · x_d
       p     = sigmoid(logit),      label ~ Bernoulli(p)

   ``p`` is the Bayes-optimal predictor, so ``optimum(n)`` (the AUC and log loss of
   ``p`` itself on ``n`` samples) is the best any model can reach. Signal on rare ids is
   real but barely learnable: the gap between a trained model and the optimum measures
   that and the model's capacity.

Defaults (8 fields, vocabularies 100 .. 10^7, exponents 0.6 .. 1.2, 4 dense features,
3 interactions, 1% fresh draws): seed 0 has base CTR 0.132, optimum AUC 0.770 and
optimum log loss 0.332 (2·10^6 samples); over seeds 0..11 the CTR lies in 0.10 .. 0.14
and the optimum AUC in 0.77 .. 0.79 (the few hottest ids of each field draw their
weights at random, which moves both). Speed: 2.7 M samples/s on one idle core, 1.3 M
with the machine loaded (vectorised numpy over blocks of 16384 samples; 8 fields).

Criteo TSV
==========
``criteo_batches(path, batch_size)`` streams the Criteo display-ads format: per line
``label \\t I1..I13 \\t C1..C26`` (40 columns), integers possibly negative, categoricals
8 hex digits, any feature may be empty. Dense ``x -> log(1 + max(x, 0))`` (empty ->
0); categorical ``Ck`` (``k`` from 1) -> ``(k-1) << 40 | int(hex)``, empty ->
``(k-1) << 40 | MISSING_LOCAL`` (``2^32``, outside the hex range). Gzip is read
through gzip (a ``.gz`` name or gzip's magic bytes: ``open_maybe_gzip``). Lines are parsed a chunk at a time (4 MiB) with vectorised numpy,
about 250 k lines/s; a malformed line raises ``ValueError`` naming its (1-based) number
and the column at fault, or with ``skip_bad=True`` is skipped and counted. (The
unlabelled Criteo test files, 39 columns, are not this format.)

Public datasets
===============
``movielens_batches`` (``ratings.dat`` ``::``, ML-100K ``u.data`` tab, ``ratings.csv``),
``avazu_batches`` (Avazu CSV with its header; categorical values hashed, ``hour``
YYMMDDHH -> hour-of-day and weekday fields, ``click`` the label) and ``libsvm_batches``
(``label idx:val ...``, Frappe and others; libFFM ``label field:idx:val ...``) keep the
Criteo loader's contract: the same ``Batch`` with field-tagged ids (field f of the
format -> ``f << 40 | local``), dense float32 (B, D) (D = 0 where the format has none),
float32 labels; gzip by name or magic bytes; the file read a line at a time and parsed
8192 lines at a time (plain Python per line: MovieLens 250 k, Avazu 85 k, libSVM with
10 features 50 k lines/s, measured on a shared 2-core machine at load 5.5); a malformed
line raises ``ValueError("<path> line <n>: <what>")`` or, with ``skip_bad``, is skipped
and counted. MovieLens labels are the ratings (not 0/1). Datasets are not bundled (their
licences forbid it): README "Public datasets" says where to get them, and
``docs/examples/`` trains on them.

Example::

    from embps.client.data import SyntheticCTR, auc, criteo_batches, logloss

    gen = SyntheticCTR(num_fields=8, seed=7)
    print(gen.optimum(200_000))          # {'auc': 0.774.., 'logloss': 0.326.., 'ctr': 0.129..}
    for batch in gen.batches(batch_size=4096, num_batches=100):
        batch.sparse                     # int64 (4096, 8), field-tagged ids
        batch.dense, batch.labels        # float32 (4096, 4), float32 (4096,)
    print(auc(batch.labels, batch.probs), logloss(batch.labels, batch.probs))

    stream = criteo_batches("train.txt.gz", batch_size=4096, skip_bad=True)
    for batch in stream:                 # sparse int64 (B, 26), dense float32 (B, 13)
        ...
    print(stream.lines, stream.bad_lines)
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from embps.protos.routing import GOLDEN, mix64_inplace, mix64_int

__all__ = [
    "AVAZU_TIME_FIELDS",
    "CRITEO_NUM_DENSE",
    "CRITEO_NUM_SPARSE",
    "FIELD_SHIFT",
    "LOCAL_MASK",
    "MISSING_LOCAL",
    "AvazuStream",
    "Batch",
    "CriteoStream",
    "LibSVMStream",
    "LineStream",
    "MovieLensStream",
    "SyntheticCTR",
    "auc",
    "avazu_batches",
    "criteo_batches",
    "field_of",
    "hash_values",
    "libsvm_batches",
    "logloss",
    "movielens_batches",
    "open_maybe_gzip",
    "tag_ids",
]

FIELD_SHIFT = 40
LOCAL_MASK = (1 << FIELD_SHIFT) - 1
MAX_FIELDS = 1 << (63 - FIELD_SHIFT)
MAX_VOCAB = 1 << 36
MISSING_LOCAL = 1 << 32
CRITEO_NUM_DENSE = 13
CRITEO_NUM_SPARSE = 26

# --------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------


def tag_ids(field_index: int, local: np.ndarray) -> np.ndarray:
    """Field-tagged ids: ``field_index << 40 | local``. local: int64 (n,) in [0, 2^40) -> int64 (n,)."""
    if not 0 <= field_index < MAX_FIELDS:
        raise ValueError(f"field_index must be in [0, {MAX_FIELDS}), got {field_index}")
    loc = np.asarray(local, dtype=np.int64)
    if loc.size and (loc.min() < 0 or loc.max() > LOCAL_MASK):
        raise ValueError("local ids must be in [0, 2^40)")
    return loc | np.int64(field_index << FIELD_SHIFT)


def field_of(ids: np.ndarray) -> np.ndarray:
    """The field of each tagged id: int64 (...) -> int64 (...), ``ids >> 40``."""
    return np.asarray(ids, dtype=np.int64) >> FIELD_SHIFT


# --------------------------------------------------------------------------
# Counter-based hashing (private). uint64 arrays, wrapping arithmetic.
# --------------------------------------------------------------------------

_M64 = (1 << 64) - 1
_GOLDEN = int(GOLDEN)
_LANES16 = np.uint64(0x0000FFFF0000FFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_MASK40 = np.uint64(LOCAL_MASK)
_PERM_M1 = np.uint64(0x9E3779B97F4A7C15 & LOCAL_MASK | 1)
_PERM_M2 = np.uint64(0xD6E8FEB86659FD93 & LOCAL_MASK | 1)
_TWO53 = 2.0**-53
# Irwin-Hall of four 16-bit uniforms: mean 2 * 65535, variance 4 * (65536^2 - 1) / 12.
_IH_MEAN = 2.0 * 65535.0
_IH_INV_STD = 1.0 / math.sqrt(4.0 * (65536.0**2 - 1.0) / 12.0)
_SQRT3 = math.sqrt(3.0)


def _key(seed: int, *stream: int) -> int:
    """A 64-bit stream key from the seed and stream coordinates."""
    z = mix64_int(seed ^ 0x5EED5EED5EED5EED)
    for s in stream:
        z = mix64_int(z + _GOLDEN + s)
    return z


def _uniform(h: np.ndarray) -> np.ndarray:
    """uint64 (...) -> float64 (...) uniform in [0, 1), 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * _TWO53


def _gauss(h: np.ndarray) -> np.ndarray:
    """uint64 (...) -> float64 (...) ≈ N(0, 1): Irwin-Hall sum of the four 16-bit chunks."""
    s = (h & _LANES16) + ((h >> np.uint64(16)) & _LANES16)  # two 17-bit sums, 32-bit lanes
    s = (s & _LOW32) + (s >> np.uint64(32))
    return (s.astype(np.float64) - _IH_MEAN) * _IH_INV_STD


def _hash_ids(ids: np.ndarray, key: int) -> np.ndarray:
    """mix64(ids ^ key): int64 (...) -> uint64 (...), a fresh array."""
    h = ids.view(np.uint64) ^ np.uint64(key)
    return mix64_inplace(h)


# --------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Batch:
    """One batch of samples.

    sparse: int64 (B, F)     one field-tagged id per field (``field_of(sparse[:, f]) == f``)
    dense:  float32 (B, D)   dense features
    labels: float32 (B,)     0.0 or 1.0 (MovieLens: the rating)
    probs:  float32 (B,) or None   the planted click probability (synthetic data only)
    """

    sparse: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    probs: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def slice(self, lo: int, hi: int) -> Batch:
        """Samples ``[lo, hi)`` of this batch (views)."""
        p = None if self.probs is None else self.probs[lo:hi]
        return Batch(self.sparse[lo:hi], self.dense[lo:hi], self.labels[lo:hi], p)

    @staticmethod
    def concat(parts: Sequence[Batch]) -> Batch:
        """The samples of ``parts`` (at least one) in order, as one batch (copies if > 1)."""
        if len(parts) == 1:
            return parts[0]
        with_probs = [b.probs for b in parts if b.probs is not None]
        if 0 < len(with_probs) < len(parts):
            raise ValueError("Batch.concat: some parts have probs and some do not")
        probs = np.concatenate(with_probs) if with_probs else None
        return Batch(
            np.concatenate([b.sparse for b in parts]),
            np.concatenate([b.dense for b in parts]),
            np.concatenate([b.labels for b in parts]),
            probs,
        )


def _rebatch(chunks: Iterator[Batch], batch_size: int, drop_last: bool) -> Iterator[Batch]:
    """Re-cut a stream of chunks into batches of exactly ``batch_size`` (the last may be short)."""
    pending: list[Batch] = []
    have = 0
    for chunk in chunks:
        n = len(chunk)
        lo = 0
        if pending:
            take = min(batch_size - have, n)
            pending.append(chunk.slice(0, take))
            have += take
            lo = take
            if have < batch_size:
                continue
            yield Batch.concat(pending)
            pending, have = [], 0
        while n - lo >= batch_size:
            yield chunk.slice(lo, lo + batch_size)
            lo += batch_size
        if lo < n:
            pending.append(chunk.slice(lo, n))
            have = n - lo
    if pending and not drop_last:
        yield Batch.concat(pending)


# --------------------------------------------------------------------------
# SyntheticCTR
# --------------------------------------------------------------------------

DEFAULT_VOCAB_SIZES = (10_000_000, 1_000_000, 100_000, 10_000, 1_000_000, 100_000, 1_000, 100)
DEFAULT_ZIPF_EXPONENTS = (1.05, 1.1, 1.0, 0.9, 1.2, 1.0, 0.8, 0.6)
DEFAULT_INTERACTIONS = ((0, 1), (2, 3), (4, 5))
HEAD_RANKS = 1024
BLOCK = 16384


def _per_field(name: str, value: Any, default: Sequence[Any], num_fields: int) -> tuple[Any, ...]:
    """Normalise a scalar / per-field option to a tuple of ``num_fields`` entries."""
    if value is None:
        return tuple(default[f % len(default)] for f in range(num_fields))
    if isinstance(value, int | float | np.integer | np.floating):
        return (value,) * num_fields
    vals = tuple(value)
    if len(vals) != num_fields:
        raise ValueError(
            f"SyntheticCTR.{name} has {len(vals)} entries, need num_fields = {num_fields}"
        )
    return vals


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias table for probabilities p: float64 (H,) summing to 1 -> (prob, alias)."""
    h = p.shape[0]
    scaled = p * h
    prob = np.ones(h, dtype=np.float64)
    alias = np.arange(h, dtype=np.int64)
    small = [i for i in range(h) if scaled[i] < 1.0]
    large = [i for i in range(h) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias  # leftovers keep prob 1 (rounding residue)


@dataclass(frozen=True)
class _FieldSampler:
    """Precomputed rank sampler of one field (see the module docstring, step 1)."""

    vocab: int
    head: int
    p_head: float  # mass of ranks 1..head
    prob: np.ndarray  # float64 (head,) alias thresholds
    alias: np.ndarray  # int64 (head,) alias targets (0-based ranks)
    b: float  # 1 - a
    x0: float
    x1: float
    x0b: float  # x0^b (or log x0 when b == 0)
    span: float  # x1^b - x0^b (or log(x1 / x0))
    z: float  # normaliser: sum of head r^-a plus the tail integral

    @staticmethod
    def build(vocab: int, a: float) -> _FieldSampler:
        head = min(vocab, HEAD_RANKS)
        r = np.arange(1, head + 1, dtype=np.float64)
        w = r**-a
        b = 1.0 - a
        x0, x1 = head + 0.5, vocab + 0.5
        log_case = abs(b) < 1e-9
        if head == vocab:
            tail = 0.0
        elif log_case:
            tail = math.log(x1 / x0)
        else:
            tail = (x1**b - x0**b) / b
        w_sum = float(w.sum())
        z = w_sum + tail
        prob, alias = _alias_table(w / w_sum)
        if log_case:
            x0b, span = math.log(x0), math.log(x1 / x0)
        else:
            x0b, span = x0**b, x1**b - x0**b
        return _FieldSampler(vocab, head, w_sum / z, prob, alias, b, x0, x1, x0b, span, z)

    def ranks(self, u: np.ndarray) -> np.ndarray:
        """0-based ranks for uniforms u: float64 (n,) in [0, 1) -> int64 (n,)."""
        w = u * (self.head / self.p_head)
        j = w.astype(np.int64)
        np.minimum(j, self.head - 1, out=j)
        w -= j
        r = np.where(w < self.prob[j], j, self.alias[j])
        if self.head == self.vocab:
            return r
        t = (u - self.p_head) * (1.0 / (1.0 - self.p_head))
        np.clip(t, 0.0, 1.0, out=t)
        t *= self.span
        t += self.x0b
        if abs(self.b) < 1e-9:
            x = np.exp(t, out=t)
        else:
            x = np.power(t, 1.0 / self.b, out=t)
        x -= 0.5  # round(x) - 1 == floor(x - 0.5): 0-based rank
        tail = x.astype(np.int64)
        np.clip(tail, self.head, self.vocab - 1, out=tail)
        return np.where(u < self.p_head, r, tail)

    def pmf(self, ranks: np.ndarray) -> np.ndarray:
        """The sampler's probability of 1-based ranks: int64 (n,) -> float64 (n,) (no fresh ids)."""
        r = np.asarray(ranks, dtype=np.float64)
        inside = (r >= 1) & (r <= self.vocab)
        r = np.where(inside, r, 1.0)
        lo, hi = r - 0.5, r + 0.5
        if abs(self.b) < 1e-9:
            tail = np.log(hi / lo)
        else:
            tail = (hi**self.b - lo**self.b) / self.b
        p = np.where(r <= self.head, r ** (self.b - 1.0), tail) / self.z
        return np.where(inside, p, 0.0)


@dataclass(frozen=True)
class SyntheticCTR:
    """A synthetic click log with Zipf ids, fresh ids over time and a planted model.

    See the module docstring for the generative model and the formulas. Per-field
    options take one value for every field or a sequence of ``num_fields`` values;
    ``None`` picks the default pattern (field ``f`` gets ``DEFAULT_...[f % 8]``).

    num_fields: categorical fields F (1 .. 2^23 - 1).
    vocab_sizes: ids per field (1 .. 2^36), default 10^7, 10^6, 10^5, 10^4, 10^6,
        10^5, 10^3, 100.
    zipf_exponents: Zipf exponent a >= 0 per field (0 = uniform), default 1.05, 1.1,
        1.0, 0.9, 1.2, 1.0, 0.8, 0.6.
    num_dense: dense features D (>= 0).
    seed: any int; same seed -> same data.
    new_id_rate: fraction of draws that pick a fresh id, in [0, 1).
    new_id_reuse: mean draws per fresh id over its life (> 0).
    new_id_lifetime: samples a fresh id stays live (>= 1).
    bias: logit intercept (sets the base CTR).
    weight_scale: std of the per-id weight of each field (>= 0).
    interactions: field pairs with an FM-style term; default (0, 1), (2, 3), (4, 5)
        among the pairs that exist.
    interaction_dim: latent vector size k (1 .. 64).
    interaction_scale: std of each pairwise term (>= 0).
    dense_scale: std of the dense coefficients β_d (>= 0).

    Example::

        gen = SyntheticCTR(num_fields=4, vocab_sizes=10_000, zipf_exponents=1.1, seed=1)
        b = next(gen.batches(batch_size=512, num_batches=1))
        b.sparse.shape, b.dense.shape, b.labels.mean()   # (512, 4), (512, 4), ~0.1
    """

    num_fields: int = 8
    vocab_sizes: int | Sequence[int] | None = None
    zipf_exponents: float | Sequence[float] | None = None
    num_dense: int = 4
    seed: int = 0
    new_id_rate: float = 0.01
    new_id_reuse: float = 4.0
    new_id_lifetime: int = 100_000
    bias: float = -2.5
    weight_scale: float | Sequence[float] = 0.33
    interactions: Sequence[tuple[int, int]] | None = None
    interaction_dim: int = 4
    interaction_scale: float = 0.35
    dense_scale: float = 0.25

    _samplers: tuple[_FieldSampler, ...] = field(init=False, repr=False, compare=False)
    _scales: np.ndarray = field(init=False, repr=False, compare=False)
    _pairs: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _beta: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        f = self.num_fields
        if not isinstance(f, int | np.integer) or not 1 <= f < MAX_FIELDS:
            raise ValueError(f"SyntheticCTR.num_fields must be in [1, {MAX_FIELDS}), got {f!r}")
        vocab = _per_field("vocab_sizes", self.vocab_sizes, DEFAULT_VOCAB_SIZES, f)
        for i, v in enumerate(vocab):
            if not isinstance(v, int | np.integer) or not 1 <= v <= MAX_VOCAB:
                raise ValueError(
                    f"SyntheticCTR.vocab_sizes[{i}] must be an int in [1, 2^36], got {v!r}"
                )
        expo = _per_field("zipf_exponents", self.zipf_exponents, DEFAULT_ZIPF_EXPONENTS, f)
        for i, a in enumerate(expo):
            if not math.isfinite(a) or not 0.0 <= a <= 10.0:
                raise ValueError(f"SyntheticCTR.zipf_exponents[{i}] must be in [0, 10], got {a!r}")
        scales = _per_field("weight_scale", self.weight_scale, (0.33,), f)
        for i, s in enumerate(scales):
            if not math.isfinite(s) or s < 0:
                raise ValueError(f"SyntheticCTR.weight_scale[{i}] must be >= 0, got {s!r}")
        if not isinstance(self.num_dense, int | np.integer) or self.num_dense < 0:
            raise ValueError(f"SyntheticCTR.num_dense must be an int >= 0, got {self.num_dense!r}")
        if not isinstance(self.seed, int | np.integer):
            raise ValueError(f"SyntheticCTR.seed must be an int, got {self.seed!r}")
        if not 0.0 <= self.new_id_rate < 1.0:
            raise ValueError(f"SyntheticCTR.new_id_rate must be in [0, 1), got {self.new_id_rate}")
        if not (math.isfinite(self.new_id_reuse) and self.new_id_reuse > 0):
            raise ValueError(f"SyntheticCTR.new_id_reuse must be > 0, got {self.new_id_reuse}")
        if not isinstance(self.new_id_lifetime, int | np.integer) or self.new_id_lifetime < 1:
            raise ValueError(
                f"SyntheticCTR.new_id_lifetime must be an int >= 1, got {self.new_id_lifetime!r}"
            )
        if not math.isfinite(self.bias):
            raise ValueError(f"SyntheticCTR.bias must be finite, got {self.bias}")
        if not isinstance(self.interaction_dim, int | np.integer) or not (
            1 <= self.interaction_dim <= 64
        ):
            raise ValueError(
                f"SyntheticCTR.interaction_dim must be in [1, 64], got {self.interaction_dim!r}"
            )
        for name in ("interaction_scale", "dense_scale"):
            val = getattr(self, name)
            if not math.isfinite(val) or val < 0:
                raise ValueError(f"SyntheticCTR.{name} must be >= 0, got {val}")
        if self.interactions is None:
            pairs = tuple(p for p in DEFAULT_INTERACTIONS if max(p) < f)
        else:
            pairs = tuple((int(p[0]), int(p[1])) for p in self.interactions)
            for i, (a, b) in enumerate(pairs):
                if not (0 <= a < f and 0 <= b < f) or a == b:
                    raise ValueError(
                        f"SyntheticCTR.interactions[{i}] = ({a}, {b}) must name two "
                        f"different fields in [0, {f})"
                    )
        sa = object.__setattr__
        for name in ("num_fields", "num_dense", "seed", "new_id_lifetime", "interaction_dim"):
            sa(self, name, int(getattr(self, name)))
        sa(self, "vocab_sizes", tuple(int(v) for v in vocab))
        sa(self, "zipf_exponents", tuple(float(a) for a in expo))
        sa(self, "weight_scale", tuple(float(s) for s in scales))
        sa(self, "interactions", pairs)
        sa(
            self,
            "_samplers",
            tuple(_FieldSampler.build(int(v), float(a)) for v, a in zip(vocab, expo, strict=True)),
        )
        sa(self, "_scales", np.asarray(scales, dtype=np.float64))
        sa(self, "_pairs", pairs)
        beta = _gauss(
            np.asarray([_key(self.seed, 3, d) for d in range(self.num_dense)], dtype=np.uint64)
        )
        sa(self, "_beta", beta * self.dense_scale)

    # ---------------------------------------------------------------- helpers

    @property
    def fresh_per_sample(self) -> float:
        """Fresh ids created per sample and field: ``new_id_rate / new_id_reuse``."""
        return self.new_id_rate / self.new_id_reuse

    @property
    def fresh_window(self) -> int:
        """Live fresh ids per field: ``max(1, round(fresh_per_sample * new_id_lifetime))``."""
        return max(1, round(self.fresh_per_sample * self.new_id_lifetime))

    def _perm(self, f: int, r0: np.ndarray) -> np.ndarray:
        """perm_f: 0-based ranks int64 (n,) -> local ids int64 (n,), a bijection of [0, 2^40)."""
        k1 = np.uint64(_key(self.seed, 1, f) & LOCAL_MASK)
        k2 = np.uint64(_key(self.seed, 2, f) & LOCAL_MASK)
        x = r0.view(np.uint64) + k1
        x *= _PERM_M1
        x &= _MASK40
        x ^= x >> np.uint64(21)
        x += k2
        x *= _PERM_M2
        x &= _MASK40
        x ^= x >> np.uint64(19)
        return x.view(np.int64)

    def id_of_rank(self, field_index: int, ranks: np.ndarray) -> np.ndarray:
        """Tagged ids of 1-based popularity ranks of a field: int64 (n,) -> int64 (n,).

        Ranks ``1..vocab_sizes[f]`` are the Zipf vocabulary; rank ``vocab + 1 + j`` is
        fresh id ``j``.
        """
        if not 0 <= field_index < self.num_fields:
            raise ValueError(f"field_index must be in [0, {self.num_fields}), got {field_index}")
        r = np.asarray(ranks, dtype=np.int64).ravel()
        if r.size and (r.min() < 1 or r.max() > LOCAL_MASK):
            raise ValueError("ranks must be in [1, 2^40)")
        return self._perm(field_index, r - 1) | np.int64(field_index << FIELD_SHIFT)

    def rank_pmf(self, field_index: int, ranks: np.ndarray) -> np.ndarray:
        """Probability that a non-fresh draw of a field has each 1-based rank: float64 (n,).

        Exact for the head (ranks <= 1024), the rounded power law for the tail, 0 outside
        ``1..vocab_sizes[f]``; sums to 1 over the vocabulary.
        """
        if not 0 <= field_index < self.num_fields:
            raise ValueError(f"field_index must be in [0, {self.num_fields}), got {field_index}")
        return self._samplers[field_index].pmf(np.asarray(ranks, dtype=np.int64))

    # ------------------------------------------------------------- generation

    def generate(self, start: int, count: int) -> Batch:
        """Samples ``start .. start + count - 1`` as one batch (see ``Batch`` for shapes)."""
        if start < 0 or count < 0:
            raise ValueError(f"start and count must be >= 0, got {start}, {count}")
        last_fresh = (start + count) * self.fresh_per_sample
        if last_fresh + max(self._samplers[f].vocab for f in range(self.num_fields)) >= LOCAL_MASK:
            raise ValueError(f"sample {start + count} is past the fresh-id space (2^40 ranks)")
        if count > BLOCK:
            return Batch.concat(
                [
                    self._block(s, min(BLOCK, start + count - s))
                    for s in range(start, start + count, BLOCK)
                ]
            )
        return self._block(start, count)

    def _block(self, start: int, n: int) -> Batch:
        nf, seed = self.num_fields, self.seed
        idx = np.arange(start, start + n, dtype=np.uint64)
        base = idx * GOLDEN
        sparse = np.empty((nf, n), dtype=np.int64)
        logit = np.full(n, self.bias, dtype=np.float64)
        rate = self.new_id_rate
        if rate > 0:
            newest = np.floor((idx.astype(np.float64)) * self.fresh_per_sample).astype(np.int64)
            live = np.minimum(newest + 1, self.fresh_window)
            oldest = newest + 1 - live
        vecs: dict[int, np.ndarray] = {}
        wkey = _key(seed, 4)
        need_vec = {f for p in self._pairs for f in p}
        k = self.interaction_dim
        for f in range(nf):
            smp = self._samplers[f]
            h = base + np.uint64(_key(seed, 0, f))
            u = _uniform(mix64_inplace(h))
            if rate > 0:
                fresh = u < rate
                j = oldest + (u * (1.0 / rate) * live).astype(np.int64)
                np.minimum(j, newest, out=j)
                u -= rate
                u *= 1.0 / (1.0 - rate)
                np.maximum(u, 0.0, out=u)
                r0 = np.where(fresh, j + smp.vocab, smp.ranks(u))
            else:
                r0 = smp.ranks(u)
            ids = self._perm(f, r0)
            ids |= np.int64(f << FIELD_SHIFT)
            sparse[f] = ids
            z = _gauss(_hash_ids(ids, wkey))
            z *= self._scales[f]
            logit += z
            if f in need_vec:
                vecs[f] = self._latent_vectors(ids, k)
        if self._pairs:
            scale = self.interaction_scale / math.sqrt(k)
            for a, b in self._pairs:
                dot = np.einsum("kn,kn->n", vecs[a], vecs[b])
                dot *= scale
                logit += dot
        dense = np.empty((self.num_dense, n), dtype=np.float64)
        for d in range(self.num_dense):
            h = base + np.uint64(_key(seed, 5, d))
            dense[d] = _gauss(mix64_inplace(h))
            logit += self._beta[d] * dense[d]
        probs = 1.0 / (1.0 + np.exp(-logit))
        h = base + np.uint64(_key(seed, 6))
        labels = _uniform(mix64_inplace(h)) < probs
        return Batch(
            np.ascontiguousarray(sparse.T),
            np.ascontiguousarray(dense.T, dtype=np.float32),
            labels.astype(np.float32),
            probs.astype(np.float32),
        )

    def _latent_vectors(self, ids: np.ndarray, k: int) -> np.ndarray:
        """v(id): int64 (n,) -> float64 (k, n), entries uniform in ±√3."""
        out = np.empty((k, ids.shape[0]), dtype=np.float64)
        for c0 in range(0, k, 4):
            h = _hash_ids(ids, _key(self.seed, 7, c0))
            for c in range(c0, min(k, c0 + 4)):
                chunk = (h >> np.uint64(16 * (c - c0))) & np.uint64(0xFFFF)
                out[c] = chunk
        out *= 2.0 * _SQRT3 / 65535.0
        out -= _SQRT3
        return out

    def batches(self, batch_size: int, num_batches: int | None, start: int = 0) -> Iterator[Batch]:
        """``num_batches`` consecutive batches (``None``: endless) from sample ``start`` on.

        Batch ``k`` holds samples ``start + k*B .. start + (k+1)*B - 1``; sample ``i`` is
        the same for any batch size. Yields ``Batch`` with sparse int64 (B, F), dense
        float32 (B, num_dense), labels float32 (B,), probs float32 (B,).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        return self._batches(batch_size, num_batches, start)

    def _batches(self, batch_size: int, num_batches: int | None, start: int) -> Iterator[Batch]:
        per_block = max(1, BLOCK // batch_size)
        k = 0
        pos = start
        while num_batches is None or k < num_batches:
            m = per_block if num_batches is None else min(per_block, num_batches - k)
            block = self.generate(pos, m * batch_size)
            for i in range(m):
                yield block.slice(i * batch_size, (i + 1) * batch_size)
            k += m
            pos += m * batch_size

    def optimum(self, n_samples: int = 1_000_000, start: int = 0) -> dict[str, float]:
        """The Bayes-optimal predictor's metrics on samples ``start .. start + n - 1``.

        Returns ``{"auc", "logloss", "ctr"}``: the AUC and log loss of the planted ``p``
        against the sampled labels (no model can beat them on these samples, up to
        noise), and the empirical click rate.
        """
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {n_samples}")
        labels = np.empty(n_samples, dtype=np.float32)
        probs = np.empty(n_samples, dtype=np.float32)
        for s in range(0, n_samples, BLOCK * 8):
            b = self.generate(start + s, min(BLOCK * 8, n_samples - s))
            labels[s : s + len(b)] = b.labels
            assert b.probs is not None
            probs[s : s + len(b)] = b.probs
        return {
            "auc": auc(labels, probs),
            "logloss": logloss(labels, probs),
            "ctr": float(labels.mean()),
        }


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


def _binary_labels(labels: np.ndarray, n: int | None = None) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if n is not None and y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} entries, scores/probs have {n}")
    yb = y.astype(np.bool_)
    if not np.array_equal(yb, y):
        raise ValueError("labels must be 0 or 1")
    return yb


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC: P(score of a random positive > that of a random negative), ties count 1/2.

    labels: 0/1 (n,); scores: float (n,) finite. Rank-based (Mann-Whitney U with mid
    ranks for ties), O(n log n). Raises ValueError when there is no positive or no
    negative (AUC undefined).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    y = _binary_labels(labels, s.shape[0])
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n = s.shape[0]
    pos = int(y.sum())
    neg = n - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"AUC needs both classes, got {pos} positives and {neg} negatives")
    order = np.argsort(s, kind="stable")
    ss = s[order]
    yy = y[order].astype(np.float64)
    starts = np.concatenate(([0], np.flatnonzero(ss[1:] != ss[:-1]) + 1))
    ends = np.concatenate((starts[1:], [n]))
    mid_rank = (starts + ends + 1) * 0.5  # mean of ranks starts+1 .. ends
    pos_per_group = np.add.reduceat(yy, starts)
    u = float(np.dot(mid_rank, pos_per_group)) - pos * (pos + 1) * 0.5
    return u / (pos * neg)


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-mean(y log p + (1-y) log(1-p))``, p clipped to [eps, 1-eps].

    labels: 0/1 (n,); probs: float (n,) in [0, 1]. Natural log.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.shape[0] == 0:
        raise ValueError(f"probs must be 1-D and non-empty, got shape {p.shape}")
    y = _binary_labels(labels, p.shape[0])
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("probs must be in [0, 1]")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.where(y, np.log(p), np.log1p(-p)).mean())


# --------------------------------------------------------------------------
# Criteo TSV
# --------------------------------------------------------------------------

_CRITEO_COLS = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_SPARSE
_MAX_DIGITS = 18
_PAD = 32
_HEX = np.full(256, 0xFF, dtype=np.uint8)  # byte -> nibble value, 0xFF when not a hex digit
for _c, _v in zip(b"0123456789abcdef", range(16), strict=True):
    _HEX[_c] = _v
for _c, _v in zip(b"ABCDEF", range(10, 16), strict=True):
    _HEX[_c] = _v
_NOT_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)
_FIELD_TAGS = np.arange(CRITEO_NUM_SPARSE, dtype=np.int64) << FIELD_SHIFT
_INT_RE = re.compile(rb"-?[0-9]{1,%d}" % _MAX_DIGITS)
_HEX_RE = re.compile(rb"[0-9a-fA-F]{8}")
MAX_LINE_BYTES = 1 << 20


def _column_name(c: int) -> str:
    if c == 0:
        return "label"
    return f"I{c}" if c <= CRITEO_NUM_DENSE else f"C{c - CRITEO_NUM_DENSE}"


def _diagnose(line: bytes) -> str:
    """What is wrong with one Criteo line (without its newline), in words."""
    if line.endswith(b"\r"):
        line = line[:-1]
    cols = line.split(b"\t")
    if len(cols) != _CRITEO_COLS:
        return f"expected {_CRITEO_COLS} tab-separated columns, got {len(cols)}"
    for c, v in enumerate(cols):
        shown = v[:40].decode("utf-8", "replace")
        where = f"column {c + 1} ({_column_name(c)})"
        if c == 0:
            if v not in (b"0", b"1"):
                return f"{where}: expected 0 or 1, got {shown!r}"
        elif c <= CRITEO_NUM_DENSE:
            if v and not _INT_RE.fullmatch(v):
                return f"{where}: expected an integer of <= {_MAX_DIGITS} digits or empty, got {shown!r}"
        elif v and not _HEX_RE.fullmatch(v):
            return f"{where}: expected 8 hex digits or empty, got {shown!r}"
    return "malformed line"  # pragma: no cover - the vectorised check and this one agree


def _parse_lines(a: np.ndarray) -> tuple[Batch, np.ndarray, np.ndarray, np.ndarray]:
    """Parse complete lines. a: uint8 (m,) ending in b"\\n".

    Returns (batch of the good lines in order, ok: bool (lines,), line starts int64
    (lines,), line ends int64 (lines,) without the terminator).
    """
    nl = np.flatnonzero(a == 10)
    n_lines = nl.shape[0]
    starts = np.empty(n_lines, dtype=np.int64)
    starts[0] = 0
    starts[1:] = nl[:-1] + 1
    ends = nl.astype(np.int64)
    ends -= (ends > starts) & (a[np.maximum(ends - 1, 0)] == 13)  # CRLF
    tabs = np.flatnonzero(a == 9)
    tabs_before = np.searchsorted(tabs, nl)  # tabs on lines 0..k, cumulative
    ntabs = np.diff(tabs_before, prepend=0)
    ok = ntabs == _CRITEO_COLS - 1
    if ok.all():
        good = np.arange(n_lines)
        t = tabs.reshape(n_lines, _CRITEO_COLS - 1)
    else:
        good = np.flatnonzero(ok)
        first_tab = (tabs_before - ntabs)[good]
        t = tabs[first_tab[:, None] + np.arange(_CRITEO_COLS - 1)]  # (n, 39)
    n = good.shape[0]
    # byte offsets into p, a padded copy of a: no window below runs off either end
    p = np.zeros(a.shape[0] + 2 * _PAD, dtype=np.uint8)
    p[_PAD:-_PAD] = a
    fs = np.empty((n, _CRITEO_COLS), dtype=np.int64)  # field starts (n, 40)
    fe = np.empty((n, _CRITEO_COLS), dtype=np.int64)  # field ends (n, 40)
    fs[:, 0] = starts[good]
    fs[:, 1:] = t + 1
    fe[:, :-1] = t
    fe[:, -1] = ends[good]
    fs += _PAD
    fe += _PAD
    ln = fe - fs
    # label: exactly "0" or "1"
    lab = p[fs[:, 0]]
    line_ok = (ln[:, 0] == 1) & ((lab == 48) | (lab == 49))
    labels = (lab == 49).astype(np.float32)
    # integers: optional '-', 1..18 digits, or empty. Right-aligned windows of the
    # last `width` bytes of each field: the digit in column j has weight 10^(width-1-j).
    i_l = ln[:, 1 : 1 + CRITEO_NUM_DENSE]
    neg = (i_l > 0) & (p[fs[:, 1 : 1 + CRITEO_NUM_DENSE]] == 45)
    nd = i_l - neg  # digits
    int_ok = (i_l == 0) | ((nd >= 1) & (nd <= _MAX_DIGITS))
    width = int(min(max(int(i_l.max(initial=0)), 1), _MAX_DIGITS + 1))
    win = np.lib.stride_tricks.sliding_window_view(p, width)
    digits = win[fe[:, 1 : 1 + CRITEO_NUM_DENSE] - width] - np.uint8(48)  # (n, 13, width)
    is_digit = np.arange(width - 1, -1, -1) < nd[..., None]
    int_ok &= ((digits <= 9) | ~is_digit).all(axis=2)
    digits[~is_digit] = 0
    val = np.zeros(i_l.shape, dtype=np.int64)
    for j in range(width):
        val *= 10
        val += digits[:, :, j]
    np.negative(val, out=val, where=neg)
    line_ok &= int_ok.all(axis=1)
    dense = np.log1p(np.maximum(val, 0).astype(np.float64)).astype(np.float32)
    # categoricals: 8 hex digits or empty. Eight nibbles (one per byte, 0xFF when
    # not hex) are read as one big-endian uint64 and packed in three shift-or steps.
    c_l = ln[:, 1 + CRITEO_NUM_DENSE :]
    win8 = np.lib.stride_tricks.sliding_window_view(p, 8)
    nib = _HEX[win8[fs[:, 1 + CRITEO_NUM_DENSE :]]]  # uint8 (n, 26, 8)
    x = nib.view(">u8")[..., 0].astype(np.uint64)  # (n, 26)
    present = c_l == 8
    cat_ok = (c_l == 0) | (present & ((x & _NOT_NIBBLES) == 0))
    line_ok &= cat_ok.all(axis=1)
    x = (x | (x >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    x = (x | (x >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    x = (x | (x >> np.uint64(16))) & np.uint64(0x00000000FFFFFFFF)
    local = np.where(present, x.view(np.int64), MISSING_LOCAL)
    sparse = local | _FIELD_TAGS
    ok[good] = line_ok
    if not line_ok.all():
        sparse, dense, labels = sparse[line_ok], dense[line_ok], labels[line_ok]
    return Batch(sparse, dense, labels, None), ok, starts, ends


class _BatchStream:
    """What every loader's stream shares: the counters, batch iteration over
    ``self._chunks()`` (re-batched to ``batch_size``), ``close`` and the context manager.
    A subclass sets its own fields, then calls ``_start``."""

    path: str
    skip_bad: bool
    max_samples: int | None

    def _start(
        self,
        path: str | os.PathLike[str],
        batch_size: int,
        skip_bad: bool,
        drop_last: bool,
        max_samples: int | None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_samples is not None and max_samples < 0:
            raise ValueError(f"max_samples must be >= 0 or None, got {max_samples}")
        self.path = os.fspath(path)
        self.skip_bad = skip_bad
        self.max_samples = max_samples
        self.lines = 0
        self.samples = 0
        self.bad_lines = 0
        self.bad_examples: list[tuple[int, str]] = []
        self._it = _rebatch(self._chunks(), batch_size, drop_last)

    def _chunks(self) -> Iterator[Batch]:
        raise NotImplementedError

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def close(self) -> None:
        """Stop early and close the file."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CriteoStream(_BatchStream):
    """Iterator over batches of a Criteo TSV file; counts lines as it goes.

    Attributes (updated while iterating): ``lines`` (lines read), ``samples`` (good
    lines yielded or pending), ``bad_lines`` (lines skipped, ``skip_bad=True`` only)
    and ``bad_examples`` (the first 10 as ``(line number, reason)``). Closes its file
    when exhausted, on ``close()`` or at the end of a ``with`` block.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int,
        *,
        skip_bad: bool = False,
        drop_last: bool = False,
        max_samples: int | None = None,
        chunk_bytes: int = 1 << 22,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.chunk_bytes = chunk_bytes
        self._start(path, batch_size, skip_bad, drop_last, max_samples)

    def _open(self) -> io.BufferedIOBase:
        return open_maybe_gzip(self.path)  # closed by the `with` in _chunks

    def _chunks(self) -> Iterator[Batch]:
        carry = b""
        with self._open() as fh:
            while True:
                block = fh.read(self.chunk_bytes)
                data = carry + block if carry else block
                if not block:
                    if data:
                        yield from self._parse(data + b"\n")
                    return
                cut = data.rfind(b"\n")
                if cut < 0:
                    if len(data) > MAX_LINE_BYTES:
                        raise ValueError(
                            f"{self.path} line {self.lines + 1}: longer than {MAX_LINE_BYTES} bytes"
                        )
                    carry = data
                    continue
                carry = data[cut + 1 :]
                yield from self._parse(data[: cut + 1])
                if self.max_samples is not None and self.samples >= self.max_samples:
                    return

    def _parse(self, data: bytes) -> Iterator[Batch]:
        a = np.frombuffer(data, dtype=np.uint8)
        batch, ok, starts, ends = _parse_lines(a)
        first = self.lines + 1
        if not ok.all():
            bad = np.flatnonzero(~ok)
            if not self.skip_bad:
                i = int(bad[0])
                reason = _diagnose(data[starts[i] : ends[i]])
                raise ValueError(f"{self.path} line {first + i}: {reason}")
            self.bad_lines += bad.shape[0]
            for i in bad[: max(0, 10 - len(self.bad_examples))]:
                self.bad_examples.append((first + int(i), _diagnose(data[starts[i] : ends[i]])))
        self.lines += ok.shape[0]
        if self.max_samples is not None:
            batch = batch.slice(0, max(0, self.max_samples - self.samples))
        self.samples += len(batch)
        if len(batch):
            yield batch


def criteo_batches(
    path: str | os.PathLike[str],
    batch_size: int,
    *,
    skip_bad: bool = False,
    drop_last: bool = False,
    max_samples: int | None = None,
    chunk_bytes: int = 1 << 22,
) -> CriteoStream:
    """Stream a Criteo TSV file (``.gz``: gzip) as batches, never loading it whole.

    Yields ``Batch`` with sparse int64 (B, 26) (``Ck`` -> field ``k-1``, empty ->
    ``MISSING_LOCAL``), dense float32 (B, 13) ``log(1 + max(x, 0))`` (empty -> 0),
    labels float32 (B,), probs None. The last batch may be short unless ``drop_last``.
    A malformed line raises ``ValueError("<path> line <n>: <what is wrong>")`` and ends
    the stream (some lines before it may not have been yielded), or with ``skip_bad``
    is skipped and counted on the returned ``CriteoStream``. ``max_samples`` stops after that many
    good lines; ``chunk_bytes`` is the read size (lines are parsed a chunk at a time).
    """
    return CriteoStream(
        path,
        batch_size,
        skip_bad=skip_bad,
        drop_last=drop_last,
        max_samples=max_samples,
        chunk_bytes=chunk_bytes,
    )


# --------------------------------------------------------------------------
# Public datasets: MovieLens, Avazu, libSVM / libFM (line-oriented text)
# --------------------------------------------------------------------------

_GZIP_MAGIC = b"\x1f\x8b"
CHUNK_LINES = 8192


def open_maybe_gzip(path: str) -> io.BufferedIOBase:
    """Open ``path`` for binary reading, through gzip when its name ends in ``.gz`` or its
    first two bytes are gzip's magic number (``1f 8b``): a compressed file with another
    name, or a ``.gz`` name on an already decompressed file, both read correctly."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return open(path, "rb")  # the caller closes it (a `with` block)


class _BadLine(Exception):
    """(private) One line is malformed; the message says what is wrong, in words."""


class LineStream(_BatchStream):
    """Iterator over batches of a line-oriented text file; the shared part of the loaders
    of the public formats (``movielens_batches``, ``avazu_batches``, ``libsvm_batches``).

    Same contract and attributes as ``CriteoStream``: ``lines`` (lines read, a header
    included), ``samples`` (good lines yielded or pending), ``bad_lines`` (skipped,
    ``skip_bad=True`` only) and ``bad_examples`` (the first 10 as ``(line number,
    reason)``); ``fields`` names the sparse columns in order (column f holds field f's
    tagged ids). The file is read a line at a time (gzip by name or magic bytes) and
    parsed ``chunk_lines`` lines at a time; a malformed line raises
    ``ValueError("<path> line <n>: <what is wrong>")`` (1-based n) or, with ``skip_bad``,
    is skipped and counted. A line longer than ``MAX_LINE_BYTES`` is always an error.
    Subclasses parse one line (``_parse_line``) and may read a header (``_header``) or
    convert a chunk their own way (``_to_batch``).
    """

    fields: tuple[str, ...] = ()

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int,
        *,
        skip_bad: bool = False,
        drop_last: bool = False,
        max_samples: int | None = None,
        chunk_lines: int = CHUNK_LINES,
    ) -> None:
        if chunk_lines < 1:
            raise ValueError(f"chunk_lines must be >= 1, got {chunk_lines}")
        self.chunk_lines = chunk_lines
        self._start(path, batch_size, skip_bad, drop_last, max_samples)

    # ------------------------------------------------------------ per format
    def _header(self, line: bytes) -> bool:
        """Read line 1 if it is a header: True when it was one (it yields no sample)."""
        return False

    def _parse_line(self, line: bytes) -> tuple[Sequence[Any], Sequence[float], float]:
        """One line without its terminator -> (one value per field, dense, label);
        raises ``_BadLine`` with what is wrong."""
        raise NotImplementedError

    def _to_batch(self, sparse: list[Any], dense: list[Any], labels: list[float]) -> Batch:
        """Good rows of one chunk -> Batch: local ids int (n, F) tagged by column."""
        local = np.array(sparse, dtype=np.int64).reshape(len(labels), len(self.fields))
        tags = np.arange(len(self.fields), dtype=np.int64) << FIELD_SHIFT
        d = np.array(dense, dtype=np.float32).reshape(len(labels), len(dense[0]))
        return Batch(local | tags, d, np.array(labels, dtype=np.float32), None)

    # ------------------------------------------------------------ reading
    def _bad(self, number: int, reason: str) -> None:
        if not self.skip_bad:
            raise ValueError(f"{self.path} line {number}: {reason}")
        self.bad_lines += 1
        if len(self.bad_examples) < 10:
            self.bad_examples.append((number, reason))

    def _chunks(self) -> Iterator[Batch]:
        sparse: list[Any] = []
        dense: list[Any] = []
        labels: list[float] = []
        with open_maybe_gzip(self.path) as fh:
            while True:
                raw = fh.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                self.lines += 1
                number = self.lines
                if len(raw) > MAX_LINE_BYTES:
                    raise ValueError(
                        f"{self.path} line {number}: longer than {MAX_LINE_BYTES} bytes"
                    )
                line = raw.rstrip(b"\r\n")
                if number == 1:
                    try:
                        if self._header(line):
                            continue
                    except _BadLine as e:
                        raise ValueError(f"{self.path} line 1: {e}") from None
                try:
                    s, d, y = self._parse_line(line)
                except _BadLine as e:
                    self._bad(number, str(e))
                    continue
                sparse.append(s)
                dense.append(d)
                labels.append(y)
                self.samples += 1
                full = self.max_samples is not None and self.samples >= self.max_samples
                if len(labels) >= self.chunk_lines or full:
                    yield self._to_batch(sparse, dense, labels)
                    sparse, dense, labels = [], [], []
                if full:
                    return
        if labels:
            yield self._to_batch(sparse, dense, labels)


def _local_int(v: bytes, what: str) -> int:
    """A non-negative integer id < 2^40 from its text, else ``_BadLine``."""
    if not v.isdigit() or len(v) > 13:
        shown = v[:40].decode("utf-8", "replace")
        raise _BadLine(f"{what}: expected a non-negative integer id, got {shown!r}")
    x = int(v)
    if x > LOCAL_MASK:
        raise _BadLine(f"{what}: id {x} is not below 2^40")
    return x


def _number(v: bytes, what: str) -> float:
    """A finite float from its text, else ``_BadLine``."""
    try:
        x = float(v)
    except ValueError:
        shown = v[:40].decode("utf-8", "replace")
        raise _BadLine(f"{what}: expected a number, got {shown!r}") from None
    if not math.isfinite(x):
        raise _BadLine(f"{what}: expected a finite number, got {x}")
    return x


# ------------------------------------------------------------ MovieLens


class MovieLensStream(LineStream):
    """MovieLens ratings: ``user::movie::rating::timestamp`` (ML-1M/10M ``ratings.dat``),
    ``user\\tmovie\\trating\\ttimestamp`` (ML-100K ``u.data``) or ``userId,movieId,
    rating,timestamp`` with a header (ML-latest/20M/25M ``ratings.csv``); the separator is
    read off line 1. Fields: 0 user, 1 movie (local id = the integer id); dense: none
    (B, 0); labels: the rating (float32, e.g. 1..5), not 0/1.
    """

    fields = ("user", "movie")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.sep = b""
        super().__init__(*args, **kwargs)

    def _header(self, line: bytes) -> bool:
        for sep in (b"::", b"\t", b","):
            if sep in line:
                self.sep = sep
                break
        else:
            raise _BadLine("expected '::', tab or ',' separated columns (user, movie, rating)")
        return self.sep == b"," and line.lower().startswith(b"userid")

    def _parse_line(self, line: bytes) -> tuple[Sequence[Any], Sequence[float], float]:
        cols = line.split(self.sep)
        if len(cols) not in (3, 4):
            sep = {b"::": "'::'", b"\t": "tab", b",": "','"}[self.sep]
            raise _BadLine(
                f"expected 4 {sep}-separated columns (user, movie, rating, timestamp), "
                f"got {len(cols)}"
            )
        user = _local_int(cols[0], "column 1 (user)")
        movie = _local_int(cols[1], "column 2 (movie)")
        rating = _number(cols[2], "column 3 (rating)")
        return (user, movie), (), rating


def movielens_batches(
    path: str | os.PathLike[str],
    batch_size: int,
    *,
    skip_bad: bool = False,
    drop_last: bool = False,
    max_samples: int | None = None,
    chunk_lines: int = CHUNK_LINES,
) -> MovieLensStream:
    """Stream MovieLens ratings (``ratings.dat``, ``u.data``, ``ratings.csv``; gzip too).

    Yields ``Batch`` with sparse int64 (B, 2) (user -> field 0, movie -> field 1), dense
    float32 (B, 0), labels float32 (B,) the ratings. Errors, ``skip_bad``, ``drop_last``
    and ``max_samples`` as ``criteo_batches``.

    Example::

        for b in movielens_batches("ml-1m/ratings.dat", 128):
            users, movies = b.sparse[:, 0] & LOCAL_MASK, b.sparse[:, 1] & LOCAL_MASK
    """
    return MovieLensStream(path, batch_size, skip_bad=skip_bad, drop_last=drop_last,
                           max_samples=max_samples, chunk_lines=chunk_lines)  # fmt: skip


# ------------------------------------------------------------ Avazu

AVAZU_TIME_FIELDS = ("hour_of_day", "weekday")
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def hash_values(values: Sequence[bytes]) -> np.ndarray:
    """Local ids of categorical strings: ``mix64(fnv1a64(v)) & (2^40 - 1)``, int64 (n,).

    Stable across runs, machines and Python versions (not ``hash()``); vectorised over
    the bytes of one column. Two distinct values of one field share an id with
    probability about ``n^2 / 2^41`` (n: the field's vocabulary).
    """
    if not values:
        return np.empty(0, dtype=np.int64)
    arr = np.array(values, dtype=np.bytes_)
    width = arr.dtype.itemsize
    b = arr.view(np.uint8).reshape(len(values), width)
    lens = np.char.str_len(arr)
    h = np.full(len(values), _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):
            live = j < lens
            nxt = (h ^ b[:, j].astype(np.uint64)) * _FNV_PRIME
            h = np.where(live, nxt, h)
    return (mix64_inplace(h) & _MASK40).view(np.int64)


class AvazuStream(LineStream):
    """Avazu CTR CSV: a header line (``id,click,hour,C1,banner_pos,site_id,...``), then
    one impression a line. ``click`` (0/1) is the label; ``hour`` (YYMMDDHH) becomes two
    categorical fields, hour of day (0..23, local id = the hour) and weekday (0 Monday
    .. 6 Sunday); ``id`` is dropped; every other column is a categorical field, its
    value hashed (``hash_values``). Fields: the header's columns in order, less those
    three, then ``hour_of_day``, ``weekday`` (23 for the Kaggle train file). Dense: none.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.columns: tuple[str, ...] = ()
        self._cat: list[int] = []
        self._click = self._hour = -1
        self._hours: dict[bytes, tuple[int, int]] = {}
        super().__init__(*args, **kwargs)

    def _header(self, line: bytes) -> bool:
        cols = tuple(c.strip().decode("utf-8", "replace") for c in line.split(b","))
        missing = [c for c in ("click", "hour") if c not in cols]
        if missing:
            raise _BadLine(
                f"expected a header with 'click' and 'hour' columns (Avazu train format), "
                f"missing {missing} in {line[:80].decode('utf-8', 'replace')!r}"
            )
        self.columns = cols
        self._click, self._hour = cols.index("click"), cols.index("hour")
        self._cat = [i for i, c in enumerate(cols) if c not in ("id", "click", "hour")]
        self.fields = tuple(cols[i] for i in self._cat) + AVAZU_TIME_FIELDS
        return True

    def _time_fields(self, v: bytes) -> tuple[int, int]:
        got = self._hours.get(v)
        if got is not None:
            return got
        bad = _BadLine(
            f"column {self._hour + 1} (hour): expected YYMMDDHH, got "
            f"{v[:40].decode('utf-8', 'replace')!r}"
        )
        if len(v) != 8 or not v.isdigit():
            raise bad
        try:
            day = dt.date(2000 + int(v[:2]), int(v[2:4]), int(v[4:6]))
        except ValueError:
            raise bad from None
        hh = int(v[6:])
        if hh > 23:
            raise bad
        got = (hh, day.weekday())
        if len(self._hours) < 100_000:  # a few hundred distinct hours in practice
            self._hours[v] = got
        return got

    def _parse_line(self, line: bytes) -> tuple[Sequence[Any], Sequence[float], float]:
        cols = line.split(b",")
        if len(cols) != len(self.columns):
            raise _BadLine(
                f"expected {len(self.columns)} comma-separated columns (as the header), "
                f"got {len(cols)}"
            )
        click = cols[self._click]
        if click not in (b"0", b"1"):
            raise _BadLine(
                f"column {self._click + 1} (click): expected 0 or 1, got "
                f"{click[:40].decode('utf-8', 'replace')!r}"
            )
        hod, wd = self._time_fields(cols[self._hour])
        return [cols[i] for i in self._cat] + [hod, wd], (), float(click == b"1")

    def _to_batch(self, sparse: list[Any], dense: list[Any], labels: list[float]) -> Batch:
        n, k = len(labels), len(self._cat)
        out = np.empty((n, k + 2), dtype=np.int64)
        for f in range(k):
            out[:, f] = hash_values([row[f] for row in sparse])
        out[:, k] = [row[k] for row in sparse]
        out[:, k + 1] = [row[k + 1] for row in sparse]
        out |= np.arange(k + 2, dtype=np.int64) << FIELD_SHIFT
        return Batch(out, np.zeros((n, 0), np.float32), np.array(labels, np.float32), None)


def avazu_batches(
    path: str | os.PathLike[str],
    batch_size: int,
    *,
    skip_bad: bool = False,
    drop_last: bool = False,
    max_samples: int | None = None,
    chunk_lines: int = CHUNK_LINES,
) -> AvazuStream:
    """Stream an Avazu CSV file (Kaggle ``train`` / ``train.gz``) as batches.

    Yields ``Batch`` with sparse int64 (B, F) (``stream.fields`` names the columns: the
    header's categorical columns, then hour of day and weekday), dense float32 (B, 0),
    labels float32 (B,) the clicks. A header without ``click`` (the unlabelled test
    file) is an error on line 1. Errors and options as ``criteo_batches``.
    """
    return AvazuStream(path, batch_size, skip_bad=skip_bad, drop_last=drop_last,
                       max_samples=max_samples, chunk_lines=chunk_lines)  # fmt: skip


# ------------------------------------------------------------ libSVM / libFM


class LibSVMStream(LineStream):
    """libSVM ``label idx:val idx:val ...`` (Frappe, MovieLens-tag and others as the NFM /
    AFM papers ship them) or libFM-with-fields (libFFM) ``label field:idx:val ...``.

    libSVM: the k-th ``idx:val`` of a line is field k, every line has the same number
    of them (``num_fields``, default: line 1's); local id = ``idx``. libFFM: the field is
    given, each at most once a line, in ``[0, num_fields)`` (default: line 1's largest
    plus one); a field a line leaves out reads ``MISSING_LOCAL``. Dense: float32 (B, F)
    each field's ``val`` (1.0 for one-hot data; 0.0 where a field is left out), the
    weight an FM gives that id. Labels: with ``binary`` (default) -1 or 0 -> 0.0 and 1
    -> 1.0 (anything else is an error), else the number as it is. The format (2 or 3
    colon-separated parts) is read off line 1 and every line must keep it.
    """

    def __init__(
        self, *args: Any, num_fields: int | None = None, binary: bool = True, **kwargs: Any
    ) -> None:
        if num_fields is not None and not 1 <= num_fields <= MAX_FIELDS:
            raise ValueError(f"num_fields must be in [1, {MAX_FIELDS}] or None, got {num_fields}")
        self.num_fields = num_fields
        self.binary = binary
        self.ffm: bool | None = None  # None until line 1 says
        if num_fields is not None:
            self.fields = tuple(f"f{i}" for i in range(num_fields))
        super().__init__(*args, **kwargs)

    def _header(self, line: bytes) -> bool:
        tokens = line.split()
        if len(tokens) < 2:
            raise _BadLine("expected 'label idx:val ...' or 'label field:idx:val ...'")
        parts = tokens[1].count(b":") + 1
        if parts not in (2, 3):
            raise _BadLine(
                f"feature 1: expected idx:val or field:idx:val, got "
                f"{tokens[1][:40].decode('utf-8', 'replace')!r}"
            )
        self.ffm = parts == 3
        if self.num_fields is None:
            if self.ffm:
                self.num_fields = 1 + max(
                    _local_int(t.split(b":")[0], f"feature {k} (field)")
                    for k, t in enumerate(tokens[1:], 1)
                )
            else:
                self.num_fields = len(tokens) - 1
            self.fields = tuple(f"f{i}" for i in range(self.num_fields))
        return False

    def _label(self, v: bytes) -> float:
        y = _number(v, "label")
        if not self.binary:
            return y
        if y not in (-1.0, 0.0, 1.0):
            raise _BadLine(f"label: expected -1, 0 or 1, got {v[:40].decode('utf-8', 'replace')!r}")
        return float(y > 0)

    def _parse_line(self, line: bytes) -> tuple[Sequence[Any], Sequence[float], float]:
        try:
            got = self._fast(line)
        except (ValueError, IndexError, OverflowError):
            got = None
        if got is not None:
            return got
        return self._checked(line)  # raises _BadLine saying what is wrong

    def _fast(self, line: bytes) -> tuple[Sequence[Any], Sequence[float], float] | None:
        """The common case without messages: the parse, or None (or an exception) when
        anything is off; ``_checked`` then finds what."""
        tokens = line.split()
        y = float(tokens[0])
        if not math.isfinite(y) or (self.binary and y not in (-1.0, 0.0, 1.0)):
            return None
        label = float(y > 0) if self.binary else y
        nf = self.num_fields
        assert nf is not None
        if self.ffm:
            triples = [t.split(b":") for t in tokens[1:]]
            ids = [MISSING_LOCAL] * nf
            vals = [0.0] * nf
            for f, i, v in triples:
                if not (f.isdigit() and i.isdigit()):
                    return None
                fi = int(f)
                if fi >= nf or ids[fi] != MISSING_LOCAL:
                    return None
                ids[fi] = int(i)
                vals[fi] = float(v)
        else:
            if len(tokens) != nf + 1:
                return None
            pairs = [t.split(b":") for t in tokens[1:]]
            if not all(i.isdigit() for i, _ in pairs):
                return None
            ids = [int(i) for i, _ in pairs]
            vals = [float(v) for _, v in pairs]
        if max(ids, default=0) > LOCAL_MASK or not all(map(math.isfinite, vals)):
            return None
        return ids, vals, label

    def _checked(self, line: bytes) -> tuple[Sequence[Any], Sequence[float], float]:
        """The parse, one check at a time, each with its message."""
        tokens = line.split()
        if not tokens:
            raise _BadLine("empty line")
        y = self._label(tokens[0])
        nf = self.num_fields
        assert nf is not None
        feats = tokens[1:]
        if not self.ffm:
            if len(feats) != nf:
                raise _BadLine(f"expected {nf} idx:val features, got {len(feats)}")
            ids: list[int] = []
            vals: list[float] = []
            for k, t in enumerate(feats, 1):
                p = t.split(b":")
                if len(p) != 2:
                    shown = t[:40].decode("utf-8", "replace")
                    raise _BadLine(f"feature {k}: expected idx:val, got {shown!r}")
                ids.append(_local_int(p[0], f"feature {k} (idx)"))
                vals.append(_number(p[1], f"feature {k} (val)"))
            return ids, vals, y
        ids = [MISSING_LOCAL] * nf
        vals = [0.0] * nf
        seen = set()
        for k, t in enumerate(feats, 1):
            p = t.split(b":")
            if len(p) != 3:
                shown = t[:40].decode("utf-8", "replace")
                raise _BadLine(f"feature {k}: expected field:idx:val, got {shown!r}")
            f = _local_int(p[0], f"feature {k} (field)")
            if f >= nf:
                raise _BadLine(f"feature {k}: field {f} is not below num_fields = {nf}")
            if f in seen:
                raise _BadLine(f"feature {k}: field {f} appears twice")
            seen.add(f)
            ids[f] = _local_int(p[1], f"feature {k} (idx)")
            vals[f] = _number(p[2], f"feature {k} (val)")
        return ids, vals, y


def libsvm_batches(
    path: str | os.PathLike[str],
    batch_size: int,
    *,
    num_fields: int | None = None,
    binary: bool = True,
    skip_bad: bool = False,
    drop_last: bool = False,
    max_samples: int | None = None,
    chunk_lines: int = CHUNK_LINES,
) -> LibSVMStream:
    """Stream a libSVM / libFM (libFFM) file as batches (``LibSVMStream`` has the format).

    Yields ``Batch`` with sparse int64 (B, F) (feature k / field k -> field k), dense
    float32 (B, F) the features' values, labels float32 (B,). Errors and options as
    ``criteo_batches``; ``num_fields`` and ``binary`` as ``LibSVMStream``.

    Example::

        stream = libsvm_batches("frappe/train.libfm", 1024)   # 10 fields, labels -1/1
        for b in stream:
            b.sparse, b.dense, b.labels   # int64 (B, 10), float32 (B, 10) all 1.0, 0/1
    """
    return LibSVMStream(path, batch_size, num_fields=num_fields, binary=binary,
                        skip_bad=skip_bad, drop_last=drop_last, max_samples=max_samples,
                        chunk_lines=chunk_lines)  # fmt: skip
