"""kvrouter.retry.Backoff: the one retry policy of reconnect loops."""

from __future__ import annotations

import asyncio

import pytest

from kvrouter.retry import Backoff


def test_delays_double_up_to_the_cap_and_reset() -> None:
    b = Backoff(0.05, 0.3, jitter=False)
    assert [b.next_delay() for _ in range(5)] == [0.05, 0.1, 0.2, 0.3, 0.3]
    b.reset()
    assert b.next_delay() == 0.05 and b.failures == 1


def test_jitter_stays_within_the_unjittered_delay() -> None:
    b = Backoff(0.05, 0.4)
    plain = Backoff(0.05, 0.4, jitter=False)
    for _ in range(20):
        d, cap = b.next_delay(), plain.next_delay()
        assert 0 <= d <= cap


def test_wait_stops_at_the_deadline_without_sleeping() -> None:
    async def run() -> list[bool]:
        b = Backoff(0.1, 10.0, deadline_s=0.5, jitter=False)  # 0.1 + 0.2, then 0.4 > 0.2 left
        return [await b.wait() for _ in range(3)]

    outcomes = asyncio.run(run())
    assert outcomes[:2] == [True, True] and outcomes[-1] is False


def test_bad_delays_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1.0)
    assert Backoff(0.5, 0.1, jitter=False).next_delay() == 0.1  # initial clamped to the cap
