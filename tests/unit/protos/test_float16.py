"""float16 wire conversions (protos/float16.py) against numpy's casts, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from embps.protos import codec
from embps.protos.float16 import from_half, to_half
from embps.v1 import embps_pb2 as pb


def numpy_half_bits(bits: np.ndarray) -> np.ndarray:
    """float32 bits (uint32) -> float16 bits by numpy's cast (the reference)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bits.view(np.float32).astype(np.float16).view(np.uint16)


def ours(bits: np.ndarray) -> np.ndarray:
    out = np.empty(bits.shape[0], dtype=np.uint16)
    to_half(bits, out)
    return out


def boundary_bits() -> np.ndarray:
    """float32 bit patterns where rounding to half decides: every half, the float32
    halfway to the next half and one float32 ulp either side of each, with both signs;
    every float32 exponent with the mantissas that steer rounding; NaNs with payloads."""
    halves = np.arange(1 << 15, dtype=np.uint16)  # the positive halves (sign added below)
    with np.errstate(over="ignore", invalid="ignore"):
        f = halves.view(np.float16).astype(np.float32)
        g = np.nextafter(halves.view(np.float16), np.float16(np.inf)).astype(np.float32)
    finite = np.isfinite(f) & np.isfinite(g)
    mid = ((f[finite].astype(np.float64) + g[finite]) / 2).astype(np.float32)
    around = [f.view(np.uint32), mid.view(np.uint32)]
    around += [mid.view(np.uint32) + np.uint32(1), mid.view(np.uint32) - np.uint32(1)]
    exps = np.arange(256, dtype=np.uint32) << np.uint32(23)
    sigs = np.array(
        [0, 1, 0x7FF, 0x800, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFFFF, 0x400000],
        dtype=np.uint32,
    )
    grid = (exps[:, None] | sigs[None, :]).reshape(-1)
    rng = np.random.default_rng(3)
    nans = np.uint32(0x7F800000) | rng.integers(1, 1 << 23, 50_000, dtype=np.uint32)
    rand = rng.integers(0, 1 << 32, 500_000, dtype=np.uint64).astype(np.uint32)
    pos = np.concatenate([*around, grid, nans, rand[:250_000]])
    return np.concatenate([pos, pos | np.uint32(0x80000000), rand[250_000:]])


def test_every_half_survives_a_round_trip() -> None:
    halves = np.arange(1 << 16, dtype=np.uint16)
    f = np.empty(1 << 16, dtype=np.float32)
    from_half(halves, f)
    with np.errstate(invalid="ignore"):
        want = halves.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(f.view(np.uint32), want.view(np.uint32))
    np.testing.assert_array_equal(ours(f.view(np.uint32)), numpy_half_bits(f.view(np.uint32)))
    finite = np.isfinite(f)
    np.testing.assert_array_equal(ours(f.view(np.uint32))[finite], halves[finite])


def test_float32_to_half_rounds_as_numpy_at_every_boundary() -> None:
    bits = boundary_bits()
    got, want = ours(bits), numpy_half_bits(bits)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(bits[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (300, 7)])
def test_the_codec_encodes_and_decodes_float16_as_numpy(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(9)
    x = (rng.normal(size=shape) * 10.0 ** rng.integers(-9, 6, shape)).astype(np.float32)
    if x.size:
        x.reshape(-1)[:3] = [np.inf, -np.nan, 1e30][: x.size]
    wire = codec.wire_values(x, pb.DTYPE_FLOAT16)
    with np.errstate(over="ignore"):
        want = x.astype("<f2")
    assert wire.dtype == np.dtype("<f2") and wire.flags.c_contiguous
    np.testing.assert_array_equal(wire.view(np.uint16), want.view(np.uint16))
    back = codec.decode_values(wire.tobytes(), pb.DTYPE_FLOAT16, *shape)
    np.testing.assert_array_equal(back.view(np.uint32), want.astype(np.float32).view(np.uint32))
    answer = codec.PullResponseBuffer(*shape, pb.DTYPE_FLOAT16)
    answer.fill(x)
    np.testing.assert_array_equal(answer.rows.view(np.uint16), want.view(np.uint16))
