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
    also misses the push of the batch being computed). ``flush()`` waits for
    every push and re-raises the first push error.

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
from concurrent.futures import Future, ThreadPoolExecutor
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

__all__ = ["OptEmbedMask", "RemoteEmbedding", "RemoteEmbeddingBag", "unique_inverse"]


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
        self._push_pool = (
            ThreadPoolExecutor(1, thread_name_prefix=f"embps-push-{table}") if staleness else None
        )
        self._pull_pool = (
            ThreadPoolExecutor(1, thread_name_prefix=f"embps-pull-{table}") if staleness else None
        )
        self._prefetched: tuple[np.ndarray, bool, Future[np.ndarray]] | None = None
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
        if self._pull_pool is None:
            raise RuntimeError("prefetch needs staleness >= 1 (staleness=0 is exactly synchronous)")
        keys = _as_keys(ids)
        uniq, _ = unique_inverse(keys)
        self._wait_pushes(self.staleness - 1)
        train = self.training
        fut = self._pull_pool.submit(self.client.pull, self.table, uniq, train)
        self._prefetched = (uniq, train, fut)

    def _pull_unique(self, uniq: np.ndarray) -> np.ndarray:
        pre = self._prefetched
        if pre is not None:
            self._prefetched = None
            keys, train, fut = pre
            if train == self.training and np.array_equal(keys, uniq):
                rows: np.ndarray = fut.result()
                return rows
            fut.result()  # a prefetch for other ids: finish it, then pull ours
        self._wait_pushes(self.staleness)
        return self.client.pull(self.table, uniq, train=self.training)

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U: rows of the unique ids (m, dim) wired for backward, inverse: int64 ids.shape)."""
        keys = _as_keys(ids)
        uniq, inverse = unique_inverse(keys)
        rows = self._to_device(self._pull_unique(uniq))
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
        if self._push_pool is None:
            self.client.push(self.table, keys, g, step=step)
            return
        self._raise_push_errors()
        self._pushes.append(
            self._push_pool.submit(self.client.push, self.table, keys, g.copy(), step)
        )

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
            self._prefetched[2].result()

    def close(self) -> None:
        """Flush and stop the background threads."""
        try:
            self.flush()
        finally:
            for pool in (self._push_pool, self._pull_pool):
                if pool is not None:
                    pool.shutdown(wait=True)

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
