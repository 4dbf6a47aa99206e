"""One retry policy for reconnect, re-registration and re-read loops.

Delays grow exponentially from `initial_s` to `max_s` with full jitter (so many
workers retrying the same router or Redis do not retry in step), reset after a
success, and can stop at a deadline. The delay sequence and the jitter are the
maintained `backoff` library's (`backoff.expo`, `backoff.full_jitter`); this class
only holds one loop's state, which the library's decorators keep hidden.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import Any

import backoff


class Backoff:
    """Delays of one retry loop: `await wait()` after a failure, `reset()` after a success."""

    def __init__(self, initial_s: float = 0.05, max_s: float = 1.0, *,
                 deadline_s: float | None = None, jitter: bool = True) -> None:
        if not (initial_s > 0 and max_s > 0):
            raise ValueError(f"backoff delays must be > 0, got {initial_s}, {max_s}")
        self.initial_s = min(initial_s, max_s)
        self.max_s = max_s
        self.deadline_s = deadline_s
        self.jitter = jitter
        self._end = None if deadline_s is None else time.monotonic() + deadline_s
        self._gen: Generator[float, Any, None]
        self.reset()

    def reset(self) -> None:
        """Start again from the initial delay (the deadline, if any, stays)."""
        self._gen = backoff.expo(base=2, factor=self.initial_s, max_value=self.max_s)
        next(self._gen)  # the library's generators yield once before their first value
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        delay = next(self._gen)
        return backoff.full_jitter(delay) if self.jitter else delay

    def remaining_s(self) -> float | None:
        return None if self._end is None else self._end - time.monotonic()

    async def wait(self) -> bool:
        """Sleep the next delay; False (without sleeping) when it would pass the deadline."""
        delay = self.next_delay()
        left = self.remaining_s()
        if left is not None and delay > left:
            return False
        await asyncio.sleep(delay)
        return True
