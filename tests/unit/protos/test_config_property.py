"""TableConfig against random values of every Python type, one field at a time and whole.

The property: a value either builds a config that round-trips unchanged (same
repr, so same types too) through the wire (to_proto / from_proto), a plain
mapping (to_dict / from_dict, also as JSON, the checkpoint manifest's form) and
YAML and TOML config files (server/serve.py's parser), or it raises
ValueError or TypeError whose message names the field. Never another exception.
``from_dict`` of the same options gives the same config or the same error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embps.protos.config import (
    FTRL,
    SGD,
    Adagrad,
    Adam,
    Combiner,
    Eviction,
    Initializer,
    InitKind,
    TableConfig,
    TableKind,
)
from embps.server.serve import parse_serve_doc
from embps.v1 import embps_pb2 as pb

FIELDS = [f.name for f in dataclasses.fields(TableConfig)]


def fast(n: int) -> settings:
    """n examples, deterministic (the same on every CI run), no example database."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# One valid config per kind, with max_bytes set so the memory check is live.
BASES: dict[str, dict[str, Any]] = {
    "dynamic": dict(name="t", dim=8, kind="dynamic", admission_threshold=2, max_rows=100,
                    eviction="lru", max_bytes=1 << 23),
    "static": dict(name="t", dim=8, kind="static", hash_bucket_size=1000, max_bytes=1 << 20),
    "adaptive": dict(name="t", dim=8, kind="adaptive", hash_bucket_size=100, promote_threshold=3,
                     sketch_width=1024, sketch_depth=2, max_rows=50, eviction="lfu",
                     max_bytes=1 << 20),
    "qr": dict(name="t", dim=8, kind="qr", qr_quotient_buckets=10, qr_remainder_buckets=20,
               qr_combiner="concat", max_bytes=1 << 20),
}  # fmt: skip

# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------

ENUMS = [*TableKind, *Eviction, *Combiner, *InitKind]
WORDS = sorted(
    {w for m in ENUMS for w in (m.value, m.name, m.value.title())}
    | {"sgd", "Adagrad", "ADAM", "ftrl", "rmsprop", "glorot_uniform", "ones", "", " lfu",
       "lfu ", "None", "null", "true", "yes", "nan", "inf", "1", "0x10", "İ", "\x00"}
)  # fmt: skip
HUGE = [2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63), -1, 10**30, 10**400]
ODD_OBJECTS = [
    object(),
    SGD,  # the class, not an instance
    np.int64(8),
    np.int32(-1),
    np.uint64(2**64 - 1),
    np.float32(0.1),
    np.float64("nan"),
    np.True_,
    Fraction(1, 3),
    Decimal("0.5"),
    complex(1, 0),
    frozenset({1}),
    (8,),
]
OPTIMIZERS = [SGD(), Adagrad(lr=0.5), Adam(beta2=0.99), FTRL(l1=0.5)]
INITIALIZERS = [Initializer(), Initializer("zeros"), Initializer("normal", 0.0, 0.01)]

numbers_ = st.one_of(
    st.floats(),  # nan and inf included
    st.integers(),
    st.sampled_from(HUGE),
    st.booleans(),
    st.sampled_from(["0.1", None]),
)
optimizer_mappings = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["sgd", "Adam", "ADAGRAD", "ftrl", "rmsprop", 3, None]),
        "lr": numbers_,
        "eps": numbers_,
        "beta1": numbers_,
        "alpha": numbers_,
        "initial_accumulator_value": numbers_,
        "momentum": numbers_,
        1: numbers_,
    },
)
initializer_mappings = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.one_of(st.sampled_from(WORDS), numbers_),
        "a": numbers_,
        "b": numbers_,
        "std": numbers_,
    },
)

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.sampled_from(ENUMS),
    st.binary(max_size=6),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(ODD_OBJECTS + OPTIMIZERS + INITIALIZERS),
    optimizer_mappings,
    initializer_mappings,
)


def ints(high: int) -> st.SearchStrategy[Any]:
    """Mostly valid integers for an int option: small ones, powers of two, the bounds."""
    return st.one_of(
        st.integers(0, 64),
        st.integers(0, 31).map(lambda k: 2**k),
        st.sampled_from([0, high, high + 1]),
    )


# Per field: plausible values (so that many examples build a config) or anything.
NEAR: dict[str, st.SearchStrategy[Any]] = {
    "name": st.one_of(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,12}", fullmatch=True),
        st.sampled_from(["a" * 128, "a" * 129, "t\n", "true", "null", "yes", "1t", ".t", "t t"]),
    ),
    "dim": st.one_of(st.integers(1, 64), st.sampled_from([0, 65536, 65537, 7])),
    "kind": st.sampled_from([*TableKind, *WORDS]),
    "optimizer": st.one_of(st.sampled_from(OPTIMIZERS), optimizer_mappings, st.sampled_from(WORDS)),
    "initializer": st.one_of(
        st.sampled_from(INITIALIZERS), initializer_mappings, st.sampled_from(WORDS)
    ),
    "default_value": st.floats(),
    "l2_evict_threshold": st.floats(),
    "eviction": st.sampled_from([*Eviction, *WORDS]),
    "qr_combiner": st.sampled_from([*Combiner, *WORDS]),
}
for _f in dataclasses.fields(TableConfig):
    if _f.name not in NEAR:
        NEAR[_f.name] = ints(2**32 - 1 if _f.name.endswith(("_threshold", "sketch_width")) else 16)


def plausible_or_any(name: str) -> st.SearchStrategy[Any]:
    """Three plausible values for the option to one of anything."""
    return st.integers(0, 3).flatmap(lambda i: NEAR[name] if i else ANY)


VALUES = {name: plausible_or_any(name) for name in FIELDS}

# The kinds each option applies to (else it must keep its default; README "Table kinds").
APPLIES: dict[str, list[str]] = {
    "admission_threshold": ["dynamic"],
    "default_value": ["dynamic"],
    "max_rows": ["dynamic", "adaptive"],
    "eviction": ["dynamic", "adaptive"],
    "steps_to_live": ["dynamic", "adaptive"],
    "l2_evict_threshold": ["dynamic", "adaptive"],
    "hash_bucket_size": ["static", "adaptive"],
    "promote_threshold": ["adaptive"],
    "sketch_width": ["adaptive"],
    "sketch_depth": ["adaptive"],
    "qr_quotient_buckets": ["qr"],
    "qr_remainder_buckets": ["qr"],
    "qr_combiner": ["qr"],
}


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


def to_toml(doc: dict[str, Any]) -> str:
    """TOML of ``{"tables": [to_dict(), ...]}``: the writer tomllib lacks, for what to_dict
    writes (str, int, finite float, one level of inline tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            assert math.isfinite(v), v
            return repr(v)  # '1e-10', '-0.0', '1e+16': all TOML floats
        if isinstance(v, str):
            return json.dumps(v)  # JSON's escapes of ASCII text are TOML basic-string escapes
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"no TOML for {v!r}")

    lines: list[str] = []
    for table in doc["tables"]:
        lines.append("[[tables]]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def assert_round_trips(cfg: TableConfig) -> None:
    same = repr(cfg)
    assert repr(TableConfig(**{f: getattr(cfg, f) for f in FIELDS})) == same
    wire = pb.TableConfig.FromString(cfg.to_proto().SerializeToString())
    assert repr(TableConfig.from_proto(wire)) == same
    d = cfg.to_dict()
    assert repr(TableConfig.from_dict(d)) == same
    assert repr(TableConfig.from_dict(json.loads(json.dumps(d)))) == same
    from_yaml = parse_serve_doc(yaml.safe_load(yaml.safe_dump({"tables": [d]})))
    assert [repr(t) for t in from_yaml.tables] == [same]
    from_toml = parse_serve_doc(tomllib.loads(to_toml({"tables": [d]})))
    assert [repr(t) for t in from_toml.tables] == [same]


def check(options: dict[str, Any], named: list[str]) -> bool:
    """Build, then round-trip or check the error names one of ``named``. True if it built."""
    try:
        cfg = TableConfig(**options)
    except (ValueError, TypeError) as e:
        assert any(n in str(e) for n in named), f"{e!s} names none of {named}"
        with pytest.raises(type(e)) as again:
            TableConfig.from_dict(options)
        assert str(again.value) == str(e)
        return False
    assert_round_trips(cfg)
    assert repr(TableConfig.from_dict(options)) == repr(cfg)
    return True


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
@fast(60)
@given(data=st.data())
def test_one_random_field_on_a_valid_config_builds_and_round_trips_or_is_named(field, data):
    kinds = APPLIES.get(field, list(BASES))
    kind = data.draw(st.sampled_from(kinds) | st.sampled_from(list(BASES)), label="kind")
    value = data.draw(VALUES[field], label=field)
    check({**BASES[kind], field: value}, named=[field])


@st.composite
def whole_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Each field: absent (its default), its base config's value, or (1 in 8) a random one."""
    base = BASES[draw(st.sampled_from(list(BASES)))]
    options: dict[str, Any] = {}
    for name in FIELDS:
        how = draw(st.sampled_from(["default", "default", *["base"] * 5, "random"]))
        if how == "random":
            options[name] = draw(VALUES[name])
        elif name in base and (how == "base" or name in ("name", "dim")):
            options[name] = base[name]
    return options


@fast(400)
@given(options=whole_configs())
def test_whole_random_configs_build_and_round_trip_or_name_a_field(options):
    check(options, named=FIELDS)


@pytest.mark.parametrize("kind", list(BASES))
def test_every_base_config_builds(kind):
    """The bases are valid, so a single-field failure above is that field's doing."""
    assert check(dict(BASES[kind]), named=[])
