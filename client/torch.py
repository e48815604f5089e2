"""PyTorch modules whose embedding rows live in embps.

``RemoteEmbedding`` and ``RemoteEmbeddingBag`` behave like ``torch.nn.Embedding``
and ``torch.nn.EmbeddingBag`` (sum/mean pooling with offsets), but their rows are
pulled from a PS table in ``forward`` and their gradients are pushed to it in
``backward``, where the table's optimizer runs. No push call appears in the
training loop: ``loss.backward()`` does it.

How one step flows::

    ids (any shape) -> unique keys + inverse (trainer side)
      -> PSClient.pull(unique)            rows float32 (m, dim), pinned -> device
      -> U: a tensor that requires grad  (m, dim)
      -> F.embedding(inverse, U) / F.embedding_bag(inverse, U, offsets, mode)
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

import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

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

from .ps_client import PSClient

__all__ = [
    "MixedDimBlock",
    "MixedDimEmbedding",
    "OptEmbedMask",
    "RemoteEmbedding",
    "RemoteEmbeddingBag",
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


class _RemoteBase(nn.Module):
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
        super().__init__()
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
        self._device = torch.device(device) if device is not None else None
        self._pushes: deque[Future[Any]] = deque()
        self._pipeline: _Pipeline | None = None
        if staleness:
            self._pipeline = _Pipeline(f"embps-{table}")
        self._prefetched: _Prefetch | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- device
    def _target_device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> _RemoteBase:
        """Move the module: pulled rows are copied to this device from then on."""
        device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None:
            self._device = torch.device(device)
        super().to(*args, **kwargs)
        return self

    def _to_device(self, rows: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(rows)
        dev = self._target_device()
        if dev.type == "cpu":
            return t
        return t.pin_memory().to(dev, non_blocking=True)

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
        g = grad.detach().to("cpu", torch.float32).contiguous().numpy()
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
        return F.embedding(inv, u)


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
