"""Discrete-event fleet simulator: simulated engines behind the router's real index and scheduler.

One process, simulated time, deterministic under a seed. The router side is
the service's own code, not a model of it: a ``kvrouter._core.PrefixIndex``
fed with the engines' ``BlockStored`` / ``BlockRemoved`` events, and a
``kvrouter._core.Scheduler`` that routes each arrival (``route_hashes``, which
reserves the request's load) and is told when its prefill is done and when it
finishes (``mark_prefill_done`` / ``release``), with ``now`` = simulated time.
Engines optionally send load reports too.

The event loop is a heap of engine wake-ups (when each engine next does
something observable: a step with prefill ends, a decode batch's first request
finishes, an import lands) merged with the arrival stream. Arrivals are handled
before engine wake-ups at the same instant, so requests arriving together batch
together. Pure-decode stretches are advanced in one go inside the engine.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvrouter._core import DEFAULT_WEIGHTS, POLICIES
from kvrouter.counters import ApplyTotals
from kvrouter.engines.sim.engine import EngineConfig, RequestUpdate, SimEngine, SimRequest
from kvrouter.engines.sim.profile import EngineProfile
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent
from kvrouter.fleet.report import FleetReport, RequestRecord, WorkerRecord, build_report
from kvrouter.fleet.traces import Trace, trace_hashes

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class FleetRequest:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hashes: Sequence[int]


def prepare(trace: Trace, block_size: int, speedup: float = 1.0,
            hashes: Sequence[Sequence[int]] | None = None) -> list[FleetRequest]:
    """Requests of a trace with router hashes, arrivals compressed by `speedup`.
    Pass precomputed `hashes` (``trace_hashes(trace, block_size)``) to reuse them."""
    if speedup <= 0:
        raise ValueError("speedup must be > 0")
    hs = hashes if hashes is not None else trace_hashes(trace, block_size)
    if len(hs) != len(trace.requests):
        raise ValueError("hashes do not match the trace")
    t0 = trace.requests[0].arrival_s if trace.requests else 0.0
    return [FleetRequest(request_id=f"r{i}", arrival_s=(r.arrival_s - t0) / speedup,
                         prompt_tokens=r.input_length, output_tokens=r.output_length,
                         hashes=hs[i])
            for i, r in enumerate(trace.requests)]


class ArrivalGate(Protocol):
    """Admission in front of the scheduler (bench/admission.py runs kvrouter.admission
    through it): `arrive` says whether an arrival is routed now (else the gate holds or
    refuses it); `ready(now)` yields held requests to route now, lazily, after every
    engine update (each is routed before the next is asked for)."""

    def arrive(self, req: FleetRequest, now: float) -> bool: ...

    def ready(self, now: float) -> Iterable[FleetRequest]: ...


_D = DEFAULT_WEIGHTS


@dataclass
class SchedulerWeights:
    """Weights passed to kvrouter._core.Scheduler (docs/design.md §3.3); defaults are the core's."""

    prefill_weight: float = _D["prefill_weight"]
    decode_weight: float = _D["decode_weight"]
    queue_weight: float = _D["queue_weight"]
    temperature: float = _D["temperature"]
    host_credit: float = _D["host_credit"]
    disk_credit: float = _D["disk_credit"]
    queued_prefill_weight: float = _D["queued_prefill_weight"]
    pressure_weight: float = _D["pressure_weight"]
    approx_ttl_s: float = _D["approx_ttl_s"]
    pending_ttl_s: float = _D["pending_ttl_s"]

    def as_kwargs(self) -> dict[str, float | None]:
        """The Scheduler keyword arguments (the field names are the Scheduler's)."""
        return dataclasses.asdict(self)


@dataclass
class FleetConfig:
    num_workers: int = 8
    policy: str = "kv"
    weights: SchedulerWeights = field(default_factory=SchedulerWeights)
    engine: EngineConfig = field(default_factory=EngineConfig)
    seed: int = 0
    load_reports: bool = True  # engines report load whenever they are advanced
    expected_output: bool = False  # tell the router each request's output length (an oracle)
    # Approximate mode (docs/design.md §3.3) for the first `approx_workers` workers: their KV
    # events are dropped and the scheduler predicts their caches from its own decisions.
    approx_workers: int = 0

    def validate(self) -> None:
        if self.num_workers <= 0:
            raise ValueError("num_workers must be > 0")
        if not 0 <= self.approx_workers <= self.num_workers:
            raise ValueError(f"approx_workers must be in 0..{self.num_workers}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r} (expected one of {POLICIES})")


@dataclass
class FleetResult:
    report: FleetReport
    records: list[RequestRecord]
    apply: ApplyTotals
    capacity_blocks_per_worker: int
    wall_s: float = 0.0


class Wakeups:
    """The engines' next wake-up times, earliest first (the event loop of both fleet
    simulators). Rescheduling an engine voids its older entry: each entry carries the
    engine's version at push time, so stale ones are skipped when popped instead of being
    searched for and removed."""

    def __init__(self, engines: Sequence[SimEngine]) -> None:
        self._engines = engines
        self._version = [0] * len(engines)
        self._heap: list[tuple[float, int, int, int]] = []  # (time, seq, worker, version)
        self._seq = 0

    def wake(self, w: int) -> None:
        """(Re)schedule engine `w` at its next wake-up; an idle engine leaves the queue."""
        self._version[w] += 1
        t = self._engines[w].next_wakeup()
        if t < math.inf:
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, w, self._version[w]))

    def pop(self, limit: float = math.inf, *, inclusive: bool = True) -> tuple[float, int] | None:
        """Remove and return the earliest current (time, engine) due before `limit` (or at
        it, when `inclusive`); None when there is none."""
        heap = self._heap
        while heap and (heap[0][0] < limit or (inclusive and heap[0][0] <= limit)):
            t, _s, w, v = heapq.heappop(heap)
            if v == self._version[w]:
                return t, w
        return None


class FleetSimulator:
    def __init__(self, profile: EngineProfile, config: FleetConfig | None = None) -> None:
        from kvrouter._core import PrefixIndex, Scheduler

        self.config = config or FleetConfig()
        self.config.validate()
        self.profile = profile
        bs = self.config.engine.block_size
        self.index = PrefixIndex(bs)
        self.scheduler = Scheduler(self.index, policy=self.config.policy,  # type: ignore[arg-type]
                                   seed=self.config.seed, lease_s=1e12,
                                   **self.config.weights.as_kwargs())
        self.engines = [SimEngine(profile, self.config.engine, name=f"w{i}")
                        for i in range(self.config.num_workers)]
        for w in range(self.config.num_workers):
            self.scheduler.add_worker(w)
            if w < self.config.approx_workers:
                self.scheduler.set_approx(w, True)
        self.apply_totals = ApplyTotals()
        self._records: list[RequestRecord] = []
        self._meta: dict[str, tuple[int, int]] = {}  # request id -> (worker, routed overlap)
        self._reqs: dict[str, SimRequest] = {}
        self._rejected = 0
        self._worker_requests = [0] * self.config.num_workers

    # -- plumbing --------------------------------------------------------------------
    def _apply_events(self, w: int, events: list[KvEvent]) -> None:
        idx = self.index
        tot = self.apply_totals
        for ev in events:
            if isinstance(ev, BlockStored):
                tot.add(idx.apply_stored(w, ev.hashes, ev.parent, router_hashes=ev.router_hashes))
            elif isinstance(ev, BlockRemoved):
                tot.add(idx.apply_removed(w, ev.hashes))
            elif isinstance(ev, AllCleared):
                tot.add(idx.clear_worker(w))

    def _apply_updates(self, w: int, updates: list[RequestUpdate]) -> None:
        sched = self.scheduler
        for u in updates:
            r = u.request
            if u.kind == "first_token":
                sched.mark_prefill_done(r.request_id, now=u.time)
            elif u.kind == "finished":
                sched.release(r.request_id)
                worker, overlap = self._meta.pop(r.request_id)
                assert r.first_token_time is not None and r.finish_time is not None
                self._records.append(RequestRecord(
                    request_id=r.request_id, worker=worker, arrival_s=r.arrival,
                    first_token_s=r.first_token_time, finish_s=r.finish_time,
                    prompt_tokens=r.prompt_tokens, output_tokens=r.generated,
                    prompt_blocks=len(r.hashes), hit_blocks=max(r.hit_blocks, 0),
                    routed_overlap_blocks=overlap, preemptions=r.preemptions))
                del self._reqs[r.request_id]
            elif u.kind == "rejected":
                sched.release(r.request_id)
                self._meta.pop(r.request_id, None)
                self._reqs.pop(r.request_id, None)
                self._rejected += 1
                log.debug("request rejected request=%s worker=%d prompt=%d", r.request_id, w,
                          r.prompt_tokens)

    def _sync(self, w: int, now: float) -> None:
        eng = self.engines[w]
        events = eng.drain_kv_events()
        if w >= self.config.approx_workers:  # an approximate worker publishes no KV events
            self._apply_events(w, events)
        self._apply_updates(w, eng.drain_updates())
        if self.config.load_reports:
            rep = eng.load_report()
            self.scheduler.report_load(w, rep.running, rep.queued, rep.kv_used_blocks,
                                       rep.kv_free_blocks, rep.queued_prefill_tokens, now=now,
                                       kv_capacity_blocks=rep.kv_capacity_blocks,
                                       kv_cached_blocks=rep.kv_cached_blocks)

    # -- main loop ---------------------------------------------------------------------
    def run(self, requests: Sequence[FleetRequest], gate: ArrivalGate | None = None,
            ) -> FleetResult:
        """Replay `requests`; with a `gate`, arrivals pass through it (admission control).
        A record's arrival is when the request reached its engine (after any wait in
        the gate)."""
        import time

        wall0 = time.perf_counter()
        engines = self.engines
        wakeups = Wakeups(engines)
        wake = wakeups.wake
        expect = self.config.expected_output
        sched = self.scheduler

        def dispatch(fr: FleetRequest, ta: float) -> None:
            d = sched.route_hashes(fr.hashes, fr.prompt_tokens, request_id=fr.request_id,
                                   expected_output_tokens=fr.output_tokens if expect else 0,
                                   now=ta)
            w = d.worker
            self._meta[fr.request_id] = (w, d.overlap_blocks)
            self._worker_requests[w] += 1
            req = SimRequest(request_id=fr.request_id, hashes=fr.hashes,
                             prompt_tokens=fr.prompt_tokens, max_tokens=fr.output_tokens)
            self._reqs[fr.request_id] = req
            engines[w].submit(req, ta)
            self._sync(w, ta)
            wake(w)

        def advance(limit: float, strict: bool) -> None:
            while (due := wakeups.pop(limit, inclusive=not strict)) is not None:
                t, w = due
                engines[w].run_until(t)
                self._sync(w, t)
                wake(w)
                if gate is not None:
                    for held in gate.ready(t):
                        dispatch(held, t)

        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
        for i in order:
            fr = requests[i]
            ta = fr.arrival_s
            advance(ta, strict=True)
            if gate is None or gate.arrive(fr, ta):
                dispatch(fr, ta)
        advance(math.inf, strict=False)
        while gate is not None:  # whatever the gate still holds once the engines are idle
            t_end = max(e.clock for e in engines)
            n = 0
            for fr in gate.ready(t_end):
                dispatch(fr, t_end)
                n += 1
            if not n:
                break
            advance(math.inf, strict=False)
        for w, eng in enumerate(engines):  # idle engines: flush anything left
            eng.run_until(math.inf)
            self._sync(w, eng.clock)
        if self._reqs:
            raise RuntimeError(f"{len(self._reqs)} requests never finished")
        workers = [WorkerRecord(worker=w, requests=self._worker_requests[w], busy_s=e.stats.busy_s,
                                prefill_tokens=e.stats.prefill_tokens,
                                reused_tokens=e.stats.reused_tokens,
                                decode_tokens=e.stats.decode_tokens,
                                preemptions=e.stats.preemptions, itl=e.stats.itl)
                   for w, e in enumerate(engines)]
        self._records.sort(key=lambda r: int(r.request_id[1:]) if r.request_id[1:].isdigit()
                           else 0)
        report = build_report(self.config.policy, self._records, workers, self._rejected)
        return FleetResult(report=report, records=self._records, apply=self.apply_totals,
                           capacity_blocks_per_worker=engines[0].cache.num_blocks,
                           wall_s=time.perf_counter() - wall0)

    def index_matches_engines(self) -> list[int]:
        """Workers whose index contents differ from their engine's cache (empty: all agree)."""
        bad = []
        for w, eng in enumerate(self.engines):
            held = {h for h, tiers in self.index.worker_router_hashes(w) if tiers & 1}
            if held != eng.cache.hashes():
                bad.append(w)
        return bad


def simulate(trace: Trace, profile: EngineProfile, config: FleetConfig, speedup: float = 1.0,
             hashes: Sequence[Sequence[int]] | None = None) -> FleetResult:
    """Prepare a trace and run it through a fresh fleet."""
    reqs = prepare(trace, config.engine.block_size, speedup, hashes)
    return FleetSimulator(profile, config).run(reqs)
