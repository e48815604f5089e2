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
import functools
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, TypeVar, cast

from google.protobuf.descriptor import FieldDescriptor

from embps.v1 import embps_pb2 as pb

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")  # fullmatch
MAX_DIM = 65536

# Memory layout of a table's arrays, for ``max_bytes`` (server/tables/block.py owns the
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


# --------------------------------------------------------------------------
# Normalisation: one helper per field type
#
# Every config dataclass passes each field through one of these in
# ``__post_init__``, so a config built directly, from a mapping (``from_dict``:
# config files, ``PSClient.create_table`` options) or from the wire is checked and
# converted the same way. Each returns the canonical value (a float, an int, an
# enum member, an optimizer or initializer object) or raises ValueError naming
# the field (``what``), the value and what is accepted. Bools are never numbers;
# floats are never integers; non-finite floats are refused.
# --------------------------------------------------------------------------

_E = TypeVar("_E", bound=StrEnum)


def _show(value: object) -> str:
    """``repr`` for messages, at most 80 characters; a huge int by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{'-' if value < 0 else ''}<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _as_float(what: str, value: object, low: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float (``>= low``, or ``> low`` when strict).

    ints and other real numbers (numpy scalars) convert; bools, strings and
    everything else do not.
    """
    number: float | None = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except (OverflowError, ValueError):
            number = None
    if (
        number is None
        or not math.isfinite(number)
        or (low is not None and (number <= low if strict else number < low))
    ):
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{what} must be a finite number{bound}, got {_show(value)}")
    return number


def _as_int(what: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``: an int or another integral (numpy ints);
    never a bool or a float (``4.0`` is refused, not truncated)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not low <= int(value) <= high
    ):
        top = f"2**{high.bit_length()} - 1" if high > 2**20 and high & (high + 1) == 0 else high
        raise ValueError(f"{what} must be an integer in [{low}, {top}], got {_show(value)}")
    return int(value)


def _as_enum(what: str, enum: type[_E], value: object) -> _E:
    """``value`` as a member of ``enum``: the member, or its value or name in any case
    (``"lfu"``, ``"LFU"``, ``"Lfu"``). A member of another enum is refused."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str) and not isinstance(value, Enum):
        folded = value.lower()
        for member in enum:
            if folded in (member.value, member.name.lower()):
                return member
    accepted = ", ".join(repr(m.value) for m in enum)
    raise ValueError(
        f"{what} must be one of {accepted} (any case) or a member of {enum.__name__}, "
        f"got {_show(value)}"
    )


def _set_floats(obj: object, **bounds: tuple[float | None, bool]) -> None:
    """Replace each named field of a frozen dataclass by ``_as_float`` of it.

    bounds: field name -> (low, strict); the message names ``Class.field``.
    """
    for name, (low, strict) in bounds.items():
        what = f"{type(obj).__name__}.{name}"
        object.__setattr__(obj, name, _as_float(what, getattr(obj, name), low, strict))


def _unknown_keys(what: str, given: Mapping[Any, Any], known: set[str]) -> None:
    """ValueError naming the keys of ``given`` that are not in ``known``, and the known ones."""
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ValueError(
            f"{what}: unknown options {', '.join(sorted(map(repr, unknown)))}; "
            f"known: {', '.join(sorted(known))}"
        )


# --------------------------------------------------------------------------
# Optimizers (applied on the server, slots stored beside the rows)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SGD:
    """w -= lr * g. No slots."""

    lr: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _as_float("SGD.lr", self.lr, 0.0, strict=True))


@dataclass(frozen=True)
class Adagrad:
    """acc += g*g; w -= lr * g / (sqrt(acc) + eps)  (torch.optim.Adagrad's formula). One slot."""

    lr: float = 0.01
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10

    def __post_init__(self) -> None:
        _set_floats(self, lr=(0.0, True), initial_accumulator_value=(0.0, False), eps=(0.0, False))
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
        _set_floats(self, lr=(0.0, True), beta1=(0.0, False), beta2=(0.0, False), eps=(0.0, True))
        for name in ("beta1", "beta2"):
            if getattr(self, name) >= 1.0:
                raise ValueError(f"Adam.{name} must be in [0, 1), got {getattr(self, name)!r}")


@dataclass(frozen=True)
class FTRL:
    """FTRL-Proximal as TensorFlow's Ftrl (learning_rate_power=-0.5). Two slots (n, z)."""

    alpha: float = 0.05
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    initial_accumulator_value: float = 0.1

    def __post_init__(self) -> None:
        _set_floats(self, alpha=(0.0, True), beta=(0.0, False), l1=(0.0, False), l2=(0.0, False),
                    initial_accumulator_value=(0.0, True))  # fmt: skip


OptimizerConfig = SGD | Adagrad | Adam | FTRL
SLOTS_PER_OPTIMIZER: dict[type, int] = {SGD: 0, Adagrad: 1, Adam: 2, FTRL: 2}
# "sgd" -> SGD, ...: the names of config files, ``to_dict`` and the shorthands
OPTIMIZER_BY_NAME: dict[str, type[OptimizerConfig]] = {
    t.__name__.lower(): t for t in SLOTS_PER_OPTIMIZER
}


def optimizer_slots(opt: OptimizerConfig) -> int:
    """Number of float32 slot vectors (of the row's dim) the optimizer keeps per row."""
    return SLOTS_PER_OPTIMIZER[type(opt)]


# (a, b) of an Initializer that leaves them out, per kind: (low, high), (mean, std), value.
INIT_DEFAULTS: dict[InitKind, tuple[float, float]] = {
    InitKind.UNIFORM: (-0.05, 0.05),
    InitKind.NORMAL: (0.0, 0.05),
    InitKind.CONSTANT: (0.0, 0.0),
    InitKind.ZEROS: (0.0, 0.0),
}


@dataclass(frozen=True)
class Initializer:
    """Row initializer; ``a``/``b`` mean value / (low, high) / (mean, std) by kind.

    An ``a`` or ``b`` left out takes its kind's default (``INIT_DEFAULTS``): uniform
    U(-0.05, 0.05), normal N(0, 0.05), constant 0.0, zeros 0.0 (a and b unused).

    Example::

        Initializer("normal")            # N(0, 0.05)
        Initializer("normal", b=0.01)    # N(0, 0.01)
        Initializer("uniform", -0.1, 0.1)
    """

    kind: InitKind = InitKind.UNIFORM
    a: float = None  # type: ignore[assignment]  # None: the kind's default
    b: float = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _as_enum("Initializer.kind", InitKind, self.kind))
        default_a, default_b = INIT_DEFAULTS[self.kind]
        if self.a is None:
            object.__setattr__(self, "a", default_a)
        if self.b is None:
            object.__setattr__(self, "b", default_b)
        _set_floats(self, a=(None, False), b=(None, False))
        if self.kind == InitKind.UNIFORM and not self.a <= self.b:
            raise ValueError(f"uniform initializer needs a <= b, got a={self.a} b={self.b}")
        if self.kind == InitKind.NORMAL and self.b < 0:
            raise ValueError(f"normal initializer needs std b >= 0, got {self.b}")


# --------------------------------------------------------------------------
# Shorthands for the object-valued fields (a string or a mapping, as users write them)
# --------------------------------------------------------------------------


def _as_optimizer(what: str, value: object) -> OptimizerConfig:
    """An optimizer object from itself, a name or a mapping.

    ``"adam"`` (any case) is ``Adam()``: that optimizer with its defaults.
    ``{"name": "adam", "lr": 0.01}`` is ``Adam(lr=0.01)``; without ``name`` it is SGD
    (the config-file form, which ``to_dict`` writes).
    """
    if type(value) in SLOTS_PER_OPTIMIZER:
        return cast(OptimizerConfig, value)
    options: dict[Any, Any] = {}
    name: object = value
    if isinstance(value, Mapping):
        options = dict(value)
        name = options.pop("name", "sgd")
    accepted = ", ".join(repr(n) for n in OPTIMIZER_BY_NAME)
    if not isinstance(name, str) or name.lower() not in OPTIMIZER_BY_NAME:
        raise ValueError(
            f"{what} must be an SGD, Adagrad, Adam or FTRL object, one of the names {accepted} "
            f"(any case) or a mapping {{'name': ..., <its options>}}, got {_show(value)}"
        )
    cls = OPTIMIZER_BY_NAME[name.lower()]
    _unknown_keys(f"{what} {name.lower()}", options, {f.name for f in dataclasses.fields(cls)})
    try:
        return cls(**options)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _as_initializer(what: str, value: object) -> Initializer:
    """An ``Initializer`` from itself, a kind or a mapping.

    ``"normal"`` (a kind name in any case, or an ``InitKind``) is ``Initializer("normal")``:
    that kind with the class defaults a=-0.05, b=0.05. ``{"kind": "normal", "a": 0,
    "b": 0.01}`` is ``Initializer("normal", 0.0, 0.01)`` (the config-file form).
    """
    if isinstance(value, Initializer):
        return value
    try:
        if isinstance(value, str):
            return Initializer(value)  # type: ignore[arg-type]
        if isinstance(value, Mapping):
            _unknown_keys("Initializer", value, {"kind", "a", "b"})
            return Initializer(**value)
    except ValueError as e:
        raise ValueError(f"{what} {_show(value)}: {e}") from None
    kinds = ", ".join(repr(k.value) for k in InitKind)
    raise ValueError(
        f"{what} must be an Initializer, one of the kinds {kinds} (any case) "
        f"or a mapping {{'kind': ..., 'a': ..., 'b': ...}}, got {_show(value)}"
    )


def _as_name(value: object) -> str:
    """A table name: 1-128 characters [A-Za-z0-9_.-], starting with a letter or underscore."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"table name {_show(value)} is invalid: use 1-128 characters "
            "[A-Za-z0-9_.-], starting with a letter or underscore"
        )
    return str(value)


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TableConfig:
    """One embedding table. Options that do not apply to ``kind`` must keep their defaults.

    Fields also take shorthands, each with one meaning (README "Shorthands"): enums by
    value or name in any case (``eviction="LFU"``), ``optimizer="adam"`` (its defaults)
    or ``{"name": "adam", "lr": 0.01}``, ``initializer="normal"`` (``Initializer("normal")``)
    or ``{"kind": "normal", "a": 0.0, "b": 0.01}``. ``__post_init__`` stores the canonical
    value (enum member, object, int, float) or raises ValueError naming the field.

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
        name = _as_name(self.name)
        t = f"table {name!r}"

        put = functools.partial(object.__setattr__, self)  # frozen: set the canonical values
        put("name", name)
        put("dim", _as_int(f"{t}: dim", self.dim, 1, MAX_DIM))
        put("kind", _as_enum(f"{t}: kind", TableKind, self.kind))
        put("optimizer", _as_optimizer(f"{t}: optimizer", self.optimizer))
        put("initializer", _as_initializer(f"{t}: initializer", self.initializer))
        for option, high in _INT_MAX.items():
            put(option, _as_int(f"{t}: {option}", getattr(self, option), 0, high))
        put("default_value", _as_float(f"{t}: default_value", self.default_value))
        l2 = _as_float(f"{t}: l2_evict_threshold", self.l2_evict_threshold, 0.0)
        put("l2_evict_threshold", l2)
        put("eviction", _as_enum(f"{t}: eviction", Eviction, self.eviction))
        put("qr_combiner", _as_enum(f"{t}: qr_combiner", Combiner, self.qr_combiner))
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
                f"raise max_bytes to at least {self.fixed_bytes}{self._fixed_options()}"
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

    def _fixed_options(self) -> str:
        """For the max_bytes message: ' or make the table smaller (<the options that size
        its fixed arrays>)', or '' when only the empty index is fixed."""
        sizes = self._fixed_sizes()
        options: list[str] = []
        if "static rows" in sizes:
            options += ["dim", "optimizer", "hash_bucket_size"]
        if "qr rows" in sizes:
            options += ["dim", "optimizer", "qr_combiner", "qr_quotient_buckets",
                        "qr_remainder_buckets"]  # fmt: skip
        if "sketch" in sizes:
            if self.kind == TableKind.DYNAMIC:
                options.append("admission_threshold")
            options += ["sketch_width", "sketch_depth"]
        if not options:
            return ""
        return f" or make the table smaller ({', '.join(options)})"

    def _check_kind_options(self) -> None:
        kind = self.kind
        uses = {
            TableKind.DYNAMIC: {"initial_capacity", "admission_threshold", "default_value", "max_rows",
                                "eviction", "steps_to_live", "l2_evict_threshold", "sketch_width",
                                "sketch_depth"},
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
        if kind == TableKind.DYNAMIC and self.admission_threshold <= 1:
            for name in ("sketch_width", "sketch_depth"):
                if getattr(self, name):
                    raise ValueError(
                        f"table {self.name!r}: option {name} sizes the admission sketch, which a "
                        "dynamic table keeps only with admission_threshold >= 2; set "
                        "admission_threshold or leave it out"
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
    def from_dict(cls, d: Mapping[str, Any]) -> TableConfig:
        """Config from a plain mapping (YAML/TOML config files, ``PSClient.create_table``).

        Values are what the constructor accepts: ``optimizer`` may be
        ``{"name": "adagrad", "lr": 0.05, ...}`` or ``"adagrad"``; ``initializer``
        ``{"kind": "normal", "a": 0, "b": 0.01}`` or ``"normal"``; enums their names.
        Unknown or missing keys are a ValueError.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a table config must be a mapping of options, got {_show(d)}")
        what = f"table {_show(d.get('name'))}"
        _unknown_keys(what, d, {f.name for f in dataclasses.fields(cls)})
        for required in ("name", "dim"):
            if required not in d:
                raise ValueError(f"{what}: {required} is required")
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


def _int_max(option: str) -> int:
    """Largest value of an integer option: its wire type's for uint32 fields; 2**63 - 1 for
    uint64 fields, as the server holds sizes, counts and seeds in int64."""
    wire = pb.TableConfig.DESCRIPTOR.fields_by_name[option].type
    return 2**32 - 1 if wire == FieldDescriptor.TYPE_UINT32 else 2**63 - 1


# Every ``int`` option but dim (which has its own range): 0 .. its largest value.
_INT_MAX = {
    f.name: _int_max(f.name)
    for f in dataclasses.fields(TableConfig)
    if f.type == "int" and f.name != "dim"
}

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


def _from_pb(mapping: Mapping[Any, Any], value: int, default: Any, what: str, table: str) -> Any:
    """A wire enum value as its config enum: 0 (unspecified) is the default; an unknown value
    (a newer or a corrupt client) is a ValueError, never silently the default."""
    if value == 0:
        return default
    if value not in mapping:
        known = ", ".join(str(v) for v in sorted(mapping))
        raise ValueError(f"table {table!r}: {what} {value} is unknown (known values: {known})")
    return mapping[value]
