"""Session affinity: a session key keeps a conversation on the worker that holds its KV.

A request may carry a session key (RouteRequest.session_id, RouterGenerateRequest.session_id;
the HTTP front and the endpoint picker fill it from the `x-session-id` header or the OpenAI
`user` field). The router remembers the worker each session last went to for
`AffinityConfig.ttl_s` after its last request. The next request of the session goes to that
worker unless it is gone, no longer routable, outside the request's candidates, or past the
overload thresholds (prompt tokens waiting for prefill, queued requests); then the normal
decision picks a worker and the session moves there.

The decision stays one synchronous Scheduler call: `pin()` only narrows the candidates. With
the Redis event plane the session table is shared by router replicas: the async entry
points call `prefetch()` before deciding (one pipelined round trip per call or stream message)
and `flush()` after (the writes, each with the TTL as a Redis expiry), so any replica sees
where a session went. Without Redis the table is in-process (bounded, least recently used
sessions dropped first). A Redis outage degrades affinity to this replica's own table; it
never fails a request.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from kvrouter.config import AffinityConfig
from kvrouter.events.keys import Keys
from kvrouter.planner import Pool
from kvrouter.protocol import ProtocolError, excerpt
from kvrouter.registry import ModelState

log = logging.getLogger("kvrouter.server.affinity")

KEPT = "kept"  # the session's worker decided
MOVED = "moved"  # the session had a worker, which was overloaded or unavailable
NEW = "new"  # no worker remembered for the session

MAX_SESSION_BYTES = 256
MAX_LOCAL_SESSIONS = 1 << 20  # in-process table bound; least recently used dropped first


def check_session(session: str) -> str:
    """A session key as given, or ProtocolError: 1-256 UTF-8 bytes, no whitespace or control
    characters (it becomes part of a Redis key and of log lines)."""
    n = len(session.encode())
    if not 0 < n <= MAX_SESSION_BYTES:
        raise ProtocolError(f"session_id must be 1-{MAX_SESSION_BYTES} bytes, got {n}")
    # isprintable() is False for control characters and every Unicode separator but the
    # ASCII space, which is refused on its own
    if not session.isprintable() or " " in session:
        raise ProtocolError(f"session_id {excerpt(session)} contains whitespace or control "
                            "characters")
    return session


@dataclass(frozen=True, slots=True)
class Pin:
    """What affinity says about one request, before the decision."""

    outcome: str  # KEPT, MOVED or NEW
    wid: int | None = None  # KEPT: the only candidate
    previous: str = ""  # the worker the session had (MOVED, KEPT)
    reason: str = ""  # MOVED: why
    avoid: int | None = None  # MOVED off an overloaded worker: decide among the others


class SessionTable:
    """(model, session) -> (worker name, expiry on the monotonic clock), LRU bounded."""

    def __init__(self, max_sessions: int = MAX_LOCAL_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self._items: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, model: str, session: str, now: float | None = None) -> str | None:
        key = (model, session)
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= (time.monotonic() if now is None else now):
            del self._items[key]
            return None
        return item[0]

    def put(self, model: str, session: str, worker: str, ttl_s: float,
            now: float | None = None) -> None:
        key = (model, session)
        self._items[key] = (worker, (time.monotonic() if now is None else now) + ttl_s)
        self._items.move_to_end(key)
        while len(self._items) > self.max_sessions:
            self._items.popitem(last=False)

    def drop(self, model: str, session: str) -> None:
        self._items.pop((model, session), None)


class RedisSessions:
    """The shared table: one string key per session (events/keys.py `session`), value the
    worker name, the affinity TTL as its expiry."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def get_many(self, pairs: list[tuple[str, str]]) -> list[str | None]:
        pipe = self.client.pipeline(transaction=False)
        for model, session in pairs:
            pipe.get(self.keys.session(model, session))
        values = await pipe.execute()
        return [v.decode() if isinstance(v, bytes) else v for v in values]

    async def put_many(self, items: list[tuple[str, str, str, float]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for model, session, worker, ttl_s in items:
            pipe.set(self.keys.session(model, session), worker.encode(),
                     px=max(1, int(ttl_s * 1000)))
        await pipe.execute()


class Affinity:
    """Session affinity of one router (see the module doc)."""

    def __init__(self, configs: Mapping[str, AffinityConfig],
                 shared: RedisSessions | None = None) -> None:
        self.configs = dict(configs)
        self.shared = shared
        self.local = SessionTable()
        self._pending: dict[tuple[str, str], tuple[str, float]] = {}
        self.redis_errors = 0

    def enabled(self, model: str) -> bool:
        cfg = self.configs.get(model)
        return cfg is not None and cfg.enabled

    # -- shared table -----------------------------------------------------------------------
    async def prefetch(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Refresh the local entries of these (model, session) pairs from Redis (no-op
        without it): another replica may have moved the session, or it may have expired."""
        if self.shared is None:
            return
        # a session recorded here but not yet written keeps this replica's newer worker
        want = list(dict.fromkeys((m, s) for m, s in pairs
                                  if s and self.enabled(m) and (m, s) not in self._pending))
        if not want:
            return
        try:
            values = await self.shared.get_many(want)
        except (RedisError, OSError) as e:
            self._redis_failed("read", e)
            return
        for (model, session), worker in zip(want, values, strict=True):
            if worker is None:
                self.local.drop(model, session)
            else:
                self.local.put(model, session, worker, self.configs[model].ttl_s)

    async def flush(self) -> None:
        """Write the sessions recorded since the last flush to Redis (no-op without it)."""
        if self.shared is None or not self._pending:
            self._pending.clear()
            return
        items = [(m, s, w, ttl) for (m, s), (w, ttl) in self._pending.items()]
        self._pending.clear()
        try:
            await self.shared.put_many(items)
        except (RedisError, OSError) as e:
            self._redis_failed("write", e)

    def _redis_failed(self, what: str, e: Exception) -> None:
        self.redis_errors += 1
        if self.redis_errors == 1 or self.redis_errors % 1000 == 0:
            log.warning("session affinity: Redis %s failed; using this replica's table",
                        what, extra={"error": str(e), "errors": self.redis_errors})

    # -- the decision ------------------------------------------------------------------------
    def worker_of(self, model: str, session: str) -> str | None:
        """The worker a session is on (from this replica's table), or None."""
        return self.local.get(model, session)

    def overloaded(self, state: ModelState, cfg: AffinityConfig, wid: int) -> str:
        """Why worker `wid` is past the overload thresholds, or ""."""
        load = state.scheduler.load(wid)
        if cfg.overload_prefill_tokens and load.prefill_tokens > cfg.overload_prefill_tokens:
            return (f"{load.prefill_tokens} prompt tokens waiting > overload_prefill_tokens "
                    f"{cfg.overload_prefill_tokens}")
        if cfg.overload_queue and load.queue > cfg.overload_queue:
            return f"{load.queue} queued > overload_queue {cfg.overload_queue}"
        return ""

    def pin(self, state: ModelState, session: str, candidates: Iterable[int] | None = None,
            ) -> Pin | None:
        """Affinity's say on a request of `session` (checked by check_session) among
        `candidates` (worker ids; None: every worker): KEPT with the one worker to route to,
        else MOVED / NEW (the normal decision chooses). None when affinity is off."""
        cfg = self.configs.get(state.name)
        if cfg is None or not cfg.enabled or not session:
            return None
        name = self.local.get(state.name, session)
        if name is None:
            return Pin(NEW)
        info = state.workers.get(name)
        if info is None:
            return Pin(MOVED, previous=name, reason="worker gone")
        if not info.routable:
            return Pin(MOVED, previous=name, reason=f"worker {info.status.value}")
        if candidates is not None and info.wid not in set(candidates):
            return Pin(MOVED, previous=name, reason="not among the request's candidates")
        why = self.overloaded(state, cfg, info.wid)
        if why:
            return Pin(MOVED, previous=name, reason=why, avoid=info.wid)
        return Pin(KEPT, wid=info.wid, previous=name)

    @staticmethod
    def narrow(state: ModelState, pin: Pin | None, candidates: list[int] | None,
               ) -> list[int] | None:
        """The candidates the decision scores given affinity's say: the session's worker
        alone (KEPT); the routable others when it moves off an overloaded worker (unless
        there is none: an overloaded worker still beats no worker); else unchanged."""
        if pin is None:
            return candidates
        if pin.wid is not None:
            return [pin.wid]
        if pin.avoid is None:
            return candidates
        allowed = None if candidates is None else set(candidates)
        others = [w.wid for w in list(state.workers.values())
                  if w.routable and w.wid != pin.avoid and (allowed is None or w.wid in allowed)]
        return others or candidates

    def record(self, model: str, session: str, worker: str) -> None:
        """The session went to `worker`: remember it for the TTL (written to Redis by the
        next flush). Every request refreshes the TTL."""
        cfg = self.configs.get(model)
        if cfg is None or not cfg.enabled or not session:
            return
        self.local.put(model, session, worker, cfg.ttl_s)
        if self.shared is not None:
            self._pending[(model, session)] = (worker, cfg.ttl_s)


def pin_pools(pools: Mapping[str, Pool], wid: int) -> dict[str, Pool]:
    """The pools narrowed to worker `wid` for a pinned Router.Generate plan: the pool that
    holds it, with it as the only aggregated or decode worker (a disaggregated pool keeps its
    prefill workers: the session's KV lives on the decode side). Empty if no pool has it."""
    out: dict[str, Pool] = {}
    for name, p in pools.items():
        if wid in p.aggregated:
            out[name] = Pool(name, aggregated=(wid,))
        elif wid in p.decode:
            out[name] = Pool(name, prefill=p.prefill, decode=(wid,))
    return out


def make_affinity(configs: Mapping[str, AffinityConfig], event_plane: Any) -> Affinity:
    """Affinity for a router: sessions shared through the event plane's Redis (its client
    and key namespace) when it is the Redis plane, else in-process."""
    client = getattr(event_plane, "client", None)
    keys = getattr(event_plane, "keys", None)
    shared = RedisSessions(client, keys) if client is not None and isinstance(keys, Keys) else None
    return Affinity(configs, shared)
