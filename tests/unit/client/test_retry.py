"""The client's one retry policy (client/retry.py) on scripted outcomes."""

from __future__ import annotations

import time

import pytest

from embps.client import retry


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def script(*rounds: dict[int, object]):  # type: ignore[no-untyped-def]
    """send() that answers job i in round k with rounds[k].get(i, 'ok-i')."""
    calls: list[list[int]] = []

    def send(idx: list[int]) -> list[object]:
        k = len(calls)
        calls.append(list(idx))
        plan = rounds[k] if k < len(rounds) else {}
        return [plan.get(i, f"ok-{i}") for i in idx]

    return send, calls


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "BACKOFF_FIRST_S", 0.001)


def test_failed_jobs_alone_are_resent_until_they_pass() -> None:
    send, calls = script({1: Flaky(), 2: Flaky()}, {2: Flaky()})
    out = retry.retry_outcomes(send, 3, lambda r: isinstance(r, Flaky), time.monotonic() + 5)
    assert out == ["ok-0", "ok-1", "ok-2"]
    assert calls == [[0, 1, 2], [1, 2], [2]]


def test_no_deadline_means_one_attempt() -> None:
    send, calls = script({0: Flaky()})
    out = retry.retry_outcomes(send, 2, lambda r: isinstance(r, Flaky), None)
    assert isinstance(out[0], Flaky) and out[1] == "ok-1" and calls == [[0, 1]]


def test_all_or_nothing_stops_at_a_fatal_error() -> None:
    send, calls = script({0: Flaky(), 1: Fatal()})
    out = retry.retry_outcomes(send, 2, lambda r: isinstance(r, Flaky), time.monotonic() + 5)
    assert isinstance(out[1], Fatal) and calls == [[0, 1]]
    send, calls = script({0: Flaky(), 1: Fatal()})
    out = retry.retry_outcomes(send, 2, lambda r: isinstance(r, Flaky), time.monotonic() + 5,
                               all_or_nothing=False)  # fmt: skip
    assert out[0] == "ok-0" and isinstance(out[1], Fatal) and calls == [[0, 1], [0]]


def test_on_retry_names_the_jobs_before_each_resend() -> None:
    seen: list[list[int]] = []
    send, _ = script({0: Flaky(), 2: Flaky()}, {2: Flaky()})
    retry.retry_outcomes(send, 3, lambda r: isinstance(r, Flaky), time.monotonic() + 5,
                         on_retry=seen.append)  # fmt: skip
    assert seen == [[0, 2], [2]]


@pytest.mark.parametrize("last_at_deadline", [False, True])
def test_the_deadline_bounds_the_retries(last_at_deadline: bool) -> None:
    def send(idx: list[int]) -> list[object]:
        return [Flaky() for _ in idx]

    t0 = time.monotonic()
    out = retry.retry_outcomes(send, 1, lambda r: isinstance(r, Flaky), t0 + 0.3,
                               last_at_deadline=last_at_deadline)  # fmt: skip
    assert isinstance(out[0], Flaky)
    assert time.monotonic() - t0 < 0.3 + 0.2
