"""``embps bench service``: pull and push through a real shard, beside a raw echo and Redis.

What runs (each server its own process, over loopback TCP; the client in this process):

  ours      ``PSClient.pull`` / ``PSClient.push`` against ``embps serve`` (real shard
            processes: a 1-shard and a 2-shard cluster). Table: dynamic, dim DIM,
            SGD, every key created by a training pull before anything is timed. Pulls
            read with ``train=False`` (also timed: ``train=True``, and keys already
            ascending, as ``np.unique`` returns them); pushes pass ``step``. Wire dtype
            float32, and float16 (half the bytes; pulls still return float32).
  echo      the transport limit of Python gRPC here: a separate process serving a
            generic handler, no protobuf, no table. Pull-shaped call: request = the
            keys' bytes (8 per row), response = as many bytes as the rows take in the
            wire dtype (a prebuilt buffer), decoded by ``codec.decode_values`` as
            PSClient decodes rows (float32: a view, no copy). Push-shaped call: request
            = keys + gradients in the wire dtype (one copy), response empty. The same
            channel options (message size limits) and server thread count as ours.
  Redis     ``redis-server`` (the Debian package) on loopback, ``--save ''
            --appendonly no``: one key per row (the key's 8 bytes), value = the row's
            DIM float32 as raw bytes, the bytes TFRA's Redis backend stores (it keeps
            them as fields of a hash per storage slice, with HMGET/HMSET). A pull is
            one MGET of the batch, decoded into float32 (rows, DIM); a push is one MSET
            of the rows. The client (``RespClient``) speaks RESP over a socket,
            vectorised with numpy: no per-key Python work, so Redis is not held back by
            its client.

Every batch holds BATCH distinct keys; a pool of ``--batches`` such batches is
cycled through, so consecutive calls touch different rows. One timed repetition
of a contender is ``--batches`` calls in a row; a measurement is the best of
``--reps`` repetitions (rows per second), after a warm-up call of each. Each
round runs every contender once, in turn, so a busy moment of the shared machine
hits them alike; garbage collection is paused while one runs.

Targets: pull >= 0.8x the echo (ours costs little beyond the transport), pull
and push >= 3x Redis. The 2-shard cluster is reported beside the 1-shard one
(no target: on a 2-core machine the client and both shards share the cores).

``python -m embps.client.bench.service`` runs the echo server (the benchmark
starts it; it prints one ready line and serves until killed).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import IO, Any

import grpc
import numpy as np

from embps.client.bench.report import (
    Target,
    best_interleaved,
    fmt_num,
    fmt_ratio,
    machine_line,
    table,
    target_cells,
    write_json,
)
from embps.client.memory import tune_malloc
from embps.client.ps_client import DEFAULT_MAX_MESSAGE_BYTES, PSClient
from embps.protos import codec
from embps.protos.config import TableKind
from embps.protos.routing import mix64
from embps.v1 import embps_pb2 as pb

DIM = 64
BATCH = 16_384  # distinct keys per call
FULL_BATCHES, QUICK_BATCHES = 16, 8  # batches in the pool = calls per timed repetition
FULL_REPS, QUICK_REPS = 15, 5
SERVER_WORKERS = 8  # RPC threads of every gRPC server (the shard's default)
TABLE = "bench"
SEED = 20240611
START_TIMEOUT_S = 90.0  # shard processes import numba and load its cache: slow on 2 cores
STOP_TIMEOUT_S = 15.0
ECHO_SERVICE = "/embps.bench.Echo/"
F32, F16 = pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16

_READY_SHARD = re.compile(r"^shard (\d+)/(\d+) listening on (\S+):(\d+), metrics on")
_READY_ECHO = re.compile(r"^echo listening on (\S+):(\d+)")


def grpc_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel and server options of every contender (PSClient's and the shard's)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


TARGETS: tuple[Target, ...] = (
    Target("pull_vs_echo", 0.8),
    Target("pull_vs_redis", 3.0),
    Target("push_vs_redis", 3.0),
)


# --------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------


def make_batches(batches: int, rows: int, seed: int) -> list[np.ndarray]:
    """``batches`` batches of ``rows`` keys, all distinct: a list of int64 (rows,).

    mix64 (splitmix64) of ``base + i`` is a bijection of i, so the keys are
    distinct without a sort; they spread over the whole int64 range.
    """
    base = int(np.random.default_rng(seed).integers(0, 2**62))
    keys = mix64(np.arange(base, base + batches * rows, dtype=np.int64)).view(np.int64)
    return [np.ascontiguousarray(keys[i * rows : (i + 1) * rows]) for i in range(batches)]


# --------------------------------------------------------------------------
# Processes: the shards, the echo server, redis-server
# --------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if the benchmark dies (no orphaned servers)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    """A server process this benchmark started, its stderr log and its stdout lines."""

    name: str
    proc: subprocess.Popen[str]
    log: IO[str]
    lines: queue.Queue[str]

    def log_text(self) -> str:
        """Everything the process wrote to stderr so far (its last 4000 characters)."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL (by this process's own pid)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.log.close()


def _spawn(name: str, argv: list[str]) -> Proc:
    """Start ``argv`` with stdout pumped into a queue and stderr into a temporary file."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by Proc.stop
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True, name=f"bench-{name}-stdout").start()
    return Proc(name, proc, log, lines)


def _await_lines(p: Proc, pattern: re.Pattern[str], count: int) -> list[re.Match[str]]:
    """The first ``count`` stdout lines of ``p`` matching ``pattern``; RuntimeError on timeout."""
    deadline = time.monotonic() + START_TIMEOUT_S
    found: list[re.Match[str]] = []
    while len(found) < count:
        try:
            line = p.lines.get(timeout=0.2)
        except queue.Empty:
            if p.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{p.name}: {len(found)} of {count} ready lines (exit code "
                    f"{p.proc.poll()}); its log:\n{p.log_text()}"
                ) from None
            continue
        m = pattern.match(line)
        if m:
            found.append(m)
    return found


def start_cluster(shards: int, stack: contextlib.ExitStack) -> list[str]:
    """``embps serve --shards N`` on loopback, any free ports; the shard addresses, in order."""
    argv = [sys.executable, "-m", "embps.server.serve", "--shards", str(shards),
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--max-workers", str(SERVER_WORKERS), "--log-level", "WARNING"]  # fmt: skip
    p = _spawn(f"embps serve --shards {shards}", argv)
    stack.callback(p.stop)
    ready = _await_lines(p, _READY_SHARD, shards)
    by_id = {int(m.group(1)): f"{m.group(3)}:{m.group(4)}" for m in ready}
    return [by_id[i] for i in range(shards)]


def start_echo(stack: contextlib.ExitStack) -> str:
    """The echo server (``python -m embps.client.bench.service``); its address."""
    p = _spawn("echo server", [sys.executable, "-m", "embps.client.bench.service"])
    stack.callback(p.stop)
    (m,) = _await_lines(p, _READY_ECHO, 1)
    return f"{m.group(1)}:{m.group(2)}"


def _free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(server: str, stack: contextlib.ExitStack) -> RespClient:
    """``redis-server`` on a free loopback port, persistence off; a connected client."""
    last = ""
    for _ in range(5):  # another process may take the port between the probe and the bind
        port = _free_port()
        argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]  # fmt: skip
        p = _spawn("redis-server", argv)
        deadline = time.monotonic() + START_TIMEOUT_S
        while p.proc.poll() is None and time.monotonic() < deadline:
            try:
                client = RespClient("127.0.0.1", port)
            except OSError:
                time.sleep(0.05)
                continue
            stack.callback(p.stop)
            stack.callback(client.close)
            if client.command(b"PING") != b"PONG":
                raise RuntimeError("redis-server did not answer PING with PONG")
            return client
        last = p.log_text() + "".join(iter_queue(p.lines))
        p.stop()
    raise RuntimeError(f"redis-server did not start; its output:\n{last}")


def iter_queue(q: queue.Queue[str]) -> Iterator[str]:
    """Lines already in ``q`` (without waiting), each with its newline."""
    while True:
        try:
            yield q.get_nowait() + "\n"
        except queue.Empty:
            return


# --------------------------------------------------------------------------
# The echo server (the transport limit) and its client
# --------------------------------------------------------------------------


class _EchoHandler(grpc.GenericRpcHandler):
    """Generic handler of ``/embps.bench.Echo/Pull<row bytes>`` and ``/embps.bench.Echo/Push``.

    Pull<b>: request = n keys (8n bytes), response = n*b bytes (a buffer built once per
    size). Push: request = anything (keys + gradients), response empty. No protobuf.
    """

    def __init__(self) -> None:
        self._replies: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if not method.startswith(ECHO_SERVICE):
            return None
        name = method[len(ECHO_SERVICE) :]
        if name == "Push":
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"")
        if name.startswith("Pull") and name[4:].isdigit():
            row_bytes = int(name[4:])
            return grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: self._reply(len(req) // 8 * row_bytes)
            )
        return None

    def _reply(self, size: int) -> bytes:
        with self._lock:
            reply = self._replies.get(size)
            if reply is None:
                reply = self._replies[size] = bytes(size)
        return reply


def echo_main() -> int:
    """Serve the echo on a free loopback port until killed; prints one ready line."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS),
        handlers=[_EchoHandler()],
        options=[*grpc_options(), ("grpc.so_reuseport", 0)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"echo listening on 127.0.0.1:{port} (pid {os.getpid()})", flush=True)
    server.wait_for_termination()
    return 0


class EchoClient:
    """Pull- and push-shaped calls to the echo server, bytes in and out (no protobuf)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=grpc_options())
        self._pulls: dict[int, grpc.UnaryUnaryMultiCallable] = {}
        self._push = self.channel.unary_unary(ECHO_SERVICE + "Push")

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def pull(self, keys: np.ndarray, dtype: pb.DType, dim: int) -> np.ndarray:
        """keys int64 (n,) -> float32 (n, dim), decoded from wire ``dtype`` as PSClient does
        (``codec.decode_values``: float32 is a read-only view of gRPC's buffer, no copy)."""
        row_bytes = dim * codec.ITEMSIZE[dtype]
        call = self._pulls.get(row_bytes)
        if call is None:
            call = self._pulls[row_bytes] = self.channel.unary_unary(
                f"{ECHO_SERVICE}Pull{row_bytes}"
            )
        data = call(keys.tobytes(), timeout=30.0)
        return codec.decode_values(data, dtype, keys.shape[0], dim)

    def push(self, keys: np.ndarray, grads: np.ndarray, dtype: pb.DType) -> None:
        """keys int64 (n,) and float32 grads (n, dim) in wire ``dtype``, copied once into one
        byte string (``codec.wire_values``, as PSClient encodes them)."""
        wire = codec.wire_values(grads, dtype)
        self._push(b"".join((keys.data.cast("B"), wire.data.cast("B"))), timeout=30.0)


# --------------------------------------------------------------------------
# A minimal RESP client: a batch of fixed-size binary rows per round trip, vectorised
# --------------------------------------------------------------------------


class RedisError(RuntimeError):
    """Redis answered with an error, or with a reply of an unexpected shape."""


class RespClient:
    """Redis over one TCP connection, speaking RESP2 directly.

    ``mget_rows`` / ``mset_rows`` move a batch of fixed-size rows with one
    command each (MGET k1..kn / MSET k1 v1 .. kn vn: the whole batch in one
    round trip), the request built and the reply parsed with numpy: the records
    of a batch all have the same length, so they form a 2-D byte array.
    """

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pending = b""

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    # ---------------------------------------------------------------- wire
    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket (the pending bytes first)."""
        got = min(len(self._pending), len(view))
        view[:got] = self._pending[:got]
        self._pending = self._pending[got:]
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                raise RedisError(
                    f"redis sent {got} of the {len(view)} bytes expected (a missing key?)"
                ) from None
            if n == 0:
                raise RedisError("redis closed the connection")
            got += n

    def _line(self) -> bytes:
        """One CRLF-terminated line, without the CRLF."""
        while b"\r\n" not in self._pending:
            data = self.sock.recv(65536)
            if not data:
                raise RedisError("redis closed the connection")
            self._pending += data
        line, _, self._pending = self._pending.partition(b"\r\n")
        return line

    def _expect(self, header: bytes) -> None:
        """Read one line; it must be ``header`` (RedisError with Redis's message if not)."""
        line = self._line()
        if line != header:
            raise RedisError(f"redis answered {line[:200]!r}, expected {header!r}")

    def command(self, *args: bytes) -> bytes | int | None:
        """Send one command; its reply (simple string, integer, bulk string or None)."""
        self.sock.sendall(_command(args))
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            buf = bytearray(size + 2)
            self._recv_into(memoryview(buf))
            return bytes(buf[:size])
        raise RedisError(f"redis answered {line[:200]!r}")

    # ---------------------------------------------------------------- rows
    def mset_rows(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """MSET key -> row for keys int64 (n,), rows (n, ...) stored as their raw bytes."""
        self.sock.sendall(_mset(keys, rows))
        self._expect(b"+OK")

    def mget_rows(self, keys: np.ndarray, dtype: np.dtype[Any], dim: int) -> np.ndarray:
        """MGET of keys int64 (n,) -> a new ``dtype`` (n, dim); every key must hold a row.

        The reply is n records of one length (``$<size>``, CRLF, the row, CRLF),
        received into one (n, record) byte array; every record's header is
        checked, then the rows are copied out in one go. A missing key makes the
        reply shorter: RedisError once the socket times out.
        """
        n = keys.shape[0]
        vb = dim * dtype.itemsize
        head = np.frombuffer(b"$%d\r\n" % vb, dtype=np.uint8)
        p = head.shape[0]
        self.sock.sendall(_mget(keys))
        self._expect(b"*%d" % n)
        buf = np.empty((n, p + vb + 2), dtype=np.uint8)
        self._recv_into(buf.data.cast("B"))
        if not (buf[:, :p] == head).all():
            raise RedisError(f"MGET: a reply is not a {vb}-byte value (a missing key?)")
        out = np.empty((n, dim), dtype=dtype)
        out.view(np.uint8).reshape(n, vb)[:] = buf[:, p : p + vb]
        return out


def _command(args: tuple[bytes, ...]) -> bytes:
    """A RESP array of bulk strings."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _mget(keys: np.ndarray) -> bytes:
    """``MGET k1 .. kn`` for keys int64 (n,), each key its 8 little-endian bytes."""
    n = keys.shape[0]
    rec = np.empty((n, 14), dtype=np.uint8)  # $8\r\n <8 key bytes> \r\n
    rec[:, :4] = np.frombuffer(b"$8\r\n", dtype=np.uint8)
    rec[:, 4:12] = keys.astype("<i8").view(np.uint8).reshape(n, 8)
    rec[:, 12:] = np.frombuffer(b"\r\n", dtype=np.uint8)
    return b"*%d\r\n$4\r\nMGET\r\n" % (n + 1) + rec.tobytes()


def _mset(keys: np.ndarray, rows: np.ndarray) -> bytes:
    """``MSET k1 v1 .. kn vn`` for keys int64 (n,) and rows (n, ...) as raw bytes."""
    n = keys.shape[0]
    raw = np.ascontiguousarray(rows).view(np.uint8).reshape(n, -1)
    vb = raw.shape[1]
    vprefix = np.frombuffer(b"$%d\r\n" % vb, dtype=np.uint8)
    crlf = np.frombuffer(b"\r\n", dtype=np.uint8)
    p = len(vprefix)
    rec = np.empty((n, 14 + p + vb + 2), dtype=np.uint8)
    rec[:, :4] = np.frombuffer(b"$8\r\n", dtype=np.uint8)
    rec[:, 4:12] = keys.astype("<i8").view(np.uint8).reshape(n, 8)
    rec[:, 12:14] = crlf
    rec[:, 14 : 14 + p] = vprefix
    rec[:, 14 + p : 14 + p + vb] = raw
    rec[:, 14 + p + vb :] = crlf
    return b"*%d\r\n$4\r\nMSET\r\n" % (2 * n + 1) + rec.tobytes()


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


class Cycle:
    """One timed repetition: ``call(batch i)`` for every batch of the pool, in order."""

    def __init__(self, call: Callable[[int], object], batches: int) -> None:
        self.call = call
        self.batches = batches

    def __call__(self) -> None:
        for i in range(self.batches):
            self.call(i)


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def measure(
    rows: int,
    batches: int,
    reps: int,
    quick: bool,
    redis_server: str,
    seed: int = SEED,
    malloc_tuned: bool = False,
) -> dict[str, Any]:
    """Start every server, fill the tables and Redis, time every contender; the flat results.

    malloc_tuned: whether ``tune_malloc()`` ran in this process (recorded only; every
    client contender lives in this process, so it applies to all of them alike).
    """
    r: dict[str, Any] = {"rows": rows, "dim": DIM, "batches": batches, "reps": reps,
                         "quick": quick, "malloc_tuned": malloc_tuned}  # fmt: skip
    pool = make_batches(batches, rows, seed)
    grads = [
        np.random.default_rng(seed + i).standard_normal((rows, DIM), dtype=np.float32) * 1e-3
        for i in range(batches)
    ]
    with contextlib.ExitStack() as stack:
        _progress("start embps serve (1 and 2 shards), the echo server and redis-server")
        one = start_cluster(1, stack)
        two = start_cluster(2, stack)
        echo = EchoClient(start_echo(stack))
        stack.callback(echo.close)
        redis = start_redis(redis_server, stack)
        clients = {}
        for name, addrs, dtype in (("1", one, "float32"), ("1h", one, "float16"),
                                   ("2", two, "float32")):  # fmt: skip
            c = PSClient(addrs, timeout=60.0, dtype=dtype)
            stack.callback(c.close)
            c.wait_ready(START_TIMEOUT_S)
            clients[name] = c
        ps, ps16, ps2 = clients["1"], clients["1h"], clients["2"]

        _progress(f"fill: {batches} x {rows:,} keys into both clusters and Redis (not timed)")
        for c in (ps, ps2):
            c.create_table(
                TABLE, dim=DIM, kind=TableKind.DYNAMIC, optimizer={"name": "sgd", "lr": 0.01}
            )
            for keys in pool:
                c.pull(TABLE, keys, train=True)
        for keys in pool:
            redis.mset_rows(keys, ps.pull(TABLE, keys, train=False))
        _check_contenders(ps, ps16, ps2, echo, redis, pool[0])

        step = iter(range(1 << 62))
        f32 = np.dtype(np.float32)
        ascending = [np.sort(keys) for keys in pool]
        work: dict[str, Callable[[int], object]] = {
            "pull": lambda i: ps.pull(TABLE, pool[i], train=False),
            "echo": lambda i: echo.pull(pool[i], F32, DIM),
            "redis_pull": lambda i: redis.mget_rows(pool[i], f32, DIM),
            "pull_sorted": lambda i: ps.pull(TABLE, ascending[i], train=False),
            "pull_train": lambda i: ps.pull(TABLE, pool[i], train=True),
            "pull_fp16": lambda i: ps16.pull(TABLE, pool[i], train=False),
            "echo_fp16": lambda i: echo.pull(pool[i], F16, DIM),
            "push": lambda i: ps.push(TABLE, pool[i], grads[i], step=next(step)),
            "echo_push": lambda i: echo.push(pool[i], grads[i], F32),
            "redis_push": lambda i: redis.mset_rows(pool[i], grads[i]),
            "push_fp16": lambda i: ps16.push(TABLE, pool[i], grads[i], step=next(step)),
            "echo_push_fp16": lambda i: echo.push(pool[i], grads[i], F16),
            "pull_2shard": lambda i: ps2.pull(TABLE, pool[i], train=False),
            "push_2shard": lambda i: ps2.push(TABLE, pool[i], grads[i], step=next(step)),
        }
        _progress("warm-up: one call of each contender")
        for fn in work.values():
            fn(0)
        _progress(f"time {len(work)} contenders, {batches} calls each, best of {reps}")
        t = best_interleaved(reps, {k: Cycle(fn, batches) for k, fn in work.items()})
    r.update({f"{name}_rows_s": batches * rows / s for name, s in t.items()})
    add_ratios(r)
    return r


def _check_contenders(
    ps: PSClient,
    ps16: PSClient,
    ps2: PSClient,
    echo: EchoClient,
    redis: RespClient,
    keys: np.ndarray,
) -> None:
    """Before timing: every contender moves what it claims (shapes, dtypes, the same rows)."""
    want = ps.pull(TABLE, keys, train=False)
    assert want.shape == (keys.shape[0], DIM) and want.dtype == np.float32
    got = redis.mget_rows(keys, np.dtype(np.float32), DIM)
    if not np.array_equal(got, want):
        raise RedisError("Redis does not hold the rows the shard holds")
    if not np.array_equal(ps2.pull(TABLE, keys, train=False), want):
        raise RuntimeError("the 2-shard cluster's rows differ from the 1-shard cluster's")
    if not np.array_equal(ps16.pull(TABLE, keys, train=False), want.astype(np.float16)):
        raise RuntimeError("float16 pulls are not the float32 rows rounded to float16")
    e = echo.pull(keys, F32, DIM)
    assert e.shape == want.shape and e.dtype == want.dtype


def add_ratios(r: dict[str, Any]) -> None:
    """Ours / baseline for every pair, and the targets met."""
    for ours, base, ratio in _PAIRS:
        r[ratio] = r[f"{ours}_rows_s"] / r[f"{base}_rows_s"]
    r["targets_met"] = sum(t.met(r[t.ratio]) for t in TARGETS)
    r["targets_total"] = len(TARGETS)


# (our JSON stem, baseline JSON stem, ratio JSON key); rates are f"{stem}_rows_s"
_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("pull", "echo", "pull_vs_echo"),
    ("pull", "redis_pull", "pull_vs_redis"),
    ("pull_sorted", "echo", "pull_sorted_vs_echo"),
    ("pull_train", "echo", "pull_train_vs_echo"),
    ("pull_fp16", "echo_fp16", "pull_fp16_vs_echo_fp16"),
    ("pull_fp16", "redis_pull", "pull_fp16_vs_redis"),
    ("push", "echo_push", "push_vs_echo"),
    ("push", "redis_push", "push_vs_redis"),
    ("push_fp16", "echo_push_fp16", "push_fp16_vs_echo_fp16"),
    ("push_fp16", "redis_push", "push_fp16_vs_redis"),
    ("pull_2shard", "pull", "pull_2shard_vs_1shard"),
    ("push_2shard", "push", "push_2shard_vs_1shard"),
)


def _progress(what: str) -> None:
    print(f"  .. {what}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

_NAMES = {
    "echo": "gRPC echo",
    "echo_fp16": "gRPC echo fp16",
    "echo_push": "gRPC echo",
    "echo_push_fp16": "gRPC echo fp16",
    "redis_pull": "Redis MGET",
    "redis_push": "Redis MSET",
    "pull": "1 shard",
    "push": "1 shard",
}
_LINES: tuple[tuple[str, str], ...] = (
    ("pull fp32, train=False", "pull"),
    ("  the same, keys ascending", "pull_sorted"),
    ("pull fp32, train=True", "pull_train"),
    ("pull fp16, train=False", "pull_fp16"),
    ("push fp32", "push"),
    ("push fp16", "push_fp16"),
    ("pull fp32, 2 shards", "pull_2shard"),
    ("push fp32, 2 shards", "push_2shard"),
)


def report(r: dict[str, Any]) -> str:
    """The readable table: each measurement beside its baselines, the ratio and the target."""
    targets = {t.ratio: t for t in TARGETS}
    head = ("measurement (M rows/s)", "ours", "baseline", "", "ratio", "target", "met")
    rows: list[tuple[str, ...]] = []
    for what, ours in _LINES:
        bases = [(base, key) for o, base, key in _PAIRS if o == ours]
        for i, (base, key) in enumerate(bases):
            t = targets.get(key)
            rows.append(
                (
                    what if i == 0 else "",
                    fmt_num(r[f"{ours}_rows_s"] / 1e6) if i == 0 else "",
                    _NAMES[base],
                    fmt_num(r[f"{base}_rows_s"] / 1e6),
                    fmt_ratio(r[key]),
                    *target_cells(t, r[key]),
                )
            )

    title = (
        f"embps bench service{' --quick' if r['quick'] else ''}: batches of {r['rows']:,} "
        f"distinct keys, dim {r['dim']}, {r['batches']} calls per repetition, best of "
        f"{r['reps']}; table: dynamic, SGD; each server its own process, loopback TCP; "
        f"client process malloc: {'tune_malloc()' if r.get('malloc_tuned') else 'glibc default'}"
    )
    machine = machine_line(f", grpcio {grpc.__version__}")
    return "\n".join(
        [
            title,
            machine,
            "",
            *table(head, rows, right={1, 3, 4}),
            "",
            f"targets met: {r['targets_met']} of {r['targets_total']}",
        ]
    )


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``embps bench service``."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_BATCHES} calls per repetition, best of {QUICK_REPS} "
        f"(default {FULL_BATCHES}, best of {FULL_REPS})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as a JSON object")
    parser.add_argument("--redis-server", default="redis-server", help="redis-server executable")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds alone in the benchmark's process (by default "
        "it calls embps.client.memory.tune_malloc(), as a trainer should; every client "
        "contender runs in this process)",
    )
    parser.add_argument("--rows", type=int, default=BATCH, help=argparse.SUPPRESS)  # tests
    parser.add_argument("--batches", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=0, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the report, write the JSON if asked. 0; 2: no redis-server."""
    batches = args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)
    reps = args.reps or (QUICK_REPS if args.quick else FULL_REPS)
    if args.rows < 1 or batches < 1 or reps < 1:
        raise SystemExit("--rows, --batches and --reps must be >= 1")
    server = shutil.which(args.redis_server)
    if server is None:
        print(
            f"embps bench service needs {args.redis_server!r} for the Redis baseline "
            "(Debian: apt-get install redis-server)",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    tuned = False if args.default_malloc else tune_malloc()
    r = measure(args.rows, batches, reps, bool(args.quick), server, malloc_tuned=tuned)
    print(report(r))
    print(f"(run took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(echo_main())
