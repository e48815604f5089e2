"""DeepRec's Adaptive Embedding example through embps.

DeepRec's example looks up ids 0..9 in an adaptive embedding variable (a static hash
part of ``hash_bucket_size = 100`` rows plus own rows for promoted ids), passes an
explicit promotion mask with the lookup (``adaptive_mask_tensors``), trains on
``loss = sum(2 * emb)`` with FTRL (learning rate 0.1, l1 2.0, l2 1e-5) and prints the
embeddings, four steps in a row. Here the table is ``kind="adaptive"`` with
``hash_bucket_size=100`` (per shard) and ``FTRL(alpha=0.1, l1=2.0, l2=1e-5)``, the mask
goes with the training pull (``PSClient.pull(..., mask=)``: True promotes the id now,
False keeps it where it is), and the gradient of ``sum(2 * emb)``, 2 everywhere, is
pushed. ``promote_threshold`` is set out of reach, so only the mask promotes.

Each step prints the loss, the embeddings the step read (one line per id, marked
``own`` for the ids the mask promotes, ``static`` for the others) and the table's
own-row count (5 from the first step on). FTRL's l1 holds an element at exactly 0
while its accumulated gradient is within l1 (many are 0 after the first push), then
every row moves down alike, promoted or not: every id's gradient is the same.

Example::

    python docs/examples/deeprec_adaptive_embedding.py
    python docs/examples/deeprec_adaptive_embedding.py --addresses 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np
from ps_session import add_ps_arguments, ps_client

from embps.protos.config import FTRL

IDS = np.arange(10, dtype=np.int64)
MASK = np.array([True, False] * 5)  # ids 0, 2, 4, 6, 8 promoted on their first lookup
STEPS = 4


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=4, help="embedding dim")
    p.add_argument("--table", default="deeprec.adaptive_ev", help="table name on the PS")
    add_ps_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    np.set_printoptions(precision=5, suppress=True, linewidth=120)
    with ps_client(args) as ps:
        ps.create_table(
            args.table, dim=args.dim, kind="adaptive", hash_bucket_size=100,
            promote_threshold=2**32 - 1, optimizer=FTRL(alpha=0.1, l1=2.0, l2=1e-5),
        )  # fmt: skip
        for step in range(STEPS):
            emb = ps.pull(args.table, IDS, train=True, mask=MASK)  # float32 (10, dim)
            loss = float((2.0 * emb).sum())
            ps.push(args.table, IDS, np.full_like(emb, 2.0), step=step)  # d loss / d emb
            own = sum(int(s.tables[args.table]["keys"]) for s in ps.stats(args.table))
            print(f"step {step}: loss={loss:.5f} own rows={own}")
            for i, row in zip(IDS.tolist(), emb, strict=True):
                where = "own" if MASK[i] else "static"
                print(f"  id {i} ({where:6}) {row}")
        final = ps.pull(args.table, IDS, train=False)
        print(f"after {STEPS} steps: loss={float((2.0 * final).sum()):.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
