"""OptEmbed (Lyu et al., CIKM 2022): learn which rows to keep and how wide each field's
table should be, then make the PS tables that small.

DESIGN

OptEmbed trains one *supernet* and reads three answers from it:

  rows        a learnable norm threshold per field (``OptEmbedMask``, client/torch.py):
              rows under their field's threshold read zeros (straight-through gradient);
              its regularization pushes the thresholds up.
  dims        uniform dimension sampling (``DimensionMask``): each training batch, each
              field f uses only the first d_f of the table's D columns, d_f drawn
              uniformly from ``candidates`` (after ``DimSchedule.warmup_steps`` steps at
              full width), so every prefix of a row learns to work on its own.
  search      ``evolutionary_search``: candidates are a dim per field, scored by a
              caller's function (held-out AUC of the trained supernet with those dims
              and the learned thresholds: ``auc_scorer``), optionally under a bytes
              budget; it returns the best dim per field.

Then the found architecture trains on (the paper's retraining stage, here in the same
pass): ``OptEmbedSupernet.fix(dims)`` stops the sampling (field f at d_f in training
too) and freezes the thresholds, and training goes on over the rest of the data, so the
dense part learns the architecture it will serve with and the rows it will keep.

Finally ``apply_optembed`` makes it real on the PS: ``Prune`` deletes every row under
its field's threshold (norms of the full rows, as the mask saw them in training), then
``Narrow`` keeps the first d_f columns of every row of field f's table and of its
optimizer slots, freeing the rest.

WHY RETRAIN IN THE SAME PASS, NOT FROM SCRATCH OR AGAIN. Recommendation models are
trained one pass over a stream; measured on ``embps bench memory`` (docs/benchmarks.md):
a second pass of the trained supernet over the same samples overfits (AUC -0.013),
and a fresh model trained from scratch at the found dims with the pruned ids held at
zero loses to the supernet (-0.004). Searching part-way (``embps bench memory``: after
60% of the steps) and training the fixed architecture on the remaining 40% recovered
most of what the dimension sampling costs.

WHAT COSTS AUC, MEASURED (``embps bench memory``, docs/benchmarks.md, "OptEmbed on six
seeds"). Two things, besides the rows a prune removes:
  - the paper's straight-through step also pushes every kept row along itself,
    (g . e) e / |e|: with nothing pruned and no sampling that alone cost 0.0013 AUC on
    one seed, and 0 with ``step_grad_to_rows=False`` (the thresholds still learn);
  - dimension sampling costs in proportion to how long it lasts (about 0.001 for 40% of
    the pass, 0.0004 for 15%), even when the found dims are the full width; drawing a
    width per sample, or the sandwich rule (full width plus a sampled width every step),
    cost as much. So sample briefly, just before the search: the search only ranks
    widths, and the found architecture trains on.

WHY A SERVER OPERATION (``Narrow``), NOT NEW TABLES FILLED FROM THE OLD. Copying would
pull every row to the trainer and push it back into a new table: twice the memory on
the shards while both exist, every row over the network twice, a new table name for
the model to learn, and the optimizer slots lost (pushes carry gradients, not slots),
so training could not go on where it stopped. Narrowing in place is one request per
shard, keeps names, keys, metadata and slots (their first d_f columns), and frees the
memory at once; the config's dim follows, so DescribeTables, pulls and checkpoints
agree. Its limits are the server's (``Table.narrow``): qr tables with the concat
combiner cannot be narrowed, and a full checkpoint must follow before an incremental
one.

A narrowed table's pulls are (n, d_f); a model built for width D reads them through
``OptEmbedField`` with ``deployed=True`` on the supernet, which pads zeros to D: the same
numbers the supernet computed with those dims (columns >= d_f were masked to zero).

LIMITATIONS. The search scores each candidate with a forward pass of the dense model
over ``SearchBudget.eval_samples`` cached rows: population x generations passes at most
(repeats are cached). A candidate over the bytes budget is repaired before it is scored
(its widest field steps down one candidate dim until it fits); if even the smallest
dims do not fit, the search raises ValueError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from embps.client.ps_client import NarrowResult, PruneResult, PSClient
from embps.client.torch import OptEmbedMask, _StraightThroughStep

__all__ = [
    "DimSchedule",
    "DimensionMask",
    "OptEmbedApplied",
    "OptEmbedField",
    "OptEmbedSupernet",
    "SearchBudget",
    "SearchResult",
    "apply_optembed",
    "auc_scorer",
    "evolutionary_search",
]

_NORM_ORD = {"l1": 1.0, "l2": 2.0, "linf": float("inf")}


# --------------------------------------------------------------------------
# Supernet: dimension mask, schedule, the per-field module
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DimSchedule:
    """When the dimension mask samples.

    warmup_steps: training forwards of a field at full width before sampling starts
    (the rows first learn as one table). full_prob: after warmup, the chance a batch
    uses the full width anyway (keeps the widest architecture trained; 0: pure uniform
    sampling, the paper's).
    """

    warmup_steps: int = 0
    full_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.full_prob <= 1.0:
            raise ValueError(f"full_prob must be in [0, 1], got {self.full_prob}")


class DimensionMask(nn.Module):
    """Uniform dimension sampling: field f uses the first d_f of ``dim`` columns.

    In training, each ``forward(field, emb)`` draws d_f uniformly from ``candidates``
    (per ``schedule``) and zeroes columns >= d_f, so only the first d_f columns get
    gradients. In eval it uses ``dims`` (int64 (F,), a buffer; default: the full width),
    the architecture being scored or deployed.

    Example::

        dm = DimensionMask(num_fields=3, dim=16, candidates=(2, 4, 8, 16))
        e = dm(0, emb_a(a))            # (B, 16), columns >= d_0 zero
        dm.eval(); dm.dims[:] = torch.tensor([4, 2, 16])
    """

    dims: torch.Tensor

    def __init__(
        self,
        num_fields: int,
        dim: int,
        candidates: Sequence[int] | None = None,
        schedule: DimSchedule | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_fields < 1 or dim < 1:
            raise ValueError(f"num_fields and dim must be >= 1, got {num_fields}, {dim}")
        cand = sorted(set(candidates if candidates is not None else range(1, dim + 1)))
        if not cand or cand[0] < 1 or cand[-1] > dim:
            raise ValueError(f"candidates must be dims in [1, {dim}], got {list(cand)}")
        self.num_fields = num_fields
        self.dim = dim
        self.candidates = tuple(int(c) for c in cand)
        self.schedule = schedule or DimSchedule()
        self.register_buffer("dims", torch.full((num_fields,), dim, dtype=torch.int64))
        self.steps = [0] * num_fields  # training forwards per field
        self.fixed = False  # ``fix``: training uses ``dims`` too, no sampling
        self._rng = np.random.default_rng(seed)

    def sample(self, field: int) -> int:
        """The width field ``field`` uses in its next training forward (advances its step)."""
        step = self.steps[field]
        self.steps[field] += 1
        s = self.schedule
        if step < s.warmup_steps or (s.full_prob and self._rng.random() < s.full_prob):
            return self.dim
        return self.candidates[int(self._rng.integers(len(self.candidates)))]

    def fix(self, dims: Sequence[int]) -> None:
        """Stop sampling: from now on training uses ``dims`` (one per field, each a
        candidate) too, so the model trains the found architecture (columns >= d_f get
        no gradient) until it is applied."""
        d = [int(x) for x in dims]
        if len(d) != self.num_fields or any(x not in self.candidates for x in d):
            raise ValueError(
                f"dims must be one of {list(self.candidates)} per field ({self.num_fields}), "
                f"got {d}"
            )
        self.dims[:] = torch.as_tensor(d, dtype=torch.int64)
        self.fixed = True

    def forward(self, field: int, emb: torch.Tensor) -> torch.Tensor:
        """emb float (B, dim) -> (B, dim) with columns >= d_field zero."""
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"emb must be (B, {self.dim}), got {tuple(emb.shape)}")
        sampling = self.training and not self.fixed
        d = self.sample(field) if sampling else int(self.dims[field])
        if d >= self.dim:
            return emb
        keep = (torch.arange(self.dim, device=emb.device) < d).to(emb.dtype)
        return emb * keep


class OptEmbedSupernet(nn.Module):
    """The shared parts of an OptEmbed model: the thresholds (``OptEmbedMask``) and the
    dimension mask. ``deployed`` (set by ``apply_optembed``): the PS tables are pruned and
    narrowed, so fields only pad their rows back to ``dim``.

    masked_rows_learn: a row under its threshold reads zeros but still gets the whole
    gradient of its output (besides the step's; a dense straight-through gradient, as in
    dynamic sparse training), so it can learn its way over the threshold. False (the
    paper's mask): it gets only the step's straight-through gradient through its norm,
    so it can only grow or shrink along the direction it has; a new id admitted after
    the thresholds rose (ids keep arriving in a stream) starts under them and stays
    nearly frozen.

    step_grad_to_rows: the step's straight-through gradient reaches the rows as well as
    the thresholds (the paper's mask: each row also gets (g . e) e / |e|, a push along
    itself, kept or not). False: the row norms the step compares are constants to
    autograd, so only the thresholds learn from the step; a kept row's gradient is
    then exactly the model's (measured: docs/benchmarks.md, "OptEmbed on six seeds").

    Example::

        net = OptEmbedSupernet(num_fields=4, dim=16, candidates=(1, 2, 4, 8, 16))
        fields = [OptEmbedField(RemoteEmbedding(ps, t), net, f) for f, t in enumerate(tables)]
        model = DLRM(fields, ...)                        # train with net.regularization()
        best = evolutionary_search(auc_scorer(model, net, sparse, dense, labels), ...)
        apply_optembed(ps, tables, net, best.dims)
    """

    def __init__(
        self,
        num_fields: int,
        dim: int,
        candidates: Sequence[int] | None = None,
        schedule: DimSchedule | None = None,
        norm: str = "l2",
        init_threshold: float = 0.0,
        weight: float = 1e-4,
        seed: int = 0,
        masked_rows_learn: bool = False,
        step_grad_to_rows: bool = True,
    ) -> None:
        super().__init__()
        self.mask = OptEmbedMask(num_fields, norm, init_threshold, weight)
        self.dim_mask = DimensionMask(num_fields, dim, candidates, schedule, seed)
        self.dim = dim
        self.masked_rows_learn = masked_rows_learn
        self.step_grad_to_rows = step_grad_to_rows
        self.deployed = False

    @property
    def num_fields(self) -> int:
        return self.dim_mask.num_fields

    def regularization(self) -> torch.Tensor:
        """The threshold regularizer (``OptEmbedMask.regularization``): add it to the loss.
        Zero once ``fix`` froze the thresholds."""
        if not self.mask.threshold.requires_grad:
            return torch.zeros((), dtype=self.mask.threshold.dtype)
        return self.mask.regularization()

    def fix(self, dims: Sequence[int]) -> None:
        """Fix the found architecture for training on before ``apply_optembed``: field f
        at width ``dims[f]`` (``DimensionMask.fix``: no more sampling) and the thresholds
        frozen where they are (no gradient, ``regularization()`` 0), so the rows a later
        prune keeps, and hence the bytes the search budgeted, stop moving."""
        self.dim_mask.fix(dims)
        self.mask.threshold.requires_grad_(False)

    def field_forward(self, field: int, emb: torch.Tensor) -> torch.Tensor:
        """One field's rows float (B, d) (d <= dim) -> (B, dim): zero-padded; before
        deployment also threshold-masked (full-row norm) and dimension-masked."""
        if emb.shape[-1] < self.dim:
            emb = nn.functional.pad(emb, (0, self.dim - emb.shape[-1]))
        if self.deployed:
            return emb
        rows = emb if self.step_grad_to_rows else emb.detach()
        norms = torch.linalg.vector_norm(rows, ord=_NORM_ORD[self.mask.norm], dim=-1)
        keep = _StraightThroughStep.apply(norms - self.mask.threshold[field]).unsqueeze(-1)
        out = emb * keep
        if self.masked_rows_learn:  # value unchanged (0 added); masked rows' gradient: whole
            out = out + (emb - emb.detach()) * (1.0 - keep.detach())
        return self.dim_mask(field, out)


class OptEmbedField(nn.Module):
    """Field ``field``'s embedding in an OptEmbed model: ``inner`` (ids -> (B, d), e.g. a
    ``RemoteEmbedding``) through the supernet's masks. Pipelining (``prefetch``,
    ``staleness``, ``step``, ``flush``, ``close``) passes through to ``inner``."""

    def __init__(self, inner: nn.Module, supernet: OptEmbedSupernet, field: int) -> None:
        super().__init__()
        if not 0 <= field < supernet.num_fields:
            raise ValueError(f"field must be in [0, {supernet.num_fields}), got {field}")
        self.inner = inner
        self.supernet = supernet
        self.field = field

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.supernet.field_forward(self.field, self.inner(ids))

    @property
    def staleness(self) -> int:
        return int(getattr(self.inner, "staleness", 0))

    @property
    def step(self) -> int:
        return int(getattr(self.inner, "step", 0))

    @step.setter
    def step(self, value: int) -> None:
        setattr(self.inner, "step", value)  # noqa: B010 - any inner module

    def prefetch(self, ids: Any) -> None:
        fn = getattr(self.inner, "prefetch", None)
        if fn is not None:
            fn(ids)

    def flush(self) -> None:
        fn = getattr(self.inner, "flush", None)
        if fn is not None:
            fn()

    def close(self) -> None:
        fn = getattr(self.inner, "close", None)
        if fn is not None:
            fn()


# --------------------------------------------------------------------------
# Evolutionary search
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchBudget:
    """What the search may spend. At most ``population * generations`` distinct
    candidates are scored (repeats come from a cache).

    population: candidates alive per generation (the first are random). generations:
    rounds of selection. parents: the best kept each round (top-k); the rest of the next
    population is half ``crossover`` children (each field's dim from one of two random
    parents) and half ``mutation`` children (each field's dim redrawn with probability
    ``mutation_prob``). eval_samples: held-out samples a score may use (read by the
    caller's scorer, e.g. ``auc_scorer``).
    """

    population: int = 20
    generations: int = 10
    parents: int = 8
    mutation_prob: float = 0.2
    eval_samples: int = 20_000

    def __post_init__(self) -> None:
        if self.population < 2 or self.generations < 1:
            raise ValueError("population must be >= 2 and generations >= 1")
        if not 1 <= self.parents <= self.population:
            raise ValueError(f"parents must be in [1, population], got {self.parents}")
        if not 0.0 < self.mutation_prob <= 1.0:
            raise ValueError(f"mutation_prob must be in (0, 1], got {self.mutation_prob}")


@dataclass
class SearchResult:
    """The best dims found (int64 (F,)), their score, the best score after each
    generation, and how many distinct candidates were scored."""

    dims: np.ndarray
    score: float
    history: list[float] = field(default_factory=list)
    evaluations: int = 0


def evolutionary_search(
    score: Callable[[np.ndarray], float],
    num_fields: int,
    candidates: Sequence[int],
    budget: SearchBudget | None = None,
    seed: int = 0,
    cost: Callable[[np.ndarray], float] | None = None,
    max_cost: float | None = None,
) -> SearchResult:
    """Search a dim per field that maximises ``score(dims)`` (dims int64 (F,), each in
    ``candidates``), within ``budget``; with ``cost`` and ``max_cost`` only candidates
    with ``cost(dims) <= max_cost`` are scored (e.g. the tables' bytes after applying).

    Deterministic for a seed and a deterministic score. Ties keep the cheaper
    candidate (smaller sum of dims). Returns the best candidate scored.

    Example::

        best = evolutionary_search(lambda d: auc_of(d), num_fields=4, candidates=(1, 2, 4, 8, 16))
        best.dims   # e.g. array([16, 2, 1, 4])
    """
    b = budget or SearchBudget()
    cand = np.array(sorted(set(int(c) for c in candidates)), dtype=np.int64)
    if cand.shape[0] == 0:
        raise ValueError("candidates must not be empty")
    rng = np.random.default_rng(seed)
    cache: dict[tuple[int, ...], float] = {}

    def fits(d: np.ndarray) -> bool:
        return cost is None or max_cost is None or cost(d) <= max_cost

    def scored(d: np.ndarray) -> float:
        k = tuple(int(x) for x in d)
        if k not in cache:
            cache[k] = float(score(d.copy()))
        return cache[k]

    def draw(make: Callable[[], np.ndarray]) -> np.ndarray:
        """make() repaired to fit: the widest field steps down a candidate until it fits."""
        d = make().copy()
        while not fits(d):
            wide = np.flatnonzero(d == d.max())
            if d.max() == cand[0]:
                raise ValueError(
                    f"no candidate within max_cost={max_cost}: even every field at dim "
                    f"{cand[0]} costs {cost(d) if cost else 0}; allow smaller dims or raise it"
                )
            f = int(wide[rng.integers(wide.shape[0])])
            d[f] = cand[np.searchsorted(cand, d[f]) - 1]
        return d

    def rand() -> np.ndarray:
        return cand[rng.integers(cand.shape[0], size=num_fields)]

    pop = [draw(rand) for _ in range(b.population)]
    history: list[float] = []
    for _gen in range(b.generations):
        ranked = sorted(pop, key=lambda d: (-scored(d), int(d.sum()), tuple(d)))
        history.append(scored(ranked[0]))
        if _gen == b.generations - 1:
            break
        parents = ranked[: b.parents]
        children: list[np.ndarray] = list(parents)
        n_cross = (b.population - len(children)) // 2

        def cross(parents: list[np.ndarray] = parents) -> np.ndarray:
            i, j = rng.integers(len(parents), size=2)
            pick = rng.random(num_fields) < 0.5
            return np.where(pick, parents[i], parents[j])

        def mutate(parents: list[np.ndarray] = parents) -> np.ndarray:
            p = parents[int(rng.integers(len(parents)))]
            redraw = rng.random(num_fields) < b.mutation_prob
            return np.where(redraw, rand(), p)

        children += [draw(cross) for _ in range(n_cross)]
        children += [draw(mutate) for _ in range(b.population - len(children))]
        pop = children
    best = sorted(cache.items(), key=lambda kv: (-kv[1], sum(kv[0]), kv[0]))
    best = [kv for kv in best if fits(np.array(kv[0], dtype=np.int64))]
    dims, s = best[0]
    return SearchResult(np.array(dims, dtype=np.int64), s, history, len(cache))


class _Cached(nn.Module):
    """Rows of one field for sample indices: ``forward(idx) -> rows[idx]``."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = rows

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows[idx]


def auc_scorer(
    model: Any,
    supernet: OptEmbedSupernet,
    sparse: np.ndarray,
    dense: np.ndarray,
    labels: np.ndarray,
) -> Callable[[np.ndarray], float]:
    """A ``score(dims) -> AUC`` for ``evolutionary_search``: the trained supernet model on
    held-out samples (sparse int64 (n, F), dense float32 (n, num_dense), labels (n,)) with
    field f at width dims[f] and the learned thresholds.

    The model must keep one module per field in ``model.embeddings`` (each applied to
    ``sparse[:, f]``, e.g. ``DLRM``). Each field's rows are read once (eval mode) and
    threshold-masked; a candidate then costs one forward of the dense part.
    """
    from embps.client.data import auc

    was_training = model.training
    model.eval()
    n, f = sparse.shape
    ids = torch.from_numpy(np.ascontiguousarray(sparse, dtype=np.int64))
    with torch.no_grad():
        rows = []
        for j, emb in enumerate(model.embeddings):
            inner = emb.inner if isinstance(emb, OptEmbedField) else emb
            e = inner(ids[:, j])
            if e.shape[-1] < supernet.dim:
                e = nn.functional.pad(e, (0, supernet.dim - e.shape[-1]))
            norms = torch.linalg.vector_norm(e, ord=_NORM_ORD[supernet.mask.norm], dim=-1)
            rows.append(e * (norms > supernet.mask.threshold[j]).to(e.dtype).unsqueeze(-1))
    idx = torch.arange(n, dtype=torch.int64).unsqueeze(1).expand(n, f).contiguous()
    dense_t = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
    cols = torch.arange(supernet.dim)
    y = np.asarray(labels)

    def score(dims: np.ndarray) -> float:
        originals = model.embeddings
        model.embeddings = nn.ModuleList(
            _Cached(r * (cols < int(d)).to(r.dtype)) for r, d in zip(rows, dims, strict=True)
        )
        try:
            with torch.no_grad():
                p = torch.sigmoid(model(idx, dense_t)).numpy()
        finally:
            model.embeddings = originals
        return auc(y, p)

    if was_training:
        model.train()
    return score


# --------------------------------------------------------------------------
# Apply on the PS
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class OptEmbedApplied:
    """One field's table after ``apply_optembed``: rows pruned and their bytes, the
    narrowing (old and new dim, bytes freed)."""

    table: str
    pruned: PruneResult
    narrowed: NarrowResult

    @property
    def bytes_freed(self) -> int:
        return self.pruned.bytes + self.narrowed.bytes


def apply_optembed(
    client: PSClient, tables: Sequence[str], supernet: OptEmbedSupernet, dims: Sequence[int]
) -> list[OptEmbedApplied]:
    """Make the search's answer real: prune every row under its field's threshold (the
    full rows' norms, as in training), then narrow field f's table to ``dims[f]``.

    tables: one per field. Sets ``supernet.deployed`` (fields then pad rows to ``dim``)
    and the dimension mask's eval dims. Returns one ``OptEmbedApplied`` per table.
    """
    if len(tables) != supernet.num_fields or len(dims) != supernet.num_fields:
        raise ValueError(
            f"need one table and one dim per field ({supernet.num_fields}), got "
            f"{len(tables)} tables and {len(dims)} dims"
        )
    pruned = supernet.mask.prune(client, list(tables))
    out = []
    for t, p, d in zip(tables, pruned, dims, strict=True):
        out.append(OptEmbedApplied(t, p, client.narrow(t, int(d))))
    supernet.dim_mask.dims[:] = torch.as_tensor([int(d) for d in dims], dtype=torch.int64)
    supernet.deployed = True
    return out
