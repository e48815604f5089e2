"""The client's one retry policy: resend what failed in a way that may pass, with
exponential backoff and jitter, until a deadline (gRPC's retry policy in its shape).

``retry_outcomes(send, n, retriable, deadline)`` sends jobs ``0..n-1``, then resends the
failed ones ``retriable`` accepts, each round after a pause of ``BACKOFF_FIRST_S`` doubling
up to ``BACKOFF_MAX_S``, each pause drawn in [1/2, 1] of its value (jitter: clients that
failed together do not retry together). Who decides what is retriable stays with the
caller: idempotent calls retry UNAVAILABLE and CANCELLED; a push only with a client id,
and then also DEADLINE_EXCEEDED, never a refusal.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.05, 2.0


def retry_outcomes(
    send: Callable[[list[int]], list[Any]],
    n: int,
    retriable: Callable[[Any], bool],
    deadline: float | None,
    *,
    all_or_nothing: bool = True,
    last_at_deadline: bool = False,
    on_retry: Callable[[list[int]], None] | None = None,
) -> list[Any]:
    """Outcomes of jobs ``0..n-1``: each its response or its exception (never raised here).

    send(indices) -> the outcomes of those jobs, in that order (one attempt, no retries).
    retriable(outcome) -> whether a failed job may be sent again.
    deadline: a ``time.monotonic()`` time after which nothing is resent (None: no retries).
    all_or_nothing: retry only while every failed job is retriable (a job that can never
      pass makes the whole call fail now, not after the deadline).
    last_at_deadline: the last pause is cut to end at the deadline, so a shard that is back
      just in time is used; otherwise a pause that would pass the deadline ends the retries.
    on_retry(indices): called with the jobs about to be resent, before the pause.
    """
    outcomes = send(list(range(n)))
    backoff = BACKOFF_FIRST_S
    while deadline is not None:
        failed = [i for i, r in enumerate(outcomes) if isinstance(r, BaseException)]
        again = [i for i in failed if retriable(outcomes[i])]
        if not again or (all_or_nothing and len(again) != len(failed)):
            break
        if on_retry is not None:
            on_retry(again)
        pause = backoff * (0.5 + random.random() / 2)
        remaining = deadline - time.monotonic()
        if last_at_deadline:
            if remaining <= 0:
                break
            pause = min(pause, remaining)
        elif pause > remaining:
            break
        time.sleep(pause)
        backoff = min(backoff * 2, BACKOFF_MAX_S)
        for i, r in zip(again, send(again), strict=True):
            outcomes[i] = r
    return outcomes
