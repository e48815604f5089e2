"""Table configs (protos/config.py): validation, wire round trip, plain mappings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from embps.client import InvalidArgumentError, PSClient
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
from embps.v1 import embps_pb2 as pb

OPTIMIZERS = [
    SGD(lr=0.25),
    Adagrad(lr=0.5, initial_accumulator_value=0.125, eps=1e-7),
    Adam(lr=0.001, beta1=0.5, beta2=0.75, eps=1e-6),
    FTRL(alpha=0.5, beta=2.0, l1=0.25, l2=0.125, initial_accumulator_value=0.5),
]

KIND_CONFIGS = {
    "dynamic": dict(
        kind="dynamic",
        initial_capacity=64,
        admission_threshold=3,
        default_value=0.5,
        max_rows=100,
        eviction="lru",
        steps_to_live=9,
        l2_evict_threshold=0.25,
        max_bytes=1 << 26,
    ),
    "static": dict(kind="static", hash_bucket_size=1000, max_bytes=1 << 26),
    "adaptive": dict(
        kind="adaptive",
        initial_capacity=32,
        max_rows=50,
        eviction="lfu",
        steps_to_live=3,
        l2_evict_threshold=0.5,
        hash_bucket_size=100,
        promote_threshold=4,
        sketch_width=4096,
        sketch_depth=3,
        max_bytes=1 << 26,
    ),
    "qr": dict(
        kind="qr",
        qr_quotient_buckets=10,
        qr_remainder_buckets=20,
        qr_combiner="concat",
        max_bytes=1 << 26,
    ),
}


def make(kind: str, optimizer=None, **kw) -> TableConfig:
    args = {"name": "emb.user-id_v2", "dim": 8, "seed": 2**40, **KIND_CONFIGS[kind], **kw}
    if optimizer is not None:
        args["optimizer"] = optimizer
    return TableConfig(**args)


# --------------------------------------------------------------------------
# Validation: a ValueError naming the option
# --------------------------------------------------------------------------

BAD: dict[str, tuple[dict[str, object], str]] = {
    "empty-name": (dict(name=""), "name"),
    "name-with-space": (dict(name="a b"), "name"),
    "dim-zero": (dict(dim=0), "dim"),
    "dim-too-large": (dict(dim=65537), "dim"),
    "dim-float": (dict(dim=4.0), "dim"),
    "unknown-kind": (dict(kind="sparse"), "kind"),
    "unknown-eviction": (dict(eviction="fifo", max_rows=5), "eviction"),
    "eviction-without-max-rows": (dict(eviction="lfu"), "max_rows"),
    "negative-seed": (dict(seed=-1), "seed"),
    "bool-capacity": (dict(initial_capacity=True), "initial_capacity"),
    "negative-max-rows": (dict(max_rows=-5), "max_rows"),
    "nan-default": (dict(default_value=float("nan")), "default_value"),
    "negative-max-bytes": (dict(max_bytes=-1), "max_bytes"),
    "float-max-bytes": (dict(max_bytes=1e9), "max_bytes"),
    "max-bytes-below-the-index": (dict(max_bytes=303), "max_bytes=303 is below the 304"),
    "max-bytes-below-static-rows": (
        dict(kind="static", hash_bucket_size=1000, max_bytes=10_000),
        "below the 40000 bytes its fixed arrays need",
    ),
    "max-bytes-below-qr-rows": (
        dict(kind="qr", qr_quotient_buckets=100, qr_remainder_buckets=100, max_bytes=7999),
        "qr rows 8000",
    ),
    "negative-l2-threshold": (dict(l2_evict_threshold=-0.1), "l2_evict_threshold"),
    "static-without-buckets": (dict(kind="static"), "hash_bucket_size"),
    "static-with-max-rows": (dict(kind="static", hash_bucket_size=4, max_rows=10), "max_rows"),
    "dynamic-with-buckets": (dict(hash_bucket_size=10), "hash_bucket_size"),
    "dynamic-with-sketch": (dict(sketch_width=64), "sketch_width"),
    "adaptive-without-threshold": (dict(kind="adaptive", hash_bucket_size=4), "promote_threshold"),
    "adaptive-with-admission": (
        dict(kind="adaptive", hash_bucket_size=4, promote_threshold=2, admission_threshold=2),
        "admission_threshold",
    ),
    "sketch-width-not-power-of-two": (
        dict(kind="adaptive", hash_bucket_size=4, promote_threshold=2, sketch_width=100),
        "sketch_width",
    ),
    "sketch-depth-too-large": (
        dict(kind="adaptive", hash_bucket_size=4, promote_threshold=2, sketch_depth=17),
        "sketch_depth",
    ),
    "qr-without-buckets": (dict(kind="qr", qr_quotient_buckets=4), "qr_remainder_buckets"),
    "qr-too-many-buckets": (
        dict(kind="qr", qr_quotient_buckets=2**31, qr_remainder_buckets=2**31),
        "qr_quotient_buckets",
    ),
    "qr-concat-odd-dim": (
        dict(kind="qr", dim=5, qr_quotient_buckets=2, qr_remainder_buckets=2, qr_combiner="concat"),
        "dim",
    ),
    "qr-unknown-combiner": (
        dict(kind="qr", qr_quotient_buckets=2, qr_remainder_buckets=2, qr_combiner="max"),
        "combiner",
    ),
    "dynamic-with-combiner": (dict(qr_combiner="add"), "qr_combiner"),
    "optimizer-not-an-optimizer": (dict(optimizer="rmsprop"), "optimizer"),
    "optimizer-class-not-instance": (dict(optimizer=SGD), "optimizer"),
    "name-with-trailing-newline": (dict(name="t\n"), "name"),
    "name-not-a-string": (dict(name=b"t"), "name"),
    "dim-bool": (dict(dim=True), "dim"),
    "seed-too-large": (dict(seed=2**63), "seed"),
    "uint32-option-too-large": (dict(admission_threshold=2**32), "admission_threshold"),
    "inf-l2-threshold": (dict(l2_evict_threshold=float("inf")), "l2_evict_threshold"),
    "string-default": (dict(default_value="0.5"), "default_value"),
    "huge-int-default": (dict(default_value=10**400), "default_value"),
    "kind-of-another-enum": (dict(kind=Eviction.LFU), "kind"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_table_config_raises_value_error_naming_the_option(case):
    kw, option = BAD[case]
    args = {"name": "t", "dim": 4, **kw}
    with pytest.raises(ValueError, match=f"(?i){option}"):
        TableConfig(**args)


@pytest.mark.parametrize(
    ("make_opt", "option"),
    [
        (lambda: SGD(lr=0), "SGD.lr"),
        (lambda: SGD(lr=float("inf")), "SGD.lr"),
        (lambda: Adagrad(lr=-1), "Adagrad.lr"),
        (lambda: Adagrad(initial_accumulator_value=-0.1), "Adagrad.initial_accumulator_value"),
        (lambda: Adagrad(eps=float("nan")), "Adagrad.eps"),
        (lambda: Adam(beta1=1.0), "Adam.beta1"),
        (lambda: Adam(beta2=-0.1), "Adam.beta2"),
        (lambda: FTRL(alpha=0), "FTRL.alpha"),
        (lambda: FTRL(l1=-1), "FTRL.l1"),
        (lambda: FTRL(l2=-1), "FTRL.l2"),
        (lambda: FTRL(initial_accumulator_value=0.0), "FTRL.initial_accumulator_value"),
        (lambda: Initializer("uniform", 1.0, -1.0), "a <= b"),
        (lambda: Initializer("normal", 0.0, -1.0), "std"),
        (lambda: Initializer("constant", float("nan")), "finite"),
        (lambda: Initializer("glorot"), "InitKind"),
    ],
)
def test_a_bad_optimizer_or_initializer_raises_value_error_naming_the_option(make_opt, option):
    with pytest.raises(ValueError) as exc:
        make_opt()
    assert option in str(exc.value)


def test_defaults_are_valid_and_strings_become_enums():
    cfg = TableConfig(
        "t", dim=1, kind="qr", qr_quotient_buckets=1, qr_remainder_buckets=1, qr_combiner="add"
    )
    assert cfg.kind is TableKind.QR and cfg.qr_combiner is Combiner.ADD
    assert cfg.eviction is Eviction.NONE
    assert cfg.optimizer == SGD() and cfg.initializer == Initializer()
    assert Initializer("zeros").kind is InitKind.ZEROS
    assert [TableConfig("t", dim=1, optimizer=o).slots for o in OPTIMIZERS] == [0, 1, 2, 2]


# --------------------------------------------------------------------------
# Wire round trip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: type(o).__name__)
@pytest.mark.parametrize("kind", list(KIND_CONFIGS))
def test_to_proto_from_proto_round_trip(kind, optimizer):
    cfg = make(kind, optimizer, initializer=Initializer("normal", 0.5, 0.25))
    msg = cfg.to_proto()
    assert isinstance(msg, pb.TableConfig)
    assert msg.optimizer.WhichOneof("kind") == type(optimizer).__name__.lower()
    back = TableConfig.from_proto(pb.TableConfig.FromString(msg.SerializeToString()))
    assert back == cfg
    assert back.to_proto() == msg


@pytest.mark.parametrize("kind", list(KIND_CONFIGS))
def test_round_trip_of_every_initializer_kind(kind):
    for ini in (Initializer("zeros"), Initializer("constant", 2.0), Initializer("uniform", -1, 1)):
        cfg = make(kind, initializer=ini)
        assert TableConfig.from_proto(cfg.to_proto()) == cfg


def test_round_trip_of_a_default_value_that_is_not_a_float32():
    """default_value 0.1 must survive the wire: a config that changes on the way is a new table."""
    cfg = make("dynamic", default_value=0.1)
    assert TableConfig.from_proto(cfg.to_proto()) == cfg


def test_from_proto_defaults_of_unset_enums():
    msg = pb.TableConfig(name="t", dim=2, kind=pb.TABLE_KIND_DYNAMIC)
    msg.optimizer.sgd.lr = 0.5
    cfg = TableConfig.from_proto(msg)
    assert cfg.eviction is Eviction.NONE and cfg.initializer == Initializer()
    assert cfg.optimizer == SGD(lr=0.5)


@pytest.mark.parametrize(
    "field, setter",
    [
        ("eviction", lambda m: setattr(m, "eviction", 9)),
        ("initializer kind", lambda m: m.initializer.CopyFrom(pb.Initializer(kind=42))),
        ("qr_combiner", lambda m: setattr(m, "qr_combiner", -3)),
    ],
)
def test_from_proto_refuses_unknown_enum_values_instead_of_a_silent_default(field, setter):
    msg = pb.TableConfig(name="t", dim=2, kind=pb.TABLE_KIND_DYNAMIC)
    msg.optimizer.sgd.lr = 0.5
    setter(msg)
    with pytest.raises(ValueError, match=f"{field} -?\\d+ is unknown"):
        TableConfig.from_proto(msg)


def test_from_proto_without_optimizer_or_kind_names_them():
    msg = pb.TableConfig(name="t", dim=2, kind=pb.TABLE_KIND_DYNAMIC)
    with pytest.raises(ValueError, match="optimizer"):
        TableConfig.from_proto(msg)
    msg.optimizer.sgd.lr = 0.5
    msg.kind = pb.TABLE_KIND_UNSPECIFIED
    with pytest.raises(ValueError, match="kind"):
        TableConfig.from_proto(msg)


def test_from_proto_validates_like_the_constructor():
    msg = make("static").to_proto()
    msg.hash_bucket_size = 0
    with pytest.raises(ValueError, match="hash_bucket_size"):
        TableConfig.from_proto(msg)


# --------------------------------------------------------------------------
# Plain mappings (config files)
# --------------------------------------------------------------------------


def test_from_dict_builds_the_optimizer_and_initializer():
    cfg = TableConfig.from_dict(
        {
            "name": "user",
            "dim": 16,
            "kind": "adaptive",
            "optimizer": {"name": "Adam", "lr": 0.01, "beta2": 0.99},
            "initializer": {"kind": "normal", "a": 0.0, "b": 0.01},
            "hash_bucket_size": 1000,
            "promote_threshold": 5,
        }
    )
    assert cfg == TableConfig(
        "user",
        dim=16,
        kind=TableKind.ADAPTIVE,
        optimizer=Adam(lr=0.01, beta2=0.99),
        initializer=Initializer(InitKind.NORMAL, 0.0, 0.01),
        hash_bucket_size=1000,
        promote_threshold=5,
    )
    assert TableConfig.from_dict(
        {"name": "t", "dim": 2, "optimizer": {"lr": 0.5}}
    ).optimizer == SGD(0.5)


@pytest.mark.parametrize(
    ("d", "option"),
    [
        ({"name": "t", "dim": 2, "max_row": 5}, "max_row"),
        ({"name": "t", "dim": 2, "optimizer": {"name": "rmsprop"}}, "rmsprop"),
        ({"name": "t", "dim": 2, "optimizer": {"name": "sgd", "momentum": 0.9}}, "momentum"),
        ({"name": "t", "dim": 0}, "dim"),
    ],
)
def test_from_dict_rejects_unknown_or_bad_options(d, option):
    with pytest.raises((ValueError, TypeError), match=option):
        TableConfig.from_dict(d)


@pytest.mark.skipif(not hasattr(TableConfig, "to_dict"), reason="TableConfig.to_dict not present")
@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: type(o).__name__)
@pytest.mark.parametrize("kind", list(KIND_CONFIGS))
def test_to_dict_from_dict_round_trip(kind, optimizer):
    cfg = make(kind, optimizer)
    assert TableConfig.from_dict(cfg.to_dict()) == cfg


def test_configs_are_frozen_and_comparable():
    cfg = make("dynamic")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3  # type: ignore[misc]
    assert cfg == make("dynamic") and cfg != make("dynamic", dim=4)


def test_max_bytes_fixed_parts_name_both_numbers_and_every_part():
    """An adaptive table's fixed arrays: static rows, sketch and the empty index, each named."""
    cfg = dict(name="t", dim=4, kind="adaptive", hash_bucket_size=10, promote_threshold=2,
               sketch_width=64, sketch_depth=2, optimizer=Adagrad())  # fmt: skip
    need = 10 * (4 * 4 * 2 + 24) + 64 * 2 * 4 + 304
    assert TableConfig(**cfg).fixed_bytes == need
    assert TableConfig(**cfg, max_bytes=need).max_bytes == need
    with pytest.raises(ValueError) as info:
        TableConfig(**cfg, max_bytes=need - 1)
    msg = str(info.value)
    assert f"max_bytes={need - 1}" in msg and f"{need} bytes" in msg
    assert "static rows 560, sketch 512, empty index 304" in msg


# --------------------------------------------------------------------------
# Shorthands (README "Shorthands"): one meaning each, the same from every entry
# --------------------------------------------------------------------------

QR = dict(kind="qr", qr_quotient_buckets=2, qr_remainder_buckets=2)

SHORTHANDS = {
    # what a Keras / config-file user writes -> the config it means
    "initializer-zeros": (
        dict(initializer="zeros"),
        dict(initializer=Initializer(InitKind.ZEROS, a=0.0, b=0.0)),
    ),
    "initializer-constant": (
        dict(initializer="constant"),
        dict(initializer=Initializer(InitKind.CONSTANT, a=0.0, b=0.0)),
    ),
    "initializer-uniform": (
        dict(initializer="uniform"),
        dict(initializer=Initializer(InitKind.UNIFORM, a=-0.05, b=0.05)),
    ),
    "initializer-normal": (
        dict(initializer="normal"),
        dict(initializer=Initializer(InitKind.NORMAL, a=0.0, b=0.05)),  # N(0, 0.05)
    ),
    "initializer-any-case": (dict(initializer="ZEROS"), dict(initializer=Initializer("zeros"))),
    "initializer-enum-member": (
        dict(initializer=InitKind.NORMAL),
        dict(initializer=Initializer("normal")),
    ),
    "initializer-mapping": (
        dict(initializer={"kind": "normal", "a": 0, "b": 0.01}),
        dict(initializer=Initializer(InitKind.NORMAL, a=0.0, b=0.01)),
    ),
    "initializer-mapping-without-kind": (
        dict(initializer={"a": -1, "b": 1}),
        dict(initializer=Initializer(InitKind.UNIFORM, a=-1.0, b=1.0)),
    ),
    "optimizer-sgd": (dict(optimizer="sgd"), dict(optimizer=SGD(lr=0.01))),
    "optimizer-adagrad": (
        dict(optimizer="Adagrad"),
        dict(optimizer=Adagrad(lr=0.01, initial_accumulator_value=0.0, eps=1e-10)),
    ),
    "optimizer-adam": (
        dict(optimizer="ADAM"),
        dict(optimizer=Adam(lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8)),
    ),
    "optimizer-ftrl": (
        dict(optimizer="ftrl"),
        dict(optimizer=FTRL(alpha=0.05, beta=1.0, l1=0.0, l2=0.0, initial_accumulator_value=0.1)),
    ),
    "optimizer-mapping": (
        dict(optimizer={"name": "Adam", "lr": 0.01}),
        dict(optimizer=Adam(lr=0.01)),
    ),
    "optimizer-mapping-without-name": (dict(optimizer={"lr": 1}), dict(optimizer=SGD(lr=1.0))),
    "kind-by-name": (dict(kind="STATIC", hash_bucket_size=4), dict(kind=TableKind.STATIC,
                                                                    hash_bucket_size=4)),
    "eviction-by-name": (dict(eviction="LFU", max_rows=5), dict(eviction=Eviction.LFU, max_rows=5)),
    "eviction-mixed-case": (dict(eviction="Lru", max_rows=5), dict(eviction=Eviction.LRU,
                                                                    max_rows=5)),
    "combiner-by-name": (dict(QR, qr_combiner="Concat"), dict(QR, qr_combiner=Combiner.CONCAT)),
    "numpy-integer-dim": (dict(dim=np.int64(8)), dict(dim=8)),
    "integer-default-value": (dict(default_value=1), dict(default_value=1.0)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SHORTHANDS))
def test_a_shorthand_builds_the_documented_config(case):
    short, meant = SHORTHANDS[case]
    cfg = TableConfig(**{"name": "t", "dim": 8, **short})
    want = TableConfig(**{"name": "t", "dim": 8, **meant})
    assert cfg == want
    assert TableConfig.from_dict({"name": "t", "dim": 8, **short}) == cfg
    # canonical inside: the enum members, objects and float/int types, not what was written
    for f in dataclasses.fields(TableConfig):
        assert type(getattr(cfg, f.name)) is type(getattr(want, f.name)), f.name
    assert TableConfig.from_proto(cfg.to_proto()) == cfg


BAD_SHORTHANDS: dict[str, tuple[dict[str, object], list[str]]] = {
    "initializer-unknown-kind": (
        dict(initializer="glorot_uniform"),
        ["initializer", "'glorot_uniform'", "'zeros', 'constant', 'uniform', 'normal'"],
    ),
    "initializer-wrong-type": (dict(initializer=0.05), ["initializer", "0.05", "'zeros'"]),
    "initializer-unknown-key": (
        dict(initializer={"kind": "normal", "std": 0.1}),
        ["initializer", "'std'", "a, b, kind"],
    ),
    "optimizer-unknown-name": (
        dict(optimizer="rmsprop"),
        ["optimizer", "'rmsprop'", "'sgd', 'adagrad', 'adam', 'ftrl'"],
    ),
    "optimizer-wrong-type": (dict(optimizer=0.1), ["optimizer", "0.1", "'sgd'"]),
    "optimizer-unknown-key": (
        dict(optimizer={"name": "sgd", "momentum": 0.9}),
        ["optimizer", "'momentum'", "lr"],
    ),
    "optimizer-bad-value": (
        dict(optimizer={"name": "adam", "lr": True}),
        ["optimizer", "Adam.lr", "True", "finite number > 0"],
    ),
    "kind-unknown": (
        dict(kind="sparse"),
        ["kind", "'sparse'", "'dynamic', 'static', 'adaptive', 'qr'"],
    ),
    "eviction-unknown": (
        dict(eviction="fifo", max_rows=5),
        ["eviction", "'fifo'", "'none', 'lfu', 'lru'"],
    ),
    "eviction-not-a-string": (dict(eviction=1, max_rows=5), ["eviction", "1", "'lfu'"]),
    "combiner-unknown": (
        dict(QR, qr_combiner="max"),
        ["qr_combiner", "'max'", "'mult', 'add', 'concat'"],
    ),
    "dim-bool": (dict(dim=True), ["dim", "True", "integer in [1, 65536]"]),
    "dim-float": (dict(dim=8.0), ["dim", "8.0", "integer"]),
    "seed-float": (dict(seed=1.5), ["seed", "1.5", "integer in [0, 2**63 - 1]"]),
    "default-nan": (dict(default_value=float("nan")), ["default_value", "nan", "finite"]),
    "default-bool": (dict(default_value=False), ["default_value", "False", "finite number"]),
}


@pytest.mark.parametrize("case", list(BAD_SHORTHANDS))
def test_a_bad_shorthand_names_the_option_the_value_and_what_is_accepted(case):
    kw, parts = BAD_SHORTHANDS[case]
    for build in (lambda: TableConfig(**{"name": "t", "dim": 8, **kw}),
                  lambda: TableConfig.from_dict({"name": "t", "dim": 8, **kw})):  # fmt: skip
        with pytest.raises(ValueError) as info:
            build()
        for part in parts:
            assert part in str(info.value)


def test_from_dict_names_a_missing_or_unknown_option():
    with pytest.raises(ValueError, match="table 't': dim is required"):
        TableConfig.from_dict({"name": "t"})
    with pytest.raises(ValueError, match="unknown options 'colour', 'size'"):
        TableConfig.from_dict({"name": "t", "dim": 2, "size": 1, "colour": "red"})
    with pytest.raises(ValueError, match="mapping"):
        TableConfig.from_dict([("name", "t")])


# --------------------------------------------------------------------------
# PSClient.create_table: shorthands are encoded; a bad one is InvalidArgumentError
# --------------------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch):
    """A PSClient (2 shards, never connected) whose calls are recorded, not sent."""
    sent: list[tuple[str, list]] = []

    def call_all(method, jobs, retry=True):
        sent.append((method, jobs))
        return [pb.CreateTableResponse(created=True) for _ in jobs]

    with PSClient(["127.0.0.1:1", "127.0.0.1:2"]) as ps:
        monkeypatch.setattr(ps, "_call_all", call_all)
        yield ps, sent


def test_create_table_encodes_a_shorthand(recorded):
    ps, sent = recorded
    assert ps.create_table("t", dim=8, initializer="zeros") is True
    ((method, jobs),) = sent
    assert method == "CreateTable" and [s for s, _ in jobs] == [0, 1]
    want = TableConfig("t", dim=8, initializer=Initializer("zeros")).to_proto()
    for _, req in jobs:
        assert req.config == want
        assert req.config.initializer.kind == pb.INITIALIZER_ZEROS


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (dict(initializer="glorot"), "initializer"),
        (dict(optimizer="rmsprop"), "optimizer"),
        (dict(kind="sparse"), "kind"),
        (dict(max_rows=True), "max_rows"),
        (dict(colour="red"), "colour"),
        (dict(name="x"), "name is given twice"),
    ],
)
def test_create_table_with_a_bad_shorthand_raises_invalid_argument_and_sends_nothing(
    recorded, options, named
):
    ps, sent = recorded
    with pytest.raises(InvalidArgumentError, match=named) as info:
        ps.create_table("t", dim=8, **options)
    assert info.value.shard is None and sent == []


def test_initializer_defaults_are_per_kind() -> None:
    """What a Keras user expects: normal is N(0, 0.05), not centred on the uniform's low."""
    assert (Initializer("normal").a, Initializer("normal").b) == (0.0, 0.05)
    assert (Initializer("uniform").a, Initializer("uniform").b) == (-0.05, 0.05)
    assert Initializer("constant").a == 0.0 and Initializer("constant", 2.0).a == 2.0
    assert Initializer("normal", b=0.01) == Initializer("normal", 0.0, 0.01)
    assert Initializer() == Initializer("uniform", -0.05, 0.05)  # the table default


def test_create_table_shorthands_on_a_real_shard(inproc_factory):
    (shard,) = inproc_factory(1)
    with PSClient([shard.address]) as ps:
        assert ps.create_table("t", dim=8, initializer="zeros", optimizer="adagrad") is True
        # the same table, spelled differently: identical, so not created again
        assert ps.create_table("t", dim=8, kind="DYNAMIC", initializer={"kind": "Zeros"},
                               optimizer=Adagrad()) is False  # fmt: skip
        (cfg,) = ps.describe_tables()
        assert cfg == TableConfig("t", dim=8, optimizer=Adagrad(), initializer=Initializer("zeros"))
        np.testing.assert_array_equal(ps.pull("t", [1, 2, 3]), np.zeros((3, 8), np.float32))


def test_sketch_size_acts_on_a_dynamic_table_with_admission() -> None:
    from embps.server.tables import make_table

    cfg = TableConfig("t", 4, admission_threshold=3, sketch_width=1024, sketch_depth=2)
    assert make_table(cfg).sketch.counters.shape == (2, 1024)  # type: ignore[attr-defined]
    assert cfg.fixed_bytes - TableConfig("t", 4, admission_threshold=3).fixed_bytes < 0
    with pytest.raises(ValueError, match="sketch_width sizes the admission sketch"):
        TableConfig("t", 4, sketch_width=1024)
    with pytest.raises(ValueError, match="sketch_depth sizes the admission sketch"):
        TableConfig("t", 4, admission_threshold=1, sketch_depth=2)
