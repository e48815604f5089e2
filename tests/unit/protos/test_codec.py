"""The wire codec (embps.protos.codec) and key routing (embps.protos.routing)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from embps.protos import codec
from embps.protos.routing import first_misrouted, mix64, shard_of
from embps.v1 import embps_pb2 as pb

F32, F16, BF16 = pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --------------------------------------------------------------------------
# Keys and masks
# --------------------------------------------------------------------------


def test_keys_round_trip_edges() -> None:
    for keys in ([], [0], [-(2**63), 2**63 - 1, -1, 0, 1]):
        k = np.array(keys, dtype=np.int64)
        data = codec.encode_keys(k)
        assert len(data) == 8 * k.shape[0]
        np.testing.assert_array_equal(codec.decode_keys(data), k)


def test_keys_are_little_endian_int64() -> None:
    assert codec.encode_keys(np.array([1, -2])) == (1).to_bytes(8, "little") + (-2).to_bytes(
        8, "little", signed=True
    )
    big_endian = np.array([5], dtype=">i8")
    np.testing.assert_array_equal(codec.decode_keys(codec.encode_keys(big_endian)), [5])


@pytest.mark.parametrize("n_bytes", [1, 7, 9, 15])
def test_keys_length_error(n_bytes: int) -> None:
    with pytest.raises(codec.CodecError, match="multiple of 8"):
        codec.decode_keys(b"\0" * n_bytes)


def test_mask_round_trip_and_errors() -> None:
    m = np.array([True, False, True])
    np.testing.assert_array_equal(codec.decode_mask(codec.encode_mask(m), 3), m)
    assert codec.decode_mask(b"", 3) is None
    with pytest.raises(codec.CodecError, match="one byte per key"):
        codec.decode_mask(b"\x01\x00", 3)
    with pytest.raises(codec.CodecError, match="0 or 1"):
        codec.decode_mask(b"\x01\x02\x00", 3)


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


def _round(x: np.ndarray, dtype: int) -> np.ndarray:
    return codec.decode_values(codec.wire_values(x, dtype).tobytes(), dtype, x.shape[0], x.shape[1])


def test_float32_is_exact(rng: np.random.Generator) -> None:
    x = rng.normal(size=(33, 7)).astype(np.float32) * np.float32(1e3)
    x[0, :3] = [np.inf, -np.inf, 0.0]
    got = _round(x, F32)
    assert got.dtype == np.float32 and got.shape == (33, 7)
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(_round(x, pb.DTYPE_UNSPECIFIED), x)  # unspecified = float32


def test_float16_within_precision(rng: np.random.Generator) -> None:
    x = rng.normal(size=(50, 8)).astype(np.float32)
    got = _round(x, F16)
    np.testing.assert_allclose(got, x, rtol=2.0**-11, atol=2.0**-24)
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))  # nearest-even


def test_bfloat16_within_precision(rng: np.random.Generator) -> None:
    x = rng.normal(size=(50, 8)).astype(np.float32) * np.float32(1e6)
    got = _round(x, BF16)
    np.testing.assert_allclose(got, x, rtol=2.0**-8)
    assert len(codec.wire_values(x, BF16).tobytes()) == x.size * 2
    # exactly representable values survive; low mantissa bits are rounded, not truncated
    exact = np.array([[1.0, -2.5, 0.0, 3.0e38]], dtype=np.float32)
    np.testing.assert_array_equal(_round(exact, BF16)[0, :3], exact[0, :3])
    up = np.array([[np.float32(1.0) + np.float32(2.0**-8) + np.float32(2.0**-20)]], np.float32)
    assert _round(up, BF16)[0, 0] == np.float32(1.0 + 2.0**-7)


def test_bfloat16_keeps_nan_and_inf() -> None:
    x = np.array([[np.nan, np.inf, -np.inf]], dtype=np.float32)
    got = _round(x, BF16)
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and got[0, 2] == -np.inf


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_values_length_errors(dtype: int) -> None:
    data = codec.wire_values(np.ones((3, 4), dtype=np.float32), dtype).tobytes()
    assert codec.decode_values(data, dtype, 3, 4).shape == (3, 4)
    for n, dim in ((2, 4), (4, 4), (3, 3), (3, 5)):
        with pytest.raises(codec.CodecError, match="expected"):
            codec.decode_values(data, dtype, n, dim)
    with pytest.raises(codec.CodecError, match="expected"):
        codec.decode_values(data[:-1], dtype, 3, 4)
    assert codec.decode_values(b"", dtype, 0, 4).shape == (0, 4)


def test_unknown_dtypes() -> None:
    with pytest.raises(codec.CodecError, match="unknown dtype"):
        codec.decode_values(b"", 9, 0, 4)
    with pytest.raises(codec.CodecError, match="unknown dtype"):
        codec.wire_values(np.ones((1, 1), np.float32), 9)
    with pytest.raises(ValueError, match="unknown dtype"):
        codec.dtype_from_name("float64")
    assert codec.dtype_from_name("bfloat16") == BF16


def test_float16_decode_matches_numpy_for_every_bit_pattern() -> None:
    every = np.arange(1 << 16, dtype=np.uint16)  # zeros, subnormals, inf, every NaN payload
    got = codec.decode_values(every.tobytes(), F16, 1024, 64)
    want = every.view(np.float16).astype(np.float32).reshape(1024, 64)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert got.flags.writeable


# --------------------------------------------------------------------------
# PullResponse / PushRequest written and read by hand (client hot path)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("step", [None, 0, 1, 2**40, 2**63 - 1])
def test_push_request_bytes_equal_protobuf(rng: np.random.Generator, dtype: int, step) -> None:
    keys = np.array([-(2**63), -1, 0, 5, 2**63 - 1], dtype=np.int64)
    grads = rng.normal(size=(5, 3)).astype(np.float32)
    got = codec.encode_push_request("tbl é", keys, codec.wire_values(grads, dtype), dtype, 3, step)
    want = pb.PushRequest(table="tbl é", keys=codec.encode_keys(keys),
                          grads=codec.wire_values(grads, dtype).tobytes(), dtype=dtype, step=step,
                          num_shards=3)  # fmt: skip
    assert got == want.SerializeToString()
    parsed = pb.PushRequest.FromString(got)
    assert parsed == want and parsed.HasField("step") == (step is not None)


def test_push_request_defaults_and_empty_arrays() -> None:
    empty = np.empty((0, 4), dtype=np.float32)
    got = codec.encode_push_request("", np.empty(0, np.int64), empty, 0, 0, None)
    assert got == b"" == pb.PushRequest().SerializeToString()
    big_endian = np.array([7, -7], dtype=">i8")  # keys are always sent little-endian
    got = codec.encode_push_request("t", big_endian, np.ones((2, 1), np.float32), F32, 1, 0)
    np.testing.assert_array_equal(codec.decode_keys(pb.PushRequest.FromString(got).keys), [7, -7])


@pytest.mark.parametrize("client_id", ["", "trainer-0", "é"])
@pytest.mark.parametrize("sequence", [0, 1, 2**40, 2**64 - 1])
def test_push_request_idempotency_fields_equal_protobuf(client_id: str, sequence: int) -> None:
    keys, grads = np.array([3, 4], dtype=np.int64), np.ones((2, 2), np.float32)
    got = codec.encode_push_request("t", keys, grads, F32, 1, 9, client_id, sequence)
    want = pb.PushRequest(table="t", keys=codec.encode_keys(keys),
                          grads=codec.wire_values(grads).tobytes(), dtype=F32, step=9, num_shards=1,
                          client_id=client_id, sequence=sequence)  # fmt: skip
    assert got == want.SerializeToString()


def _same_push(view: codec.PushRequestView, msg: pb.PushRequest) -> None:
    assert (view.table, bytes(view.keys), bytes(view.grads), view.dtype, view.num_shards,
            view.client_id, view.sequence) == (msg.table, msg.keys, msg.grads, msg.dtype,
                                               msg.num_shards, msg.client_id, msg.sequence)  # fmt: skip
    assert view.step == (msg.step if msg.HasField("step") else None)


@pytest.mark.parametrize("step", [None, 0, -1, 2**63 - 1, -(2**63)])
def test_push_request_is_read_in_place_as_protobuf_reads_it(rng: np.random.Generator, step) -> None:
    grads = rng.normal(size=(4, 3)).astype(np.float32)
    msg = pb.PushRequest(table="tbl é", keys=codec.encode_keys(np.arange(4)),
                         grads=codec.wire_values(grads).tobytes(), dtype=F16, step=step,
                         num_shards=7, client_id="c", sequence=2**64 - 1)  # fmt: skip
    data = msg.SerializeToString()
    view = codec.decode_push_request(data)
    _same_push(view, msg)
    assert view.grads.obj is data  # a view: the gradients are not copied
    # defaults, unknown fields, repeated fields (last wins), truncation of 32-bit fields
    for extra in (b"", b"\x48\x01", b"\x30\x05", b"\x20" + b"\xff" * 9 + b"\x01",
                  b"\x30" + b"\xff" * 9 + b"\x01", b"\x0a\x01z", b"\x12\x00"):  # fmt: skip
        _same_push(codec.decode_push_request(data + extra), pb.PushRequest.FromString(data + extra))
    _same_push(codec.decode_push_request(b""), pb.PushRequest())


@pytest.mark.parametrize(
    "data", [b"\x0a\x02\xff\xfe", b"\x3a\x01\x80", b"\x12\x09abc", b"\x28", b"\x0b"]
)
def test_malformed_push_requests_are_codec_errors(data: bytes) -> None:
    with pytest.raises(codec.CodecError, match="malformed"):
        codec.decode_push_request(data)
    with pytest.raises(Exception):  # noqa: B017 - protobuf refuses them too (DecodeError)
        pb.PushRequest.FromString(data)


@pytest.mark.parametrize("dtype", [0, F32, F16, BF16])
@pytest.mark.parametrize(("n", "dim"), [(0, 5), (1, 5), (300, 5), (3, 0), (40, 64)])
def test_pull_response_bytes_equal_protobuf(
    rng: np.random.Generator, dtype: int, n: int, dim: int
) -> None:
    values = rng.normal(size=(n, dim)).astype(np.float32)
    answer = codec.PullResponseBuffer(n, dim, dtype)
    assert answer.rows.shape == (n, dim) and answer.rows.flags.writeable
    answer.fill(values)
    want = pb.PullResponse(values=codec.wire_values(values, dtype).tobytes(), dim=dim, dtype=dtype)
    assert type(answer.data) is bytes and answer.data == want.SerializeToString()


def test_pull_response_rows_are_written_in_place(rng: np.random.Generator) -> None:
    """What the shard does: gather float32 rows straight into the answer's bytes."""
    values = rng.normal(size=(7, 3)).astype(np.float32)
    answer = codec.PullResponseBuffer(7, 3, F32)
    refs = sys.getrefcount(answer.data)
    assert refs == 2  # no reference leaked: the answer's and this call's
    assert answer.rows.dtype == np.float32
    np.take(values, np.arange(7), 0, out=answer.rows)
    payload, dim, dtype = codec.decode_pull_response(answer.data)
    assert (dim, dtype) == (3, F32)
    np.testing.assert_array_equal(codec.decode_values(payload, F32, 7, 3), values)
    with pytest.raises(codec.CodecError, match="unknown dtype"):
        codec.PullResponseBuffer(1, 1, 9)


@pytest.mark.parametrize("dtype", [0, F32, F16, BF16])
def test_pull_response_is_read_in_place(rng: np.random.Generator, dtype: int) -> None:
    values = rng.normal(size=(6, 5)).astype(np.float32)
    data = pb.PullResponse(values=codec.wire_values(values, dtype).tobytes(), dim=5,
                           dtype=dtype).SerializeToString()  # fmt: skip
    payload, dim, got_dtype = codec.decode_pull_response(data)
    assert (dim, got_dtype) == (5, dtype)
    assert bytes(payload) == codec.wire_values(values, dtype).tobytes()
    assert payload.obj is data  # a view: the rows are not copied
    np.testing.assert_array_equal(
        codec.decode_values(payload, dtype, 6, 5), _round(values, dtype or F32)
    )


def test_pull_response_follows_protobuf_parsing_rules() -> None:
    assert codec.decode_pull_response(b"") == (memoryview(b""), 0, 0)
    msg = pb.PullResponse(values=b"abcd", dim=1, dtype=F32).SerializeToString()
    unknown = b"\x20\x07" + b"\x2a\x02xy" + b"\x31" + bytes(8) + b"\x3d" + bytes(4)  # fields 4-7
    payload, dim, dtype = codec.decode_pull_response(unknown + msg + b"\x10\x02")
    assert (bytes(payload), dim, dtype) == (b"abcd", 2, F32)  # unknown skipped, last dim wins
    assert pb.PullResponse.FromString(unknown + msg + b"\x10\x02").dim == 2
    wrong_types = b"\x08\x01" + b"\x12\x01a" + b"\x18\x02"  # values a varint, dim bytes
    payload, dim, dtype = codec.decode_pull_response(wrong_types)
    want = pb.PullResponse.FromString(wrong_types)  # upb skips them as unknown fields
    assert (bytes(payload), dim, dtype) == (want.values, want.dim, want.dtype) == (b"", 0, F16)


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05abc",  # values longer than the message
        b"\x10",  # varint cut off
        b"\x10" + b"\xff" * 11,  # varint over 10 bytes
        b"\x31\x00",  # fixed64 cut off
        b"\x0b",  # group wire types are not proto3
    ],
)
def test_malformed_pull_responses_are_codec_errors(data: bytes) -> None:
    with pytest.raises(codec.CodecError, match="malformed"):
        codec.decode_pull_response(data)
    with pytest.raises(Exception):  # noqa: B017 - protobuf refuses them too (DecodeError)
        pb.PullResponse.FromString(data)


# --------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [2, 3, 7, 16])
def test_routing_spreads_keys_evenly(num_shards: int) -> None:
    # sequential ids (the worst case for a weak hash) and random ids
    for keys in (np.arange(200_000, dtype=np.int64),
                 np.random.default_rng(7).integers(-(2**63), 2**63 - 1, 200_000)):  # fmt: skip
        owner = shard_of(keys, num_shards)
        assert owner.min() >= 0 and owner.max() < num_shards
        counts = np.bincount(owner, minlength=num_shards)
        expected = keys.shape[0] / num_shards
        assert np.abs(counts - expected).max() < 0.03 * expected, counts


def test_routing_is_deterministic_and_total() -> None:
    keys = np.array([-(2**63), -1, 0, 1, 2**63 - 1], dtype=np.int64)
    np.testing.assert_array_equal(shard_of(keys, 5), shard_of(keys.copy(), 5))
    np.testing.assert_array_equal(shard_of(keys, 1), np.zeros(5, dtype=np.int64))
    assert len(np.unique(mix64(np.arange(10_000, dtype=np.int64)))) == 10_000  # bijective
    with pytest.raises(ValueError):
        shard_of(keys, 0)


@pytest.mark.parametrize("num_shards", [2, 3, 5])
def test_server_routing_check_agrees_with_shard_of(num_shards: int) -> None:
    keys = np.concatenate([
        np.random.default_rng(num_shards).integers(-(2**63), 2**63 - 1, 20_000),
        [-(2**63), 2**63 - 1, -1, 0],
    ]).astype(np.int64)  # fmt: skip
    owner = shard_of(keys, num_shards)
    for s in range(num_shards):
        mine = keys[owner == s]
        assert first_misrouted(mine, num_shards, s) == -1
        first_other = int(np.flatnonzero(owner != s)[0])
        assert first_misrouted(keys, num_shards, s) == first_other
