"""Give freed heap back to the OS after large messages.

A router that decoded a few 10-20 MiB requests (a flood of oversized prompts, a huge
RouteStream message) keeps their memory: glibc raises its mmap threshold after large
frees, so later large buffers come from the heap, and the heap's free top is not
returned. bench/chaos measured router RSS going from 89 MiB to 138 MiB and staying
there after one such flood. `HeapTrimmer.maybe_trim`, called from the router's
maintenance loop, runs glibc's malloc_trim(0) when RSS has grown by `min_growth_bytes`
since the last trim; on other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

from prometheus_client import Counter

log = logging.getLogger("kvrouter.server.memory")

TRIMS = Counter("kvrouter_heap_trims_total", "malloc_trim calls after the router's RSS grew")
TRIMMED = Counter("kvrouter_heap_trimmed_bytes_total", "RSS returned to the OS by malloc_trim")


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrimmer:
    def __init__(self, min_growth_bytes: int = 8 << 20, min_interval_s: float = 5.0) -> None:
        self.min_growth_bytes = min_growth_bytes
        self.min_interval_s = min_interval_s
        self._trim = _malloc_trim()
        self._baseline = rss_bytes()
        self._last = 0.0

    def maybe_trim(self, now: float | None = None) -> int:
        """Trim if RSS grew enough since the last trim; returns the bytes returned."""
        if self._trim is None:
            return 0
        now = time.monotonic() if now is None else now
        rss = rss_bytes()
        if rss - self._baseline < self.min_growth_bytes or now - self._last < self.min_interval_s:
            return 0
        self._last = now
        self._trim(0)
        after = rss_bytes()
        freed = max(0, rss - after)
        self._baseline = after
        TRIMS.inc()
        TRIMMED.inc(freed)
        log.debug("heap trimmed", extra={"rss_before": rss, "rss_after": after})
        return freed
