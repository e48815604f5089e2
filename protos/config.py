"""Typed table and optimizer configs, shared by the server and the client.

These dataclasses are the one definition of what a table is; they validate in
``__post_init__`` and convert to and from the wire messages (``embps.v1``).

Example::

    from embps.protos.config import TableConfig, Adagrad

    cfg = TableConfig("user_id", dim=16, kind="adaptive", optimizer=Adagrad(lr=0.05),
                      hash_bucket_size=100_000, promote_threshold=5)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from embps.v1 import embps_pb2 as pb

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
MAX_DIM = 65536

# Memory layout of a table's arrays, for ``max_bytes`` (server/tables.py owns the
# arrays; tests/unit/test_memory_cap.py holds these numbers equal to their nbytes).
ROW_META_BYTES = 24  # freq, last_step, version: int64 each, per row
INDEX_MIN_BYTES = 16 * 16 + 6 * 8  # the smallest hash index: 16 [key, row] buckets + map state
SKETCH_DEFAULT_WIDTH = 1 << 18  # count-min columns when sketch_width is 0
SKETCH_DEFAULT_DEPTH = 4  # count-min rows when sketch_depth is 0
SKETCH_COUNTER_BYTES = 4  # uint32 counters


class TableKind(StrEnum):
    """How keys map to rows."""

    DYNAMIC = "dynamic"  # collision-free hash map: one row per admitted key
    STATIC = "static"  # hash_bucket_size rows; colliding keys share a row
    ADAPTIVE = "adaptive"  # static part for rare keys, dynamic rows for frequent keys
    QR = "qr"  # quotient-remainder: two small tables combined per key


class Eviction(StrEnum):
    """What a table at max_rows does with a new key."""

    NONE = "none"  # refuse it (RESOURCE_EXHAUSTED)
    LFU = "lfu"  # evict the least frequently pulled rows
    LRU = "lru"  # evict the least recently touched rows


class Combiner(StrEnum):
    """How a qr table combines its quotient and remainder rows."""

    MULT = "mult"  # elementwise product
    ADD = "add"  # elementwise sum
    CONCAT = "concat"  # [quotient row (dim/2), remainder row (dim/2)]


class Norm(StrEnum):
    """Row norm used by prune and by L2-threshold eviction."""

    L2 = "l2"
    L1 = "l1"
    LINF = "linf"


class InitKind(StrEnum):
    """Distribution of a new row (seeded by key and table seed: deterministic)."""

    ZEROS = "zeros"
    CONSTANT = "constant"  # every element = a
    UNIFORM = "uniform"  # U(a, b)
    NORMAL = "normal"  # N(mean=a, std=b)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# --------------------------------------------------------------------------
# Optimizers (applied on the server, slots stored beside the rows)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SGD:
    """w -= lr * g. No slots."""

    lr: float = 0.01

    def __post_init__(self) -> None:
        _positive("SGD.lr", self.lr)


@dataclass(frozen=True)
class Adagrad:
    """acc += g*g; w -= lr * g / (sqrt(acc) + eps)  (torch.optim.Adagrad's formula). One slot."""

    lr: float = 0.01
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10

    def __post_init__(self) -> None:
        _positive("Adagrad.lr", self.lr)
        _non_negative("Adagrad.initial_accumulator_value", self.initial_accumulator_value)
        _non_negative("Adagrad.eps", self.eps)
        if self.eps == 0 and self.initial_accumulator_value == 0:
            raise ValueError(
                "Adagrad needs eps > 0 or initial_accumulator_value > 0 "
                "(else a zero gradient on a fresh row divides 0 by 0)"
            )


@dataclass(frozen=True)
class Adam:
    """Lazy (sparse) Adam: only rows in a push update m, v and w; bias correction by step. Two slots."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _positive("Adam.lr", self.lr)
        for name, b in (("Adam.beta1", self.beta1), ("Adam.beta2", self.beta2)):
            if not (0.0 <= b < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        _positive("Adam.eps", self.eps)


@dataclass(frozen=True)
class FTRL:
    """FTRL-Proximal as TensorFlow's Ftrl (learning_rate_power=-0.5). Two slots (n, z)."""

    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    initial_accumulator_value: float = 0.1

    def __post_init__(self) -> None:
        _positive("FTRL.alpha", self.alpha)
        _non_negative("FTRL.beta", self.beta)
        _non_negative("FTRL.l1", self.l1)
        _non_negative("FTRL.l2", self.l2)
        _positive("FTRL.initial_accumulator_value", self.initial_accumulator_value)


OptimizerConfig = SGD | Adagrad | Adam | FTRL
SLOTS_PER_OPTIMIZER: dict[type, int] = {SGD: 0, Adagrad: 1, Adam: 2, FTRL: 2}


def optimizer_slots(opt: OptimizerConfig) -> int:
    """Number of float32 slot vectors (of the row's dim) the optimizer keeps per row."""
    return SLOTS_PER_OPTIMIZER[type(opt)]


@dataclass(frozen=True)
class Initializer:
    """Row initializer; ``a``/``b`` mean value / (low, high) / (mean, std) by kind."""

    kind: InitKind = InitKind.UNIFORM
    a: float = -0.05
    b: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", InitKind(self.kind))
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError("Initializer a and b must be finite")
        if self.kind == InitKind.UNIFORM and not self.a <= self.b:
            raise ValueError(f"uniform initializer needs a <= b, got a={self.a} b={self.b}")
        if self.kind == InitKind.NORMAL and self.b < 0:
            raise ValueError(f"normal initializer needs std b >= 0, got {self.b}")


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TableConfig:
    """One embedding table. Options that do not apply to ``kind`` must keep their defaults.

    Example::

        TableConfig("item", dim=32, kind="dynamic", optimizer=Adam(lr=1e-3),
                    admission_threshold=3, max_rows=1_000_000, eviction="lfu")
    """

    name: str
    dim: int
    kind: TableKind = TableKind.DYNAMIC
    optimizer: OptimizerConfig = field(default_factory=SGD)
    initializer: Initializer = field(default_factory=Initializer)
    seed: int = 0
    # dynamic, and the dynamic part of adaptive
    initial_capacity: int = 1024  # rows reserved up front
    admission_threshold: int = 0  # a key gets a row at its N-th training sighting (0/1: first)
    default_value: float = 0.0  # what keys without a row read
    max_rows: int = 0  # cap on dynamic rows (0: unbounded)
    eviction: Eviction = Eviction.NONE  # policy at the cap
    steps_to_live: int = 0  # evict rows untouched for this many steps (0: never)
    l2_evict_threshold: float = 0.0  # evict rows whose L2 norm is below this (0: never)
    # every kind: bytes this table may hold on one shard (0: no cap). At the cap a new
    # dynamic row evicts (with eviction set) or is refused (RESOURCE_EXHAUSTED); an
    # adaptive table keeps the key in its static part instead. static/qr never grow:
    # only checked at create (their fixed arrays must fit).
    max_bytes: int = 0
    # static, and the static part of adaptive
    hash_bucket_size: int = 0
    promote_threshold: int = 0  # adaptive: sightings that promote a key to a dynamic row
    sketch_width: int = 0  # count-min columns (power of two; 0: 2**18)
    sketch_depth: int = 0  # count-min rows (0: 4)
    # qr
    qr_quotient_buckets: int = 0
    qr_remainder_buckets: int = 0
    qr_combiner: Combiner = Combiner.MULT

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TableKind(self.kind))
        object.__setattr__(self, "eviction", Eviction(self.eviction))
        object.__setattr__(self, "qr_combiner", Combiner(self.qr_combiner))
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"table name {self.name!r} is invalid: use 1-128 characters "
                "[A-Za-z0-9_.-], starting with a letter or underscore"
            )
        if not isinstance(self.dim, int) or not 1 <= self.dim <= MAX_DIM:
            raise ValueError(
                f"table {self.name!r}: dim must be an integer in [1, {MAX_DIM}], got {self.dim!r}"
            )
        if type(self.optimizer) not in SLOTS_PER_OPTIMIZER:
            raise ValueError(f"table {self.name!r}: optimizer must be SGD, Adagrad, Adam or FTRL")
        ints = ("seed", "initial_capacity", "admission_threshold", "max_rows", "steps_to_live",
                "max_bytes", "hash_bucket_size", "promote_threshold", "sketch_width",
                "sketch_depth", "qr_quotient_buckets", "qr_remainder_buckets")  # fmt: skip
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v >= 2**63:
                raise ValueError(
                    f"table {self.name!r}: {name} must be an integer in [0, 2**63), got {v!r}"
                )
        _non_negative(f"table {self.name!r}: l2_evict_threshold", self.l2_evict_threshold)
        if not math.isfinite(self.default_value):
            raise ValueError(f"table {self.name!r}: default_value must be finite")
        if self.sketch_width and self.sketch_width & (self.sketch_width - 1):
            raise ValueError(
                f"table {self.name!r}: sketch_width must be a power of two, got {self.sketch_width}"
            )
        if self.sketch_depth > 16:
            raise ValueError(
                f"table {self.name!r}: sketch_depth must be <= 16, got {self.sketch_depth}"
            )
        if self.max_rows == 0 and self.eviction != Eviction.NONE:
            raise ValueError(
                f"table {self.name!r}: eviction={self.eviction.value} needs max_rows > 0"
            )
        self._check_kind_options()
        if self.max_bytes and self.fixed_bytes > self.max_bytes:
            raise ValueError(
                f"table {self.name!r}: max_bytes={self.max_bytes} is below the "
                f"{self.fixed_bytes} bytes its fixed arrays need ({self._fixed_parts()}); "
                f"raise max_bytes to at least {self.fixed_bytes} or make the table smaller"
            )

    # ---------------------------------------------------------------- memory
    @property
    def row_bytes(self) -> int:
        """Bytes of one row of this table's blocks: values, optimizer slots, metadata.

        For a qr table with the concat combiner a part row has dim / 2 columns.
        """
        d = (
            self.dim // 2
            if self.kind == TableKind.QR and self.qr_combiner == Combiner.CONCAT
            else self.dim
        )
        return 4 * d * (1 + self.slots) + ROW_META_BYTES

    @property
    def fixed_bytes(self) -> int:
        """Bytes of the arrays that never grow: static / qr blocks, the sketch, the smallest index.

        A table holds at least this much from its creation on (a dynamic part's
        arena, buckets and lists grow from there); ``max_bytes`` must not be below it.
        """
        return sum(self._fixed_sizes().values())

    def _fixed_sizes(self) -> dict[str, int]:
        kind = self.kind
        out: dict[str, int] = {}
        if kind in (TableKind.STATIC, TableKind.ADAPTIVE):
            out["static rows"] = self.hash_bucket_size * self.row_bytes
        if kind == TableKind.QR:
            out["qr rows"] = (self.qr_quotient_buckets + self.qr_remainder_buckets) * self.row_bytes
        if kind == TableKind.ADAPTIVE or (
            kind == TableKind.DYNAMIC and self.admission_threshold > 1
        ):
            width = self.sketch_width or SKETCH_DEFAULT_WIDTH
            depth = self.sketch_depth or SKETCH_DEFAULT_DEPTH
            out["sketch"] = width * depth * SKETCH_COUNTER_BYTES
        if kind in (TableKind.DYNAMIC, TableKind.ADAPTIVE):
            out["empty index"] = INDEX_MIN_BYTES
        return out

    def _fixed_parts(self) -> str:
        return ", ".join(f"{name} {n}" for name, n in self._fixed_sizes().items())

    def _check_kind_options(self) -> None:
        kind = self.kind
        uses = {
            TableKind.DYNAMIC: {"initial_capacity", "admission_threshold", "default_value", "max_rows",
                                "eviction", "steps_to_live", "l2_evict_threshold"},
            TableKind.STATIC: {"hash_bucket_size"},
            TableKind.ADAPTIVE: {"initial_capacity", "max_rows", "eviction", "steps_to_live",
                                 "l2_evict_threshold", "hash_bucket_size", "promote_threshold",
                                 "sketch_width", "sketch_depth"},
            TableKind.QR: {"qr_quotient_buckets", "qr_remainder_buckets", "qr_combiner"},
        }[kind]  # fmt: skip
        defaults = {f.name: f.default for f in dataclasses.fields(TableConfig)}
        for name in ("admission_threshold", "default_value", "max_rows", "eviction", "steps_to_live",
                     "l2_evict_threshold", "hash_bucket_size", "promote_threshold", "sketch_width",
                     "sketch_depth", "qr_quotient_buckets", "qr_remainder_buckets", "qr_combiner"):  # fmt: skip
            if name not in uses and getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"table {self.name!r}: option {name} does not apply to kind {kind.value}"
                )
        if kind in (TableKind.STATIC, TableKind.ADAPTIVE) and self.hash_bucket_size < 1:
            raise ValueError(f"table {self.name!r}: kind {kind.value} needs hash_bucket_size >= 1")
        if kind == TableKind.ADAPTIVE and self.promote_threshold < 1:
            raise ValueError(f"table {self.name!r}: kind adaptive needs promote_threshold >= 1")
        if kind == TableKind.QR:
            if self.qr_quotient_buckets < 1 or self.qr_remainder_buckets < 1:
                raise ValueError(
                    f"table {self.name!r}: kind qr needs qr_quotient_buckets >= 1 and qr_remainder_buckets >= 1"
                )
            if self.qr_quotient_buckets * self.qr_remainder_buckets >= 2**62:
                raise ValueError(
                    f"table {self.name!r}: qr_quotient_buckets * qr_remainder_buckets must be < 2**62"
                )
            if self.qr_combiner == Combiner.CONCAT and self.dim % 2:
                raise ValueError(
                    f"table {self.name!r}: qr combiner concat needs an even dim, got {self.dim}"
                )

    # ---------------------------------------------------------------- wire
    def to_proto(self) -> pb.TableConfig:
        """The wire message for this config."""
        msg = pb.TableConfig(
            name=self.name,
            dim=self.dim,
            kind=_KIND_TO_PB[self.kind],
            seed=self.seed,
            initial_capacity=self.initial_capacity,
            admission_threshold=self.admission_threshold,
            default_value=self.default_value,
            max_rows=self.max_rows,
            eviction=_EVICTION_TO_PB[self.eviction],
            steps_to_live=self.steps_to_live,
            l2_evict_threshold=self.l2_evict_threshold,
            max_bytes=self.max_bytes,
            hash_bucket_size=self.hash_bucket_size,
            promote_threshold=self.promote_threshold,
            sketch_width=self.sketch_width,
            sketch_depth=self.sketch_depth,
            qr_quotient_buckets=self.qr_quotient_buckets,
            qr_remainder_buckets=self.qr_remainder_buckets,
            qr_combiner=_COMBINER_TO_PB[self.qr_combiner],
            initializer=pb.Initializer(
                kind=_INIT_TO_PB[self.initializer.kind], a=self.initializer.a, b=self.initializer.b
            ),
        )
        opt = self.optimizer
        if isinstance(opt, SGD):
            msg.optimizer.sgd.CopyFrom(pb.Sgd(lr=opt.lr))
        elif isinstance(opt, Adagrad):
            msg.optimizer.adagrad.CopyFrom(
                pb.Adagrad(
                    lr=opt.lr, initial_accumulator_value=opt.initial_accumulator_value, eps=opt.eps
                )
            )
        elif isinstance(opt, Adam):
            msg.optimizer.adam.CopyFrom(
                pb.Adam(lr=opt.lr, beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps)
            )
        else:
            msg.optimizer.ftrl.CopyFrom(
                pb.Ftrl(
                    alpha=opt.alpha,
                    beta=opt.beta,
                    l1=opt.l1,
                    l2=opt.l2,
                    initial_accumulator_value=opt.initial_accumulator_value,
                )
            )
        return msg

    @classmethod
    def from_proto(cls, msg: pb.TableConfig) -> TableConfig:
        """Config from a wire message; raises ValueError naming the bad field."""
        which = msg.optimizer.WhichOneof("kind")
        opt: OptimizerConfig
        if which is None:
            raise ValueError(
                f"table {msg.name!r}: optimizer is missing (set sgd, adagrad, adam or ftrl)"
            )
        if which == "sgd":
            opt = SGD(lr=msg.optimizer.sgd.lr)
        elif which == "adagrad":
            o = msg.optimizer.adagrad
            opt = Adagrad(lr=o.lr, initial_accumulator_value=o.initial_accumulator_value, eps=o.eps)
        elif which == "adam":
            o2 = msg.optimizer.adam
            opt = Adam(lr=o2.lr, beta1=o2.beta1, beta2=o2.beta2, eps=o2.eps)
        else:
            o3 = msg.optimizer.ftrl
            opt = FTRL(alpha=o3.alpha, beta=o3.beta, l1=o3.l1, l2=o3.l2,
                       initial_accumulator_value=o3.initial_accumulator_value)  # fmt: skip
        if msg.kind not in _KIND_FROM_PB:
            raise ValueError(f"table {msg.name!r}: kind is missing or unknown ({msg.kind})")
        return cls(
            name=msg.name,
            dim=msg.dim,
            kind=_KIND_FROM_PB[msg.kind],
            optimizer=opt,
            initializer=Initializer(
                kind=_from_pb(
                    _INIT_FROM_PB,
                    msg.initializer.kind,
                    InitKind.UNIFORM,
                    "initializer kind",
                    msg.name,
                ),
                a=msg.initializer.a,
                b=msg.initializer.b,
            )
            if msg.HasField("initializer")
            else Initializer(),
            seed=msg.seed,
            initial_capacity=msg.initial_capacity,
            admission_threshold=msg.admission_threshold,
            default_value=msg.default_value,
            max_rows=msg.max_rows,
            eviction=_from_pb(_EVICTION_FROM_PB, msg.eviction, Eviction.NONE, "eviction", msg.name),
            steps_to_live=msg.steps_to_live,
            l2_evict_threshold=msg.l2_evict_threshold,
            max_bytes=msg.max_bytes,
            hash_bucket_size=msg.hash_bucket_size,
            promote_threshold=msg.promote_threshold,
            sketch_width=msg.sketch_width,
            sketch_depth=msg.sketch_depth,
            qr_quotient_buckets=msg.qr_quotient_buckets,
            qr_remainder_buckets=msg.qr_remainder_buckets,
            qr_combiner=_from_pb(
                _COMBINER_FROM_PB, msg.qr_combiner, Combiner.MULT, "qr_combiner", msg.name
            ),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableConfig:
        """Config from a plain mapping (YAML/TOML config files).

        ``optimizer`` is ``{"name": "adagrad", "lr": 0.05, ...}``; ``initializer``
        is ``{"kind": "normal", "a": 0, "b": 0.01}``. Unknown keys are an error.
        """
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"table {d.get('name')!r}: unknown options {sorted(unknown)}; known: {sorted(known)}"
            )
        if "optimizer" in d and isinstance(d["optimizer"], dict):
            o = dict(d["optimizer"])
            name = str(o.pop("name", "sgd")).lower()
            types = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam, "ftrl": FTRL}
            if name not in types:
                raise ValueError(
                    f"table {d.get('name')!r}: unknown optimizer {name!r}; use one of {sorted(types)}"
                )
            d["optimizer"] = types[name](**o)
        if "initializer" in d and isinstance(d["initializer"], dict):
            d["initializer"] = Initializer(**d["initializer"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (JSON/YAML/TOML-safe); ``from_dict`` inverts it exactly."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "optimizer":
                v = {"name": type(v).__name__.lower(), **dataclasses.asdict(v)}
            elif f.name == "initializer":
                v = {"kind": v.kind.value, "a": v.a, "b": v.b}
            elif isinstance(v, StrEnum):
                v = v.value
            d[f.name] = v
        return d

    @property
    def slots(self) -> int:
        """Optimizer slot vectors per row."""
        return optimizer_slots(self.optimizer)


_KIND_TO_PB = {
    TableKind.DYNAMIC: pb.TABLE_KIND_DYNAMIC,
    TableKind.STATIC: pb.TABLE_KIND_STATIC,
    TableKind.ADAPTIVE: pb.TABLE_KIND_ADAPTIVE,
    TableKind.QR: pb.TABLE_KIND_QR,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_EVICTION_TO_PB = {
    Eviction.NONE: pb.EVICTION_NONE,
    Eviction.LFU: pb.EVICTION_LFU,
    Eviction.LRU: pb.EVICTION_LRU,
}
_EVICTION_FROM_PB = {v: k for k, v in _EVICTION_TO_PB.items()}
_COMBINER_TO_PB = {
    Combiner.MULT: pb.COMBINER_MULT,
    Combiner.ADD: pb.COMBINER_ADD,
    Combiner.CONCAT: pb.COMBINER_CONCAT,
}
_COMBINER_FROM_PB = {v: k for k, v in _COMBINER_TO_PB.items()}
_INIT_TO_PB = {
    InitKind.ZEROS: pb.INITIALIZER_ZEROS,
    InitKind.CONSTANT: pb.INITIALIZER_CONSTANT,
    InitKind.UNIFORM: pb.INITIALIZER_UNIFORM,
    InitKind.NORMAL: pb.INITIALIZER_NORMAL,
}
_INIT_FROM_PB = {v: k for k, v in _INIT_TO_PB.items()}
NORM_TO_PB = {Norm.L2: pb.NORM_L2, Norm.L1: pb.NORM_L1, Norm.LINF: pb.NORM_LINF}
NORM_FROM_PB = {v: k for k, v in NORM_TO_PB.items()}


def _from_pb(mapping: dict[int, Any], value: int, default: Any, what: str, table: str) -> Any:
    """A wire enum value as its config enum: 0 (unspecified) is the default; an unknown value
    (a newer or a corrupt client) is a ValueError, never silently the default."""
    if value == 0:
        return default
    if value not in mapping:
        known = ", ".join(str(v) for v in sorted(mapping))
        raise ValueError(f"table {table!r}: {what} {value} is unknown (known values: {known})")
    return mapping[value]
