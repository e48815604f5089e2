"""Push idempotency: an anti-replay window per client id (as IPsec's, RFC 4303 3.4.3).

A client that sets ``PushRequest.client_id`` numbers its pushes with
``sequence`` (> 0, increasing; ``PSClient`` starts at the clock in
microseconds, so a restarted client with the same id continues above its old
numbers). One ``ReplayGuard`` per shard, shared by every table of the shard:
a client's sequences are one series whatever table a push names.

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

LIMITATIONS. Memory is bounded: at most ``max_clients`` ids (least recently
used forgotten first; about 300 bytes each). A forgotten id, and every id after
a restart or a restore (this state is not checkpointed), starts afresh: its
next push is applied whatever its sequence, so a replay of a push from before
is applied again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from .errors import FailedPrecondition, InvalidArgument

T = TypeVar("T")

DEFAULT_WINDOW = 1024  # sequences remembered below the highest one, per client id
DEFAULT_MAX_CLIENTS = 65536  # client ids remembered per shard (LRU)
MAX_CLIENT_ID_BYTES = 128
MAX_SEQUENCE = 2**64 - 1


class _Window:
    """One client's state: lock, highest applied sequence, bitmap of the window below it."""

    __slots__ = ("bits", "lock", "top")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.top = 0  # 0: nothing applied yet (sequences are > 0)
        self.bits = 0


class ReplayGuard:
    """Per-shard memory of the (client id, sequence) pairs applied. Thread-safe.

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
