"""Array <-> bytes codec of the wire contract.

keys: little-endian int64. values/grads: little-endian float32, float16 or
bfloat16 (the upper half of a float32, rounded to nearest even), row-major.
Decoders validate lengths and raise ``CodecError`` (a ValueError) with a
message that says what is wrong; the server maps it to INVALID_ARGUMENT.

The two messages that carry rows on the client's hot path, ``PullResponse``
and ``PushRequest``, are also read and written here directly in the protobuf
wire format (``decode_pull_response``, ``encode_push_request``). Why: the
generated (upb) classes copy a bytes field into their arena when parsing or
building a message, again when the field is read, and once more when
serializing; for a batch of 16384 rows of dim 64 each copy is a fresh 4 MiB
buffer, and fresh buffers page-fault (about 1000 faults each). Written by
hand, a pull's rows are read in place from gRPC's response buffer and a push's
gradients are copied once, from the array into the request. The shard does
the mirror image (``PullResponseBuffer``: the rows gathered straight into the
bytes of the answer; ``decode_push_request``: keys and gradients read in place from the
request). All four are tested against the generated classes
(tests/unit/test_codec.py).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import cast

import numpy as np

from embps.v1 import embps_pb2 as pb

_LE_I8 = np.dtype("<i8")
_LE_F4 = np.dtype("<f4")
_LE_F2 = np.dtype("<f2")
_LE_U2 = np.dtype("<u2")
_LE_U4 = np.dtype("<u4")

ITEMSIZE: dict[int, int] = {
    pb.DTYPE_UNSPECIFIED: 4,
    pb.DTYPE_FLOAT32: 4,
    pb.DTYPE_FLOAT16: 2,
    pb.DTYPE_BFLOAT16: 2,
}
DTYPE_NAMES = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}


class CodecError(ValueError):
    """A payload that cannot be decoded as the request says."""


def dtype_from_name(name: str) -> pb.DType:
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


def _to_half(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 (n, dim) -> float16 (n, dim), bit for bit numpy's cast, about 3x faster
    (``embps.protos.float16``); into ``out`` (any 16-bit dtype, same shape) if given."""
    from embps.protos.float16 import to_half  # numba: imported on first use (fast CLI start)

    v = np.ascontiguousarray(x, dtype=_LE_F4)
    if out is None:
        out = np.empty(v.shape, dtype=_LE_F2)
    to_half(v.reshape(-1).view(_LE_U4), out.reshape(-1).view(_LE_U2))
    return out


def wire_values(values: np.ndarray, dtype: pb.DType = pb.DTYPE_FLOAT32) -> np.ndarray:
    """float32 (n, dim) -> a C-contiguous array whose bytes are the wire encoding.

    float32 input that is already contiguous little-endian comes back as is (no copy).
    """
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
        return np.ascontiguousarray(values, dtype=_LE_F4)
    if dtype == pb.DTYPE_FLOAT16:
        return _to_half(values)
    if dtype == pb.DTYPE_BFLOAT16:
        return _to_bf16(values)
    raise CodecError(f"unknown dtype {dtype}")


def decode_values(data: bytes | memoryview, dtype: pb.DType, n: int, dim: int) -> np.ndarray:
    """bytes -> float32 (n, dim); the length must be exactly n * dim * itemsize.

    float32: a read-only view of ``data`` (no copy); 16-bit dtypes: a new array.
    """
    if dtype not in ITEMSIZE:
        raise CodecError(f"unknown dtype {dtype}; use FLOAT32, FLOAT16 or BFLOAT16")
    want = n * dim * ITEMSIZE[dtype]
    if len(data) != want:
        raise CodecError(
            f"values payload is {len(data)} bytes; {n} keys x dim {dim} x {ITEMSIZE[dtype]} bytes = {want} expected"
        )
    if dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_UNSPECIFIED):
        return np.frombuffer(data, dtype=_LE_F4).reshape(n, dim)
    if dtype == pb.DTYPE_FLOAT16:  # a 256 KiB table of every half (numpy's own cast, once)
        from embps.protos.float16 import from_half

        out = np.empty(n * dim, dtype=np.float32)
        from_half(np.frombuffer(data, dtype=_LE_U2), out)
        return out.reshape(n, dim)
    u = np.frombuffer(data, dtype=_LE_U2).astype(np.uint32) << np.uint32(16)
    return u.view(np.float32).reshape(n, dim)


# --------------------------------------------------------------------------
# PullResponse and PushRequest in the protobuf wire format (client hot path)
# --------------------------------------------------------------------------

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    """Protobuf varint of an int64/uint64 (negative: 10 bytes, two's complement)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: memoryview, i: int) -> tuple[int, int]:
    """(value as uint64, next position) of the varint at ``data[i]``."""
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise CodecError("malformed message: truncated or overlong varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, i
        shift += 7


def _len_field(field_number: int, size: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _varint(field_number << 3 | _WIRE_LEN) + _varint(size)


def _as_int32(value: int) -> int:
    """A varint read as uint64, truncated to int32 as protobuf reads int32 and enum fields."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def encode_push_request(
    table: str,
    keys: np.ndarray,
    grads: np.ndarray,
    dtype: pb.DType,
    num_shards: int,
    step: int | None,
    client_id: str = "",
    sequence: int = 0,
) -> bytes:
    """The bytes of ``PushRequest(table, keys, grads, dtype, step, num_shards, client_id,
    sequence)``.

    keys: int64 (n,); grads: the wire encoding, e.g. ``wire_values(g, dtype)``
    (n, dim), any C-contiguous array. The arrays are copied once, straight into
    the result. Fields at their proto3 default are left out, as protobuf does;
    ``step`` (an optional field) is written whenever it is not None.
    """
    k = np.ascontiguousarray(keys, dtype=_LE_I8)
    g = np.ascontiguousarray(grads)
    name = table.encode("utf-8")
    parts: list[bytes | memoryview] = []
    if name:
        parts += [_len_field(1, len(name)), name]
    if k.nbytes:
        parts += [_len_field(2, k.nbytes), k.data.cast("B")]
    if g.nbytes:
        parts += [_len_field(3, g.nbytes), g.reshape(-1).data.cast("B")]
    if dtype:
        parts += [b"\x20", _varint(dtype)]  # field 4, varint
    if step is not None:
        parts += [b"\x28", _varint(int(step))]  # field 5, varint
    if num_shards:
        parts += [b"\x30", _varint(num_shards)]  # field 6, varint
    if client_id:
        cid = client_id.encode("utf-8")
        parts += [_len_field(7, len(cid)), cid]
    if sequence:
        parts += [b"\x40", _varint(sequence)]  # field 8, varint
    return b"".join(parts)


class PullResponseBuffer:
    """The bytes of a ``PullResponse`` of (n, dim) rows, written in place.

    ``rows`` is a writable (n, dim) array in the wire dtype that lies inside
    ``data``, a new ``bytes`` object whose other fields (tag, length, dim, dtype)
    are already written: the shard gathers the rows straight into the answer, and
    the answer is the ``bytes`` gRPC sends (no copy of the rows in between). Fill
    ``rows`` completely before ``data`` is shared; afterwards ``data`` is an
    ordinary immutable ``bytes``, byte for byte protobuf's encoding (fields at their
    proto3 default left out, as protobuf does).
    """

    __slots__ = ("data", "rows")

    def __init__(self, n: int, dim: int, dtype: pb.DType) -> None:
        if dtype not in ITEMSIZE:
            raise CodecError(f"unknown dtype {dtype}; use FLOAT32, FLOAT16 or BFLOAT16")
        nbytes = n * dim * ITEMSIZE[dtype]
        head = _len_field(1, nbytes) if nbytes else b""
        tail = (b"\x10" + _varint(dim) if dim else b"") + (
            b"\x18" + _varint(dtype) if dtype else b""
        )
        self.data, buf = _new_bytes(len(head) + nbytes + len(tail))
        buf[: len(head)] = np.frombuffer(head, np.uint8)
        buf[len(head) + nbytes :] = np.frombuffer(tail, np.uint8)
        wire = {pb.DTYPE_FLOAT16: _LE_F2, pb.DTYPE_BFLOAT16: _LE_U2}.get(dtype, _LE_F4)
        self.rows = buf[len(head) : len(head) + nbytes].view(wire).reshape(n, dim)

    def fill(self, values: np.ndarray) -> None:
        """Write float32 (n, dim) rows, converted to the wire dtype."""
        if self.rows.dtype == _LE_U2:
            self.rows[...] = _to_bf16(values)
        elif self.rows.dtype == _LE_F2:
            _to_half(values, self.rows)
        else:
            np.copyto(self.rows, values, casting="same_kind")


class StepResponseBuffer:
    """The bytes of a ``StepResponse`` whose pulled rows are written in place.

    ``rows[g]`` is a writable (n_g, dim_g) array in the wire dtype for pull group g,
    each lying inside ``data`` (the ``values`` field: groups one after another), as
    ``PullResponseBuffer`` does for one table. ``tail``: the other fields, already
    serialized (a ``StepResponse`` without ``values``); protobuf reads a message's
    fields in any order, so values first and the rest after is the same message.
    """

    __slots__ = ("data", "rows")

    def __init__(self, shapes: list[tuple[int, int]], dtype: pb.DType, tail: bytes) -> None:
        if dtype not in ITEMSIZE:
            raise CodecError(f"unknown dtype {dtype}; use FLOAT32, FLOAT16 or BFLOAT16")
        item = ITEMSIZE[dtype]
        nbytes = sum(n * dim for n, dim in shapes) * item
        head = _len_field(1, nbytes) if nbytes else b""
        self.data, buf = _new_bytes(len(head) + nbytes + len(tail))
        buf[: len(head)] = np.frombuffer(head, np.uint8)
        buf[len(head) + nbytes :] = np.frombuffer(tail, np.uint8)
        wire = {pb.DTYPE_FLOAT16: _LE_F2, pb.DTYPE_BFLOAT16: _LE_U2}.get(dtype, _LE_F4)
        self.rows: list[np.ndarray] = []
        at = len(head)
        for n, dim in shapes:
            size = n * dim * item
            self.rows.append(buf[at : at + size].view(wire).reshape(n, dim))
            at += size

    def fill(self, group: int, values: np.ndarray) -> None:
        """Write float32 (n, dim) rows of pull group ``group``, converted to the wire dtype."""
        rows = self.rows[group]
        if rows.dtype == _LE_U2:
            rows[...] = _to_bf16(values)
        elif rows.dtype == _LE_F2:
            _to_half(values, rows)
        else:
            np.copyto(rows, values, casting="same_kind")


_PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.restype = ctypes.py_object
_PyBytes_FromStringAndSize.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_BYTES_HEADER = bytes.__basicsize__ - 1  # CPython: a bytes' data follow its header (ob_sval)


def _new_bytes(size: int) -> tuple[bytes, np.ndarray]:
    """A new, unfilled ``bytes`` of ``size`` and a writable uint8 (size,) view of its data.

    The C API's way to build a bytes object in place (``PyBytes_FromStringAndSize(NULL,
    size)``, then write its buffer before anyone else sees it). The view does not keep
    the bytes alive: hold on to both.
    """
    data = _PyBytes_FromStringAndSize(None, size)
    if size == 0:
        return data, np.empty(0, np.uint8)
    raw = (ctypes.c_ubyte * size).from_address(id(data) + _BYTES_HEADER)
    return data, np.ctypeslib.as_array(raw)


def _scan(data: bytes | memoryview, message: str) -> dict[tuple[int, int], memoryview | int]:
    """Every field of a protobuf message: {(field number, wire type): last value}.

    Length-delimited values are views into ``data``; varints are uint64. A known
    field seen with another wire type stays apart (upb keeps it as an unknown
    field), and the last occurrence of a field wins, as protobuf parses.
    CodecError for a truncated or malformed message.
    """
    buf = memoryview(data).cast("B")
    fields: dict[tuple[int, int], memoryview | int] = {}
    i, end = 0, len(buf)
    while i < end:
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise CodecError(f"malformed {message}: field number 0")
        if wire == _WIRE_LEN:
            size, i = _read_varint(buf, i)
            if i + size > end:
                raise CodecError(f"malformed {message}: field {field} runs past the end")
            fields[field, wire] = buf[i : i + size]
            i += size
        elif wire == _WIRE_VARINT:
            fields[field, wire], i = _read_varint(buf, i)
        elif wire in (_WIRE_I64, _WIRE_I32):
            i += 8 if wire == _WIRE_I64 else 4
        else:
            raise CodecError(f"malformed {message}: wire type {wire} of field {field}")
    if i != end:
        raise CodecError(f"malformed {message}: truncated")
    return fields


def _string(value: memoryview | int, message: str, name: str) -> str:
    """A string field's text; CodecError if it is not UTF-8 (protobuf refuses it too)."""
    assert isinstance(value, memoryview)
    try:
        return str(value, "utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"malformed {message}: field {name!r} is not valid UTF-8") from None


_EMPTY = memoryview(b"")


def decode_pull_response(data: bytes) -> tuple[memoryview, int, pb.DType]:
    """``PullResponse`` bytes -> (values, dim, dtype); values is a view into ``data``.

    Follows protobuf's parsing rules: unknown fields (and known ones of another
    wire type, as upb does) are skipped, the last occurrence of a field wins.
    CodecError for a truncated or malformed message.
    """
    f = _scan(data, "PullResponse")
    values = f.get((1, _WIRE_LEN), _EMPTY)
    assert isinstance(values, memoryview)
    dim = int(f.get((2, _WIRE_VARINT), 0)) & 0xFFFFFFFF
    return values, dim, cast(pb.DType, _as_int32(int(f.get((3, _WIRE_VARINT), 0))))


@dataclass(slots=True)
class PushRequestView:
    """A ``PushRequest`` read in place (``decode_push_request``): its fields under the
    proto names; ``keys`` and ``grads`` are views into the request's bytes (no copy);
    ``step`` is None when the request has none (an absent optional field)."""

    table: str = ""
    keys: memoryview = _EMPTY
    grads: memoryview = _EMPTY
    dtype: pb.DType = pb.DTYPE_UNSPECIFIED
    step: int | None = None
    num_shards: int = 0
    client_id: str = ""
    sequence: int = 0


def decode_push_request(data: bytes) -> PushRequestView:
    """``PushRequest`` bytes -> ``PushRequestView``, keys and grads read in place.

    The same fields, with the same values, as ``pb.PushRequest.FromString`` gives
    (int64 ``step`` signed, uint32 ``num_shards`` and int32 ``dtype`` truncated as
    protobuf truncates); CodecError where protobuf would fail to parse.
    """
    f = _scan(data, "PushRequest")
    m = "PushRequest"
    out = PushRequestView()
    if (1, _WIRE_LEN) in f:
        out.table = _string(f[1, _WIRE_LEN], m, "table")
    keys, grads = f.get((2, _WIRE_LEN), _EMPTY), f.get((3, _WIRE_LEN), _EMPTY)
    assert isinstance(keys, memoryview) and isinstance(grads, memoryview)
    out.keys, out.grads = keys, grads
    out.dtype = cast(pb.DType, _as_int32(int(f.get((4, _WIRE_VARINT), 0))))
    if (5, _WIRE_VARINT) in f:
        step = int(f[5, _WIRE_VARINT])
        out.step = step - (1 << 64) if step >= 1 << 63 else step
    out.num_shards = int(f.get((6, _WIRE_VARINT), 0)) & 0xFFFFFFFF
    if (7, _WIRE_LEN) in f:
        out.client_id = _string(f[7, _WIRE_LEN], m, "client_id")
    out.sequence = int(f.get((8, _WIRE_VARINT), 0))
    return out
