"""Helpers shared by the event-plane tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from kvrouter.registry import Registry


async def wait_until(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0) -> bool:
    """Polls `cond` (sync or async) until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return True
        await asyncio.sleep(0.02)
    return False


def held(reg: Registry, worker: str, model: str = "m") -> set[int] | None:
    """Router hashes the router's index holds for a worker (None: worker unknown)."""
    st = reg.model(model)
    w = st.workers.get(worker)
    if w is None:
        return None
    return {h for h, _ in st.index.worker_router_hashes(w.wid)}
