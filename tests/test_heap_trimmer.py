"""When the router gives memory back (server/memory.py HeapTrimmer): at once on growth,
else on a backoff schedule, so RSS comes back after a flood whose own trims freed little."""

from __future__ import annotations

from kvrouter.server.memory import HeapTrimmer

MB = 1 << 20


class FakeHeap:
    """RSS a test sets; trim() gives back what the test marked as freeable."""

    def __init__(self, rss: int) -> None:
        self.rss = rss
        self.freeable = 0
        self.trims = 0

    def read(self) -> int:
        return self.rss

    def trim(self, pad: int) -> int:
        self.trims += 1
        self.rss -= self.freeable
        self.freeable = 0
        return 1


def make(heap: FakeHeap) -> HeapTrimmer:
    return HeapTrimmer(min_growth_bytes=8 * MB, min_interval_s=1.0, max_interval_s=8.0,
                       rss=heap.read, trim=heap.trim)


def test_growth_trims_at_once_and_at_most_every_min_interval() -> None:
    heap = FakeHeap(100 * MB)
    t = make(heap)
    heap.rss, heap.freeable = 150 * MB, 40 * MB
    assert t.maybe_trim(now=10.0) == 40 * MB
    heap.rss, heap.freeable = 200 * MB, 40 * MB
    assert t.maybe_trim(now=10.5) == 0  # within min_interval_s
    assert t.maybe_trim(now=11.0) == 40 * MB


def test_memory_left_after_a_flood_is_given_back_without_new_growth() -> None:
    """The flood's trims free little (its requests are alive) and raise the reference;
    once it ends nothing grows, yet the next scheduled trim returns the memory."""
    heap = FakeHeap(100 * MB)
    t = make(heap)
    heap.rss = 240 * MB  # the flood: live memory, nothing to free yet
    t.maybe_trim(now=1.0)
    assert heap.rss == 240 * MB
    heap.freeable = 140 * MB  # the flood ended: its memory is free but not returned
    now, returned = 1.0, 0
    while not returned and now < 30.0:
        now += 1.0
        returned = t.maybe_trim(now=now)
    assert returned == 140 * MB and heap.rss == 100 * MB
    assert now <= 1.0 + 2.0  # the interval had backed off at most once


def test_a_heap_that_never_grows_is_never_trimmed() -> None:
    heap = FakeHeap(100 * MB)
    t = make(heap)
    for s in range(1, 200):
        t.maybe_trim(now=float(s))
    assert heap.trims == 0


def test_after_growth_the_follow_ups_back_off_and_end() -> None:
    heap = FakeHeap(100 * MB)
    t = make(heap)
    heap.rss = 120 * MB
    trimmed_at = []
    for s in range(1, 100):
        before = heap.trims
        t.maybe_trim(now=float(s))
        if heap.trims > before:
            trimmed_at.append(s)
    # the trim on growth at 1 s, then follow-ups after 1, 2, 4 and 8 s (max_interval_s)
    assert trimmed_at == [1, 2, 4, 8, 16]
