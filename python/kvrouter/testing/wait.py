"""Condition waits with a deadline: the one polling helper of tests, demo, benches and
the vLLM harness. A wait never sleeps a fixed time to let something happen; it polls a
condition and fails with a message that names what it waited for (and, when processes
are watched, the log tail of one that exited meanwhile)."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, overload

T = TypeVar("T")


class WaitTimeout(TimeoutError, AssertionError):
    """The condition did not hold in time. An AssertionError too, so pytest reports it
    as a failed check rather than an error."""


class ProcessExited(RuntimeError):
    """A watched process exited while something waited on it."""


class Watched(Protocol):
    """What a wait needs to know of a process it watches."""

    @property
    def name(self) -> str: ...

    def exit_code(self) -> int | None:
        """None while it runs."""
        ...

    def log_tail(self, lines: int = ...) -> str: ...


class _Poll:
    """One wait's deadline and its errors, shared by the sync and the async loop: the
    watched processes are checked before each try, and a miss (a falsy value or an ignored
    exception) is kept for the timeout message."""

    def __init__(self, what: str, timeout: float, procs: Sequence[Watched]) -> None:
        self.what = what
        self.timeout = timeout
        self.procs = procs
        self.deadline = time.monotonic() + timeout

    def check_alive(self) -> None:
        for p in self.procs:
            code = p.exit_code()
            if code is not None:
                raise ProcessExited(f"{p.name} exited with status {code} while waiting for "
                                    f"{self.what}; its log:\n{p.log_tail()}")

    def missed(self, last: object) -> None:
        """Raise WaitTimeout, naming `last`, when the deadline has passed."""
        if time.monotonic() >= self.deadline:
            tails = "".join(f"\n--- {p.name}:\n{p.log_tail(20)}" for p in self.procs)
            raise WaitTimeout(f"{self.what}: not true after {self.timeout:g}s "
                              f"(last: {last!r}){tails}")


def wait_until(cond: Callable[[], T], timeout: float, *, interval: float = 0.05,
               what: str = "condition", procs: Sequence[Watched] = (),
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `cond()` until it returns something truthy and return that.

    Raises WaitTimeout after `timeout` seconds, ProcessExited as soon as one of `procs`
    has exited. Exceptions of the types in `ignore` count as "not yet" (a server that
    does not accept connections yet)."""
    poll = _Poll(what, timeout, procs)
    while True:
        poll.check_alive()
        try:
            value = cond()
        except ignore as e:
            poll.missed(e)
        else:
            if value:
                return value
            poll.missed(value)
        time.sleep(interval)


@overload
async def async_wait_until(cond: Callable[[], Awaitable[T]], timeout: float, *,
                           interval: float = ..., what: str = ..., procs: Sequence[Watched] = ...,
                           ignore: tuple[type[BaseException], ...] = ...) -> T: ...


@overload
async def async_wait_until(cond: Callable[[], T], timeout: float, *,
                           interval: float = ..., what: str = ..., procs: Sequence[Watched] = ...,
                           ignore: tuple[type[BaseException], ...] = ...) -> T: ...


async def async_wait_until(cond: Callable[[], Any], timeout: float, *,
                           interval: float = 0.02, what: str = "condition",
                           procs: Sequence[Watched] = (),
                           ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """`wait_until` for a running event loop; `cond` may be a plain or an async callable."""
    poll = _Poll(what, timeout, procs)
    while True:
        poll.check_alive()
        try:
            r = cond()
            value = await r if inspect.isawaitable(r) else r
        except ignore as e:
            poll.missed(e)
        else:
            if value:
                return value
            poll.missed(value)
        await asyncio.sleep(interval)


def wait_stable(read: Callable[[], T], quiet_s: float, timeout: float, *,
                interval: float = 0.05, what: str = "value") -> T:
    """Poll `read()` until its value has not changed for `quiet_s` seconds; return it."""
    last = read()
    stable_since = time.monotonic()
    deadline = stable_since + timeout
    while time.monotonic() - stable_since < quiet_s:
        if time.monotonic() > deadline:
            raise WaitTimeout(f"{what} still changing after {timeout:g}s (last: {last!r})")
        time.sleep(interval)
        now = read()
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


__all__ = ["ProcessExited", "WaitTimeout", "Watched", "async_wait_until", "wait_stable",
           "wait_until"]
