"""CTR models whose embedding tables live in embps: a DLRM-style network.

``DLRM`` (Naumov et al., 2019) in its usual small form::

    dense  (B, num_dense) -> bottom MLP -> x0 (B, dim)
    sparse (B, F)         -> one embedding per field -> e_1..e_F (B, dim) each
    T = [x0, e_1, ..., e_F]                  (B, F + 1, dim)
    pairwise dot products <T_i, T_j>, i < j  (B, (F + 1) * F / 2)
    [x0, dots] -> top MLP -> logit (B,)

With ``concat_embeddings=True`` the top MLP also sees the embeddings themselves,
``[x0, e_1, ..., e_F, dots]``: first-order terms per id (DeepFM's linear part)
reach it directly instead of through ``<x0, e_f>``. On the demo's synthetic data
(additive per-id effects) that learns a little faster at equal samples.

The embeddings are any modules mapping int64 ids (B,) to float (B, dim) (a
``torch.nn.Embedding`` in unit tests), or one module for every field at once
(``num_fields=F`` with a single embedding) mapping (B, F) -> (B, F, dim): with a
table per field on the PS, ``FieldColumns`` over a ``RemoteEmbeddingCollection``
(one request per shard per step for all F tables; the demo's). ``prefetch`` /
``flush`` / ``close`` forward to the embeddings that have them, so a training loop
can pipeline the next batch's pulls.

Example::

    from embps.client.demo.models import DLRM
    from embps.client.torch import FieldColumns, RemoteEmbeddingCollection, RemoteTableConfig

    ec = RemoteEmbeddingCollection(
        ps, [RemoteTableConfig(f"field_{f}", [f"field_{f}"]) for f in range(F)], staleness=1
    )
    model = DLRM([FieldColumns(ec)], num_dense=4, dim=16, num_fields=F)
    logits = model(sparse, dense)          # sparse int64 (B, F), dense float32 (B, 4)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "embps.client.demo.models needs PyTorch; install it with `pip install torch` "
        "(or the extra: `pip install 'embps[torch]'`)"
    ) from e

__all__ = ["DLRM", "mlp", "pairwise_dots"]


def mlp(sizes: Sequence[int], final_activation: bool = True) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ...`` with ReLU between them.

    final_activation: also a ReLU after the last layer (bottom MLP: yes; top: no).
    """
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {sizes}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def pairwise_dots(t: torch.Tensor) -> torch.Tensor:
    """Dot products of every pair of distinct vectors: t (B, n, dim) -> (B, n * (n - 1) / 2).

    Order: (0, 1), (0, 2), ..., (0, n-1), (1, 2), ... (the strict upper triangle).
    """
    n = t.shape[1]
    z = torch.bmm(t, t.transpose(1, 2))  # (B, n, n)
    i, j = torch.triu_indices(n, n, offset=1, device=t.device)
    return z[:, i, j]


class DLRM(nn.Module):
    """DLRM: bottom MLP on dense features, dot-product interactions, top MLP -> logits.

    embeddings: one module per categorical field, ids int64 (B,) -> float (B, dim).
    num_fields: categorical fields; default ``len(embeddings)``. With one embedding
    and ``num_fields`` F > 1 that embedding is shared: it maps the ids of every
    field at once, int64 (B, F) -> (B, F, dim).
    num_dense: dense features per sample (0: no bottom MLP; the interactions are
    then among the embeddings only). bottom / top: hidden sizes of the MLPs.
    concat_embeddings: also feed the F embeddings to the top MLP (see above).

    ``forward(sparse: int64 (B, F), dense: float32 (B, num_dense)) -> logits (B,)``.
    """

    def __init__(
        self,
        embeddings: Sequence[nn.Module],
        num_dense: int,
        dim: int,
        bottom: Sequence[int] = (64,),
        top: Sequence[int] = (128, 64),
        concat_embeddings: bool = False,
        num_fields: int | None = None,
    ) -> None:
        super().__init__()
        if not embeddings:
            raise ValueError("DLRM needs at least one embedding (one per categorical field)")
        if num_dense < 0 or dim < 1:
            raise ValueError(f"need num_dense >= 0 and dim >= 1, got {num_dense}, {dim}")
        if num_fields is not None and num_fields != len(embeddings) and len(embeddings) != 1:
            raise ValueError(
                f"num_fields={num_fields} needs one embedding per field or one shared "
                f"embedding, got {len(embeddings)}"
            )
        self.embeddings = nn.ModuleList(embeddings)
        self.num_fields = len(embeddings) if num_fields is None else num_fields
        self.shared = len(embeddings) != self.num_fields
        self.num_dense = num_dense
        self.dim = dim
        self.concat_embeddings = concat_embeddings
        self.bottom = mlp([num_dense, *bottom, dim]) if num_dense else None
        n = self.num_fields + (1 if num_dense else 0)
        width = n * (n - 1) // 2 + dim * (
            (1 if num_dense else 0) + (self.num_fields if concat_embeddings else 0)
        )
        self.top = mlp([width, *top, 1], final_activation=False)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        sparse = torch.as_tensor(sparse)
        if sparse.dim() != 2 or sparse.shape[1] != self.num_fields:
            raise ValueError(f"sparse must be (B, {self.num_fields}), got {tuple(sparse.shape)}")
        if self.shared:
            vecs = list(self.embeddings[0](sparse).unbind(1))  # F x (B, dim)
        else:
            vecs = [emb(sparse[:, f]) for f, emb in enumerate(self.embeddings)]
        head: list[torch.Tensor] = list(vecs) if self.concat_embeddings else []
        if self.bottom is not None:
            if dense is None or dense.shape != (sparse.shape[0], self.num_dense):
                got = None if dense is None else tuple(dense.shape)
                raise ValueError(f"dense must be ({sparse.shape[0]}, {self.num_dense}), got {got}")
            x0 = self.bottom(dense)
            vecs.insert(0, x0)
            head.insert(0, x0)
        dots = pairwise_dots(torch.stack(vecs, dim=1))
        return self.top(torch.cat([*head, dots], dim=1)).squeeze(1)

    # ------------------------------------------------------------ pipelining
    def prefetch(self, sparse: torch.Tensor | np.ndarray) -> None:
        """Start pulling the rows of the next batch's ids: sparse int64 (B, F).

        Only embeddings that can prefetch do (``RemoteEmbedding`` with ``staleness >= 1``);
        the others pull in ``forward`` as usual.
        """
        for f, emb in enumerate(self.embeddings):
            fn = getattr(emb, "prefetch", None)
            if fn is not None and getattr(emb, "staleness", 1) >= 1:
                fn(sparse if self.shared else sparse[:, f])

    def flush(self) -> None:
        """Wait for every outstanding push of the embeddings; re-raise the first error."""
        for emb in self.embeddings:
            fn = getattr(emb, "flush", None)
            if fn is not None:
                fn()

    def close(self) -> None:
        """Flush and stop the embeddings' background threads."""
        for emb in self.embeddings:
            fn = getattr(emb, "close", None)
            if fn is not None:
                fn()
