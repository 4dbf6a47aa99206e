"""Sessions' KV around tool calls in the simulated engine: keep (pin on GPU), offload to a
host tier, reload. Pure: no I/O, no clock (callers pass simulated time), like the core.

A session is the chain of full prompt blocks of its last request (`note`). While the
session waits for a tool, the router asks the engine (Engine.Offload) to either

* keep it on the GPU (target TIER_GPU): its cached blocks are pinned (referenced), so LRU
  eviction cannot take them, until Reload, the session's next request or the TTL;
* offload it (TIER_HOST): the chain's GPU blocks are copied to host memory (a capacity of
  its own, in blocks; refused whole when it does not fit: `HostFull`), then the chain's
  unreferenced tail is freed on the GPU for others (`PagedKvCache.discard`);

and before the next turn Engine.Reload copies the host blocks that are no longer on the
GPU back into the GPU prefix cache (as many as fit; the rest will be prefilled) and
frees the host copy. Copies take bytes over the calibrated host-to-device bandwidth
(`EngineProfile.h2d_bytes_per_s`, 54 GB/s on the H100 calibration), one after the other
on the host link. A reload does not wait for its copy: the blocks are in the GPU prefix
cache at once but still landing until the copy ends (`loading_until`), and a request
that reuses them gets that time as its `SimRequest.load_until`, so its prefill overlaps
the copy layer by layer (the live worker's Generate and bench/agentic both take it from
here: one code path).

Every move is announced with tier-tagged events in the cache's own event list, so one
ordered stream reaches the router: BlockStored(tier=HOST) when a block lands on host,
BlockRemoved(tier=GPU) when its GPU copy is freed, BlockStored(tier=GPU) when it comes
back and BlockRemoved(tier=HOST) when the host copy goes. A block shared by several
sessions is stored on host once (reference counted) and removed with its last user.

Sessions not touched for `ttl_s` (simulated seconds) expire: pins are released and host
copies freed, so a router that vanished leaks nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvrouter.engines.sim.kvcache import PagedKvCache
from kvrouter.events.model import BlockRemoved, BlockStored, Tier

DEFAULT_TTL_S = 600.0
MAX_SESSIONS = 4096  # remembered session chains (oldest forgotten first)


class HostFull(RuntimeError):
    """The host tier cannot take the session's blocks; nothing was changed."""


class UnknownSession(KeyError):
    """No such session here (never seen, expired, or not offloaded / kept)."""


@dataclass(frozen=True, slots=True)
class Moved:
    """Result of an offload, keep or reload."""

    blocks: int  # blocks copied (offload / reload) or pinned (keep)
    freed: int = 0  # GPU blocks freed (offload)
    seconds: float = 0.0  # copy time at the host link's bandwidth
    tier: Tier = Tier.HOST
    until: float = 0.0  # reload: simulated time its copy ends (it queues behind earlier ones)


@dataclass(slots=True)
class _Session:
    chain: tuple[int, ...]  # full prompt blocks of the last request, router hashes
    touched: float
    state: str = "gpu"  # gpu | kept | host
    pinned: tuple[int, ...] = ()
    hosted: tuple[int, ...] = ()


class SessionKv:
    """Keep / offload / reload of sessions' KV on one engine's paged cache."""

    def __init__(self, cache: PagedKvCache, *, host_blocks: int, bytes_per_block: int,
                 h2d_bytes_per_s: float, ttl_s: float = DEFAULT_TTL_S) -> None:
        if host_blocks < 0:
            raise ValueError(f"host_blocks must be >= 0, got {host_blocks}")
        if bytes_per_block <= 0 or not h2d_bytes_per_s > 0 or not ttl_s > 0:
            raise ValueError("bytes_per_block, h2d_bytes_per_s and ttl_s must be > 0")
        self.cache = cache
        self.host_capacity = host_blocks
        self.bytes_per_block = bytes_per_block
        self.h2d_bytes_per_s = h2d_bytes_per_s
        self.ttl_s = ttl_s
        self._host: dict[int, int] = {}  # block on host -> sessions holding it
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        # blocks reloaded whose host -> GPU copy is still running: block -> copy end
        self._landing: dict[int, float] = {}
        self._link_free = 0.0  # simulated time the host link finishes its queued copies
        self.offloads = 0
        self.reloads = 0
        self.expired = 0

    # -- views ------------------------------------------------------------------------
    @property
    def host_used(self) -> int:
        return len(self._host)

    @property
    def host_free(self) -> int:
        return self.host_capacity - len(self._host)

    def on_host(self, block: int) -> bool:
        return block in self._host

    def host_hashes(self) -> set[int]:
        return set(self._host)

    def state(self, session: str) -> str:
        """gpu | kept | host, or '' for an unknown session."""
        s = self._sessions.get(session)
        return s.state if s is not None else ""

    def copy_seconds(self, blocks: int) -> float:
        return blocks * self.bytes_per_block / self.h2d_bytes_per_s

    def loading_until(self, hashes: Sequence[int], now: float) -> float:
        """When the last of these blocks still being copied in lands (0.0: none is): what a
        request reusing them sets as its SimRequest.load_until."""
        if not self._landing:
            return 0.0
        until = max((self._landing.get(h, 0.0) for h in hashes), default=0.0)
        return until if until > now else 0.0

    # -- requests -----------------------------------------------------------------------
    def note(self, session: str, chain: Sequence[int], now: float) -> None:
        """A request of the session arrived: its chain replaces the old one and the pause
        ends (a pin is released: the request references what it reuses once admitted)."""
        self.expire(now)
        s = self._sessions.pop(session, None)
        if s is not None:
            self._end(s)
        self._sessions[session] = _Session(tuple(chain), now)
        while len(self._sessions) > MAX_SESSIONS:
            _, old = self._sessions.popitem(last=False)
            self._end(old)

    def keep(self, session: str, now: float) -> Moved:
        """Pin the session's cached prefix on the GPU for the pause."""
        s = self._get(session, now)
        self._end(s)
        m = self.cache.match_prefix(s.chain)
        s.pinned = s.chain[:m]
        self.cache.acquire(s.pinned)
        s.state, s.touched = "kept", now
        return Moved(blocks=m, tier=Tier.GPU)

    def offload(self, session: str, now: float) -> Moved:
        """Copy the session's cached prefix to host and free its GPU tail. HostFull (and
        nothing changed) when the new host blocks do not fit."""
        s = self._get(session, now)
        if s.state == "host":
            return Moved(blocks=0, tier=Tier.HOST)  # already there: idempotent
        m = self.cache.match_prefix(s.chain)
        chain = s.chain[:m]
        new = [h for h in chain if h not in self._host]
        if len(new) > self.host_free:
            raise HostFull(f"host KV tier full: the session needs {len(new)} blocks, "
                           f"{self.host_free} of {self.host_capacity} free")
        self._end(s)
        events = self.cache.events
        prev: int | None = None
        run: list[int] = []
        run_parent: int | None = None
        for h in chain:
            c = self._host.get(h, 0)
            self._host[h] = c + 1
            if c == 0:
                if not run:
                    run_parent = prev
                run.append(h)
            elif run:
                events.append(BlockStored(hashes=tuple(run), parent=run_parent,
                                          router_hashes=tuple(run), tier=Tier.HOST))
                run = []
            prev = h
        if run:
            events.append(BlockStored(hashes=tuple(run), parent=run_parent,
                                      router_hashes=tuple(run), tier=Tier.HOST))
        freed = self.cache.discard(chain)
        s.hosted, s.state, s.touched = chain, "host", now
        self.offloads += 1
        return Moved(blocks=len(new), freed=len(freed), seconds=self.copy_seconds(len(new)))

    def reload(self, session: str, now: float) -> Moved:
        """Bring an offloaded session back (as much as fits), or end a keep's pin.
        UnknownSession when the session is neither offloaded nor kept."""
        s = self._get(session, now)
        if s.state == "kept":
            self._end(s)
            s.touched = now
            return Moved(blocks=0, tier=Tier.GPU)
        if s.state != "host":
            raise UnknownSession(f"session {session!r} is not offloaded or kept here")
        chain = s.hosted
        cache = self.cache
        m = cache.match_prefix(chain)
        missing = chain[m:]
        fit = min(len(missing), cache.available_blocks)
        back = missing[:fit]
        seconds = self.copy_seconds(len(back))
        until = 0.0
        if back:
            # blocks land unreferenced at the recent end of the LRU, like a finished request's
            cache.allocate(len(back))
            cache.commit(back, chain[m - 1] if m else None)
            cache.release(back)
            # the copy queues behind the link's earlier ones; until it ends the blocks are
            # landing (a request reusing them waits for them layer by layer)
            self._landing = {h: t for h, t in self._landing.items() if t > now}
            until = self._link_free = max(now, self._link_free) + seconds
            for h in back:
                self._landing[h] = until
        self._end(s)
        s.touched = now
        self.reloads += 1
        return Moved(blocks=len(back), seconds=seconds, tier=Tier.GPU, until=until)

    def forget(self, session: str) -> None:
        s = self._sessions.pop(session, None)
        if s is not None:
            self._end(s)

    def expire(self, now: float) -> int:
        """End sessions idle longer than the TTL (oldest first); how many ended."""
        n = 0
        while self._sessions:
            key, s = next(iter(self._sessions.items()))
            if now - s.touched <= self.ttl_s:
                break
            del self._sessions[key]
            self._end(s)
            n += 1
        self.expired += n
        return n

    # -- internals ----------------------------------------------------------------------
    def _get(self, session: str, now: float) -> _Session:
        self.expire(now)
        s = self._sessions.get(session)
        if s is None:
            raise UnknownSession(f"unknown session {session!r} (never seen here, or expired "
                                 f"after {self.ttl_s:g} s)")
        self._sessions.move_to_end(session)
        return s

    def _end(self, s: _Session) -> None:
        """Release what the session holds: its pin, its host copy."""
        if s.pinned:
            self.cache.release(s.pinned)
            s.pinned = ()
        if s.hosted:
            gone = []
            for h in s.hosted:
                c = self._host[h] - 1
                if c:
                    self._host[h] = c
                else:
                    del self._host[h]
                    gone.append(h)
            if gone:
                self.cache.events.append(BlockRemoved(hashes=tuple(gone), tier=Tier.HOST))
            s.hosted = ()
        s.state = "gpu"
