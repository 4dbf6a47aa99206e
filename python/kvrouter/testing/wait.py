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


def _check_alive(what: str, procs: Sequence[Watched]) -> None:
    for p in procs:
        code = p.exit_code()
        if code is not None:
            raise ProcessExited(f"{p.name} exited with status {code} while waiting for {what}; "
                                f"its log:\n{p.log_tail()}")


def _timeout(what: str, timeout: float, last: object, procs: Sequence[Watched]) -> WaitTimeout:
    tails = "".join(f"\n--- {p.name}:\n{p.log_tail(20)}" for p in procs)
    return WaitTimeout(f"{what}: not true after {timeout:g}s (last: {last!r}){tails}")


def wait_until(cond: Callable[[], T], timeout: float, *, interval: float = 0.05,
               what: str = "condition", procs: Sequence[Watched] = (),
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `cond()` until it returns something truthy and return that.

    Raises WaitTimeout after `timeout` seconds, ProcessExited as soon as one of `procs`
    has exited. Exceptions of the types in `ignore` count as "not yet" (a server that
    does not accept connections yet)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        _check_alive(what, procs)
        try:
            value = cond()
            if value:
                return value
            last = value
        except ignore as e:
            last = e
        if time.monotonic() >= deadline:
            raise _timeout(what, timeout, last, procs)
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
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        _check_alive(what, procs)
        try:
            r = cond()
            value = await r if inspect.isawaitable(r) else r
            if value:
                return value
            last = value
        except ignore as e:
            last = e
        if time.monotonic() >= deadline:
            raise _timeout(what, timeout, last, procs)
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
