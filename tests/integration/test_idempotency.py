"""Push idempotency: (client_id, sequence) lets a shard drop a replayed push.

Real in-process shards (``build_server`` on port 0), raw stubs for exact
requests, and a real TCP proxy that loses the first push's answer after the
shard applied it, so that PSClient's retry with the same sequence is exercised.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from embps.client import PSClient, PushOutcomeUnknownError
from embps.protos import codec, limits
from embps.protos.config import TableConfig
from embps.server import service
from embps.server.replay import DEFAULT_WINDOW, ReplayGuard
from embps.server.service import ShardConfig, build_server
from embps.v1 import embps_pb2 as pb
from embps.v1 import embps_pb2_grpc as pb_grpc

DIM = 8
LR = 0.5
Code = grpc.StatusCode


@pytest.fixture
def shard() -> Iterator[service.ShardServer]:
    cfg = ShardConfig(
        port=0, tables=(TableConfig.from_dict({"name": "t", "dim": DIM,
                                               "optimizer": {"name": "sgd", "lr": LR}}),)
    )  # fmt: skip
    s = build_server(cfg)
    s.start()
    yield s
    s.stop(grace=0)


@pytest.fixture
def stub(shard: service.ShardServer) -> Iterator[pb_grpc.ParameterServerStub]:
    with grpc.insecure_channel(shard.address) as ch:
        yield pb_grpc.ParameterServerStub(ch)


def keys_of(n: int = 6, base: int = 100) -> np.ndarray:
    return np.arange(base, base + n, dtype=np.int64)


def rows(stub: pb_grpc.ParameterServerStub, keys: np.ndarray) -> np.ndarray:
    req = pb.PullRequest(table="t", keys=codec.encode_keys(keys), train=True, num_shards=1)
    r = stub.Pull(req, timeout=10)
    return codec.decode_values(r.values, r.dtype, keys.shape[0], r.dim).copy()


def push_req(keys: np.ndarray, grad: float = 1.0, **kw: object) -> pb.PushRequest:
    g = np.full((keys.shape[0], DIM), grad, dtype=np.float32)
    return pb.PushRequest(table="t", keys=codec.encode_keys(keys), grads=g.tobytes(),
                          num_shards=1, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_a_replayed_push_is_dropped_and_changes_nothing(stub) -> None:
    k = keys_of()
    before = rows(stub, k)
    req = push_req(k, client_id="c1", sequence=7)
    first = stub.Push(req, timeout=10)
    assert (first.applied, first.replayed) == (6, False)
    after = rows(stub, k)
    np.testing.assert_allclose(after, before - LR, atol=1e-6)
    again = stub.Push(req, timeout=10)
    assert (again.applied, again.dropped, again.replayed) == (0, 0, True)
    np.testing.assert_array_equal(rows(stub, k), after)
    # the same sequence from another client id is another push
    other = stub.Push(push_req(k, client_id="c2", sequence=7), timeout=10)
    assert (other.applied, other.replayed) == (6, False)


def test_out_of_order_sequences_within_the_window_both_apply(stub) -> None:
    k = keys_of()
    before = rows(stub, k)
    for seq in (10, 8, 9):  # several pushes in flight arrive out of order
        r = stub.Push(push_req(k, client_id="c", sequence=seq), timeout=10)
        assert not r.replayed and r.applied == 6, seq
    np.testing.assert_allclose(rows(stub, k), before - 3 * LR, atol=1e-6)
    assert stub.Push(push_req(k, client_id="c", sequence=8), timeout=10).replayed
    assert stub.Push(push_req(k, client_id="c", sequence=10), timeout=10).replayed
    np.testing.assert_allclose(rows(stub, k), before - 3 * LR, atol=1e-6)


def test_a_sequence_older_than_the_window_is_refused(stub) -> None:
    k = keys_of()
    top = 5 * DEFAULT_WINDOW
    assert not stub.Push(push_req(k, client_id="c", sequence=top), timeout=10).replayed
    before = rows(stub, k)
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(push_req(k, client_id="c", sequence=top - DEFAULT_WINDOW), timeout=10)
    assert info.value.code() == Code.FAILED_PRECONDITION
    assert "older than this shard's replay window" in info.value.details()
    assert dict(info.value.trailing_metadata())[limits.OUTCOME_KEY] == limits.OUTCOME_REJECTED
    np.testing.assert_array_equal(rows(stub, k), before)
    # the oldest sequence still in the window applies
    assert not stub.Push(push_req(k, client_id="c", sequence=top - DEFAULT_WINDOW + 1)).replayed


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"client_id": "c", "sequence": 0}, "sequence 0"),
        ({"sequence": 3}, "no client_id"),
        ({"client_id": "x" * 129, "sequence": 1}, "shorter id"),
    ],
)
def test_bad_idempotency_fields_are_invalid_argument(stub, kw, match) -> None:
    k = keys_of()
    before = rows(stub, k)
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(push_req(k, **kw), timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT and match in info.value.details()
    np.testing.assert_array_equal(rows(stub, k), before)


def test_a_failed_push_leaves_its_sequence_free(stub) -> None:
    k = keys_of()
    bad = push_req(k, client_id="c", sequence=4, grad=float("nan"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(bad, timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert not stub.Push(push_req(k, client_id="c", sequence=4), timeout=10).replayed


def test_concurrent_duplicates_apply_once(stub) -> None:
    k = keys_of(2000)
    before = rows(stub, k)
    req = push_req(k, client_id="c", sequence=1)
    start = threading.Barrier(8)
    answers: list[pb.PushResponse] = []

    def send() -> None:
        start.wait(timeout=10)
        answers.append(stub.Push(req, timeout=20))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(answers) == 8
    assert sorted(a.replayed for a in answers) == [False] + [True] * 7
    np.testing.assert_allclose(rows(stub, k), before - LR, atol=1e-6)


def test_a_push_without_client_id_is_not_deduplicated(stub) -> None:
    k = keys_of()
    before = rows(stub, k)
    req = push_req(k)
    for _ in range(2):
        r = stub.Push(req, timeout=10)
        assert (r.applied, r.replayed) == (6, False)
    np.testing.assert_allclose(rows(stub, k), before - 2 * LR, atol=1e-6)


def test_guard_forgets_the_least_recently_used_client() -> None:
    g = ReplayGuard(window=4, max_clients=2)
    assert g.apply_once("a", 1, lambda: "x") == "x"
    assert g.apply_once("b", 1, lambda: "x") == "x"
    assert g.apply_once("a", 1, lambda: "x") is None  # a is now the most recent
    assert g.apply_once("c", 1, lambda: "x") == "x"  # forgets b
    assert len(g) == 2
    assert g.apply_once("b", 1, lambda: "x") == "x"  # b starts afresh: applied again
    assert g.apply_once("c", 10**18, lambda: "y") == "y"  # a far jump (a clock-based start)
    assert g.apply_once("c", 10**18 - 3, lambda: "z") == "z"
    assert g.apply_once("c", 10**18 - 3, lambda: "z") is None


def test_guard_state_survives_export_and_load() -> None:
    """What a checkpoint saves: ids (any UTF-8), highest sequences, window bits, LRU order."""
    g = ReplayGuard(window=70, max_clients=3)
    for cid, seq in [("a", 5), ("b", 2**63 + 7), ("é-trainer", 100), ("é-trainer", 40), ("a", 6)]:
        assert g.apply_once(cid, seq, lambda: 1) == 1
    arrays = g.export()
    assert arrays["replay.bits"].shape == (3, 9) and arrays["replay.top"].dtype == np.uint64
    h = ReplayGuard(window=70, max_clients=3)
    h.load(arrays)
    assert h.apply_once("d", 1, lambda: 3) == 3  # forgets b, the least recently used in g
    for cid, seq in [("a", 5), ("a", 6), ("é-trainer", 100), ("é-trainer", 40)]:
        assert h.apply_once(cid, seq, lambda: 1) is None, (cid, seq)
    assert h.apply_once("é-trainer", 41, lambda: 2) == 2  # a gap in the window: not applied yet
    assert h.apply_once("b", 2**63 + 7, lambda: 4) == 4  # b was forgotten: applied afresh
    empty = ReplayGuard().export()
    assert all(a.shape[0] == 0 for a in empty.values())
    ReplayGuard().load(empty)
    bad = dict(arrays, **{"replay.top": arrays["replay.top"][:2]})
    with pytest.raises(ValueError, match="do not fit"):
        ReplayGuard().load(bad)


# --------------------------------------------------------------------------
# PSClient: sequences and the retry of a push whose answer was lost
# --------------------------------------------------------------------------


class AnswerLosingProxy:
    """TCP proxy 127.0.0.1:port -> target. On the first connection that carries more
    than ``big`` bytes to the server (a push), it passes the request on, holds back
    everything the server sends from then on, waits ``hold`` seconds (the shard
    applies and answers), then cuts both sockets: the client never sees the answer.
    Later connections pass through."""

    def __init__(self, target: str, big: int = 8192, hold: float = 0.5) -> None:
        self.target = target
        self.big, self.hold = big, hold
        self.tripped = threading.Event()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            host, port = self.target.rsplit(":", 1)
            server = socket.create_connection((host, int(port)), timeout=10)
            state = {"up": 0, "cut": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
                state["up"] += len(data)
                if not self.tripped.is_set() and state["up"] > self.big:
                    self.tripped.set()
                    state["cut"] = True
                    time.sleep(self.hold)
                    for s in (src, dst):
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                    return

    def _down(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not state["cut"]:
                    dst.sendall(data)


def test_client_retries_a_lost_answer_with_the_same_sequence(shard) -> None:
    k = keys_of(400)
    with PSClient([shard.address]) as direct:
        before = direct.pull("t", k)
    proxy = AnswerLosingProxy(shard.address)
    try:
        with PSClient([f"127.0.0.1:{proxy.port}"], client_id="trainer-0", timeout=5,
                      retry_deadline=20) as ps:  # fmt: skip
            g = np.ones((k.shape[0], DIM), dtype=np.float32)
            res = ps.push("t", k, g)
        assert proxy.tripped.is_set() and proxy.connections >= 2  # the answer was lost
        # the shard applied the first copy; the retry (same sequence) was dropped
        assert (res.applied, res.replayed, res.replayed_shards) == (0, 400, (0,))
        with PSClient([shard.address]) as direct:
            np.testing.assert_allclose(direct.pull("t", k), before - LR, atol=1e-6)
    finally:
        proxy.close()


def test_without_client_id_a_lost_answer_stays_unknown(shard) -> None:
    k = keys_of(400)
    proxy = AnswerLosingProxy(shard.address)
    try:
        ps = PSClient([f"127.0.0.1:{proxy.port}"], timeout=5)
        with ps, pytest.raises(PushOutcomeUnknownError) as info:
            ps.push("t", k, np.ones((k.shape[0], DIM), dtype=np.float32))
        assert info.value.unknown_shards == [0]
    finally:
        proxy.close()


def test_client_sequences_increase_and_retries_apply_once(shard) -> None:
    k = keys_of(50)
    with PSClient([shard.address], idempotent_push=True) as ps:
        assert ps._pushes.client_id and len(ps._pushes.client_id) == 32  # a uuid4
        before = ps.pull("t", k)
        a, b = ps._pushes.take(1), ps._pushes.take(2)
        assert b == a + 1
        for _ in range(3):
            r = ps.push("t", k, np.ones((50, DIM), dtype=np.float32))
            assert (r.applied, r.replayed, r.replayed_shards) == (50, 0, ())
        np.testing.assert_allclose(ps.pull("t", k), before - 3 * LR, atol=1e-6)
    with PSClient([shard.address]) as plain:
        assert plain._pushes.client_id == "" and plain._pushes.take(1) == 0


def test_a_malformed_push_request_is_invalid_argument(shard) -> None:
    """Push reads its request by hand (codec.decode_push_request): bytes protobuf cannot
    parse are refused as INVALID_ARGUMENT with the rejected trailer, not INTERNAL."""
    with grpc.insecure_channel(shard.address) as ch:
        raw = ch.unary_unary(f"/{limits.SERVICE_NAME}/Push")
        for data in (b"\x0a\x02\xff\xfe", b"\x12\x09abc"):  # table not UTF-8; keys cut off
            with pytest.raises(grpc.RpcError) as info:
                raw(data, timeout=10)
            assert info.value.code() == Code.INVALID_ARGUMENT, info.value.details()
            assert "malformed" in info.value.details()
            md = dict(info.value.trailing_metadata())
            assert md[limits.OUTCOME_KEY] == limits.OUTCOME_REJECTED
