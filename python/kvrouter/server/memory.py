"""Give the memory of large refused or finished requests back to the OS.

Two things kept it (measured with bench/chaos and a probe sending 2M-token prompts):
- A refused RPC ends in grpc.aio's AbortError, which sits in a reference cycle with the
  call's state and the handler's frames, so the request (an 8 MiB message for a
  2M-token prompt, plus its token array) lives until the cyclic GC's next full pass:
  router RSS grew ~25 MiB per such request, to 350 MiB and beyond.
- glibc raises its mmap threshold after large frees, so later large buffers come from
  the heap, whose free space is not returned: one flood of oversized requests left RSS
  at 138 MiB from 89 MiB.
`HeapTrimmer.maybe_trim`, called from the router's maintenance loop, runs a full
collection and glibc's malloc_trim(0) (on other C libraries only the collection): at once
when RSS has grown by `min_growth_bytes` since the last trim, then on a backoff schedule
(`min_interval_s`, doubling while trims return little, ending past `max_interval_s`; a
heap that never grows is never trimmed). The schedule is what brings RSS back after a
flood: trims during the flood free little (its requests are still alive) and leave the
growth reference at the flood's height, so a rule on growth alone never trimmed again
afterwards (bench/chaos: RSS stayed at ~200 MB from ~97 MB for 40-90 s, until glibc
returned some of it by itself).
In a process started by `kvrouter.mainloop.run` a pass walks only what was allocated
since the start (the imports' heap is frozen there), not the ~90K objects before it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


# glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def tune_allocator(arenas: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """Call before the gRPC server starts its threads. Returns False without glibc.

    - At most `arenas` malloc arenas: gRPC's threads otherwise get arenas of their own
      (8 per core), whose freed message buffers stay resident.
    - Allocations of `mmap_threshold` bytes and more always mmap'd, so they go back to
      the OS when freed (glibc raises the threshold after large frees otherwise).
    Measured with three 300K-item RouteStream messages: router RSS 87 MiB before and
    after with both, 172 MiB after with neither."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, arenas)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))


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
    """When to give memory back (module doc). `rss` and `trim` (default: /proc and glibc's
    malloc_trim) are for tests."""

    def __init__(self, min_growth_bytes: int = 8 << 20, min_interval_s: float = 1.0,
                 max_interval_s: float = 64.0, rss: Callable[[], int] = rss_bytes,
                 trim: Callable[[int], int] | None = None) -> None:
        self.min_growth_bytes = min_growth_bytes
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self._rss = rss
        self._trim = trim if trim is not None else _malloc_trim()
        self._baseline = rss()
        self._interval = min_interval_s
        self._scheduled = False  # armed by a trim on growth, ends past max_interval_s
        self._last = 0.0

    def maybe_trim(self, now: float | None = None) -> int:
        """Trim when RSS grew enough since the last trim, or when a scheduled follow-up
        is due; returns the bytes given back."""
        now = time.monotonic() if now is None else now
        if now - self._last < self.min_interval_s:
            return 0
        rss = self._rss()
        grew = rss - self._baseline >= self.min_growth_bytes
        if not grew and not (self._scheduled and now - self._last >= self._interval):
            return 0
        self._last = now
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        after = self._rss()
        freed = max(0, rss - after)
        self._baseline = after
        # Productive (or the heap is growing): again soon; else back off, then stop.
        if grew or freed >= self.min_growth_bytes:
            self._interval, self._scheduled = self.min_interval_s, True
        else:
            self._interval *= 2
            self._scheduled = self._interval <= self.max_interval_s
        TRIMS.inc()
        TRIMMED.inc(freed)
        log.debug("heap trimmed", extra={"rss_before": rss, "rss_after": after,
                                         "next_s": self._interval})
        return freed
