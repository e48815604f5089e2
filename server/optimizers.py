"""The server's optimizer registry: one entry per optimizer, naming everything the
server does differently for it. Adding an optimizer (say row-wise Adagrad) is an entry
here, its kernel in ``embps.server.kernels.optim``, and its config class and wire message
in ``embps.protos.config`` (which owns the slot count, ``SLOTS_PER_OPTIMIZER``, and the
name); a unit test fails while any config class lacks an entry.

Each optimizer owns its state layout (as FBGEMM's ``EmbOptimType`` does): ``n_slots``
vectors of ``dim`` floats beside each row, slot s of row r at ``slots[r, s*dim:(s+1)*dim]``,
each initialized to ``initial_slots(opt)[s]``. The formulas are in the kernels' module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embps.protos.config import (
    FTRL,
    SGD,
    SLOTS_PER_OPTIMIZER,
    Adagrad,
    Adam,
    InitKind,
    OptimizerConfig,
)
from embps.server.kernels.optim import adagrad_update, adam_update, ftrl_update, sgd_update

# the initializer kernel's codes (``kernels.optim.init_rows``'s ``kind``)
INIT_CODES = {InitKind.ZEROS: 0, InitKind.CONSTANT: 1, InitKind.UNIFORM: 2, InitKind.NORMAL: 3}


@dataclass(frozen=True)
class OptimizerSpec:
    """What the server does for one optimizer.

    update(opt, values float32 (cap, dim), slots float32 (cap, n_slots * dim),
           rows int64 (m,) unique, grads float32 (m, dim), t: the table's step)
    initial_slots(opt) -> one float per slot vector, the value of a new row's slot.
    """

    n_slots: int
    update: Callable[[OptimizerConfig, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], None]
    initial_slots: Callable[[OptimizerConfig], tuple[float, ...]]


def _sgd(opt, values, slots, rows, grads, t):
    sgd_update(values, rows, grads, opt.lr)


def _adagrad(opt, values, slots, rows, grads, t):
    adagrad_update(values, slots, rows, grads, opt.lr, opt.eps)


def _adam(opt, values, slots, rows, grads, t):
    adam_update(values, slots, rows, grads, opt.lr, opt.beta1, opt.beta2, opt.eps, float(max(t, 1)))


def _ftrl(opt, values, slots, rows, grads, t):
    ftrl_update(values, slots, rows, grads, opt.alpha, opt.beta, opt.l1, opt.l2)


REGISTRY: dict[type, OptimizerSpec] = {
    SGD: OptimizerSpec(0, _sgd, lambda opt: ()),
    Adagrad: OptimizerSpec(1, _adagrad, lambda opt: (opt.initial_accumulator_value,)),  # type: ignore[union-attr]
    Adam: OptimizerSpec(2, _adam, lambda opt: (0.0, 0.0)),
    FTRL: OptimizerSpec(2, _ftrl, lambda opt: (opt.initial_accumulator_value, 0.0)),  # type: ignore[union-attr]
}
for _cls, _spec in REGISTRY.items():  # the config's slot count is the layout's
    assert SLOTS_PER_OPTIMIZER[_cls] == _spec.n_slots, _cls


def spec_of(opt: OptimizerConfig) -> OptimizerSpec:
    """The registry entry of ``opt``'s class; ValueError naming the accepted ones."""
    try:
        return REGISTRY[type(opt)]
    except KeyError:
        accepted = ", ".join(c.__name__ for c in REGISTRY)
        raise ValueError(
            f"optimizer {type(opt).__name__} has no server kernel; accepted: {accepted}"
        ) from None


def apply_optimizer(
    opt: OptimizerConfig,
    values: np.ndarray,  # float32 (cap, dim)
    slots: np.ndarray,  # float32 (cap, n_slots * dim)
    rows: np.ndarray,  # int64 (m,), unique
    grads: np.ndarray,  # float32 (m, dim)
    t: int,
) -> None:
    """Run ``opt``'s kernel on unique ``rows`` with their summed ``grads``."""
    if rows.shape[0] == 0:
        return
    spec_of(opt).update(opt, values, slots, rows, grads, t)


def initial_slot_values(opt: OptimizerConfig) -> tuple[float, ...]:
    """Initial value of each slot vector of a new row."""
    return spec_of(opt).initial_slots(opt)
