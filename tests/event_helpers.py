"""Helpers shared by the event-plane tests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis

from kvrouter.events.keys import Keys
from kvrouter.events.plane import make_event_plane
from kvrouter.events.publisher import EventPublisher
from kvrouter.events.workload import SyntheticCache
from kvrouter.registry import Registry
from kvrouter.testing.wait import async_wait_until
from tests.conftest import REDIS_URL


async def wait_until(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0) -> bool:
    """The event-plane tests' default deadline over the one polling helper: True once
    `cond` (sync or async) holds; raises WaitTimeout naming the condition otherwise."""
    return await async_wait_until(cond, timeout, what=getattr(cond, "__qualname__", "condition"))


def held(reg: Registry, worker: str, model: str = "m") -> set[int] | None:
    """Router hashes the router's index holds for a worker (None: worker unknown)."""
    st = reg.model(model)
    w = st.workers.get(worker)
    if w is None:
        return None
    return {h for h, _ in st.index.worker_router_hashes(w.wid)}


def reported_load(reg: Registry, model: str, worker: str) -> tuple[int, int, int, int] | None:
    """(running, queued, KV used blocks, KV free blocks) of the worker's last load report
    as the router's scheduler holds it (None: worker unknown)."""
    st = reg.model(model)
    w = st.workers.get(worker)
    if w is None:
        return None
    ld = st.scheduler.load(w.wid)
    return (ld.reported_running, ld.reported_queued, ld.reported_kv_used_blocks,
            ld.reported_kv_free_blocks)


def all_equal(reg: Registry, caches: dict[str, SyntheticCache]) -> bool:
    """Whether the router holds exactly each synthetic worker's blocks."""
    return all(held(reg, n) == c.router_hashes() for n, c in caches.items())


async def churn(pubs: dict[str, EventPublisher], caches: dict[str, SyntheticCache], steps: int) -> None:
    """`steps` random changes per worker, published, then flushed."""
    for i in range(steps):
        for n, c in caches.items():
            pubs[n].publish(c.step())
        if i % 5 == 0:
            await asyncio.sleep(0.001)  # yield to the publishers' loops, not a wait for anything
    for p in pubs.values():
        assert await p.flush()


@dataclass
class RedisRouter:
    """The router side of the engine-adapter tests: a registry with one model, fed by a
    started Redis event plane over a namespace of its own on the test Redis."""

    ns: str
    model: str
    registry: Registry
    plane: Any

    def overlap(self, worker: str, tokens: list[int]) -> int:
        """Blocks of `tokens` the router's index holds for `worker` (0: worker unknown)."""
        state = self.registry.model(self.model)
        info = state.workers.get(worker)
        if info is None:
            return 0
        return sum(state.index.find_matches_tokens(tokens).get(info.wid, (0, 0, 0)))


@contextlib.asynccontextmanager
async def redis_router(block_size: int, model: str = "m") -> AsyncIterator[RedisRouter]:
    """A RedisRouter (no snapshots, 2 s heartbeat TTL); its plane stopped and its keys
    deleted at the end."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    registry = Registry()
    registry.add_model(model, block_size)
    plane = make_event_plane(registry, REDIS_URL, namespace=ns, snapshot_interval_s=0,
                             heartbeat_ttl_s=2.0)
    await plane.start()
    try:
        yield RedisRouter(ns, model, registry, plane)
    finally:
        await plane.stop()
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(Keys(ns).pattern()))
        if keys:
            r.delete(*keys)
        r.close()
