"""Sessions' KV around tool calls on TensorRT-LLM: the mapping of keep / offload / drop
onto TensorRT-LLM's retention priorities and its host (secondary) tier.

TensorRT-LLM (docs: features/kvcache.md, examples/kvcacheretentionconfig.md) evicts
blocks by prioritized LRU (priority 0-100, default 35; all blocks of a lower priority go
before any of a higher one). With a host cache (`KvCacheConfig.host_cache_size`), a block
evicted from GPU memory is copied to host memory and stays reusable; a later request that
reuses it onboards it back. Blocks below `secondary_offload_min_priority` (default 30)
are discarded instead. A request sets its blocks' priority when it is submitted
(`kv_cache_retention_config=KvCacheRetentionConfig(...)`, prompt ranges and decoded
blocks, each with a duration after which the priority reverts to 35); there is no call
that moves one session's blocks afterwards. So:

* keep -> priority 90 for the pause (evicted after everything at the default);
* offload -> priority 30 for the pause: the first blocks to leave the GPU when others
  need room, and still at or above the offload threshold, so they go to host memory,
  not away; no room needed, they stay on the GPU (nothing copied for nothing);
* drop -> priority 0: the first to be discarded;
* "" (the engine's choice) -> offload: TensorRT-LLM's own eviction then makes the
  keep-or-offload decision as pressure comes;

each for twice the expected pause (a tool that runs long keeps its protection a while).
Engine.Offload / Reload then only confirm: Offload answers the tier the blocks were
given at submission (the moves themselves happen in the engine and reach the router as
`updated` events with a cache_level change, which kvrouter.engines.trtllm.translate
applies as tier moves); Reload answers 0 blocks (TensorRT-LLM onboards host blocks when
the next turn reuses them). A session whose last request carried no tool pause, or whose
retention lapsed, is NOT_FOUND.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

KEEP_PRIORITY = 90
OFFLOAD_PRIORITY = 30  # TensorRT-LLM's default secondary_offload_min_priority
DROP_PRIORITY = 0
DURATION_FACTOR = 2.0
MAX_SESSIONS = 65536
_PRIORITY = {"keep": KEEP_PRIORITY, "offload": OFFLOAD_PRIORITY, "": OFFLOAD_PRIORITY,
             "drop": DROP_PRIORITY}


class RetentionError(ValueError):
    """A tool_kv_action this mapping does not know."""


@dataclass(frozen=True, slots=True)
class Retention:
    action: str  # keep | offload | drop
    priority: int
    duration_s: float


def retention_for(pause_s: float, action: str) -> Retention | None:
    """The retention of a turn that ends in a tool call of `pause_s` seconds (None: no
    pause, TensorRT-LLM's defaults)."""
    if not pause_s > 0:
        return None
    prio = _PRIORITY.get(action)
    if prio is None:
        raise RetentionError(f"tool_kv_action must be keep, offload, drop or empty, got "
                             f"{action[:64]!r}")
    return Retention(action or "offload", prio, pause_s * DURATION_FACTOR)


def retention_config(ctor: Callable[..., Any], token_range: Callable[..., Any],
                     r: Retention) -> Any:
    """TensorRT-LLM's KvCacheRetentionConfig for `r`: the whole prompt and the decoded
    blocks at one priority for the duration (keyword names as in its documentation)."""
    duration = timedelta(seconds=r.duration_s)
    return ctor(token_range_retention_configs=[token_range(0, None, r.priority, duration)],
                decode_retention_priority=r.priority, decode_duration_ms=duration)


class SessionRetentions:
    """What retention each session's last turn got, until it lapses (Offload / Reload)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: OrderedDict[str, tuple[Retention, float]] = OrderedDict()

    def record(self, session: str, r: Retention | None) -> None:
        self._sessions.pop(session, None)
        if r is not None:
            self._sessions[session] = (r, self._clock() + r.duration_s)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def get(self, session: str) -> Retention | None:
        entry = self._sessions.get(session)
        if entry is None:
            return None
        r, until = entry
        if self._clock() > until:
            del self._sessions[session]
            return None
        return r
