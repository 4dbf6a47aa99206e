"""Paged KV cache: reuse, LRU eviction of unreferenced blocks only, events = contents."""

from __future__ import annotations

import random

import pytest

from kvrouter.engines.sim.kvcache import CacheFull, PagedKvCache
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent


def replay(events: list[KvEvent], held: set[int]) -> None:
    """What a consumer of the events believes the cache holds."""
    for ev in events:
        if isinstance(ev, BlockStored):
            assert ev.parent is None or ev.parent in held, "stored under an unknown parent"
            assert ev.router_hashes == ev.hashes
            for h in ev.hashes:
                assert h not in held, "stored twice"
                held.add(h)
        elif isinstance(ev, BlockRemoved):
            for h in ev.hashes:
                held.remove(h)
        elif isinstance(ev, AllCleared):
            held.clear()


def store(cache: PagedKvCache, hashes: list[int]) -> None:
    """A request computing `hashes` from scratch, then finishing."""
    m = cache.match_prefix(hashes)
    cache.acquire(hashes[:m])
    cache.allocate(len(hashes) - m)
    cache.commit(hashes[m:], hashes[m - 1] if m else None)
    cache.release(hashes)


def test_prefix_reuse_and_sharing() -> None:
    c = PagedKvCache(16, 4)
    store(c, [1, 2, 3])
    assert c.match_prefix([1, 2, 3, 4]) == 3
    assert c.match_prefix([1, 9]) == 1
    assert c.match_prefix([9, 2]) == 0
    c.acquire([1, 2])
    assert c.ref_count(1) == 1 and c.evictable_blocks == 1  # only block 3 unreferenced
    # a second request computed the same block concurrently: shared, copy freed, no event
    c.allocate(2)
    c.drain_events()
    c.commit([3, 7], parent=2)
    assert c.ref_count(3) == 1 and c.ref_count(7) == 1
    assert c.used_blocks == 4 and c.free_blocks == 12
    evs = c.drain_events()
    assert evs == [BlockStored(hashes=(7,), parent=3, router_hashes=(7,))]


def test_lru_evicts_only_unreferenced_tail_first() -> None:
    c = PagedKvCache(6, 4)
    store(c, [1, 2, 3])  # unreferenced, tail first in LRU: 3, 2, 1
    c.acquire([1])  # pin the head
    c.allocate(4)  # needs 1 beyond the 3 free: evicts the tail (3), keeps the pinned head
    assert not c.contains(3) and c.contains(2) and c.contains(1)
    c.allocate(1)
    assert not c.contains(2) and c.contains(1)
    with pytest.raises(CacheFull):
        c.allocate(1)  # only the referenced block 1 is left: nothing changes
    assert c.contains(1) and c.used_blocks == 6
    removed = [ev for ev in c.drain_events() if isinstance(ev, BlockRemoved)]
    assert [ev.hashes for ev in removed] == [(3,), (2,)]


def test_events_match_contents_under_random_load() -> None:
    rng = random.Random(7)
    c = PagedKvCache(40, 4)
    held: set[int] = set()
    live: list[tuple[list[int], int]] = []
    prefixes = [[p * 100 + i for i in range(rng.randint(2, 8))] for p in range(6)]
    for _ in range(500):
        if live and (rng.random() < 0.45 or c.available_blocks < 12):
            hashes, anon = live.pop(rng.randrange(len(live)))
            c.release(hashes)
            c.free_anonymous(anon)
        else:
            base = rng.choice(prefixes)
            hashes = base[: rng.randint(1, len(base))] + [rng.randrange(10**6, 10**7)
                                                         for _ in range(rng.randint(0, 3))]
            m = c.match_prefix(hashes)
            need = len(hashes) - m + 1  # plus one anonymous (partial) block
            lru_hit = sum(1 for h in hashes[:m] if c.ref_count(h) == 0)
            if need > c.available_blocks - lru_hit:
                continue
            c.acquire(hashes[:m])
            c.allocate(need)
            c.commit(hashes[m:], hashes[m - 1] if m else None)
            live.append((hashes, 1))
        replay(c.drain_events(), held)
        assert held == c.hashes()
        assert c.used_blocks + c.free_blocks + c.evictable_blocks == c.num_blocks
    for hashes, anon in live:
        c.release(hashes)
        c.free_anonymous(anon)
    c.clear()
    replay(c.drain_events(), held)
    assert held == c.hashes() == set()
    assert c.free_blocks == c.num_blocks


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PagedKvCache(0, 4)
    c = PagedKvCache(4, 4)
    with pytest.raises(ValueError):
        c.free_anonymous(1)
    with pytest.raises(ValueError):
        c.commit([1], None)  # nothing allocated
