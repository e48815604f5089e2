"""Quotient-remainder tables: rows Q[h // m] and R[h % m] combined by mult, add or concat."""

from __future__ import annotations

import numpy as np

from embps.protos.config import (
    Combiner,
    TableConfig,
)
from embps.server.tables.base import PushResult, Table
from embps.server.tables.block import TRAINING, Block, Storage
from embps.server.tables.part import DynamicPart


class QRTable(Table):
    """Quotient-remainder table: h = key mod (Q*m); row = combine(Q[h // m], R[h % m]).

    Keys in [0, Q*m) get distinct (quotient, remainder) pairs. Gradients:
    mult: dQ = g * R[r], dR = g * Q[q]; add: dQ = dR = g; concat: the halves of g.
    """

    def __init__(self, config: TableConfig, storage: Storage = TRAINING) -> None:
        super().__init__(config, storage)
        self.m = config.qr_remainder_buckets
        self.q = config.qr_quotient_buckets
        self.part_dim = config.dim // 2 if config.qr_combiner == Combiner.CONCAT else config.dim
        self.quotient = Block(self.q, self.part_dim, self.n_slots, storage)
        self.remainder = Block(self.m, self.part_dim, self.n_slots, storage)
        self.quotient.init(
            np.arange(self.q, dtype=np.int64),
            np.arange(self.q, dtype=np.int64),
            config,
            config.seed,
        )
        self.remainder.init(np.arange(self.m, dtype=np.int64), np.arange(self.m, dtype=np.int64),
                            config, config.seed + 1)  # fmt: skip

    def _blocks(self) -> dict[str, Block]:
        return {"quotient": self.quotient, "remainder": self.remainder}

    def parts_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(quotient rows, remainder rows), each int64 (n,)."""
        h = np.mod(keys, np.int64(self.q * self.m))
        return h // self.m, h % self.m

    def _pull(
        self, keys: np.ndarray, train: bool, mask: np.ndarray | None, out: np.ndarray
    ) -> None:
        qr, rr = self.parts_of(keys)
        if train:
            self._touch(self.quotient, qr)
            self._touch(self.remainder, rr)
        vq = self.quotient.decode(qr)
        vr = self.remainder.decode(rr)
        comb = self.config.qr_combiner
        if comb == Combiner.MULT:
            np.multiply(vq, vr, out=out)
        elif comb == Combiner.ADD:
            np.add(vq, vr, out=out)
        else:
            out[:, : self.part_dim] = vq
            out[:, self.part_dim :] = vr

    def _push(self, keys: np.ndarray, grads: np.ndarray, step: int) -> PushResult:
        qr, rr = self.parts_of(keys)
        comb = self.config.qr_combiner
        if comb == Combiner.MULT:
            gq = grads * self.remainder.values[rr]
            gr = grads * self.quotient.values[qr]
        elif comb == Combiner.ADD:
            gq = gr = grads
        else:
            gq = np.ascontiguousarray(grads[:, : self.part_dim])
            gr = np.ascontiguousarray(grads[:, self.part_dim :])
        self._apply(self.quotient, qr, gq, step)
        self._apply(self.remainder, rr, gr, step)
        return PushResult(applied=keys.shape[0], dropped=0)

    def _narrowed(self) -> None:
        self.part_dim = self.dim

    def feed_parts(self) -> list[DynamicPart | Block]:
        return [self.quotient, self.remainder]

    def _sizes(self) -> tuple[int, int, int, int, int, float]:
        st = self.quotient.nbytes + self.remainder.nbytes
        return st, 0, st, 0, self.q + self.m, 0.0
