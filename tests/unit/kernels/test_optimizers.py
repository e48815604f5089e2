"""Optimizer and row kernels (server/kernels/optim.py, server/kernels/rows.py) against numpy float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from support.reference import initial_slots, initial_values, n_slots, optimizer_step, sum_by

from embps.protos.config import FTRL, SGD, Adagrad, Adam, Initializer, TableConfig
from embps.server import optimizers as opt_mod
from embps.server.kernels import optim as kernels_optim
from embps.server.kernels import rows as kernels_rows
from embps.server.tables import make_table

RTOL, ATOL = 1e-6, 1e-7
DIM = 5

OPTIMIZERS = {
    "sgd": SGD(lr=0.3),
    "adagrad": Adagrad(lr=0.2, initial_accumulator_value=0.05, eps=1e-8),
    "adagrad-zero-acc": Adagrad(lr=0.05),
    "adam": Adam(lr=0.02, beta1=0.8, beta2=0.95, eps=1e-6),
    "ftrl": FTRL(alpha=0.3, beta=0.5, l1=0.0, l2=0.0, initial_accumulator_value=0.1),
    "ftrl-l1-l2": FTRL(alpha=0.3, beta=1.0, l1=0.05, l2=0.2, initial_accumulator_value=0.2),
}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


# --------------------------------------------------------------------------
# dedup_sum
# --------------------------------------------------------------------------


def test_dedup_sum_of_nothing():
    rows, grads = kernels_optim.dedup_sum(np.empty(0, dtype=np.int64), np.empty((0, 3), np.float32))
    assert rows.shape == (0,) and grads.shape == (0, 3)


def test_dedup_sum_sums_equal_rows_in_first_seen_order_and_drops_negative_rows(rng):
    rows = np.array([5, -1, 3, 5, 5, 0, 3, -1, 1000000], dtype=np.int64)
    grads = rng.normal(size=(rows.shape[0], 3)).astype(np.float32)
    urows, ugrads = kernels_optim.dedup_sum(rows, grads)
    keep = rows >= 0
    exp = sum_by(rows[keep].tolist(), grads[keep])
    assert urows.tolist() == list(exp) == [5, 3, 0, 1000000]
    assert ugrads.dtype == np.float32
    np.testing.assert_allclose(ugrads, np.stack(list(exp.values())), rtol=RTOL, atol=ATOL)


def test_dedup_sum_on_a_large_batch_with_many_collisions(rng):
    rows = rng.integers(0, 50, 5000).astype(np.int64)
    grads = rng.normal(size=(5000, 2)).astype(np.float32)
    urows, ugrads = kernels_optim.dedup_sum(rows, grads)
    assert sorted(urows.tolist()) == sorted(set(rows.tolist()))
    for r, g in zip(urows, ugrads, strict=True):
        np.testing.assert_allclose(
            g, grads[rows == r].astype(np.float64).sum(0), rtol=1e-4, atol=1e-4
        )


# --------------------------------------------------------------------------
# First steps in closed form (independent of reference.optimizer_step)
# --------------------------------------------------------------------------


def one_step(opt, w0: float, g: float, t: int = 1) -> tuple[float, np.ndarray]:
    values = np.full((1, 1), w0, dtype=np.float32)
    slots = np.zeros((1, n_slots(opt)), dtype=np.float32)
    slots[0] = initial_slots(opt, 1)
    rows = np.array([0], dtype=np.int64)
    opt_mod.apply_optimizer(opt, values, slots, rows, np.array([[g]], np.float32), t)
    return float(values[0, 0]), slots[0]


def test_sgd_closed_form():
    w, _ = one_step(SGD(lr=0.1), 1.0, 2.0)
    assert w == pytest.approx(0.8, rel=1e-6)


def test_adagrad_closed_form():
    # acc = 0.5 + 4 = 4.5; w = 1 - 0.1 * 2 / (sqrt(4.5) + 1e-10)
    w, slots = one_step(Adagrad(lr=0.1, initial_accumulator_value=0.5), 1.0, 2.0)
    assert slots[0] == pytest.approx(4.5)
    assert w == pytest.approx(1.0 - 0.2 / math.sqrt(4.5), rel=1e-6)


@pytest.mark.parametrize("t", [1, 7])
def test_adam_closed_form(t):
    # m = 0.1 g, v = 0.001 g^2; w -= lr sqrt(1 - 0.999^t) / (1 - 0.9^t) * m / (sqrt(v) + eps)
    w, slots = one_step(Adam(lr=0.01, eps=1e-8), 1.0, -3.0, t=t)
    m, v = 0.1 * -3.0, 0.001 * 9.0
    assert slots.tolist() == pytest.approx([m, v], rel=1e-6)
    step = 0.01 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    assert w == pytest.approx(1.0 - step * m / (math.sqrt(v) + 1e-8), rel=1e-6)


@pytest.mark.parametrize("l1", [0.0, 0.5, 5.0])
def test_ftrl_closed_form(l1):
    # From w = 0: z = g, n = n0 + g^2, w = (sign(z) l1 - z) / ((beta + sqrt(n)) / alpha + 2 l2)
    opt = FTRL(alpha=0.5, beta=1.0, l1=l1, l2=0.25, initial_accumulator_value=1.0)
    w, slots = one_step(opt, 0.0, 2.0)
    assert slots.tolist() == pytest.approx([5.0, 2.0])
    exp = 0.0 if l1 >= 2.0 else (l1 - 2.0) / ((1.0 + math.sqrt(5.0)) / 0.5 + 0.5)
    assert w == pytest.approx(exp, rel=1e-6, abs=1e-9)


def test_ftrl_linear_term_uses_the_current_weight():
    # From w = 0.4, n0 = 1, g = 1: z = 1 - (sqrt(2) - 1) / alpha * 0.4
    opt = FTRL(alpha=0.5, beta=0.0, l1=0.0, l2=0.0, initial_accumulator_value=1.0)
    w, slots = one_step(opt, 0.4, 1.0)
    z = 1.0 - (math.sqrt(2.0) - 1.0) / 0.5 * 0.4
    assert slots[1] == pytest.approx(z, rel=1e-6)
    assert w == pytest.approx(-z / (math.sqrt(2.0) / 0.5), rel=1e-6)


# --------------------------------------------------------------------------
# Several steps: kernels, then whole tables
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kernel_steps_match_the_reference(name, rng):
    opt = OPTIMIZERS[name]
    rows_total = 6
    values = rng.uniform(-0.5, 0.5, (rows_total, DIM)).astype(np.float32)
    slots = np.tile(initial_slots(opt, DIM), (rows_total, 1))
    ref_w = values.copy()
    ref_s = slots.copy()
    for t in range(1, 6):
        rows = rng.choice(rows_total, size=3, replace=False).astype(np.int64)
        grads = rng.normal(0, 1, (3, DIM)).astype(np.float32)
        opt_mod.apply_optimizer(opt, values, slots, rows, grads, t)
        for r, g in zip(rows, grads, strict=True):
            ref_w[r], ref_s[r] = optimizer_step(opt, ref_w[r], ref_s[r], g, t)
        np.testing.assert_allclose(values, ref_w, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(slots, ref_s, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_pushes_with_duplicate_keys_match_the_reference(name, rng):
    """A dynamic table: duplicates in a push are summed first; untouched rows stay (lazy)."""
    opt = OPTIMIZERS[name]
    config = TableConfig("t", dim=DIM, optimizer=opt, initializer=Initializer("uniform", -0.5, 0.5))
    table = make_table(config)
    keys = [-3, 0, 1, 2, 7, 2**40]
    init = table.pull(keys)
    np.testing.assert_array_equal(init, initial_values(config, keys, 0, DIM))
    ref_w = {k: init[i].copy() for i, k in enumerate(keys)}
    ref_s = {k: initial_slots(opt, DIM) for k in keys}
    for step in range(6):
        batch = rng.choice(keys[:-1], size=7).tolist()  # duplicates; the last key never pushed
        grads = rng.normal(0, 1, (7, DIM)).astype(np.float32)
        res = table.push(np.array(batch), grads)
        assert (res.applied, res.dropped) == (7, 0)
        for k, g in sum_by(batch, grads).items():
            ref_w[k], ref_s[k] = optimizer_step(opt, ref_w[k], ref_s[k], g, step + 1)
        got = table.pull(keys, train=False)
        np.testing.assert_allclose(got, np.stack([ref_w[k] for k in keys]), rtol=RTOL, atol=ATOL)
    rows = table.part.find(np.array(keys))
    for k, r in zip(keys, rows, strict=True):
        np.testing.assert_allclose(table.part.block.slots[r], ref_s[k], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(table.pull([2**40], train=False)[0], init[-1])


@pytest.mark.parametrize("name", ["adam", "ftrl-l1-l2", "adagrad"])
def test_static_rows_shared_by_keys_get_the_summed_gradient(name, rng):
    opt = OPTIMIZERS[name]
    config = TableConfig("t", dim=DIM, kind="static", optimizer=opt, hash_bucket_size=3)
    table = make_table(config)
    keys = np.arange(12)
    rows = table.static_rows_of(keys).tolist()
    w = table.block.values.copy()
    s = table.block.slots.copy()
    for step in range(4):
        grads = rng.normal(0, 1, (12, DIM)).astype(np.float32)
        table.push(keys, grads)
        for r, g in sum_by(rows, grads).items():
            w[r], s[r] = optimizer_step(opt, w[r], s[r], g, step + 1)
    np.testing.assert_allclose(table.block.values, w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(table.block.slots, s, rtol=RTOL, atol=ATOL)


def test_adam_bias_correction_uses_the_push_step():
    opt = Adam(lr=0.1)
    table = make_table(TableConfig("t", dim=1, optimizer=opt, initializer=Initializer("zeros")))
    table.pull([1, 2])
    table.push([1], np.ones((1, 1)), step=9)  # t = 10
    table.push([2], np.ones((1, 1)))  # auto step continues: 10, so t = 11
    w1, _ = optimizer_step(
        opt, np.zeros(1, np.float32), np.zeros(2, np.float32), np.ones(1, np.float32), 10
    )
    w2, _ = optimizer_step(
        opt, np.zeros(1, np.float32), np.zeros(2, np.float32), np.ones(1, np.float32), 11
    )
    got = table.pull([1, 2], train=False)[:, 0]
    np.testing.assert_allclose(got, [w1[0], w2[0]], rtol=RTOL)
    assert w1[0] != w2[0]


def test_ftrl_l1_keeps_weights_exactly_zero():
    opt = FTRL(alpha=0.1, l1=10.0)
    table = make_table(TableConfig("t", dim=DIM, optimizer=opt))
    table.pull([1])
    table.push([1, 1], np.full((2, DIM), 0.5, dtype=np.float32))
    assert (table.pull([1], train=False) == 0.0).all()


# --------------------------------------------------------------------------
# Initial slots, gathers, norms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_new_rows_start_with_the_optimizer_initial_slots(name):
    opt = OPTIMIZERS[name]
    table = make_table(TableConfig("t", dim=DIM, optimizer=opt))
    assert table.part.block.slots.shape[1] == n_slots(opt) * DIM
    table.pull([1, 2, 0])
    rows = table.part.find(np.array([0, 1, 2]))
    for r in rows:
        np.testing.assert_array_equal(table.part.block.slots[r], initial_slots(opt, DIM))


def test_gather_reads_rows_and_the_default_for_missing_rows(rng):
    values = rng.normal(size=(40, 3)).astype(np.float32)
    rows = np.array([3, -1, 39, 3, -1, 0, *range(20)], dtype=np.int64)
    out = np.empty((rows.shape[0], 3), dtype=np.float32)
    kernels_rows.gather(values, rows, np.float32(-2.5), out)
    exp = np.where((rows >= 0)[:, None], values[np.maximum(rows, 0)], np.float32(-2.5))
    np.testing.assert_array_equal(out, exp)


@pytest.mark.parametrize(
    ("kind", "fn"),
    [
        (0, lambda x: np.sqrt((x * x).sum(1))),
        (1, lambda x: np.abs(x).sum(1)),
        (2, lambda x: np.abs(x).max(1)),
    ],
)
def test_row_norms(kind, fn, rng):
    values = rng.normal(size=(10, 7)).astype(np.float32)
    rows = np.array([9, 0, 4, 4], dtype=np.int64)
    got = kernels_rows.row_norms(values, rows, kind)
    np.testing.assert_allclose(got, fn(values[rows].astype(np.float64)), rtol=1e-12)


def test_init_rows_is_a_pure_function_of_key_and_seed():
    a = np.zeros((3, 8), dtype=np.float32)
    b = np.zeros((3, 8), dtype=np.float32)
    keys = np.array([5, -5, 2**62], dtype=np.int64)
    kernels_optim.init_rows(a, np.arange(3, dtype=np.int64), keys, 2, -1.0, 1.0, 3)
    kernels_optim.init_rows(
        b, np.array([2, 0, 1], dtype=np.int64), keys[[1, 2, 0]], 2, -1.0, 1.0, 3
    )
    np.testing.assert_array_equal(a, b[[1, 2, 0]])
    assert len({a[i].tobytes() for i in range(3)}) == 3, "different keys, different rows"
    assert len(set(a[0].tolist())) == 8, "different columns, different values"


def test_every_optimizer_config_has_a_server_entry() -> None:
    """The registry covers every optimizer the config accepts, with the config's slot
    count: a new optimizer without a kernel fails here, not inside a push."""
    from embps.protos.config import SLOTS_PER_OPTIMIZER

    assert set(opt_mod.REGISTRY) == set(SLOTS_PER_OPTIMIZER)
    for cls, spec in opt_mod.REGISTRY.items():
        assert spec.n_slots == SLOTS_PER_OPTIMIZER[cls]
        assert len(spec.initial_slots(cls())) == spec.n_slots


def test_an_optimizer_without_an_entry_is_a_precise_error() -> None:
    class RowWiseAdagrad:
        lr = 0.1

    with pytest.raises(ValueError, match="RowWiseAdagrad has no server kernel; accepted: SGD"):
        opt_mod.spec_of(RowWiseAdagrad())  # type: ignore[arg-type]
