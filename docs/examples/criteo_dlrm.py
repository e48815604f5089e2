"""A DLRM on the Criteo Kaggle (display advertising challenge) data through embps.

One PS table per categorical field (``criteo.C1`` .. ``criteo.C26``, dynamic, dim 16,
Adagrad), all looked up by one ``RemoteEmbeddingCollection`` (one request per shard per
step whatever the number of tables) fed through ``FieldColumns`` (the (B, 26) id
matrix -> (B, 26, 16)), the 13 integer features through DLRM's bottom MLP
(``embps.client.demo.models.DLRM``, the demo's sizes). The file (``train.txt``, or a
``day_N`` file of the 1 TB logs; gzip too) is streamed with
``embps.client.data.criteo_batches``; every ``--eval-every``-th batch is held out
(predicted, never trained on) and scored at the end: AUC and log loss beside the
trivial baseline (predict the training click rate). ``--max-rows`` bounds the run.

Example::

    python docs/examples/criteo_dlrm.py --data train.txt --max-rows 2000000
    python docs/examples/criteo_dlrm.py --data day_0.gz --addresses 10.0.0.1:50051,10.0.0.2:50051
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from ps_session import add_ps_arguments, ps_client, table_parameters

from embps.client.data import CRITEO_NUM_DENSE, CRITEO_NUM_SPARSE, auc, criteo_batches, logloss
from embps.client.demo.models import DLRM
from embps.client.torch import FieldColumns, RemoteEmbeddingCollection, RemoteTableConfig
from embps.protos.config import Adagrad


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="Criteo TSV: train.txt or day_N (.gz too)")
    p.add_argument("--max-rows", type=int, default=1_000_000, help="lines to read (0: all)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05, help="Adagrad, rows and dense weights")
    p.add_argument("--eval-every", type=int, default=10, help="hold out every k-th batch")
    p.add_argument("--log-every", type=int, default=100, help="print every k training steps")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines")
    p.add_argument("--prefix", default="criteo", help="table name prefix on the PS")
    add_ps_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    tables = [f"{args.prefix}.C{k}" for k in range(1, CRITEO_NUM_SPARSE + 1)]
    stream = criteo_batches(args.data, args.batch_size, skip_bad=args.skip_bad,
                            max_samples=args.max_rows or None)  # fmt: skip
    with ps_client(args) as ps:
        for t in tables:
            ps.create_table(t, dim=args.dim, optimizer=Adagrad(lr=args.lr))
        ec = RemoteEmbeddingCollection(ps, [RemoteTableConfig(t, [t]) for t in tables])
        model = DLRM([FieldColumns(ec)], num_dense=CRITEO_NUM_DENSE, dim=args.dim,
                     num_fields=CRITEO_NUM_SPARSE)  # fmt: skip
        opt = torch.optim.Adagrad(model.parameters(), lr=args.lr)
        bce = torch.nn.BCEWithLogitsLoss()
        held_labels: list[np.ndarray] = []
        held_probs: list[np.ndarray] = []
        seen = clicks = steps = 0
        window = 0.0
        t0 = time.perf_counter()
        for i, batch in enumerate(stream):
            sparse, dense = torch.from_numpy(batch.sparse), torch.from_numpy(batch.dense)
            if args.eval_every and i % args.eval_every == args.eval_every - 1:
                model.eval()
                with torch.no_grad():
                    held_probs.append(torch.sigmoid(model(sparse, dense)).numpy())
                held_labels.append(batch.labels)
                model.train()
                continue
            loss = bce(model(sparse, dense), torch.from_numpy(batch.labels))
            opt.zero_grad()
            loss.backward()  # pushes the rows' gradients (Adagrad runs on the PS)
            opt.step()
            steps += 1
            seen += len(batch)
            clicks += int(batch.labels.sum())
            window += float(loss.detach())
            if steps % args.log_every == 0:
                print(
                    f"step {steps}: {seen} samples, train_logloss={window / args.log_every:.4f}, "
                    f"{seen / (time.perf_counter() - t0):,.0f} samples/s",
                    flush=True,
                )
                window = 0.0
        model.flush()
        secs = time.perf_counter() - t0
        rows = sum(table_parameters(ps, t) for t in tables) // args.dim
        model.close()
    print(f"trained on {seen} samples in {steps} steps, {secs:.1f} s; {rows:,} rows on the PS")
    if stream.bad_lines:
        print(f"skipped {stream.bad_lines} malformed lines, first: {stream.bad_examples[0]}")
    if not held_labels:
        print("eval: no held-out batch (more rows or a smaller --eval-every)")
        return 0
    y, p = np.concatenate(held_labels), np.concatenate(held_probs)
    ctr = clicks / max(seen, 1)
    trivial = logloss(y, np.full_like(p, min(max(ctr, 1e-6), 1 - 1e-6)))
    score = f"auc={auc(y, p):.4f} " if 0 < y.sum() < y.shape[0] else "auc=n/a (one class) "
    print(f"eval on {y.shape[0]} held-out samples: {score}logloss={logloss(y, p):.4f} "
          f"(predicting the training click rate {ctr:.3f}: logloss={trivial:.4f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
