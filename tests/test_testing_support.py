"""kvrouter.testing: the one polling helper and the process-fleet helpers fail clearly."""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

import pytest

from kvrouter.testing.processes import ChildProcess, child_env, start_router
from kvrouter.testing.wait import (
    ProcessExited,
    WaitTimeout,
    async_wait_until,
    wait_stable,
    wait_until,
)


def test_wait_until_returns_the_truthy_value() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter) >= 3 and "ready", 5, interval=0.001) == "ready"


def test_wait_until_times_out_naming_what_and_the_last_value() -> None:
    with pytest.raises(WaitTimeout, match=r"the answer: not true after 0\.05s \(last: \[\]\)"):
        wait_until(lambda: [], 0.05, interval=0.01, what="the answer")
    # A WaitTimeout is an AssertionError too: pytest reports a failed check.
    assert issubclass(WaitTimeout, AssertionError) and issubclass(WaitTimeout, TimeoutError)


def test_ignored_exceptions_count_as_not_yet() -> None:
    calls = itertools.count()

    def flaky() -> bool:
        if next(calls) < 2:
            raise ConnectionError("not listening yet")
        return True

    assert wait_until(flaky, 5, interval=0.001, ignore=(OSError,))
    with pytest.raises(ValueError):
        wait_until(lambda: int("x"), 5, ignore=(OSError,))


def test_a_watched_process_that_exits_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    proc = ChildProcess("crasher", [sys.executable, "-c", "print('boom happened'); raise SystemExit(3)"],
                        tmp_path / "crasher.log", child_env()).start()
    with pytest.raises(ProcessExited, match=r"(?s)crasher exited with status 3.*boom happened"):
        wait_until(lambda: False, 30, what="never", procs=[proc])


def test_async_wait_until_takes_plain_and_async_conditions() -> None:
    async def run() -> None:
        n = itertools.count()

        async def ready() -> int:
            return next(n) if next(n) > 4 else 0

        assert await async_wait_until(ready, 5, interval=0.001) > 4
        assert await async_wait_until(lambda: "yes", 5) == "yes"
        with pytest.raises(WaitTimeout, match="nothing"):
            await async_wait_until(lambda: False, 0.02, what="nothing")

    asyncio.run(run())


def test_wait_stable_returns_the_settled_value() -> None:
    values = iter([1, 2, 3])
    assert wait_stable(lambda: next(values, 3), 0.05, 5, interval=0.01) == 3
    counter = itertools.count()
    with pytest.raises(WaitTimeout, match="still changing"):
        wait_stable(lambda: next(counter), 0.2, 0.1, interval=0.01, what="counter")


def test_a_router_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    with pytest.raises(ProcessExited, match=r"(?s)router.*exited.*lease_s"):
        start_router(tmp_path, {"router": {"lease_s": -1}}, timeout=30)
