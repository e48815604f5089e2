"""Experiment (not part of embps): does a server-streamed pull beat a unary one?

Idea tested: answer a 16384-row pull as a stream of 2, 4 or 8 chunks, each
gathered from the table on a helper thread while the previous chunk is being
sent, so that the shard's table work (and the client's copy of each chunk
into the result) overlaps the transport. Baselines in the same run: the echo
(a prebuilt answer of the same size) as a unary call and as a stream of the
same chunks.

Contenders (all in one server process, one call at a time, 8 rounds of 100
calls, interleaved; ms per call, best and median of the rounds):
  echoUview  unary echo, the answer read as a view (what `embps bench service`'s echo does)
  echoU      unary echo, the answer copied into a new array (what PSClient.pull returns)
  echoS<k>   the echo as a stream of k chunks, copied into one array
  pullU      unary pull: a real dynamic table, rows gathered into the answer bytes
  pullS<k>   the same pull as a stream of k chunks, the next chunk gathered while one is sent

Run from the repository root: .venv/bin/python docs/experiments/stream_pull.py
(results: docs/benchmarks.md, "Service", session 4).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import numpy as np

OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]
DIM, ROWS = 64, 16384
TOTAL = ROWS * DIM * 4
ROUNDS, CALLS = 8, 100


def serve() -> None:
    """The server process: a filled dynamic table behind four generic handlers."""
    from embps.client.bench import service as bs
    from embps.protos import codec
    from embps.protos.config import TableConfig
    from embps.server.engine import Engine
    from embps.v1 import embps_pb2 as pb

    engine = Engine()
    engine.create_table(TableConfig(name="t", dim=DIM))  # dynamic, the default kind
    table = engine.table("t")
    for b in bs.make_batches(8, ROWS, 1):
        table.pull(b, train=True)
    helper = futures.ThreadPoolExecutor(1)
    replies: dict[int, bytes] = {}

    def pull_unary(req: bytes, ctx: object) -> bytes:
        keys = np.frombuffer(req[4:], np.int64)
        answer = codec.PullResponseBuffer(keys.shape[0], DIM, pb.DTYPE_FLOAT32)
        table.pull(keys, train=False, out=answer.rows)
        return answer.data

    def pull_stream(req: bytes, ctx: object) -> Iterator[bytes]:
        chunks, keys = int(req[:4]), np.frombuffer(req[4:], np.int64)
        n = keys.shape[0]
        step = -(-n // chunks)
        bufs = [
            codec.PullResponseBuffer(min(n, a + step) - a, DIM, pb.DTYPE_FLOAT32)
            for a in range(0, n, step)
        ]

        def fill(i: int) -> None:
            table.pull(keys[i * step : (i + 1) * step], train=False, out=bufs[i].rows)

        fill(0)
        for i in range(len(bufs)):
            nxt = helper.submit(fill, i + 1) if i + 1 < len(bufs) else None
            yield bufs[i].data  # blocks until sent; the helper gathers the next chunk meanwhile
            if nxt is not None:
                nxt.result()

    def echo_unary(req: bytes, ctx: object) -> bytes:
        return replies.setdefault(TOTAL, bytes(TOTAL))

    def echo_stream(req: bytes, ctx: object) -> Iterator[bytes]:
        chunks = int(req[:4])
        reply = replies.setdefault(TOTAL // chunks, bytes(TOTAL // chunks))
        for _ in range(chunks):
            yield reply

    handlers = {
        "/x/PullU": grpc.unary_unary_rpc_method_handler(pull_unary),
        "/x/PullS": grpc.unary_stream_rpc_method_handler(pull_stream),
        "/x/EchoU": grpc.unary_unary_rpc_method_handler(echo_unary),
        "/x/EchoS": grpc.unary_stream_rpc_method_handler(echo_stream),
    }

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return handlers.get(details.method)

    server = grpc.server(futures.ThreadPoolExecutor(8), handlers=[Handler()], options=OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def main() -> None:
    from embps.client.bench import service as bs
    from embps.client.memory import tune_malloc
    from embps.protos import codec

    tune_malloc()
    batches = bs.make_batches(8, ROWS, 1)
    proc = subprocess.Popen([sys.executable, __file__, "serve"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        channel = grpc.insecure_channel(f"127.0.0.1:{int(proc.stdout.readline())}", options=OPTIONS)

        def values(m: bytes) -> bytes | memoryview:  # a PullResponse's rows; an echo is all rows
            return m if len(m) % (DIM * 4) == 0 else codec.decode_pull_response(m)[0]

        def unary(method: str, copy: bool) -> Callable[[int], np.ndarray]:
            call = channel.unary_unary(method)

            def run(i: int) -> np.ndarray:
                rows = np.frombuffer(values(call(b"0000" + batches[i % 8].tobytes())), np.float32)
                return np.array(rows) if copy else rows

            return run

        def stream(method: str, chunks: int) -> Callable[[int], np.ndarray]:
            call = channel.unary_stream(method)

            def run(i: int) -> np.ndarray:
                out = np.empty((ROWS, DIM), np.float32)
                flat, at = out.reshape(-1).view(np.uint8), 0
                for m in call(b"%04d" % chunks + batches[i % 8].tobytes()):
                    part = np.frombuffer(values(m), np.uint8)
                    flat[at : at + part.shape[0]] = part
                    at += part.shape[0]
                return out

            return run

        contenders = {
            "echoUview": unary("/x/EchoU", False),
            "echoU": unary("/x/EchoU", True),
            "echoS4": stream("/x/EchoS", 4),
            "echoS8": stream("/x/EchoS", 8),
            "pullU": unary("/x/PullU", True),
            **{f"pullS{k}": stream("/x/PullS", k) for k in (2, 4, 8)},
        }
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(ROUNDS):
            for name, run in contenders.items():
                for i in range(5):
                    run(i)
                t0 = time.perf_counter()
                for i in range(CALLS):
                    run(i)
                times[name].append((time.perf_counter() - t0) / CALLS * 1e3)
        for name, ts in times.items():
            ts.sort()
            print(f"{name:10s} best {ts[0]:.3f} ms  median {ts[len(ts) // 2]:.3f} ms")
    finally:
        proc.kill()


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["serve"] else main()
