"""Sessions' KV around tool calls: what to do with an idle session's blocks, and doing it.

When a turn ends in a tool call (the engine's finish reason ``tool_calls``, or a client
hint: RouterGenerateRequest.tool_pause_s, the expected pause), the router decides by a
cost comparison (`decide`) whether the session's KV on its worker is

* kept on the GPU (Engine.Offload with target TIER_GPU: pinned for the pause),
* offloaded to the worker's host tier (Engine.Offload, TIER_HOST), or
* dropped (left to the engine's LRU: nothing is called),

and before the session's next turn (its next Router.Generate, or Router.ResumeSession
for a prefetch) it calls Engine.Reload on that worker. Every failure falls back to
re-prefill, which is always correct: an engine without a host tier (UNIMPLEMENTED), a
full host tier (RESOURCE_EXHAUSTED), a dead worker (UNAVAILABLE) or a session the
engine forgot (NOT_FOUND) just leaves the next turn to prefill. The index learns where
the blocks are from the engine's tier-tagged events, never from this module, so no
block is credited to a tier it is not in. Contracts: docs/kv-offload.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import grpc

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.protocol import BACKEND_METADATA_KEY
from kvrouter.registry import ModelState

log = logging.getLogger("kvrouter.server.sessions")

TOOL_FINISH_REASONS = frozenset({"tool_calls", "tool_use", "function_call"})
DEFAULT_TOOL_PAUSE_S = 10.0  # assumed pause after a tool-call finish without a hint
MAX_TOOL_PAUSE_S = 3600.0
MAX_SESSIONS = 100_000
SESSION_TTL_S = 600.0  # a session not seen for this long is forgotten (the engine's TTL too)
# GPU KV use above which an idle session's blocks are taken to be needed by others.
PRESSURE_THRESHOLD = 0.7
ENGINE_CALL_TIMEOUT_S = 5.0
MAX_SESSION_ID_BYTES = 256
# What the router assumes of a worker that does not say otherwise in its registry metadata
# (keys below): the H100 Llama-3-8B-shape calibration of the simulated engine.
DEFAULT_KV_BYTES_PER_TOKEN = 131072
DEFAULT_H2D_GBPS = 54.0
DEFAULT_PREFILL_TOKENS_PER_S = 35000.0  # 8192 tokens in 0.234 s
META_KV_BYTES = "kv_bytes_per_token"
META_H2D_GBPS = "h2d_gbps"
META_PREFILL_TPS = "prefill_tokens_per_s"
META_HOST_TIER = "host_kv"  # "0": the worker has no host tier (never offload there)


class KvAction(StrEnum):
    KEEP = "keep"
    OFFLOAD = "offload"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class PauseCosts:
    """What `decide` weighs, all in seconds of GPU time."""

    keep: float  # GPU KV share the idle session holds x pause, when others need it
    offload: float  # copy out and back at host-to-device bandwidth (inf: no host tier)
    drop: float  # re-prefill of the context


def pause_costs(*, context_tokens: int, pause_s: float, kv_bytes_per_token: int,
                h2d_bytes_per_s: float, prefill_s: float, total_blocks: int,
                used_blocks: int, block_size: int, host_free_blocks: int | None,
                pressure_threshold: float = PRESSURE_THRESHOLD) -> PauseCosts:
    """The three costs of an idle session of `context_tokens` for `pause_s` seconds.

    Keeping costs nothing on a GPU with room to spare; past `pressure_threshold` of its KV
    in use, the session's share of the cache is lost to others for the whole pause (they
    queue or recompute instead). Offloading costs the two copies (None host blocks: no
    host tier, offload impossible). Dropping costs the re-prefill."""
    blocks = -(-context_tokens // block_size)
    total = max(1, total_blocks)
    pressured = used_blocks / total >= pressure_threshold
    keep = pause_s * blocks / total if pressured else 0.0
    copy_s = context_tokens * kv_bytes_per_token / h2d_bytes_per_s if h2d_bytes_per_s > 0 else math.inf
    offload = 2 * copy_s if host_free_blocks is not None and host_free_blocks >= blocks else math.inf
    return PauseCosts(keep=keep, offload=offload, drop=prefill_s)


def decide(c: PauseCosts) -> KvAction:
    """The cheapest action; ties prefer keep, then offload (no work beats some work)."""
    best = min(c.keep, c.offload, c.drop)
    if c.keep <= best:
        return KvAction.KEEP
    if c.offload <= best:
        return KvAction.OFFLOAD
    return KvAction.DROP


@dataclass(slots=True)
class Session:
    """What the router knows of one session's KV (the engine holds the blocks)."""

    session_id: str
    model: str
    worker: str = ""
    address: str = ""
    context_tokens: int = 0
    state: str = "active"  # active | kept | offloaded | dropped
    action_reason: str = ""
    seen: float = field(default_factory=time.monotonic)
    pending: asyncio.Task[None] | None = None  # an Offload in flight


@dataclass(frozen=True, slots=True)
class ResumeResult:
    worker: str
    state: str  # what the session was: kept | offloaded | dropped | active
    action: str  # reloaded | unpinned | reprefill | none
    blocks: int
    detail: str = ""


class UnknownSession(KeyError):
    pass


@dataclass(slots=True)
class Turn:
    """One Router.Generate of a session, watched for how it ends."""

    model: str
    session_id: str
    pause_s: float  # the client's hint; 0: none
    override: KvAction | None = None  # the client's tool_kv_action
    resumed: ResumeResult | None = None
    generated: int = 0
    finish_reason: str = ""
    finished: bool = False  # a final response went out (an error mid-way: no decision)

    def observe(self, resp: engine_pb2.GenerateResponse) -> None:
        self.generated += len(resp.token_ids)
        if resp.finished:
            self.finished = True
            self.finish_reason = resp.finish_reason


def check_pause(pause_s: float, action: str) -> str | None:
    """Why a tool_pause_s / tool_kv_action pair is unacceptable, or None."""
    if not math.isfinite(pause_s) or not 0 <= pause_s <= MAX_TOOL_PAUSE_S:
        return f"tool_pause_s must be 0..{MAX_TOOL_PAUSE_S:g} seconds, got {pause_s}"
    if action and action not in KvAction.__members__.values():
        return (f"tool_kv_action must be empty, keep, offload or drop, got "
                f"{action[:64]!r}")
    return None


def _meta_float(meta: dict[str, str], key: str, default: float) -> float:
    try:
        v = float(meta[key])
    except (KeyError, ValueError):
        return default
    return v if math.isfinite(v) and v > 0 else default


class SessionKvManager:
    """The router's side of sessions' KV: decisions, Offload / Reload calls, resumes."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, timeout_s: float = ENGINE_CALL_TIMEOUT_S,
                 on_count: Callable[[str], None] | None = None) -> None:
        self.ttl_s = ttl_s
        self._on_count = on_count  # e.g. the router's Prometheus counter
        self.timeout_s = timeout_s
        self._sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.counts: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        if self._on_count is not None:
            self._on_count(key)

    def get(self, model: str, session_id: str) -> Session | None:
        self._expire()
        return self._sessions.get((model, session_id))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._sessions:
            key, s = next(iter(self._sessions.items()))
            if now - s.seen <= self.ttl_s and len(self._sessions) <= MAX_SESSIONS:
                break
            del self._sessions[key]
            self._count("expired")

    def _stub(self, address: str) -> engine_pb2_grpc.EngineStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(address)
        return engine_pb2_grpc.EngineStub(ch)

    async def close(self) -> None:
        for s in self._sessions.values():
            if s.pending is not None:
                s.pending.cancel()
        chans, self._channels = self._channels, {}
        for ch in chans.values():
            with contextlib.suppress(Exception):
                await ch.close()

    # -- the service's hooks ------------------------------------------------------------------
    async def begin(self, model: str, session_id: str, pause_s: float, action: str = "",
                    ) -> Turn:
        """A Generate of the session starts: bring its KV back if it was kept or offloaded
        (an unknown session is simply new). Arguments are checked (check_pause) first."""
        turn = Turn(model, session_id, pause_s, KvAction(action) if action else None)
        if self.get(model, session_id) is not None:
            turn.resumed = await self.resume(model, session_id)
        return turn

    def end(self, turn: Turn, state: ModelState, worker: str, prompt_tokens: int) -> Session | None:
        """The Generate finished on `worker`: a turn that ends in a tool call (hint or finish
        reason) gets its KV kept, offloaded or dropped by `decide`; None otherwise."""
        if turn.pause_s <= 0 and turn.finish_reason not in TOOL_FINISH_REASONS:
            return None
        info = state.workers.get(worker)
        if info is None:
            return None
        if (info.metadata.get(BACKEND_METADATA_KEY) or "grpc") != "grpc":
            # an OpenAI-compatible server (vLLM, SGLang) has no Engine.Offload: its LRU keeps
            # or evicts the session's blocks (docs/kv-offload.md, vLLM)
            self._count("no_engine_api")
            return None
        pause = turn.pause_s or DEFAULT_TOOL_PAUSE_S
        context = prompt_tokens + turn.generated
        load = state.scheduler.load(info.wid)
        used = int(load.reported_kv_used_blocks)
        total = used + int(load.reported_kv_free_blocks)
        md = info.metadata
        host = None if md.get(META_HOST_TIER) == "0" else 1 << 62  # unknown: try; it may refuse
        costs = pause_costs(
            context_tokens=context, pause_s=pause,
            kv_bytes_per_token=int(_meta_float(md, META_KV_BYTES, DEFAULT_KV_BYTES_PER_TOKEN)),
            h2d_bytes_per_s=_meta_float(md, META_H2D_GBPS, DEFAULT_H2D_GBPS) * 1e9,
            prefill_s=context / _meta_float(md, META_PREFILL_TPS, DEFAULT_PREFILL_TOKENS_PER_S),
            total_blocks=total, used_blocks=used, block_size=state.block_size,
            host_free_blocks=host)
        action = turn.override or decide(costs)
        reason = (f"{'client override; ' if turn.override else ''}pause {pause:g} s, {context} "
                  f"tokens: keep {costs.keep:.3g} s, offload {costs.offload:.3g} s, drop "
                  f"{costs.drop:.3g} s")
        return self.turn_ended(turn.model, turn.session_id, worker, info.address, context,
                               action, reason)

    # -- turn end -------------------------------------------------------------------------
    def turn_ended(self, model: str, session_id: str, worker: str, address: str,
                   context_tokens: int, action: KvAction, reason: str) -> Session:
        """Record where the session's KV is and start the action (Offload in the
        background: the client's reply does not wait for the copy)."""
        self._expire()
        key = (model, session_id)
        s = self._sessions.pop(key, None) or Session(session_id, model)
        self._sessions[key] = s
        s.worker, s.address, s.context_tokens = worker, address, context_tokens
        s.seen, s.action_reason = time.monotonic(), reason
        self._count(f"decided_{action.value}")
        if action is KvAction.DROP or not address:
            s.state = "dropped"
            return s
        s.state = "kept" if action is KvAction.KEEP else "offloaded"
        s.pending = asyncio.create_task(self._offload(s, action))
        return s

    async def _offload(self, s: Session, action: KvAction) -> None:
        tier = common_pb2.TIER_GPU if action is KvAction.KEEP else common_pb2.TIER_HOST
        try:
            resp = await self._stub(s.address).Offload(
                engine_pb2.OffloadRequest(session_id=s.session_id, target=tier),
                timeout=self.timeout_s)
            # an engine that set retention at submission (TensorRT-LLM) says where it is
            s.state = "kept" if resp.tier == common_pb2.TIER_GPU else "offloaded"
            self._count(f"{action.value}_ok")
        except grpc.aio.AioRpcError as e:
            # no host tier, host full, worker gone, session unknown there: the next turn
            # prefills (the documented fallback); the index is untouched (no events)
            s.state = "dropped"
            s.action_reason = f"{action.value} failed: {e.code().name}: {e.details()}"
            self._count(f"{action.value}_failed_{e.code().name.lower()}")
            log.info("session offload failed", extra={"session": s.session_id,
                                                      "worker": s.worker, "error": s.action_reason})

    # -- next turn ------------------------------------------------------------------------
    async def resume(self, model: str, session_id: str) -> ResumeResult:
        """Bring the session's KV back before its next turn; UnknownSession if the router
        does not know it (never seen, or expired). Never raises for engine failures: the
        fallback is re-prefill, reported in the result."""
        s = self.get(model, session_id)
        if s is None:
            raise UnknownSession(f"unknown session {session_id!r} for model {model!r} "
                                 f"(never seen, or idle for more than {self.ttl_s:g} s)")
        s.seen = time.monotonic()
        self._sessions.move_to_end((model, session_id))
        if s.pending is not None:
            with contextlib.suppress(Exception):
                await s.pending
            s.pending = None
        state = s.state
        if state not in ("kept", "offloaded"):
            s.state = "active"
            return ResumeResult(s.worker, state, "reprefill" if state == "dropped" else "none",
                                0, s.action_reason)
        s.state = "active"
        try:
            resp = await self._stub(s.address).Reload(
                engine_pb2.ReloadRequest(session_id=session_id), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            self._count(f"reload_failed_{e.code().name.lower()}")
            return ResumeResult(s.worker, state, "reprefill", 0,
                                f"reload failed: {e.code().name}: {e.details()}")
        self._count("reloaded" if state == "offloaded" else "unpinned")
        return ResumeResult(s.worker, state, "reloaded" if state == "offloaded" else "unpinned",
                            int(resp.blocks))

    def forget_worker(self, worker: str) -> None:
        for s in self._sessions.values():
            if s.worker == worker and s.state in ("kept", "offloaded"):
                s.state, s.action_reason = "dropped", f"worker {worker!r} left"
