"""Block storage (server/tables/block.py): float32 for training, float16 and int8 rows
for serving replicas, with or without per-row training metadata."""

from __future__ import annotations

import numpy as np
import pytest

from embps.protos.config import TableConfig
from embps.server.tables import ROW_DTYPES, Block, Storage, make_table

DIM = 16


def rows_f32(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 0.3, (n, DIM)).astype(np.float32)
    v[0] = 0.25  # a constant row: scale 0 must not divide by zero
    return v


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_rows_come_back_within_the_dtype_rounding(dtype: str) -> None:
    blk = Block(64, DIM, 0, Storage(dtype, meta=False))
    v = rows_f32(40)
    where = np.arange(40, dtype=np.int64)[::-1] + 10
    blk.set_values(where, v)
    got = np.empty((41, DIM), dtype=np.float32)
    blk.gather(np.append(where, -1), -3.0, got)
    assert (got[-1] == -3.0).all()  # no row: the default
    if dtype == "float32":
        np.testing.assert_array_equal(got[:-1], v)
    elif dtype == "float16":
        np.testing.assert_array_equal(got[:-1], v.astype(np.float16).astype(np.float32))
    else:
        step = (v.max(axis=1) - v.min(axis=1)) / 255
        assert (np.abs(got[:-1] - v) <= step[:, None] / 2 * 1.001 + 1e-7).all()
        np.testing.assert_array_equal(got[0], v[0])  # a constant row is exact
    np.testing.assert_array_equal(blk.decode(where), got[:-1])


@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("meta", [True, False])
def test_bytes_are_exactly_the_arrays(dtype: str, meta: bool) -> None:
    blk = Block(100, DIM, 1, Storage(dtype, meta=meta))
    item = {"float32": 4, "float16": 2, "int8": 1}[dtype]
    want_row = item * DIM + 4 * DIM + (24 if meta else 0) + (8 if dtype == "int8" else 0)
    assert blk.row_bytes == want_row
    assert blk.nbytes == 100 * want_row
    blk.resize(150)
    assert blk.rows == 150 and blk.nbytes == 150 * want_row
    taken = blk.take(np.array([3, 1], dtype=np.int64))
    assert taken.rows == 2 and taken.nbytes == 2 * want_row


def test_an_int8_table_starts_with_the_training_init_rounded() -> None:
    cfg = TableConfig("s", DIM, kind="static", hash_bucket_size=50, initializer="uniform")
    train, serve = make_table(cfg), make_table(cfg, Storage("int8", meta=False))
    keys = np.arange(-30, 30, dtype=np.int64)
    want, got = train.pull(keys, train=False), serve.pull(keys, train=False)
    step = (want.max(axis=1) - want.min(axis=1)) / 255
    assert (np.abs(got - want) <= step[:, None] / 2 * 1.001 + 1e-7).all()
    assert not np.array_equal(got, want)
    assert serve.memory_bytes() < 0.5 * train.memory_bytes()


def test_an_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(ValueError, match="row dtype 'int4': use one of float32, float16, int8"):
        Storage("int4")
