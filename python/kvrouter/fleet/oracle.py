"""Reference hit rate: one LRU cache holding the whole fleet's capacity.

A pooled cache is what a perfect router over perfectly shared memory would
see: every request meets every block any worker ever computed, limited only by
total capacity. Requests are taken in arrival order; the hit count of a request
is its contiguous cached prefix (prefix caching cannot reuse a block after a
miss), after which all its blocks become most recently used, tail first so the
head of a prompt outlives its tail.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OracleResult:
    hit_blocks: int
    total_blocks: int
    capacity_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0


def lru_prefix_hits(requests: Iterable[Sequence[int]], capacity_blocks: int) -> Iterator[int]:
    """Per request, in order: how many leading blocks of its chain one LRU of
    `capacity_blocks` holds when it arrives (the request's chain is then stored)."""
    if capacity_blocks <= 0:
        raise ValueError("capacity_blocks must be > 0")
    lru: OrderedDict[int, None] = OrderedDict()
    for hashes in requests:
        k = 0
        for h in hashes:
            if h not in lru:
                break
            k += 1
        yield k
        # touch tail first so the prompt's head ends up most recently used
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > capacity_blocks:
            lru.popitem(last=False)


def pooled_lru(requests: Iterable[Sequence[int]], capacity_blocks: int) -> OracleResult:
    """Block hit rate of one LRU of `capacity_blocks` over requests' block-hash chains."""
    chains = list(requests)
    hits = sum(lru_prefix_hits(chains, capacity_blocks))
    total = sum(len(h) for h in chains)
    return OracleResult(hit_blocks=hits, total_blocks=total, capacity_blocks=capacity_blocks)
