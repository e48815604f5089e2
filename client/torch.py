"""PyTorch modules whose embedding rows live in embps.

``RemoteEmbedding`` and ``RemoteEmbeddingBag`` behave like ``torch.nn.Embedding``
and ``torch.nn.EmbeddingBag`` (sum/mean pooling with offsets), but their rows are
pulled from a PS table in ``forward`` and their gradients are pushed to it in
``backward``, where the table's optimizer runs. No push call appears in the
training loop: ``loss.backward()`` does it.

``RemoteEmbeddingCollection`` and ``RemoteEmbeddingBagCollection`` (TorchRec's
``EmbeddingCollection`` / ``EmbeddingBagCollection``) do the same for every sparse
feature of a model at once: features map to tables (``RemoteTableConfig``), and a
training step is ONE request per shard whatever the number of tables (the pull of
step t carries the push of step t-1: ``PSClient.push_pull``). Prefer them to one
``RemoteEmbedding`` per field, which costs a pull and a push per table per shard
per step; see the DESIGN note above ``Pooling``.

How one step flows::

    ids (any shape) -> unique keys + inverse (trainer side)
      -> PSClient.pull(unique)            rows float32 (m, dim), pinned -> device
      -> U: a tensor that requires grad  (m, dim)
      -> U[inverse] / F.embedding_bag(inverse, U, offsets, mode)
    loss.backward() -> dU (m, dim) -> PSClient.push(unique, dU, step)

Pipelining (``staleness``):
  * 0 (default): synchronous. Every pull sees every earlier push; training is
    exactly in-process training with the same optimizer (tested against
    ``torch.nn.Embedding`` + ``torch.optim``).
  * s >= 1: pushes run on a background thread, in order; ``prefetch(ids)``
    pulls the next batch's rows while the current batch computes. A pull never
    misses more than ``s`` earlier pushes: before it starts, the module waits
    until at most ``s`` pushes are outstanding (``s - 1`` for a prefetch, which
    also misses the push of the batch being computed). A prefetch does that
    waiting, and the unique + inverse of its ids, on its pull thread: the call
    returns at once, and the ``forward`` with those ids reuses them. ``flush()``
    waits for every push and re-raises the first push error.

Example::

    import torch
    from embps.client import PSClient, Adagrad
    from embps.client.torch import RemoteEmbedding

    ps = PSClient(["127.0.0.1:50051"])
    ps.create_table("item", dim=16, optimizer=Adagrad(lr=0.05))
    emb = RemoteEmbedding(ps, "item")             # rows on the PS
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.Adagrad(head.parameters(), lr=0.05)   # dense params only
    ids = torch.tensor([[1, 2], [2, 3]])
    loss = head(emb(ids).sum(1)).pow(2).mean()
    loss.backward()                                # pushes the rows' gradients
    opt.step()
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

import numpy as np

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "embps.client.torch needs PyTorch; install it with `pip install torch` "
        "(or the extra: `pip install 'embps[torch]'`)"
    ) from e

from embps.client.plan import Plan, distinct_plan, plan_keys
from embps.client.ps_client import PSClient

__all__ = [
    "FieldColumns",
    "JaggedIds",
    "MixedDimBlock",
    "MixedDimEmbedding",
    "OptEmbedMask",
    "Pooling",
    "RemoteEmbedding",
    "RemoteEmbeddingBag",
    "RemoteEmbeddingBagCollection",
    "RemoteEmbeddingCollection",
    "RemoteTableConfig",
    "plan_mixed_dim_blocks",
    "plan_mixed_dim_blocks_from_ps",
    "unique_inverse",
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def unique_inverse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys (ascending) and the inverse: ``uniq[inverse] == keys``.

    keys: int64 (n,) -> (uniq: int64 (m,), inverse: int64 (n,)). Sort-based:
    faster than numpy 2's hash-based ``np.unique(return_inverse=True)`` here.
    """
    n = keys.shape[0]
    if n == 0:
        return keys.copy(), np.empty(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    s = keys[order]
    new = np.empty(n, dtype=np.bool_)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    group = np.cumsum(new) - 1
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = group
    return s[new], inverse


def _rows_at(u: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``u[inverse]``: u (m, dim), inverse int64 (any shape) -> (*inverse.shape, dim).

    On the cpu through ``index_select``, whose backward (``index_add_``) is 5-20x
    faster there than ``F.embedding``'s (measured with torch 2.13, 2k-8k ids, dim
    16); elsewhere ``F.embedding`` (its backward is the deterministic one on CUDA).
    """
    if u.device.type != "cpu":
        return F.embedding(inverse, u)
    return u.index_select(0, inverse.reshape(-1)).view(*inverse.shape, u.shape[1])


def _grad_array(grad: torch.Tensor) -> np.ndarray:
    """A gradient on any device -> float32 (m, dim) on the cpu, contiguous, for a push."""
    return grad.detach().to("cpu", torch.float32).contiguous().numpy()


class _Lookup:
    """One forward's pull: the unique keys, their rows, and how to push their gradient."""

    __slots__ = ("keys", "owner", "rows")

    def __init__(self, owner: _RemoteBase, keys: np.ndarray, rows: torch.Tensor) -> None:
        self.owner = owner
        self.keys = keys
        self.rows = rows


class _Prefetch:
    """A pull started ahead: the ids (int64 (n,)), the mode, and the pull thread's
    (unique keys (m,), inverse (n,), rows float32 (m, dim))."""

    __slots__ = ("keys", "result", "train")

    def __init__(
        self,
        keys: np.ndarray,
        train: bool,
        result: Future[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        self.keys = keys
        self.train = train
        self.result = result


class _Pipeline:
    """A pipelined module's two background threads: one pulls (prefetch), one pushes.

    (One module, one pair: sharing one pair among a model's fields was measured
    slower, since its pulls then run one after another; see docs/benchmarks.md.)
    """

    def __init__(self, name: str) -> None:
        self.pull = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-pull")
        self.push = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-push")

    def close(self) -> None:
        """Stop both threads after the work already queued."""
        self.push.shutdown(wait=True)
        self.pull.shutdown(wait=True)


class _PullPush(torch.autograd.Function):
    """Identity on the pulled rows whose backward pushes their gradient to the PS."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, lookup: _Lookup) -> torch.Tensor:
        ctx.lookup = lookup
        return lookup.rows

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[None, None]:
        lookup: _Lookup = ctx.lookup
        lookup.owner._push(lookup.keys, grad_rows)
        return None, None


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


class _DeviceModule(nn.Module):
    """A module whose pulled rows land on its device: ``device`` (cpu by default) or
    wherever ``.to()`` moves it; rows reach an accelerator through pinned memory."""

    def __init__(self, device: torch.device | str | None) -> None:
        super().__init__()
        self._device = torch.device(device) if device is not None else None

    def _target_device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> Self:
        """Move the module: pulled rows are copied to this device from then on."""
        device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self._device = torch.device(device)
        super().to(*args, **kwargs)
        return self

    def _to_device(self, rows: np.ndarray) -> torch.Tensor:
        """rows float32 (m, dim) -> a tensor on the target device (no copy on cpu)."""
        t = torch.from_numpy(rows)
        dev = self._target_device()
        if dev.type == "cpu":
            return t
        return t.pin_memory().to(dev, non_blocking=True)


class _RemoteBase(_DeviceModule):
    """Pull/push plumbing shared by RemoteEmbedding and RemoteEmbeddingBag."""

    def __init__(
        self,
        client: PSClient,
        table: str,
        *,
        staleness: int = 0,
        device: torch.device | str | None = None,
        start_step: int = 0,
    ) -> None:
        super().__init__(device)
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        dims = {t.name: t.dim for t in client.describe_tables()}
        if table not in dims:
            raise ValueError(
                f"table {table!r} does not exist on the PS (tables: {sorted(dims)}); create it first"
            )
        self.client = client
        self.table = table
        self.embedding_dim = dims[table]
        self.staleness = staleness
        self.step = start_step
        self._pushes: deque[Future[Any]] = deque()
        self._pipeline: _Pipeline | None = None
        if staleness:
            self._pipeline = _Pipeline(f"embps-{table}")
        self._prefetched: _Prefetch | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- pull
    def prefetch(self, ids: torch.Tensor | np.ndarray) -> None:
        """Start pulling the rows of ``ids`` (the next batch) in the background.

        Needs ``staleness >= 1``: the prefetched rows miss the push of the batch
        being computed now. The next ``forward`` with the same ids uses them.
        """
        if self._pipeline is None:
            raise RuntimeError("prefetch needs staleness >= 1 (staleness=0 is exactly synchronous)")
        keys = np.array(_as_keys(ids))  # a copy: the caller may reuse its buffer
        self._raise_push_errors()
        # The pushes this pull must see: all but the last staleness - 1 issued so far.
        # The pull thread waits for them, so this call returns at once.
        must_see = list(self._pushes)[: max(len(self._pushes) - (self.staleness - 1), 0)]
        train = self.training
        fut = self._pipeline.pull.submit(self._pull_after, must_see, keys, train)
        self._prefetched = _Prefetch(keys, train, fut)

    def _pull_after(
        self, pushes: list[Future[Any]], keys: np.ndarray, train: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pull thread) unique + inverse of ``keys``; wait for ``pushes`` (their errors
        surface in the trainer's thread, at the next push or flush); pull. -> (uniq,
        inverse, rows float32 (m, dim))."""
        uniq, inverse = unique_inverse(keys)
        if pushes:
            wait(pushes)
        return uniq, inverse, self.client.pull(self.table, uniq, train=train)

    def _take_prefetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(uniq, inverse, rows) of the prefetch for exactly these keys, else None.

        A prefetch for other ids (or the other train/eval mode) is finished and dropped.
        """
        pre = self._prefetched
        if pre is None:
            return None
        self._prefetched = None
        if pre.train == self.training and np.array_equal(pre.keys, keys):
            return pre.result.result()
        pre.result.result()  # finish it (an error surfaces here), then pull ours
        return None

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U: rows of the unique ids (m, dim) wired for backward, inverse: int64 ids.shape)."""
        keys = _as_keys(ids)
        hit = self._take_prefetch(keys)
        if hit is not None:
            uniq, inverse, pulled = hit
        else:
            uniq, inverse = unique_inverse(keys)
            self._wait_pushes(self.staleness)
            pulled = self.client.pull(self.table, uniq, train=self.training)
        rows = self._to_device(pulled)
        inv = torch.from_numpy(inverse).view(ids.shape).to(rows.device, non_blocking=True)
        if self.training and torch.is_grad_enabled():
            anchor = torch.empty(0, requires_grad=True)
            u = _PullPush.apply(anchor, _Lookup(self, uniq, rows))
            return u, inv
        return rows, inv

    # ---------------------------------------------------------------- push
    def _push(self, keys: np.ndarray, grad: torch.Tensor) -> None:
        g = _grad_array(grad)
        step = self.step
        self.step += 1
        if self._pipeline is None:
            self.client.push(self.table, keys, g, step=step)
            return
        self._raise_push_errors()
        # No copy of g: autograd hands each backward a gradient it never touches again,
        # and the array keeps its tensor alive until the push has sent it.
        self._pushes.append(self._pipeline.push.submit(self.client.push, self.table, keys, g, step))

    def _wait_pushes(self, allowed: int) -> None:
        """Block until at most ``allowed`` pushes are outstanding; re-raise a failed push."""
        while self._pushes and (len(self._pushes) > max(allowed, 0) or self._pushes[0].done()):
            fut = self._pushes.popleft()
            fut.result()

    def _raise_push_errors(self) -> None:
        while self._pushes and self._pushes[0].done():
            self._pushes.popleft().result()

    def flush(self) -> None:
        """Wait for every outstanding push (and prefetch); re-raise the first error."""
        self._wait_pushes(0)
        if self._prefetched is not None:
            self._prefetched.result.result()

    def close(self) -> None:
        """Flush and stop the background threads."""
        try:
            self.flush()
        finally:
            if self._pipeline is not None:
                self._pipeline.close()

    def extra_repr(self) -> str:
        return f"table={self.table!r}, dim={self.embedding_dim}, staleness={self.staleness}"


class RemoteEmbedding(_RemoteBase):
    """``nn.Embedding`` backed by a PS table: ``forward(ids) -> (*ids.shape, dim)``.

    ids: any integer tensor (or array); duplicates are pulled once.
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        u, inv = self._lookup(ids)
        return _rows_at(u, inv)


class RemoteEmbeddingBag(_RemoteBase):
    """``nn.EmbeddingBag`` backed by a PS table: pooled rows of multi-valued features.

    ``forward(input, offsets=None, per_sample_weights=None) -> (B, dim)`` with the
    same conventions as ``torch.nn.EmbeddingBag``: a 2-D ``input`` (B, L) is B
    bags of L ids; a 1-D ``input`` with ``offsets`` (B,) gives bag starts.
    """

    def __init__(self, client: PSClient, table: str, mode: str = "mean", **kwargs: Any) -> None:
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        super().__init__(client, table, **kwargs)
        self.mode = mode

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        input = torch.as_tensor(input)
        if input.dim() == 1 and offsets is None:
            raise ValueError("a 1-D input needs offsets (bag starts), as in torch.nn.EmbeddingBag")
        u, inv = self._lookup(input)
        if offsets is not None:
            offsets = torch.as_tensor(offsets).to(inv.device)
        return F.embedding_bag(
            inv, u, offsets, mode=self.mode, per_sample_weights=per_sample_weights
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}"


# --------------------------------------------------------------------------
# Collections: every feature of a step in one round trip per shard
# --------------------------------------------------------------------------
#
# DESIGN (RemoteEmbeddingCollection, RemoteEmbeddingBagCollection)
#
# One module for all sparse features of a step, as TorchRec's EmbeddingCollection
# and EmbeddingBagCollection: features map to PS tables (several features may
# share one), ``forward({feature: ids})`` returns ``{feature: rows}``.
#
# Grouping. Per table, the keys of its features are concatenated (in config
# order) and made distinct and routed once (``plan.plan_keys``: one numba pass; the
# client takes that plan as it is, for the pull and for the push, and deduplicates
# nothing again): the table's rows U (m, dim) are pulled once, every feature indexes U with its slice of the inverse, and the
# gradient of U (m, dim), which autograd sums over every feature and duplicate,
# is that table's one push group. One autograd node covers every table, so one
# ``backward`` is one push of all tables.
#
# The held push. ``backward`` does not send: it holds its push {table: (keys,
# dU)} with its step, and the next call that reaches the PS carries it as
# ``PSClient.push_pull(held, pulls)``: one request per shard that applies the
# push, then answers the pulls, which therefore see it. That next call is
#   * the next training forward (staleness 0): exactly synchronous training in
#     one RPC per shard per step;
#   * the next ``prefetch`` (staleness >= 1), on the pull thread;
#   * ``flush()`` (a ``push_many`` alone), which ``eval()``, ``close()``, a
#     mode switch and a checkpoint need; a second ``backward`` before any of these
#     also sends the earlier push alone (gradient accumulation).
# Each push is sent exactly once, in backward order, before any pull issued
# after it (a failed send raises: see LIMITATIONS).
#
# Steps. Each backward takes the module's step counter (``step``, from
# ``start_step``; assign it to resume) and advances it; its push carries it as
# ``step=`` so Adam's bias correction is torch's (t = step + 1) on every table.
#
# Pipelining (staleness s >= 1). One background thread runs every PS call in
# the order issued (a prefetch with the held push, a push alone), so a pull
# sees every push whose backward ran before the pull was issued. The pull of a
# prefetch issued before the current batch's backward misses that one push:
# staleness 1, within any bound s >= 1; issued after it, it misses nothing. At
# most s calls carrying a push are outstanding (the next one waits). Without
# prefetch a pipelined collection runs as staleness 0 (each forward carries the
# held push, and waits for its rows).
#
# LIMITATIONS. A failed fused call raises in the forward (or prefetch result)
# that carried the push: its push is not resent (PSClient retries pushes only
# with a client id, ``idempotent_push=True``; a fused request carries a push, so
# its pulls are then not retried either). Every configured feature must be in
# every input (a missing feature is an error, not an empty lookup).


class Pooling(StrEnum):
    """How a bag's rows become one vector (``RemoteTableConfig.pooling``)."""

    SUM = "sum"  # the rows added up (TorchRec's default)
    MEAN = "mean"  # the rows averaged; an empty bag gives zeros


@dataclass(frozen=True)
class RemoteTableConfig:
    """A PS table and the features that look it up (TorchRec's ``EmbeddingConfig`` /
    ``EmbeddingBagConfig``; the dim, optimizer and initializer live on the PS).

    name: the PS table (create it first). feature_names: the input features whose
    ids are keys of this table, at least one; several features may share a table
    (their keys and gradients go as one group). pooling: for
    ``RemoteEmbeddingBagCollection`` only, ``"sum"`` (the default) or ``"mean"``.

    Example::

        RemoteTableConfig("user", ["user_id"])
        RemoteTableConfig("item", ["item_id", "last_item_id"], pooling="mean")
    """

    name: str
    feature_names: Sequence[str]
    pooling: Pooling | str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"table name must be a non-empty string, got {self.name!r}")
        if isinstance(self.feature_names, str):
            raise ValueError(
                f"table {self.name!r}: feature_names must be a list of names, got the string "
                f"{self.feature_names!r}"
            )
        names = tuple(self.feature_names)
        if not names:
            raise ValueError(f"table {self.name!r}: feature_names is empty; give at least one")
        for f in names:
            if not isinstance(f, str) or not f:
                raise ValueError(f"table {self.name!r}: feature names must be strings, got {f!r}")
        dup = sorted({f for f in names if names.count(f) > 1})
        if dup:
            raise ValueError(f"table {self.name!r}: duplicate feature names {dup}")
        object.__setattr__(self, "feature_names", names)
        if self.pooling is not None:
            try:
                pooling = Pooling(str(self.pooling).lower())
            except ValueError:
                raise ValueError(
                    f"table {self.name!r}: pooling must be 'sum' or 'mean', got {self.pooling!r}"
                ) from None
            object.__setattr__(self, "pooling", pooling)


@dataclass(frozen=True)
class JaggedIds:
    """The ids of one feature as bags of any length (a ``KeyedJaggedTensor``'s feature).

    values: integer (n,), the bags one after another; offsets: integer (B + 1,),
    bag b is ``values[offsets[b]:offsets[b + 1]]`` (``offsets[0] == 0``,
    ``offsets[-1] == n``, non-decreasing). ``torch.nn.EmbeddingBag``'s offsets are
    the B bag starts: append n (or build with ``from_lengths``).
    """

    values: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_lengths(cls, values: Any, lengths: Any) -> JaggedIds:
        """Bags from their lengths: integer (B,) -> offsets (B + 1,)."""
        lens = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
        offsets = torch.zeros(lens.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=offsets[1:])
        return cls(torch.as_tensor(values), offsets)


@dataclass
class _Batch:
    """One call's input, checked and converted once (``_prepare``).

    keys:    feature -> int64 (n_f,), flattened ids
    shapes:  feature -> the ids' shape (dense ids; (B, L) for fixed-length bags)
    offsets: feature -> int64 (B + 1,), for jagged bags only
    """

    keys: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    offsets: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Gathered:
    """The rows of one batch, per table in config order, and where each feature reads.

    uniq:    per table the plan of its distinct keys (``plan.keys`` int64 (m_t,), grouped
             by shard: the client sends them as they are, and the backward's push too)
    inverse: per table int64 (sum of its features' n_f,): position in uniq of each key,
             its features' keys one after another
    spans:   feature -> (table index, a, b): its keys are inverse[table][a:b]
    rows:    per table float32 (m_t, dim)
    """

    uniq: list[Plan]
    inverse: list[np.ndarray]
    spans: dict[str, tuple[int, int, int]]
    rows: list[np.ndarray]


@dataclass(frozen=True)
class _HeldPush:
    """A backward's push not sent yet: its step and {table: (the plan of its keys (m,),
    grads (m, dim))}."""

    step: int
    grads: dict[str, tuple[Plan, np.ndarray]]


class _BatchPrefetch:
    """A gather started ahead: the keys per feature, the mode, and the pull thread's result."""

    __slots__ = ("keys", "result", "train")

    def __init__(self, keys: dict[str, np.ndarray], train: bool, result: Future[_Gathered]) -> None:
        self.keys = keys
        self.train = train
        self.result = result

    def matches(self, keys: dict[str, np.ndarray], train: bool) -> bool:
        return (
            train == self.train
            and keys.keys() == self.keys.keys()
            and all(np.array_equal(keys[f], self.keys[f]) for f in keys)
        )


class _TablesLookup:
    """One forward's rows of every table, and the collection whose backward pushes them."""

    __slots__ = ("keys", "owner", "rows")

    def __init__(self, owner: _CollectionBase, keys: list[Plan], rows: list[torch.Tensor]) -> None:
        self.owner = owner
        self.keys = keys
        self.rows = rows


class _PullPushTables(torch.autograd.Function):
    """Identity on every table's pulled rows; one backward hands all their gradients to
    the collection (a table whose rows got no gradient gets None: nothing pushed)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, lookup: _TablesLookup) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.lookup = lookup
        return tuple(lookup.rows)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[None, None]:
        lookup: _TablesLookup = ctx.lookup
        lookup.owner._hold(lookup, grads)
        return None, None


def _feature_keys(feature: str, ids: Any) -> np.ndarray:
    """ids (any integer shape) -> int64 (n,); a ValueError naming the feature otherwise."""
    try:
        return _as_keys(ids)
    except TypeError as e:
        raise ValueError(f"feature {feature!r}: {e}") from None


class _CollectionBase(_DeviceModule):
    """Grouping, the held push, the pipeline and flush, shared by both collections."""

    _bags = False

    def __init__(
        self,
        client: PSClient,
        tables: Sequence[RemoteTableConfig],
        *,
        staleness: int = 0,
        device: torch.device | str | None = None,
        start_step: int = 0,
    ) -> None:
        super().__init__(device)
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"staleness must be an integer >= 0, got {staleness!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
        configs = list(tables)
        if not configs:
            raise ValueError("a collection needs at least one RemoteTableConfig")
        table_of: dict[str, str] = {}
        seen: set[str] = set()
        for c in configs:
            if not isinstance(c, RemoteTableConfig):
                raise ValueError(f"tables must be RemoteTableConfig, got {type(c).__name__}")
            if c.name in seen:
                raise ValueError(f"Duplicate table name {c.name!r}")
            seen.add(c.name)
            if c.pooling is not None and not self._bags:
                raise ValueError(
                    f"table {c.name!r}: pooling is for RemoteEmbeddingBagCollection; "
                    "RemoteEmbeddingCollection returns one row per id"
                )
            for f in c.feature_names:
                if f in table_of:
                    raise ValueError(
                        f"feature {f!r} is in tables {table_of[f]!r} and {c.name!r}; a feature "
                        "looks up one table"
                    )
                table_of[f] = c.name
        dims = {t.name: t.dim for t in client.describe_tables()}
        missing = [c.name for c in configs if c.name not in dims]
        if missing:
            raise ValueError(
                f"tables {missing} do not exist on the PS (tables: {sorted(dims)}); create them first"
            )
        self.client = client
        self.tables = configs
        self.feature_names: list[str] = [f for c in configs for f in c.feature_names]
        self.embedding_dims: dict[str, int] = {f: dims[t] for f, t in table_of.items()}
        self.staleness = staleness
        self.step = start_step
        self._table_index = {f: i for i, c in enumerate(configs) for f in c.feature_names}
        self._lock = threading.Lock()  # the held push and the step counter
        self._held: _HeldPush | None = None
        self._worker: ThreadPoolExecutor | None = None
        if staleness:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="embps-collection")
        self._inflight: deque[Future[Any]] = deque()  # worker calls that carry a push
        self._prefetched: _BatchPrefetch | None = None

    # ---------------------------------------------------------------- input
    def _convert(self, feature: str, ids: Any, batch: _Batch) -> None:
        """Check one feature's ids and add them to ``batch`` (each collection its layout)."""
        raise NotImplementedError

    def _prepare(self, features: Any, copy: bool = False) -> _Batch:
        """Check the whole input once: {feature: ids} -> _Batch. copy: own the keys (a
        prefetch: the caller may reuse its buffers)."""
        if not isinstance(features, Mapping):
            raise ValueError(
                f"input must be a dict {{feature: ids}}, got {type(features).__name__}"
            )
        unknown = [f for f in features if f not in self._table_index]
        if unknown:
            raise ValueError(
                f"unknown feature(s) {unknown} in the input (features: {self.feature_names})"
            )
        missing = [f for f in self.feature_names if f not in features]
        if missing:
            raise ValueError(
                f"feature(s) {missing} missing from the input: every feature of the collection "
                "is looked up in each call"
            )
        batch = _Batch({})
        for f in self.feature_names:
            self._convert(f, features[f], batch)
            if copy:
                batch.keys[f] = batch.keys[f].copy()
        return batch

    # ---------------------------------------------------------------- the PS calls
    def _gather(
        self, keys: dict[str, np.ndarray], held: _HeldPush | None, train: bool
    ) -> _Gathered:
        """Group the keys per table, make them distinct, pull every table in one call
        (carrying ``held``, applied first). Runs in the caller or on the pull thread."""
        inverse: list[np.ndarray] = []
        plans: list[Plan] = []
        spans: dict[str, tuple[int, int, int]] = {}
        for ti, c in enumerate(self.tables):
            parts = [keys[f] for f in c.feature_names]
            # one dedup + route pass per table; the client takes the plan as it is
            plan = plan_keys(parts[0] if len(parts) == 1 else np.concatenate(parts),
                             self.client.num_shards)  # fmt: skip
            u = plan.keys.copy() if plan.same else plan.keys  # never the caller's buffer
            plans.append(distinct_plan(u, plan.bounds))
            inverse.append(plan.where)
            a = 0
            for f, part in zip(c.feature_names, parts, strict=True):
                spans[f] = (ti, a, a + part.shape[0])
                a += part.shape[0]
        pull = {c.name: p for c, p in zip(self.tables, plans, strict=True)}
        if held is None:
            rows = self.client.pull_many(pull, train=train)
        else:
            rows = self.client.push_pull(held.grads, pull, step=held.step, train=train)[1]
        return _Gathered(plans, inverse, spans, [rows[c.name] for c in self.tables])

    def _take_held(self) -> _HeldPush | None:
        with self._lock:
            held, self._held = self._held, None
        return held

    def _submit(self, fn: Any, *args: Any, carries_push: bool) -> Future[Any]:
        """Queue a PS call on the pull thread (in issue order); a call carrying a push
        first waits until fewer than ``staleness`` such calls are outstanding."""
        assert self._worker is not None
        if carries_push:
            self._wait_pushes(self.staleness - 1)
        fut = self._worker.submit(fn, *args)
        if carries_push:
            self._inflight.append(fut)
        return fut

    def _collect(self, fut: Future[Any]) -> Any:
        """The result of a queued call (its error raised here, once)."""
        with contextlib.suppress(ValueError):
            self._inflight.remove(fut)
        return fut.result()

    def _wait_pushes(self, allowed: int) -> None:
        """Block until at most ``allowed`` calls carrying a push are outstanding; re-raise
        the first failure (a failed prefetch is dropped with it)."""
        while self._inflight and (
            len(self._inflight) > max(allowed, 0) or self._inflight[0].done()
        ):
            fut = self._inflight.popleft()
            pre = self._prefetched
            if pre is not None and pre.result is fut and fut.exception() is not None:
                self._prefetched = None
            fut.result()

    def _send_alone(self, held: _HeldPush) -> None:
        """A push with no pull to ride on (flush, or a second backward)."""
        if self._worker is None:
            self.client.push_many(held.grads, step=held.step)
        else:
            self._submit(self.client.push_many, held.grads, held.step, carries_push=True)

    # ---------------------------------------------------------------- forward
    def prefetch(self, features: Mapping[str, Any]) -> None:
        """Start pulling every feature of the next batch in one call, on the pull thread,
        carrying the held push; the next ``forward`` with the same ids uses the rows.

        Needs ``staleness >= 1``: issued before the current batch's backward, the rows
        miss that batch's push (staleness 1); issued after it, they miss nothing.
        """
        if self._worker is None:
            raise RuntimeError("prefetch needs staleness >= 1 (staleness=0 is exactly synchronous)")
        batch = self._prepare(features, copy=True)
        self._wait_pushes(self.staleness)  # raise a failed push now
        held = self._take_held()
        fut = self._submit(self._gather, batch.keys, held, self.training,
                           carries_push=held is not None)  # fmt: skip
        self._prefetched = _BatchPrefetch(batch.keys, self.training, fut)

    def _take_prefetch(self, keys: dict[str, np.ndarray]) -> _Gathered | None:
        """The prefetched rows when they are for exactly these keys (and mode), else None;
        a prefetch for other ids is finished (its push applied) and dropped."""
        pre = self._prefetched
        if pre is None:
            return None
        self._prefetched = None
        gathered: _Gathered = self._collect(pre.result)
        return gathered if pre.matches(keys, self.training) else None

    def _lookup(self, batch: _Batch) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """(per table its rows (m_t, dim) wired for backward, per feature its int64 indices
        into its table's rows, flat, on the device)."""
        g = self._take_prefetch(batch.keys)
        if g is None:
            held = self._take_held()
            train = self.training
            if self._worker is None:
                g = self._gather(batch.keys, held, train)
            else:
                fut = self._submit(self._gather, batch.keys, held, train,
                                   carries_push=held is not None)  # fmt: skip
                g = self._collect(fut)
        rows = [self._to_device(r) for r in g.rows]
        dev = self._target_device()
        inv = [torch.from_numpy(i).to(dev, non_blocking=True) for i in g.inverse]
        if self.training and torch.is_grad_enabled():
            anchor = torch.empty(0, requires_grad=True)
            rows = list(_PullPushTables.apply(anchor, _TablesLookup(self, g.uniq, rows)))
        return rows, {f: inv[t][a:b] for f, (t, a, b) in g.spans.items()}

    # ---------------------------------------------------------------- backward
    def _hold(self, lookup: _TablesLookup, grads: Sequence[torch.Tensor | None]) -> None:
        """(autograd) Hold this backward's push, at the next step, for the next PS call."""
        push = {
            c.name: (k, _grad_array(g))
            for c, k, g in zip(self.tables, lookup.keys, grads, strict=True)
            if g is not None and k.keys.shape[0]
        }
        if not push:
            return
        with self._lock:
            held = _HeldPush(self.step, push)
            self.step += 1
            earlier, self._held = self._held, held
        if earlier is not None:  # two backwards with no PS call between them
            self._send_alone(earlier)

    # ---------------------------------------------------------------- flush
    def flush(self) -> None:
        """Send the held push and wait for every outstanding one (and a prefetch); re-raise
        the first error. Call it before evaluating elsewhere, checkpointing or stopping;
        ``eval()`` and ``close()`` call it."""
        held = self._take_held()
        if held is not None:
            self._send_alone(held)
        if self._worker is None:
            return
        self._wait_pushes(0)
        if self._prefetched is not None:
            wait([self._prefetched.result])  # its error surfaces at the forward using it

    def train(self, mode: bool = True) -> Self:
        """``eval()`` (mode False) flushes first: inference pulls see every push."""
        if not mode:
            self.flush()
        return super().train(mode)

    def close(self) -> None:
        """Flush and stop the pull thread."""
        try:
            self.flush()
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)

    def extra_repr(self) -> str:
        tables = ", ".join(f"{c.name}:{list(c.feature_names)}" for c in self.tables)
        return f"tables=[{tables}], staleness={self.staleness}"


class RemoteEmbeddingCollection(_CollectionBase):
    """Every sparse feature of a step, rows from PS tables, in one call per shard
    (TorchRec's ``EmbeddingCollection``; see the DESIGN note above).

    ``forward({feature: integer ids of any shape}) -> {feature: float (*ids.shape,
    dim)}``, in config order. Every configured feature must be in the input. One
    ``backward`` pushes every table's gradient at once; staleness 0 (the default)
    sends it with the next forward's pull (``push_pull``: one RPC per shard per
    step, exactly synchronous), staleness s >= 1 with the next ``prefetch``.
    Call ``flush()`` (or ``eval()``) before reading the tables elsewhere.

    Example::

        ps.create_table("user", dim=16)
        ps.create_table("item", dim=16)
        ec = RemoteEmbeddingCollection(ps, [
            RemoteTableConfig("user", ["user_id"]),
            RemoteTableConfig("item", ["item_id", "clicked_item_ids"]),   # shared table
        ])
        out = ec({"user_id": torch.tensor([1, 2]), "item_id": torch.tensor([5, 6]),
                  "clicked_item_ids": torch.tensor([[5, 7], [8, 8]])})
        out["clicked_item_ids"].shape   # (2, 2, 16)
    """

    def _convert(self, feature: str, ids: Any, batch: _Batch) -> None:
        if isinstance(ids, JaggedIds):
            raise ValueError(
                f"feature {feature!r}: RemoteEmbeddingCollection takes id tensors (one row per "
                "id); pooled bags (JaggedIds) go to RemoteEmbeddingBagCollection"
            )
        arr = ids if isinstance(ids, torch.Tensor) else np.asarray(ids)
        batch.keys[feature] = _feature_keys(feature, arr)
        batch.shapes[feature] = tuple(arr.shape)

    def forward(self, features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        batch = self._prepare(features)
        rows, inv = self._lookup(batch)
        return {
            f: _rows_at(rows[self._table_index[f]], inv[f].view(batch.shapes[f]))
            for f in self.feature_names
        }


class RemoteEmbeddingBagCollection(_CollectionBase):
    """Every sparse feature of a step pooled into one vector per bag, rows from PS
    tables, in one call per shard (TorchRec's ``EmbeddingBagCollection``; pooling per
    table, ``RemoteTableConfig.pooling``: "sum", the default, or "mean").

    ``forward({feature: JaggedIds | integer (B, L)}) -> {feature: float (B, dim)}``:
    ``JaggedIds(values, offsets)`` are B bags of any length (an empty bag pools to
    zeros); a 2-D tensor is B bags of L ids. Pushes, steps, staleness and flush as
    in ``RemoteEmbeddingCollection``.

    Example::

        ebc = RemoteEmbeddingBagCollection(ps, [
            RemoteTableConfig("item", ["clicked", "bought"], pooling="mean"),
        ])
        out = ebc({"clicked": JaggedIds(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])),
                   "bought": torch.tensor([[4], [5]])})
        out["clicked"].shape   # (2, dim): bags [1, 2] and [3]
    """

    _bags = True

    def _convert(self, feature: str, ids: Any, batch: _Batch) -> None:
        if isinstance(ids, JaggedIds):
            values = ids.values if isinstance(ids.values, torch.Tensor) else np.asarray(ids.values)
            if values.ndim != 1:
                raise ValueError(
                    f"feature {feature!r}: JaggedIds values must be 1-D, got {tuple(values.shape)}"
                )
            keys = _feature_keys(feature, values)
            off = np.asarray(ids.offsets.detach().cpu() if isinstance(ids.offsets, torch.Tensor)
                             else ids.offsets)  # fmt: skip
            n = keys.shape[0]
            if (
                off.ndim != 1
                or off.dtype.kind not in "iu"
                or off.shape[0] < 1
                or off[0] != 0
                or off[-1] != n
                or bool((off[1:] < off[:-1]).any())
            ):
                raise ValueError(
                    f"feature {feature!r}: offsets must be integer (B + 1,) bag boundaries, "
                    f"non-decreasing from 0 to len(values) = {n}; got {off.dtype} "
                    f"{off[:8].tolist() if off.ndim == 1 else off.shape}"
                    f"{' ...' if off.ndim == 1 and off.shape[0] > 8 else ''} "
                    "(torch.nn.EmbeddingBag's B bag starts: append len(values), or use "
                    "JaggedIds.from_lengths)"
                )
            batch.keys[feature] = keys
            batch.offsets[feature] = np.ascontiguousarray(off, dtype=np.int64)
            return
        arr = ids if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if arr.ndim != 2:
            raise ValueError(
                f"feature {feature!r}: bags are JaggedIds(values, offsets) or a 2-D (B, L) id "
                f"tensor, got shape {tuple(arr.shape)}"
            )
        batch.keys[feature] = _feature_keys(feature, arr)
        batch.shapes[feature] = tuple(arr.shape)

    def forward(self, features: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        batch = self._prepare(features)
        rows, inv = self._lookup(batch)
        dev = self._target_device()
        out: dict[str, torch.Tensor] = {}
        for f in self.feature_names:
            c = self.tables[self._table_index[f]]
            u = rows[self._table_index[f]]
            mode = str(c.pooling or Pooling.SUM)
            if f in batch.offsets:
                off = torch.from_numpy(batch.offsets[f]).to(dev, non_blocking=True)
                out[f] = F.embedding_bag(inv[f], u, off, mode=mode, include_last_offset=True)
            else:
                out[f] = F.embedding_bag(inv[f].view(batch.shapes[f]), u, mode=mode)
        return out

    def extra_repr(self) -> str:
        pooling = ", ".join(f"{c.name}:{c.pooling or Pooling.SUM}" for c in self.tables)
        return super().extra_repr() + f", pooling=[{pooling}]"


class FieldColumns(nn.Module):
    """A collection fed by one id column per field: int (B, F) -> float (B, F, dim).

    Column i holds the ids of feature ``features[i]`` (default: the collection's
    features in config order); the rows come back stacked in the same order, so
    every feature's dim must be equal. For data stored as a (B, F) id matrix
    (Criteo-like) and models that take (B, F, dim), such as ``models.DLRM`` with
    ``num_fields=F`` and this as its one embedding. ``prefetch``, ``flush``,
    ``close``, ``step`` and ``staleness`` are the collection's.

    Example::

        ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(f"c{i}", [f"c{i}"])
                                            for i in range(26)])
        model = DLRM([FieldColumns(ec)], num_dense=13, dim=16, num_fields=26)
    """

    def __init__(
        self, collection: RemoteEmbeddingCollection, features: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        names = list(collection.feature_names if features is None else features)
        if sorted(names) != sorted(collection.feature_names):
            raise ValueError(
                f"features {names} must be the collection's features "
                f"{collection.feature_names}, each once"
            )
        dims = {collection.embedding_dims[f] for f in names}
        if len(dims) != 1:
            raise ValueError(f"stacked features need one dim, got {collection.embedding_dims}")
        self.collection = collection
        self.features = names

    @property
    def staleness(self) -> int:
        return self.collection.staleness

    @property
    def step(self) -> int:
        return self.collection.step

    @step.setter
    def step(self, value: int) -> None:
        self.collection.step = value

    def _split(self, ids: Any) -> dict[str, Any]:
        if ids.ndim != 2 or ids.shape[1] != len(self.features):
            raise ValueError(
                f"ids must be (B, {len(self.features)}), one column per feature, got "
                f"{tuple(ids.shape)}"
            )
        return {f: ids[:, i] for i, f in enumerate(self.features)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.collection(self._split(torch.as_tensor(ids)))
        return torch.stack([out[f] for f in self.features], dim=1)

    def prefetch(self, ids: torch.Tensor | np.ndarray) -> None:
        """Start pulling the next batch's rows (needs staleness >= 1)."""
        self.collection.prefetch(self._split(ids))

    def flush(self) -> None:
        self.collection.flush()

    def close(self) -> None:
        self.collection.close()


# --------------------------------------------------------------------------
# OptEmbed-style pruning
# --------------------------------------------------------------------------


class _StraightThroughStep(torch.autograd.Function):
    """step(x) = 1 if x > 0 else 0 forward; identity gradient backward (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


_NORMS = {"l1": 1.0, "l2": 2.0, "linf": float("inf")}


class OptEmbedMask(nn.Module):
    """A learnable pruning threshold per field (OptEmbed's embedding-row pruning).

    ``forward(emb)`` with ``emb`` float (B, F, dim) zeroes every row whose norm
    is at most its field's threshold: ``emb * step(||emb|| - t_f)``, with a
    straight-through gradient, so both the rows and the thresholds learn.
    ``regularization()`` (add it to the loss) pushes thresholds up, trading
    accuracy for memory: ``weight * sum_f exp(-t_f)``. ``prune(client, tables)``
    then deletes, on the PS, the rows each field's threshold masks out, and
    returns what was freed.

    Example::

        mask = OptEmbedMask(num_fields=3, norm="l2", init_threshold=0.0, weight=1e-4)
        e = mask(torch.stack([emb_a(a), emb_b(b), emb_c(c)], dim=1))   # (B, 3, dim)
        loss = bce(model(e), y) + mask.regularization()
        ...
        freed = mask.prune(ps, ["a", "b", "c"])     # one table per field
    """

    def __init__(
        self, num_fields: int, norm: str = "l2", init_threshold: float = 0.0, weight: float = 1e-4
    ) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
        if num_fields < 1:
            raise ValueError(f"num_fields must be >= 1, got {num_fields}")
        self.norm = norm
        self.weight = weight
        self.threshold = nn.Parameter(torch.full((num_fields,), float(init_threshold)))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        if emb.dim() != 3 or emb.shape[1] != self.threshold.shape[0]:
            raise ValueError(
                f"emb must be (B, {self.threshold.shape[0]}, dim), got {tuple(emb.shape)}"
            )
        norms = torch.linalg.vector_norm(emb, ord=_NORMS[self.norm], dim=-1)  # (B, F)
        keep = _StraightThroughStep.apply(norms - self.threshold)
        return emb * keep.unsqueeze(-1)

    def regularization(self) -> torch.Tensor:
        """``weight * sum(exp(-threshold))``: add to the loss to favour pruning."""
        return self.weight * torch.exp(-self.threshold).sum()

    def prune(self, client: PSClient, tables: list[str]) -> list[Any]:
        """Delete on the PS the rows of field f's table whose norm is below threshold f.

        tables: one table name per field. Returns one ``PruneResult`` per table.
        A non-positive threshold prunes nothing.
        """
        if len(tables) != self.threshold.shape[0]:
            raise ValueError(
                f"need one table per field ({self.threshold.shape[0]}), got {len(tables)}"
            )
        out = []
        for name, t in zip(tables, self.threshold.detach().cpu().tolist(), strict=True):
            out.append(client.prune(name, threshold=max(float(t), 0.0), norm=self.norm))
        return out


def _as_keys(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        return ids.detach().to("cpu", torch.int64).contiguous().numpy().reshape(-1)
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------
# Mixed-dimension embeddings (frequency blocks with projections)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MixedDimBlock:
    """One block of a ``MixedDimEmbedding``: its PS table, its dim and the ids it holds.

    table: the PS table of dim ``dim`` (any kind; the long-tail block is usually a
    static table, the others dynamic). ids: int64 (k,), sorted and distinct, the ids
    routed to this block; ``None`` marks the catch-all block that takes every id no
    other block lists (it must be the last block).
    """

    table: str
    dim: int
    ids: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Ids listed (0 for the catch-all block)."""
        return 0 if self.ids is None else int(self.ids.shape[0])


def plan_mixed_dim_blocks(
    ids: Any,
    counts: Any,
    sizes: Sequence[int],
    dims: Sequence[int],
    tables: Sequence[str],
) -> list[MixedDimBlock]:
    """Blocks by frequency rank: the ``sizes[0]`` most frequent ids -> block 0, the next
    ``sizes[1]`` -> block 1, ..., everything else (the long tail, ids never counted,
    ids never seen) -> the last, catch-all block.

    ids: int64 (n,) candidate ids (distinct); counts: int (n,) their frequencies (e.g.
    ``PSClient.frequencies``). Ranks are by count, descending, ties by id ascending
    (deterministic). Ids with a count of 0 never enter a listed block. dims, tables:
    one per block, ``len(sizes) + 1`` of each; dims are usually decreasing.

    Example::

        blocks = plan_mixed_dim_blocks(ids, ps.frequencies("clicks", ids),
                                       sizes=[1000, 10_000], dims=[32, 16, 4],
                                       tables=["item.d32", "item.d16", "item.tail"])
    """
    keys = _as_keys(np.asarray(ids))
    c = np.asarray(counts).reshape(-1)
    if c.shape[0] != keys.shape[0] or c.dtype.kind not in "iu":
        raise ValueError(
            f"counts must be integers, one per id ({keys.shape[0]}), got {c.dtype} {c.shape}"
        )
    if len(dims) != len(sizes) + 1 or len(tables) != len(dims):
        raise ValueError(
            f"need len(sizes) + 1 dims and tables (one per block, the last the catch-all): "
            f"got {len(sizes)} sizes, {len(dims)} dims, {len(tables)} tables"
        )
    if any(int(s) < 0 for s in sizes) or any(int(d) < 1 for d in dims):
        raise ValueError(f"sizes must be >= 0 and dims >= 1, got {list(sizes)}, {list(dims)}")
    if unique_inverse(keys)[0].shape[0] != keys.shape[0]:
        raise ValueError("ids must be distinct")
    order = np.lexsort((keys, -c.astype(np.int64)))  # count descending, then id ascending
    order = order[c[order] > 0]
    blocks = []
    lo = 0
    for s, d, t in zip(sizes, dims[:-1], tables[:-1], strict=True):
        hi = min(lo + int(s), order.shape[0])
        blocks.append(MixedDimBlock(t, int(d), np.sort(keys[order[lo:hi]])))
        lo = hi
    blocks.append(MixedDimBlock(tables[-1], int(dims[-1]), None))
    return blocks


def plan_mixed_dim_blocks_from_ps(
    client: PSClient,
    table: str,
    ids: Any,
    sizes: Sequence[int],
    dims: Sequence[int],
    tables: Sequence[str],
) -> list[MixedDimBlock]:
    """``plan_mixed_dim_blocks`` with counts read from the PS: ``client.frequencies(table, ids)``.

    table: a table that counted the ids (a dynamic table's own rows count every
    training pull; an adaptive table's sketch counts the rest).
    """
    keys = unique_inverse(_as_keys(np.asarray(ids)))[0]
    return plan_mixed_dim_blocks(keys, client.frequencies(table, keys), sizes, dims, tables)


class MixedDimEmbedding(nn.Module):
    """Mixed-dimension embedding: frequent ids get wide rows, rare ids narrow ones.

    Block b keeps its rows in its own PS table of dim d_b (pulled and pushed by a
    ``RemoteEmbedding``) and a trainable projection ``nn.Linear(d_b, base_dim,
    bias=False)`` on the trainer; ``forward(ids) -> (*ids.shape, base_dim)``. Memory:
    the tables' rows (d_b floats each, plus optimizer slots, on the PS) plus the
    projections (``projection_bytes``, on the trainer), instead of base_dim floats
    per id. Blocks come from ``plan_mixed_dim_blocks`` (by frequency rank).

    Routing an id to its block is one binary search: the listed ids of every block
    are kept in one sorted int64 array with a parallel int8 array of block numbers;
    ``np.searchsorted`` finds each id, and an id not found goes to the catch-all
    (last) block. O(n log m) for n ids and m listed ids, no Python dict, no loop
    over ids.

    All blocks share one step counter (``step``), so every table's pushes carry the
    trainer's global step. ``staleness`` and ``prefetch`` work as in
    ``RemoteEmbedding`` (each block prefetches its share of the ids).

    Example::

        blocks = plan_mixed_dim_blocks_from_ps(ps, "item.counts", ids, sizes=[1000, 10_000],
                                               dims=[32, 8, 2],
                                               tables=["item.d32", "item.d8", "item.tail"])
        ps.create_table("item.d32", dim=32)
        ps.create_table("item.d8", dim=8)
        ps.create_table("item.tail", dim=2, kind="static", hash_bucket_size=4096)
        emb = MixedDimEmbedding(ps, blocks, base_dim=32)
        vecs = emb(torch.tensor([[1, 2], [3, 4]]))        # (2, 2, 32)
    """

    def __init__(
        self,
        client: PSClient,
        blocks: Sequence[MixedDimBlock],
        base_dim: int,
        *,
        staleness: int = 0,
        device: torch.device | str | None = None,
        start_step: int = 0,
    ) -> None:
        super().__init__()
        if not blocks or blocks[-1].ids is not None:
            raise ValueError("blocks must end with the catch-all block (ids=None)")
        if any(b.ids is None for b in blocks[:-1]):
            raise ValueError("only the last block may be the catch-all block (ids=None)")
        if base_dim < 1:
            raise ValueError(f"base_dim must be >= 1, got {base_dim}")
        self.blocks = list(blocks)
        self.base_dim = base_dim
        self.staleness = staleness
        self.step = start_step
        self._remote: list[RemoteEmbedding] = [
            RemoteEmbedding(client, b.table, staleness=staleness, device=device,
                            start_step=start_step)
            for b in self.blocks
        ]  # fmt: skip
        self.embeddings = nn.ModuleList(self._remote)
        for b, e in zip(self.blocks, self._remote, strict=True):
            if e.embedding_dim != b.dim:
                raise ValueError(
                    f"table {b.table!r} has dim {e.embedding_dim}, its block says {b.dim}"
                )
        self._proj: list[nn.Linear] = [nn.Linear(b.dim, base_dim, bias=False) for b in self.blocks]
        self.projections = nn.ModuleList(self._proj)
        listed = [b.ids for b in self.blocks[:-1] if b.ids is not None]
        ids = np.concatenate(listed) if listed else np.empty(0, dtype=np.int64)
        which = np.repeat(np.arange(len(listed), dtype=np.int8), [a.shape[0] for a in listed])
        order = np.argsort(ids, kind="stable")
        self._ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        self._which = which[order]
        if self._ids.shape[0] > 1 and not bool((self._ids[1:] > self._ids[:-1]).all()):
            raise ValueError("an id is listed in two blocks")

    @property
    def projection_bytes(self) -> int:
        """Bytes of the projection weights on the trainer (float32)."""
        return sum(4 * p.numel() for p in self.projections.parameters())

    def block_of(self, keys: np.ndarray) -> np.ndarray:
        """Block number of each id: int64 (n,) -> int64 (n,) (the last block: not listed)."""
        last = len(self.blocks) - 1
        if not self._ids.shape[0]:
            return np.full(keys.shape[0], last, dtype=np.int64)
        pos = np.searchsorted(self._ids, keys)
        pos_c = np.minimum(pos, self._ids.shape[0] - 1)
        hit = self._ids[pos_c] == keys
        return np.where(hit, self._which[pos_c].astype(np.int64), last)

    def _split(self, ids: Any) -> tuple[np.ndarray, list[np.ndarray]]:
        keys = _as_keys(ids)
        blk = self.block_of(keys)
        return keys, [np.flatnonzero(blk == b) for b in range(len(self.blocks))]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        keys, parts = self._split(ids)
        training = self.training and torch.is_grad_enabled()
        dev = self._proj[0].weight.device
        out = torch.zeros(keys.shape[0], self.base_dim, device=dev)
        for emb, proj, idx in zip(self._remote, self._proj, parts, strict=True):
            emb.step = self.step
            if not idx.shape[0]:
                continue
            rows = emb(torch.from_numpy(keys[idx]))  # (k, d_b); backward pushes its gradient
            out = out.index_copy(0, torch.from_numpy(idx).to(dev), proj(rows.to(dev)))
        if training:
            self.step += 1
        return out.view(*ids.shape, self.base_dim)

    def prefetch(self, ids: torch.Tensor | np.ndarray) -> None:
        """Start pulling the next batch's rows, each block its share (needs staleness >= 1)."""
        keys, parts = self._split(ids)
        for emb, idx in zip(self._remote, parts, strict=True):
            if idx.shape[0]:
                emb.prefetch(keys[idx])

    def flush(self) -> None:
        """Wait for every block's outstanding pushes; re-raise the first error."""
        for emb in self._remote:
            emb.flush()

    def close(self) -> None:
        """Flush and stop every block's background threads."""
        for emb in self._remote:
            emb.close()

    def extra_repr(self) -> str:
        dims = ", ".join(f"{b.table}:{b.dim}x{b.size or 'rest'}" for b in self.blocks)
        return f"base_dim={self.base_dim}, blocks=[{dims}]"
