"""Keras's "memory-efficient embeddings" recipe through embps, on MovieLens ratings.

The recipe (keras.io/examples/keras_recipes/memory_efficient_embeddings) predicts a
rating as ``sigmoid(<user, movie>) * 5`` from dim-64 user and movie embeddings, MSE
loss, Adam (lr 0.001), batch 128, 3 epochs, an 85/15 random split, and compares:

* baseline: one plain embedding per user and per movie (here: dynamic PS tables);
* memory-efficient: users through the quotient-remainder trick (``kind="qr"``:
  ``q[u // m] * r[u % m]``, m = users // 50), movies through mixed-dimension blocks by
  rating count: the 400 most rated movies at dim 64, the next 1300 at dim 32, the
  rest at dim 16, each block projected to 64 on the trainer
  (``MixedDimEmbedding``, blocks from ``plan_mixed_dim_blocks``).

It prints each epoch's training and validation MSE, then, for both models, the
validation MSE and the parameters held (embedding values on the PS, distinct rows
times dim, plus the projections). The ratings file is read with
``embps.client.data.movielens_batches`` (``ratings.dat``, ``u.data``, ``ratings.csv``,
gzip too); README "Public datasets" says where to get it.

Example::

    python docs/examples/movielens_memory_efficient.py --data ml-1m/ratings.dat
    python docs/examples/movielens_memory_efficient.py --data ml-1m/ratings.dat \\
        --addresses 10.0.0.1:50051,10.0.0.2:50051 --epochs 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ps_session import add_ps_arguments, ps_client, table_parameters
from torch import nn

from embps.client import PSClient
from embps.client.data import LOCAL_MASK, movielens_batches
from embps.client.torch import MixedDimEmbedding, RemoteEmbedding, plan_mixed_dim_blocks
from embps.protos.config import Adam

DIM = 64
BLOCK_SIZES = (400, 1300)  # the rest: the catch-all block
BLOCK_DIMS = (64, 32, 16)
QR_USERS_PER_BUCKET = 50


@dataclass
class Ratings:
    users: np.ndarray  # int64 (n,)
    movies: np.ndarray  # int64 (n,)
    ratings: np.ndarray  # float32 (n,)

    def take(self, idx: np.ndarray) -> Ratings:
        return Ratings(self.users[idx], self.movies[idx], self.ratings[idx])


def load(path: str, max_rows: int | None) -> Ratings:
    """Every rating of the file (streamed in batches; the arrays are n * 20 bytes)."""
    parts = list(movielens_batches(path, 1 << 16, max_samples=max_rows))
    if not parts:
        raise SystemExit(f"{path}: no ratings")
    sparse = np.concatenate([b.sparse for b in parts]) & LOCAL_MASK
    return Ratings(sparse[:, 0], sparse[:, 1], np.concatenate([b.labels for b in parts]))


class DotModel(nn.Module):
    """``sigmoid(<user(u), movie(m)>) * 5``: the recipe's model, whatever the embeddings."""

    def __init__(self, user: nn.Module, movie: nn.Module) -> None:
        super().__init__()
        self.user = user
        self.movie = movie

    def forward(self, users: torch.Tensor, movies: torch.Tensor) -> torch.Tensor:
        dot = (self.user(users) * self.movie(movies)).sum(dim=1)
        return torch.sigmoid(dot) * 5.0


def evaluate(model: DotModel, data: Ratings, batch_size: int = 4096) -> float:
    """Mean squared error on ``data`` (inference pulls: no row is created)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for lo in range(0, data.ratings.shape[0], batch_size):
            pred = model(
                torch.from_numpy(data.users[lo : lo + batch_size]),
                torch.from_numpy(data.movies[lo : lo + batch_size]),
            )
            y = torch.from_numpy(data.ratings[lo : lo + batch_size])
            total += float(((pred - y) ** 2).sum())
    model.train()
    return total / max(data.ratings.shape[0], 1)


def train(
    name: str, model: DotModel, train_set: Ratings, val: Ratings, args: argparse.Namespace
) -> float:
    """The recipe's loop; returns the last validation MSE."""
    params = list(model.parameters())  # dense parameters only (projections); rows: the PS
    opt = torch.optim.Adam(params, lr=args.lr) if params else None
    rng = np.random.default_rng(args.seed)
    n = train_set.ratings.shape[0]
    val_mse = float("nan")
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        total = 0.0
        for lo in range(0, n, args.batch_size):
            idx = order[lo : lo + args.batch_size]
            pred = model(
                torch.from_numpy(train_set.users[idx]), torch.from_numpy(train_set.movies[idx])
            )
            loss = ((pred - torch.from_numpy(train_set.ratings[idx])) ** 2).mean()
            if opt is not None:
                opt.zero_grad()
            loss.backward()  # pushes the rows' gradients: Adam runs on the PS
            if opt is not None:
                opt.step()
            total += float(loss.detach()) * idx.shape[0]
        val_mse = evaluate(model, val)
        print(
            f"{name} epoch {epoch}/{args.epochs}: train_mse={total / n:.4f} "
            f"val_mse={val_mse:.4f} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return val_mse


def baseline(ps: PSClient, prefix: str, lr: float) -> tuple[DotModel, list[str]]:
    tables = [f"{prefix}.user", f"{prefix}.movie"]
    for t in tables:
        ps.create_table(t, dim=DIM, optimizer=Adam(lr=lr))
    return DotModel(RemoteEmbedding(ps, tables[0]), RemoteEmbedding(ps, tables[1])), tables


def memory_efficient(
    ps: PSClient, prefix: str, lr: float, train_set: Ratings
) -> tuple[DotModel, list[str], MixedDimEmbedding]:
    """QR users, mixed-dimension movie blocks by rating count in the training split."""
    num_users = int(train_set.users.max()) + 1
    m = max(1, num_users // QR_USERS_PER_BUCKET)
    user_table = f"{prefix}.user.qr"
    ps.create_table(user_table, dim=DIM, kind="qr", optimizer=Adam(lr=lr),
                    qr_quotient_buckets=math.ceil(num_users / m),
                    qr_remainder_buckets=m, qr_combiner="mult")  # fmt: skip
    movies, counts = np.unique(train_set.movies, return_counts=True)
    block_tables = [f"{prefix}.movie.d{d}" for d in BLOCK_DIMS]
    blocks = plan_mixed_dim_blocks(movies, counts, BLOCK_SIZES, BLOCK_DIMS, block_tables)
    for t, d in zip(block_tables, BLOCK_DIMS, strict=True):
        ps.create_table(t, dim=d, optimizer=Adam(lr=lr))
    movie = MixedDimEmbedding(ps, blocks, base_dim=DIM)
    return DotModel(RemoteEmbedding(ps, user_table), movie), [user_table, *block_tables], movie


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ratings.dat, u.data or ratings.csv (.gz too)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--max-rows", type=int, default=None, help="read at most this many ratings")
    p.add_argument("--seed", type=int, default=42, help="the split and the shuffles")
    p.add_argument("--prefix", default="movielens", help="table name prefix on the PS")
    add_ps_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = load(args.data, args.max_rows)
    n = data.ratings.shape[0]
    order = np.random.default_rng(args.seed).permutation(n)
    cut = round(n * 0.85)
    train_set, val = data.take(order[:cut]), data.take(order[cut:])
    print(
        f"{n} ratings, {np.unique(data.users).shape[0]} users, "
        f"{np.unique(data.movies).shape[0]} movies; train {cut}, validation {n - cut}",
        flush=True,
    )
    torch.manual_seed(args.seed)
    with ps_client(args) as ps:
        model, tables = baseline(ps, args.prefix, args.lr)
        base_mse = train("baseline", model, train_set, val, args)
        base_params = sum(table_parameters(ps, t) for t in tables)
        model, tables, movie = memory_efficient(ps, args.prefix, args.lr, train_set)
        eff_mse = train("memory-efficient", model, train_set, val, args)
        eff_params = sum(table_parameters(ps, t) for t in tables) + movie.projection_bytes // 4
    print(f"baseline:         val_mse={base_mse:.4f} parameters={base_params:,}")
    print(
        f"memory-efficient: val_mse={eff_mse:.4f} parameters={eff_params:,} "
        f"({eff_params / max(base_params, 1):.2f}x the baseline)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
