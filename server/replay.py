"""Push idempotency: an anti-replay window per client id (as IPsec's, RFC 4303 3.4.3).

A client that sets ``PushRequest.client_id`` numbers its pushes with
``sequence`` (> 0, increasing; ``PSClient`` starts at the clock in
microseconds, so a restarted client with the same id continues above its old
numbers). One ``ReplayGuard`` per table: a client's sequences are one series across
tables, and each table remembers the ones it applied (a gap is fine).

HOW IT WORKS. Per client id: ``top``, the highest sequence applied, and a
bitmap of the last ``window`` sequences (bit i: ``top - i`` was applied),
because one client may have several pushes in flight that arrive out of order.
A push with sequence s is

* above ``top``: applied; the bitmap shifts;
* in ``(top - window, top]``: applied if its bit is clear, else dropped as a
  replay (the caller answers ``replayed=true``, nothing changes);
* at or below ``top - window``: refused with FAILED_PRECONDITION (the shard
  cannot tell whether it was applied; nothing changes).

ATOMICITY. Each client id has a lock held across check, apply and mark, so two
copies of one push arriving at once apply once (the second sees the bit). A
push that fails (a bad request, nothing applied) leaves its bit clear: the same
sequence may come again. Pushes of different clients never wait on each other
here (the table's lock still orders pushes to one table).

CHECKPOINTS. Each table keeps its own guard and consults it under the table's
lock (``Table.push``), so a table's snapshot holds exactly the pairs applied to
the rows it holds: restored from a checkpoint, a table drops a replay of any
push the checkpoint contains and applies any push it lost (``export`` /
``load``; the arrays ``replay.*`` of a snapshot). A restore onto another shard
count starts with empty windows (one old shard's window cannot speak for keys
that come from others).

LIMITATIONS. Memory is bounded: at most ``max_clients`` ids per table (least
recently used forgotten first; about 300 bytes each). A forgotten id, and every
id after a restart without a restore or a resharding restore, starts afresh:
its next push is applied whatever its sequence, so a replay of a push from
before is applied again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from embps.server.errors import FailedPrecondition, InvalidArgument

T = TypeVar("T")

DEFAULT_WINDOW = 1024  # sequences remembered below the highest one, per client id
DEFAULT_MAX_CLIENTS = 65536  # client ids remembered per shard (LRU)
MAX_CLIENT_ID_BYTES = 128
REPLAY_ARRAYS = ("replay.ids", "replay.ends", "replay.top", "replay.bits")  # a snapshot's


class _Window:
    """One client's state: lock, highest applied sequence, bitmap of the window below it."""

    __slots__ = ("bits", "lock", "top")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.top = 0  # 0: nothing applied yet (sequences are > 0)
        self.bits = 0


class ReplayGuard:
    """Per-table memory of the (client id, sequence) pairs applied. Thread-safe.

    Example::

        guard = ReplayGuard()
        res = guard.apply_once("trainer-0", 17, lambda: table.push(keys, grads))
        if res is None:
            ...  # a replay: nothing was applied
    """

    def __init__(self, window: int = DEFAULT_WINDOW, max_clients: int = DEFAULT_MAX_CLIENTS):
        if window < 1 or max_clients < 1:
            raise ValueError("window and max_clients must be >= 1")
        self.window = window
        self.max_clients = max_clients
        self._mask = (1 << window) - 1
        self._clients: OrderedDict[str, _Window] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Client ids remembered."""
        with self._lock:
            return len(self._clients)

    @staticmethod
    def check(client_id: str, sequence: int) -> None:
        """InvalidArgument for a pair no push may carry (call before anything changes)."""
        if not client_id:
            if sequence:
                raise InvalidArgument(
                    f"push has sequence {sequence} but no client_id; set client_id "
                    "(PSClient(client_id=...)) or leave sequence 0"
                )
            return
        if len(client_id.encode("utf-8")) > MAX_CLIENT_ID_BYTES:
            raise InvalidArgument(
                f"client_id is {len(client_id.encode('utf-8'))} bytes, over "
                f"{MAX_CLIENT_ID_BYTES}; use a shorter id (a uuid4 hex is 32)"
            )
        if sequence == 0:
            raise InvalidArgument(
                f"push of client_id {client_id!r} has sequence 0; number pushes from 1 up "
                "(one new sequence per push)"
            )

    def apply_once(self, client_id: str, sequence: int, apply: Callable[[], T]) -> T | None:
        """``apply()``'s result, or None without calling it when the pair was applied.

        FailedPrecondition when ``sequence`` is older than the window (cannot
        tell). An exception from ``apply`` propagates and leaves the sequence
        unmarked. Call ``check`` first.
        """
        w = self._window(client_id)
        with w.lock:
            if sequence <= w.top:
                age = w.top - sequence
                if age >= self.window:
                    raise FailedPrecondition(
                        f"push sequence {sequence} of client_id {client_id!r} is older than "
                        f"this shard's replay window (highest applied {w.top}, window "
                        f"{self.window}): the shard cannot tell whether it was applied, so "
                        "nothing was changed; treat its outcome as unknown"
                    )
                if w.bits >> age & 1:
                    return None
            result = apply()
            if sequence > w.top:
                shift = sequence - w.top  # huge for a client's first push: never shift that far
                w.bits = (w.bits << shift | 1) & self._mask if shift < self.window else 1
                w.top = sequence
            else:
                w.bits |= 1 << (w.top - sequence)
            return result

    def export(self) -> dict[str, np.ndarray]:
        """The state as arrays (least recently used client first): ``replay.ids`` uint8
        (the UTF-8 ids, concatenated), ``replay.ends`` int64 (k,) (where each id ends),
        ``replay.top`` uint64 (k,), ``replay.bits`` uint8 (k, ceil(window / 8)) (little
        endian). Call it where no push runs meanwhile (under the table's lock)."""
        nb = (self.window + 7) // 8
        with self._lock:
            items = list(self._clients.items())
        ids = [c.encode("utf-8") for c, _ in items]
        return {
            "replay.ids": np.frombuffer(b"".join(ids), dtype=np.uint8).copy(),
            "replay.ends": np.cumsum([len(i) for i in ids], dtype=np.int64),
            "replay.top": np.array([w.top for _, w in items], dtype=np.uint64),
            "replay.bits": np.frombuffer(
                b"".join(w.bits.to_bytes(nb, "little") for _, w in items), dtype=np.uint8
            ).reshape(len(items), nb),
        }

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the state by ``export``'s arrays (ValueError if they do not fit together)."""
        ids, ends = arrays["replay.ids"], arrays["replay.ends"]
        top, bits = arrays["replay.top"], arrays["replay.bits"]
        k = ends.shape[0]
        if top.shape != (k,) or bits.shape[0] != k or (k and int(ends[-1]) != ids.shape[0]):
            raise ValueError("replay arrays do not fit together")
        raw = ids.tobytes()
        clients: OrderedDict[str, _Window] = OrderedDict()
        start = 0
        for i in range(k):
            w = _Window()
            w.top = int(top[i])
            w.bits = int.from_bytes(bits[i].tobytes(), "little") & self._mask
            clients[raw[start : int(ends[i])].decode("utf-8")] = w
            start = int(ends[i])
        while len(clients) > self.max_clients:
            clients.popitem(last=False)
        with self._lock:
            self._clients = clients

    def _window(self, client_id: str) -> _Window:
        with self._lock:
            w = self._clients.get(client_id)
            if w is None:
                w = self._clients[client_id] = _Window()
                if len(self._clients) > self.max_clients:
                    self._clients.popitem(last=False)
            else:
                self._clients.move_to_end(client_id)
            return w
