"""The simulated engine's host KV tier (engines/sim/host_tier.py): pure logic, in process."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvrouter.engines.sim.host_tier import HostFull, SessionKv, UnknownSession
from kvrouter.engines.sim.kvcache import PagedKvCache
from kvrouter.events.model import BlockRemoved, BlockStored, Tier


def cached(cache: PagedKvCache, chain: list[int]) -> None:
    """A finished request left `chain` in the cache (unreferenced, in the LRU)."""
    m = cache.match_prefix(chain)
    cache.acquire(chain[:m])
    cache.allocate(len(chain) - m)
    cache.commit(chain[m:], chain[m - 1] if m else None)
    cache.release(chain)


def make(gpu: int = 8, host: int = 6) -> tuple[PagedKvCache, SessionKv]:
    cache = PagedKvCache(gpu, 16)
    return cache, SessionKv(cache, host_blocks=host, bytes_per_block=1000,
                            h2d_bytes_per_s=1e6, ttl_s=100.0)


def tiers(events: Sequence[object]) -> list[tuple[str, Tier, tuple[int, ...]]]:
    out = []
    for e in events:
        if isinstance(e, BlockStored):
            out.append(("stored", e.tier, e.hashes))
        elif isinstance(e, BlockRemoved):
            out.append(("removed", e.tier, e.hashes))
    return out


def test_offload_then_reload_moves_blocks_between_tiers_with_events() -> None:
    cache, kv = make()
    cached(cache, [1, 2, 3])
    kv.note("s", [1, 2, 3], now=0.0)
    cache.drain_events()
    moved = kv.offload("s", now=1.0)
    assert (moved.blocks, moved.freed) == (3, 3)
    assert moved.seconds == pytest.approx(3 * 1000 / 1e6)
    assert cache.cached_blocks == 0 and kv.host_used == 3 and kv.state("s") == "host"
    assert tiers(cache.drain_events()) == [("stored", Tier.HOST, (1, 2, 3)),
                                           ("removed", Tier.GPU, (3, 2, 1))]
    back = kv.reload("s", now=2.0)
    assert back.blocks == 3 and cache.match_prefix([1, 2, 3]) == 3
    assert kv.host_used == 0 and kv.state("s") == "gpu"
    assert tiers(cache.drain_events()) == [("stored", Tier.GPU, (1, 2, 3)),
                                           ("removed", Tier.HOST, (1, 2, 3))]


def test_host_full_changes_nothing() -> None:
    cache, kv = make(gpu=8, host=2)
    cached(cache, [1, 2, 3])
    kv.note("s", [1, 2, 3], now=0.0)
    cache.drain_events()
    with pytest.raises(HostFull, match="needs 3 blocks, 2 of 2 free"):
        kv.offload("s", now=1.0)
    assert cache.match_prefix([1, 2, 3]) == 3 and kv.host_used == 0
    assert cache.drain_events() == [] and kv.state("s") == "gpu"
    with pytest.raises(UnknownSession):
        kv.reload("s", now=1.0)  # not offloaded


def test_shared_head_stays_on_gpu_while_another_chain_hangs_under_it() -> None:
    cache, kv = make()
    cached(cache, [1, 2, 3])
    cached(cache, [1, 9])  # another session's branch under block 1
    kv.note("s", [1, 2, 3], now=0.0)
    moved = kv.offload("s", now=1.0)
    assert moved.blocks == 3 and moved.freed == 2  # 1 has a child (9): it stays
    assert cache.contains(1) and cache.contains(9) and not cache.contains(2)
    assert kv.reload("s", now=2.0).blocks == 2


def test_keep_pins_blocks_against_eviction_until_reload() -> None:
    cache, kv = make(gpu=4)
    cached(cache, [1, 2, 3])
    kv.note("s", [1, 2, 3], now=0.0)
    assert kv.keep("s", now=1.0).blocks == 3
    assert cache.available_blocks == 1  # pinned blocks are not evictable
    assert kv.reload("s", now=2.0).blocks == 0  # nothing to copy: the pin ends
    assert cache.available_blocks == 4


def test_partial_reload_when_the_gpu_is_full_and_expiry_frees_everything() -> None:
    cache, kv = make(gpu=4, host=6)
    cached(cache, [1, 2, 3])
    kv.note("s", [1, 2, 3], now=0.0)
    kv.offload("s", now=1.0)
    cache.allocate(3)  # others now use 3 of the 4 GPU blocks
    assert kv.reload("s", now=2.0).blocks == 1  # only the head fits; the rest is prefilled
    assert kv.host_used == 0
    cache.free_anonymous(3)
    cached(cache, [5, 6])
    kv.note("t", [5, 6], now=3.0)
    kv.offload("t", now=3.0)
    kv.note("u", [7], now=3.0)
    assert kv.host_used == 2
    assert kv.expire(now=200.0) == 3  # s, t and u idle past the TTL
    assert kv.host_used == 0 and kv.state("t") == ""
    with pytest.raises(UnknownSession, match="unknown session"):
        kv.reload("t", now=200.0)


def test_reloads_queue_on_the_host_link_and_their_blocks_land_when_the_copy_ends() -> None:
    cache, kv = make(gpu=8, host=6)
    for sid, chain in (("a", [1, 2]), ("b", [5, 6, 7])):
        cached(cache, chain)
        kv.note(sid, chain, now=0.0)
        kv.offload(sid, now=0.5)
    a = kv.reload("a", now=1.0)
    b = kv.reload("b", now=1.0)  # same instant: its copy starts when a's ends
    assert a.until == pytest.approx(1.0 + 2 * 1000 / 1e6)
    assert b.until == pytest.approx(a.until + 3 * 1000 / 1e6)
    # what a request reusing the blocks sets as its SimRequest.load_until
    assert kv.loading_until([1, 2], now=1.0) == a.until
    assert kv.loading_until([5, 6, 7, 99], now=1.0) == b.until
    assert kv.loading_until([99], now=1.0) == 0.0
    assert kv.loading_until([5, 6, 7], now=b.until) == 0.0  # landed
    # the link is free again later: a copy then starts at once
    kv.note("a", [1, 2], now=2.0)
    kv.offload("a", now=2.0)
    assert kv.reload("a", now=3.0).until == pytest.approx(3.0 + 2 * 1000 / 1e6)
