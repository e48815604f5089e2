"""Planning one call's requests, before anything is sent: input converted once at the boundary (``as_keys``, ``as_grads``), keys deduplicated and routed (``Plan``, one numba pass: ``embps.protos.routing.dedup_route``), gradients of duplicate keys summed as a shard would, rows of the answers put back in the caller's order, and requests packed within the key and message limits (``StepPacker``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embps.client.exceptions import (
    InvalidArgumentError,
)
from embps.protos import codec
from embps.v1 import embps_pb2 as pb

# --------------------------------------------------------------------------
# Input conversion (once, at the boundary)
# --------------------------------------------------------------------------


def as_keys(keys: Any) -> np.ndarray:
    """Any integer array (any shape) -> contiguous int64 (n,)."""
    arr = np.asarray(keys)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"keys must be an integer array, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) >= 2**63:
        raise InvalidArgumentError("keys must fit in int64; got uint64 values >= 2**63")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


def as_grads(grads: Any, keys_shape: tuple[int, ...], n: int, dim: int) -> np.ndarray:
    """float (n, dim) or keys_shape + (dim,) -> float32 (n, dim); dim is checked by the caller."""
    g = np.asarray(grads)
    if g.dtype.kind not in "fiu":
        raise InvalidArgumentError(f"gradients must be floats, got dtype {g.dtype}")
    if n == 0 and g.size == 0:
        return np.empty((0, dim), dtype=np.float32)
    if g.ndim == len(keys_shape) + 1 and g.shape[:-1] == keys_shape:
        g = g.reshape(n, g.shape[-1])
    if g.ndim != 2 or g.shape[0] != n:
        raise InvalidArgumentError(
            f"gradients must have shape (n, dim) with n = {n} keys (one row per key, in the "
            f"keys' order), got {g.shape}"
        )
    return np.ascontiguousarray(g, dtype=np.float32)


@dataclass(frozen=True)
class Plan:
    """Where the keys of one call go.

    keys:   int64 (u,) the distinct keys, grouped by owning shard; within a shard in
            the order of their first occurrence in the batch
    where:  int64 (n,) position in ``keys`` of each of the caller's keys
    bounds: shard s owns keys[bounds[s]:bounds[s + 1]]
    first:  int64 (u,) batch index of each key's first occurrence (pushes only, else None)
    same:   True when ``keys`` is the caller's batch itself (distinct keys, one shard):
            ``where`` and ``first`` are the identity
    """

    keys: np.ndarray
    where: np.ndarray
    bounds: list[int]
    first: np.ndarray | None = None
    same: bool = False


def plan_keys(keys: np.ndarray, num_shards: int, first: bool = False) -> Plan:
    """Dedup and route keys: int64 (n,) -> Plan, in one pass (``routing.dedup_route``: no
    sort). Per-shard key runs are contiguous, so requests are slices and responses land
    with one copy each (no row scatter)."""
    from embps.protos.routing import dedup_route  # numba: imported on first use (fast CLI start)

    uniq, where, index, bounds = dedup_route(keys, num_shards)
    same = num_shards == 1 and uniq.shape[0] == keys.shape[0]
    return Plan(keys if same else uniq, where, bounds.tolist(), index if first else None, same)


def distinct_plan(keys: np.ndarray, bounds: list[int]) -> Plan:
    """The plan of ``keys`` int64 (u,) that a ``plan_keys`` pass already made distinct and
    grouped by shard (``bounds``): nothing left to dedup, route or put back. A caller that
    planned a batch itself (the PyTorch collections) passes it to ``pull_many``,
    ``push_many`` or ``push_pull`` in place of the keys, so the batch is deduplicated once."""
    ident = np.arange(keys.shape[0], dtype=np.int64)
    return Plan(keys, ident, list(bounds), ident, True)


def plan_groups(keys: list[np.ndarray], num_shards: int, first: int = 0) -> list[Plan]:
    """``plan_keys`` of many groups of keys in one numba call (``routing.dedup_route_groups``);
    the first ``first`` groups keep their first occurrences (pushes)."""
    from embps.protos.routing import dedup_route_groups

    if not keys:
        return []
    offsets = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum([k.shape[0] for k in keys], out=offsets[1:])
    uniq, where, index, counts, bounds = dedup_route_groups(
        np.concatenate(keys) if len(keys) > 1 else keys[0], offsets, num_shards
    )
    out = []
    for g, k in enumerate(keys):
        lo, hi, u = int(offsets[g]), int(offsets[g + 1]), int(counts[g])
        same = num_shards == 1 and u == hi - lo
        out.append(Plan(k if same else uniq[lo : lo + u], where[lo:hi], bounds[g].tolist(),
                         index[lo : lo + u] if g < first else None, same))  # fmt: skip
    return out


def sum_duplicates(plan: Plan, grads: np.ndarray) -> np.ndarray:
    """Gradient of each distinct key: float32 (u, dim), summed exactly as a shard sums them.

    A shard computes ((0 + g_first) + g_second) + ... in float32, in batch order
    (``dedup_sum``); so does ``routing.sum_rows``. Distinct keys need no sum: their
    rows are only put in the plan's order (``grads`` itself when it already is;
    the shard's own zero start then does the same to -0.0).
    """
    assert plan.first is not None
    if plan.same:
        return grads
    u = plan.keys.shape[0]
    if u == grads.shape[0]:
        return np.take(grads, plan.first, 0)
    from embps.protos.routing import sum_rows

    return sum_rows(plan.where, grads, u)


def assemble_rows(plan: Plan, parts: list[tuple[int, int, np.ndarray]], dim: int) -> np.ndarray:
    """The caller's rows, float32 (n, dim), a new array, from the shards' answers.

    parts: (a, b, rows) with rows float32 (b - a, dim) of ``plan.keys[a:b]``
    (possibly read-only views of the responses); together they cover the
    distinct keys. Each row is copied once: gathered by ``plan.where`` from a
    single answer, or scattered to its place when the keys were distinct.
    """
    n, u = plan.where.shape[0], plan.keys.shape[0]
    if len(parts) == 1:
        rows = parts[0][2]
        return np.array(rows, dtype=np.float32) if plan.same else np.take(rows, plan.where, 0)
    if n == u:  # distinct keys: plan.where is a permutation; send each row to its place
        src = np.empty(n, dtype=np.int64)
        src[plan.where] = np.arange(n, dtype=np.int64)
        out = np.empty((n, dim), dtype=np.float32)
        for a, b, rows in parts:
            out[src[a:b]] = rows
        return out
    uniq = np.empty((u, dim), dtype=np.float32)
    for a, b, rows in parts:
        uniq[a:b] = rows
    return np.take(uniq, plan.where, 0)


def pack_step(
    num_shards: int,
    pushes: list[tuple[str, Plan, np.ndarray, int]],
    pulls: list[tuple[str, Plan, np.ndarray | None, int]],
    dtype: pb.DType,
    train: bool,
    step: int | None,
    max_keys: int,
    max_bytes: int,
) -> tuple[list[list[pb.StepRequest]], list[list[list[tuple[int, int, int]]]]]:
    """Per shard, its StepRequests: every push group's keys, then every pull group's, cut
    into requests of at most ``max_keys`` keys and about ``max_bytes`` bytes (a shard's
    push requests all come before its pull requests). Also, per shard and request, the
    pull pieces it carries: (pull group, a, b) for ``plan.keys[a:b]``.

    pushes: (table, plan, wire gradients (u, dim), dim); pulls: (table, plan, mask (u,)
    or None, dim). Every shard gets the push groups (empty ones too: each table's push
    counter then advances once per call on every shard, as ``push`` does); pull groups
    only where they have keys. A shard with nothing to do gets no request.
    """
    itemsize = codec.ITEMSIZE[dtype]
    per_shard: list[list[pb.StepRequest]] = []
    spans: list[list[list[tuple[int, int, int]]]] = []
    for s in range(num_shards):
        packer = StepPacker(num_shards, dtype, train, step, max_keys, max_bytes)
        for table, plan, grads, dim in pushes:
            a, hi = plan.bounds[s], plan.bounds[s + 1]
            per_key = 8 + dim * itemsize
            while True:
                b = a + packer.room(per_key, hi - a)
                packer.req.push.add(table=table, keys=codec.encode_keys(plan.keys[a:b]),
                                    grads=grads[a:b].tobytes())  # fmt: skip
                packer.take(b - a, per_key, table)
                a = b
                if a >= hi:
                    break
        for gi, (table, plan, mask, dim) in enumerate(pulls):
            a, hi = plan.bounds[s], plan.bounds[s + 1]
            per_key = 8 + dim * itemsize + (1 if mask is not None else 0)
            while a < hi:
                b = a + packer.room(per_key, hi - a)
                group = packer.req.pull.add(table=table, keys=codec.encode_keys(plan.keys[a:b]))
                if mask is not None:
                    group.mask = codec.encode_mask(mask[a:b])
                packer.spans[-1].append((gi, a, b))
                packer.take(b - a, per_key, table)
                a = b
        if not packer.req.push and not packer.req.pull:
            packer.reqs.pop()
            packer.spans.pop()
        per_shard.append(packer.reqs)
        spans.append(packer.spans)
    return per_shard, spans


class StepPacker:
    """The requests of one shard being packed (``pack_step``): the current one and its
    room left under the key and byte limits."""

    def __init__(
        self,
        num_shards: int,
        dtype: pb.DType,
        train: bool,
        step: int | None,
        keys: int,
        nbytes: int,
    ) -> None:
        self._args = (num_shards, dtype, train, step)
        self._limits = (keys, nbytes)
        self.reqs: list[pb.StepRequest] = []
        self.spans: list[list[tuple[int, int, int]]] = []
        self._new()

    def _new(self) -> None:
        num_shards, dtype, train, step = self._args
        self.req = pb.StepRequest(num_shards=num_shards, dtype=dtype, train=train)
        if step is not None:
            self.req.step = int(step)
        self.reqs.append(self.req)
        self.spans.append([])
        self.keys_left, self.bytes_left = self._limits

    def room(self, per_key: int, want: int) -> int:
        """Keys of ``per_key`` bytes that fit (a new request when none does), <= want."""
        fit = min(self.keys_left, self.bytes_left // per_key, want)
        if fit <= 0 and want > 0:
            self._new()
            fit = min(self.keys_left, self.bytes_left // per_key, want)
        return max(fit, 0)

    def take(self, n: int, per_key: int, table: str) -> None:
        self.keys_left -= n
        self.bytes_left -= n * per_key + len(table) + 16


def slices(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) in pieces of at most ``size`` (one empty piece for an empty range)."""
    if hi - lo <= size:
        return [(lo, hi)]
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


def keyed_spans(plan: Plan, size: int) -> list[tuple[int, int, int]]:
    """(shard, a, b) pieces of at most ``size`` keys of ``plan.keys``, skipping shards
    without keys (a read changes nothing there; a push still sends to every shard)."""
    n = len(plan.bounds) - 1
    return [
        (s, a, b)
        for s in range(n)
        if plan.bounds[s] < plan.bounds[s + 1]
        for a, b in slices(plan.bounds[s], plan.bounds[s + 1], size)
    ]
