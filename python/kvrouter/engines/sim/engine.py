"""Step-based core of the simulated engine, in simulated time. Pure: no I/O, no clock.

The engine works like a continuous-batching server (vLLM v1 style):

* every step first gives each running decode one token, then spends the rest of
  the ``max_num_batched_tokens`` budget on prefill chunks: requests already
  prefilling first, then waiting requests in arrival order (chunked prefill);
* a waiting request is admitted when its whole prompt fits in the KV cache
  (reused prefix blocks plus new ones, evicting unreferenced blocks LRU) and
  fewer than ``max_num_seqs`` requests run;
* when a decode needs a block and none is left, the most recently admitted
  request is preempted (its blocks released; it recomputes later);
* a step's duration comes from the profile's cost model.

Driving it: ``submit(request, now)`` then ``run_until(t)``, which completes every
step that ends by ``t`` and leaves the step in progress at ``t`` pending (its
composition is fixed, so requests submitted at ``t`` join the next step).
``next_wakeup()`` says when something observable happens next (a prefill step
ends, the first decode finishes, an import completes). Outputs are drained:
``drain_updates()`` (first token / finished / preempted / rejected, with times),
``drain_kv_events()`` (``BlockStored`` / ``BlockRemoved`` in the order they
happened) and ``load_report()``. A wall-clock server maps simulated time to wall
time and calls the same methods; ``SimRequest.record_tokens`` keeps every token's
timestamp for streaming.

Pure-decode stretches (no prefill in progress, nothing admissible waiting) are
advanced many steps at once: the batch does not change until its first request
finishes, so the step time is computed once for the stretch.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from kvrouter.counters import Counters
from kvrouter.engines.sim.kvcache import PagedKvCache
from kvrouter.engines.sim.profile import EngineProfile
from kvrouter.events.model import KvEvent, LoadReport

log = logging.getLogger(__name__)

INF = math.inf
# Layers a layer-wise host reload is pipelined over (Llama-3-8B has 32): after the copy ends,
# only the last layer's compute is left (SimRequest.load_until).
LAYERWISE_LOAD_LAYERS = 32


class RequestMode(StrEnum):
    BOTH = "both"
    CONTEXT_ONLY = "context_only"  # prefill only; the KV stays cached for a decode worker
    GENERATION_ONLY = "generation_only"  # KV imported over a link, then decode


class Phase(StrEnum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass(eq=False, slots=True)
class SimRequest:
    request_id: str
    hashes: Sequence[int]  # router sequence hashes of the prompt's full blocks
    prompt_tokens: int
    max_tokens: int
    arrival: float = 0.0
    mode: RequestMode = RequestMode.BOTH
    record_tokens: bool = False
    # A parallel sample (n > 1) of `fork_of`'s prompt: admitted once that request's prompt KV
    # is computed, so n samples share one prefill (vLLM / TensorRT-LLM fork the sequence).
    fork_of: SimRequest | None = None
    # Its cached prefix is still being copied host -> GPU until this time (an Engine.Reload
    # that overlaps the new tokens' prefill layer by layer, as vLLM's KV connectors
    # (wait_for_layer_load) and LMCache do): a step that prefills it ends no earlier than
    # the copy plus the last layer's share of that step's compute.
    load_until: float = 0.0
    # state, owned by the engine
    phase: Phase = Phase.WAITING
    ready_at: float = 0.0
    admitted_at: float | None = None
    hit_blocks: int = -1  # prompt blocks reused at first admission (-1: not admitted yet)
    computed: int = 0  # context tokens whose KV exists (cached + computed)
    target: int = 0  # context tokens to prefill before decoding
    generated: int = 0
    n_ref: int = 0  # leading hashes referenced in the cache
    anon: int = 0  # anonymous blocks held
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    token_times: list[float] = field(default_factory=list)

    @property
    def held_blocks(self) -> int:
        return self.n_ref + self.anon


@dataclass(frozen=True, slots=True)
class RequestUpdate:
    kind: str  # "first_token" | "finished" | "preempted" | "rejected"
    time: float
    request: SimRequest


@dataclass
class EngineConfig:
    block_size: int = 64
    num_blocks: int | None = None  # None: from kv_capacity_tokens or the profile
    kv_capacity_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    link_bytes_per_s: float = 50e9  # KV import for generation-only requests
    record_steps: bool = False  # keep a StepRecord per step (tests, debugging)

    def resolve_blocks(self, profile: EngineProfile) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        tokens = self.kv_capacity_tokens
        if tokens is None:
            tokens = profile.kv_capacity_tokens(self.gpu_memory_utilization)
        return tokens // self.block_size


@dataclass(slots=True)
class _Step:
    start: float
    end: float
    decodes: list[SimRequest]
    chunks: list[tuple[SimRequest, int]]
    load_wait: float = 0.0  # what the step waited for host copies beyond its compute


@dataclass(frozen=True, slots=True)
class StepRecord:
    start: float
    end: float
    prefill_tokens: int
    decodes: int
    steps: int = 1  # > 1 for a pure-decode stretch (same batch, same duration each)


@dataclass
class EngineStats(Counters):
    """The core's tallies; itl and step_log are samples (lists), added by concatenation."""

    steps: int = 0
    busy_s: float = 0.0
    prefill_tokens: int = 0  # computed, excluding reused
    reused_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    rejected: int = 0
    finished: int = 0
    cancelled: int = 0
    # steps that ended late for a host reload still landing (SimRequest.load_until), and by
    # how much in all: the part of the copies that the prefill did not hide
    load_waits: int = 0
    load_wait_s: float = 0.0
    # inter-token latency samples: (step duration, tokens produced with that gap)
    itl: list[tuple[float, int]] = field(default_factory=list)
    step_log: list[StepRecord] = field(default_factory=list)


class SimEngine:
    def __init__(self, profile: EngineProfile, config: EngineConfig | None = None,
                 name: str = "sim") -> None:
        self.profile = profile
        self.config = config or EngineConfig()
        if self.config.max_num_batched_tokens <= 0 or self.config.max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be > 0")
        self.name = name
        self.block_size = self.config.block_size
        self.cache = PagedKvCache(self.config.resolve_blocks(profile), self.block_size)
        self.clock = 0.0
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []  # admission order
        self._pending: _Step | None = None
        self._updates: list[RequestUpdate] = []
        self.stats = EngineStats()

    # -- API ----------------------------------------------------------------------
    def submit(self, req: SimRequest, now: float) -> None:
        """Queue a request arriving at `now`; the engine first advances to `now`."""
        if req.phase is not Phase.WAITING or req.admitted_at is not None:
            raise ValueError(f"request {req.request_id} was already submitted")
        if req.prompt_tokens <= 0 or req.max_tokens <= 0:
            raise ValueError(f"request {req.request_id}: prompt and max_tokens must be > 0")
        if len(req.hashes) > req.prompt_tokens // self.block_size:
            raise ValueError(f"request {req.request_id}: more block hashes than full blocks")
        self.run_until(now, inclusive=False)
        if self._idle():
            self.clock = max(self.clock, now)
        elif self._pending is None and self.running and self.clock < now:
            # a decode step was running (unplanned) when this request arrived: fix its
            # composition first so the request joins the step after it
            self._pending = self._plan(self.clock)
        req.arrival = now
        req.target = req.prompt_tokens
        if req.mode is RequestMode.GENERATION_ONLY:
            # Only the part of the prompt this engine does not hold already crosses the link
            # (a prefix evicted before admission is imported at no extra cost: a small error).
            held = min(self._match(req) * self.block_size, req.prompt_tokens)
            req.ready_at = now + self.profile.transfer_time(req.prompt_tokens - held,
                                                            self.config.link_bytes_per_s)
        if self._blocks_for(req.target + 1) > self.cache.num_blocks:
            req.phase = Phase.DONE
            req.finish_time = now
            self.stats.rejected += 1
            self._updates.append(RequestUpdate("rejected", now, req))
            return
        self.waiting.append(req)

    def cancel(self, req: SimRequest, now: float) -> bool:
        """Abort a submitted request at `now` (its caller went away, or the router stopped
        the sample): its blocks are freed at once. False if it had already ended."""
        if req.phase is Phase.DONE or (req.admitted_at is None and req not in self.waiting):
            return False
        self.run_until(now, inclusive=False)
        if req.phase is Phase.DONE:
            return False
        if req in self.running:
            self.running.remove(req)
            self._free(req)
        else:
            self.waiting.remove(req)
        req.phase = Phase.DONE
        req.finish_time = now
        self.stats.cancelled += 1
        return True

    def run_until(self, t: float, inclusive: bool = True) -> None:
        """Complete every step that ends by `t` and leave the step in progress at `t` pending.

        With ``inclusive=False`` a step that would start exactly at `t` is not planned
        yet, so requests submitted at `t` still join it (call this before submit)."""
        while True:
            p = self._pending
            if p is not None:
                if p.end > t:
                    return
                self._pending = None
                self._complete(p)
                continue
            if not self.running and not self.waiting:
                return
            if self.clock > t or (self.clock == t and not inclusive):
                return
            if not self.running and not self._admissible_now():
                # only imports in flight: sleep until the first lands
                wake = min(r.ready_at for r in self.waiting if not self._fork_waits(r))
                if wake > t:
                    return
                self.clock = max(self.clock, wake)
                continue
            if self._pure_decode():
                if self._stretch(t):
                    continue
                if self.clock + self._decode_dt() > t:
                    # Leave the decode step unplanned: nothing observable happens before
                    # next_wakeup(), and submit() fixes it if a request arrives meanwhile.
                    return
            step = self._plan(self.clock)
            if step is None:  # pragma: no cover - defensive; _plan only fails when idle
                return
            self._pending = step

    def next_wakeup(self) -> float:
        """Simulated time of the next observable change (INF when idle)."""
        p = self._pending
        if p is not None:
            return p.end
        if not self.running and not self.waiting:
            return INF
        if not self.running and not self._admissible_now():
            return max(self.clock, min(r.ready_at for r in self.waiting
                                       if not self._fork_waits(r)))
        if self._pure_decode():
            dt = self._decode_dt()
            k = min(r.max_tokens - r.generated for r in self.running)
            return self.clock + k * dt
        return self.clock  # a step must be planned now

    def drain_updates(self) -> list[RequestUpdate]:
        out, self._updates = self._updates, []
        return out

    def drain_kv_events(self) -> list[KvEvent]:
        return self.cache.drain_events()

    def load_report(self) -> LoadReport:
        queued_tokens = sum(r.target - r.computed for r in self.waiting)
        queued_tokens += sum(r.target - r.computed for r in self.running
                             if r.phase is Phase.PREFILL)
        return LoadReport(running=len(self.running), queued=len(self.waiting),
                          kv_used_blocks=self.cache.used_blocks,
                          kv_free_blocks=self.cache.available_blocks,
                          queued_prefill_tokens=queued_tokens,
                          kv_capacity_blocks=self.cache.num_blocks,
                          kv_cached_blocks=self.cache.evictable_blocks)

    @property
    def busy(self) -> bool:
        return not self._idle()

    # -- internals ----------------------------------------------------------------
    def _idle(self) -> bool:
        return self._pending is None and not self.running and not self.waiting

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _admissible_now(self) -> bool:
        return any(self._ready(r, self.clock) for r in self.waiting)

    @staticmethod
    def _fork_waits(r: SimRequest) -> bool:
        """A parallel sample whose parent's prompt KV is not computed yet."""
        p = r.fork_of
        return p is not None and p.phase in (Phase.WAITING, Phase.PREFILL)

    def _ready(self, r: SimRequest, now: float) -> bool:
        return r.ready_at <= now and not self._fork_waits(r)

    def _pure_decode(self) -> bool:
        if not self.running:
            return False
        for r in self.running:
            if r.phase is not Phase.DECODE:
                return False
        if self.waiting:
            # a waiting request that could be admitted ends the stretch
            if len(self.running) < self.config.max_num_seqs:
                for r in self.waiting:
                    if self._ready(r, self.clock):
                        return not self._fits(r)
                # imports landing later: stop the stretch when the first lands
                return False
        return True

    def _decode_dt(self) -> float:
        n = len(self.running)
        ctx = sum(r.prompt_tokens + r.generated for r in self.running) / n
        return self.profile.decode_time(n, ctx)

    def _fits(self, r: SimRequest) -> bool:
        m = self._match(r)
        need = self._blocks_for(r.target + 1) - m
        # matched blocks that are unreferenced stop being evictable once acquired
        lru_hit = sum(1 for h in r.hashes[:m] if self.cache.ref_count(h) == 0)
        return need <= self.cache.available_blocks - lru_hit

    def _match(self, r: SimRequest) -> int:
        if not self.config.enable_prefix_caching:
            return 0
        m = self.cache.match_prefix(r.hashes)
        if r.mode is not RequestMode.GENERATION_ONLY:
            # at least one token is computed to produce logits
            m = min(m, (r.target - 1) // self.block_size)
        return m

    def _stretch(self, t: float) -> bool:
        """Advance a pure-decode batch by every whole step that ends by t (>= 1), or False."""
        if not self._pure_decode():
            return False
        running = self.running
        dt = self._decode_dt()
        k = min(r.max_tokens - r.generated for r in running)
        if t != INF:
            # whole steps ending by t (the tolerance absorbs float error of clock + k*dt)
            k = min(k, int((t - self.clock) / dt + 1e-9))
        if k < 2:
            return False  # a single step goes through the normal path
        bs = self.block_size
        need = 0
        for r in running:
            need += max(0, -(-(r.prompt_tokens + r.generated + k + 1) // bs) - r.held_blocks)
        if need > self.cache.available_blocks:
            return False  # memory runs out inside the stretch: step by step, with preemption
        if need:
            self.cache.allocate(need)
        start = self.clock
        end = start + k * dt
        finished: list[SimRequest] = []
        for r in running:
            r.anon += max(0, -(-(r.prompt_tokens + r.generated + k + 1) // bs) - r.held_blocks)
            if r.record_tokens:
                r.token_times.extend(start + (j + 1) * dt for j in range(k))
            if r.first_token_time is None:  # generation-only: first decode step
                r.first_token_time = start + dt
                self._updates.append(RequestUpdate("first_token", start + dt, r))
            r.generated += k
            if r.generated >= r.max_tokens:
                finished.append(r)
        st = self.stats
        st.steps += k
        st.busy_s += k * dt
        st.decode_tokens += k * len(running)
        st.itl.append((dt, k * len(running)))
        if self.config.record_steps:
            st.step_log.append(StepRecord(start, end, 0, len(running), k))
        self.clock = end
        for r in finished:
            self._finish(r, end)
        return True

    def _preempt_last(self, now: float) -> SimRequest:
        victim = self.running.pop()
        self._free(victim)
        victim.phase = Phase.WAITING
        victim.computed = 0
        victim.target = victim.prompt_tokens + victim.generated
        victim.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(victim)
        self._updates.append(RequestUpdate("preempted", now, victim))
        return victim

    def _free(self, r: SimRequest) -> None:
        if r.n_ref:
            self.cache.release(r.hashes[: r.n_ref])
        if r.anon:
            self.cache.free_anonymous(r.anon)
        r.n_ref = 0
        r.anon = 0

    def _plan(self, now: float) -> _Step | None:
        budget = self.config.max_num_batched_tokens
        bs = self.block_size
        decodes: list[SimRequest] = []
        chunks: list[tuple[SimRequest, int]] = []
        # 1. running decodes, one token each; a missing block preempts from the tail
        i = 0
        while i < len(self.running):
            r = self.running[i]
            if r.phase is Phase.DECODE:
                if budget <= 0:
                    break
                if r.prompt_tokens + r.generated + 1 > r.held_blocks * bs:
                    while self.cache.available_blocks < 1 and self.running[-1] is not r:
                        self._preempt_last(now)
                    if self.cache.available_blocks < 1:
                        self._preempt_last(now)  # r itself
                        continue
                    self.cache.allocate(1)
                    r.anon += 1
                decodes.append(r)
                budget -= 1
            i += 1
        # 2. requests part-way through prefill
        for r in self.running:
            if budget <= 0:
                break
            if r.phase is Phase.PREFILL:
                c = min(r.target - r.computed, budget)
                chunks.append((r, c))
                budget -= c
        # 3. admit waiting requests in order while the budget and the cache allow
        skipped: list[SimRequest] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            r = self.waiting[0]
            if not self._ready(r, now):
                skipped.append(self.waiting.popleft())  # import or parent's prefill in flight
                continue
            if not self._fits(r):
                break
            self.waiting.popleft()
            self._admit(r, now)
            if r.phase is Phase.DECODE:  # imported KV: decodes right away
                decodes.append(r)
                budget -= 1
                continue
            c = min(r.target - r.computed, budget)
            chunks.append((r, c))
            budget -= c
        for r in reversed(skipped):
            self.waiting.appendleft(r)
        if not decodes and not chunks:
            return None
        n_pf = 0
        pairs = 0.0
        for r, c in chunks:
            n_pf += c
            pairs += c * r.computed
        ctx = (sum(r.prompt_tokens + r.generated for r in decodes) / len(decodes)) if decodes else 0.0
        dt = self.profile.step_time(n_pf, pairs, len(decodes), ctx)
        end = now + dt
        for r, _c in chunks:
            if r.load_until > now:  # layer i computes while layer i+1's KV is copied
                end = max(end, r.load_until + dt / LAYERWISE_LOAD_LAYERS)
        return _Step(start=now, end=end, decodes=decodes, chunks=chunks,
                     load_wait=end - (now + dt))

    def _admit(self, r: SimRequest, now: float) -> None:
        m = self._match(r)
        need = self._blocks_for(r.target + 1) - m
        self.cache.acquire(r.hashes[:m])
        self.cache.allocate(need)
        r.n_ref = m
        r.anon = need
        r.computed = m * self.block_size
        if r.hit_blocks < 0:
            r.hit_blocks = m
            r.admitted_at = now
            self.stats.reused_tokens += r.computed
        self.running.append(r)
        if r.mode is RequestMode.GENERATION_ONLY and r.computed < r.target:
            # the imported KV lands in our blocks: cache the full ones, then decode
            self._commit_full(r, r.target)
            r.computed = r.target
        r.phase = Phase.DECODE if r.computed >= r.target else Phase.PREFILL

    def _commit_full(self, r: SimRequest, computed: int) -> None:
        full = min(computed // self.block_size, len(r.hashes))
        if full > r.n_ref:
            parent = r.hashes[r.n_ref - 1] if r.n_ref else None
            self.cache.commit(r.hashes[r.n_ref:full], parent)
            r.anon -= full - r.n_ref
            r.n_ref = full

    def _complete(self, step: _Step) -> None:
        end = step.end
        dt = end - step.start
        st = self.stats
        st.steps += 1
        st.busy_s += dt
        if step.load_wait > 0:
            st.load_waits += 1
            st.load_wait_s += step.load_wait
        finished: list[SimRequest] = []
        for r in step.decodes:
            if r.phase is not Phase.DECODE:  # preempted after planning (cannot happen today)
                continue
            r.generated += 1
            if r.record_tokens:
                r.token_times.append(end)
            if r.first_token_time is None:  # generation-only: first decode step
                r.first_token_time = end
                self._updates.append(RequestUpdate("first_token", end, r))
            if r.generated >= r.max_tokens:
                finished.append(r)
        if step.decodes:
            st.decode_tokens += len(step.decodes)
            st.itl.append((dt, len(step.decodes)))
        if self.config.record_steps:
            st.step_log.append(StepRecord(step.start, end, sum(c for _, c in step.chunks),
                                          len(step.decodes)))
        for r, c in step.chunks:
            if r.phase is Phase.DONE:  # cancelled after planning
                continue
            r.computed += c
            st.prefill_tokens += c
            if self.config.enable_prefix_caching:
                self._commit_full(r, r.computed)
            if r.computed >= r.target:
                r.phase = Phase.DECODE
                r.generated += 1
                if r.record_tokens:
                    r.token_times.append(end)
                if r.first_token_time is None:
                    r.first_token_time = end
                    self._updates.append(RequestUpdate("first_token", end, r))
                if r.generated >= r.max_tokens or r.mode is RequestMode.CONTEXT_ONLY:
                    finished.append(r)
        self.clock = end
        for r in finished:
            self._finish(r, end)

    def _finish(self, r: SimRequest, now: float) -> None:
        self.running.remove(r)
        self._free(r)
        r.phase = Phase.DONE
        r.finish_time = now
        self.stats.finished += 1
        self._updates.append(RequestUpdate("finished", now, r))
