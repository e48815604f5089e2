"""Array <-> bytes codec of the wire contract.

keys: little-endian int64. values/grads: little-endian float32, float16 or
bfloat16 (the upper half of a float32, rounded to nearest even), row-major.
Decoders validate lengths and raise ``CodecError`` (a ValueError) with a
message that says what is wrong; the server maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

import numpy as np

from embps.v1 import embps_pb2 as pb

_LE_I8 = np.dtype("<i8")
_LE_F4 = np.dtype("<f4")
_LE_F2 = np.dtype("<f2")
_LE_U2 = np.dtype("<u2")
_LE_U4 = np.dtype("<u4")

ITEMSIZE = {pb.DTYPE_UNSPECIFIED: 4, pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}
DTYPE_NAMES = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}


class CodecError(ValueError):
    """A payload that cannot be decoded as the request says."""


def dtype_from_name(name: str) -> int:
    """Wire DType for 'float32' | 'float16' | 'bfloat16'."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPE_NAMES)}") from None


def encode_keys(keys: np.ndarray) -> bytes:
    """int64 (n,) -> bytes (8n)."""
    return np.ascontiguousarray(keys, dtype=_LE_I8).tobytes()


def decode_keys(data: bytes) -> np.ndarray:
    """bytes (8n) -> int64 (n,) (a read-only view, no copy)."""
    if len(data) % 8:
        raise CodecError(
            f"keys must be little-endian int64 (8 bytes each); got {len(data)} bytes, not a multiple of 8"
        )
    return np.frombuffer(data, dtype=_LE_I8)


def encode_mask(mask: np.ndarray) -> bytes:
    """bool (n,) -> bytes (n), one 0/1 byte per key."""
    return np.ascontiguousarray(mask, dtype=np.uint8).tobytes()


def decode_mask(data: bytes, n: int) -> np.ndarray | None:
    """bytes (n) -> bool (n,), or None for an empty field."""
    if not data:
        return None
    if len(data) != n:
        raise CodecError(f"mask must have one byte per key: {n} keys but {len(data)} mask bytes")
    m = np.frombuffer(data, dtype=np.uint8)
    if m.max(initial=0) > 1:
        raise CodecError("mask bytes must be 0 or 1")
    return m.astype(bool)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=_LE_F4).view(_LE_U4)
    rounding = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    out = ((u + rounding) >> np.uint32(16)).astype(_LE_U2)
    nan = np.isnan(x)
    if nan.any():  # keep NaN a NaN (rounding could carry it into Inf)
        out[nan.reshape(out.shape)] = np.uint16(0x7FC0)
    return out


def encode_values(values: np.ndarray, dtype: int = pb.DTYPE_FLOAT32) -> bytes:
    """float32 (n, dim) -> bytes in the wire dtype."""
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
        return np.ascontiguousarray(values, dtype=_LE_F4).tobytes()
    if dtype == pb.DTYPE_FLOAT16:
        return np.ascontiguousarray(values, dtype=_LE_F2).tobytes()
    if dtype == pb.DTYPE_BFLOAT16:
        return _to_bf16(values).tobytes()
    raise CodecError(f"unknown dtype {dtype}")


def decode_values(data: bytes, dtype: int, n: int, dim: int) -> np.ndarray:
    """bytes -> float32 (n, dim); the length must be exactly n * dim * itemsize."""
    if dtype not in ITEMSIZE:
        raise CodecError(f"unknown dtype {dtype}; use FLOAT32, FLOAT16 or BFLOAT16")
    want = n * dim * ITEMSIZE[dtype]
    if len(data) != want:
        raise CodecError(
            f"values payload is {len(data)} bytes; {n} keys x dim {dim} x {ITEMSIZE[dtype]} bytes = {want} expected"
        )
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
        return np.frombuffer(data, dtype=_LE_F4).reshape(n, dim)
    if dtype == pb.DTYPE_FLOAT16:
        return np.frombuffer(data, dtype=_LE_F2).astype(np.float32).reshape(n, dim)
    u = np.frombuffer(data, dtype=_LE_U2).astype(np.uint32) << np.uint32(16)
    return u.view(np.float32).reshape(n, dim)
