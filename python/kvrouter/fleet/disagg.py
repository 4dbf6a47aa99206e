"""Disaggregated mode of the fleet simulator: pools of aggregated, prefill and decode engines
behind the router's own planner, index and scheduler, driven by closed-loop users.

Same parts as `FleetSimulator` (this class extends it): the simulated engine core
(`SimEngine`), one `PrefixIndex` fed by the engines' KV events and one Rust
`Scheduler`; and the same planning code as Router.Generate (`kvrouter.planner`):
specialisation to a pool, conditional disaggregation, decode choice with KV
transfer cost, reservations per stage. A disaggregated request runs as a
CONTEXT_ONLY request on its prefill engine (first token at the end of the
prefill); when that ends, its prefill reservation is released and a
GENERATION_ONLY request is submitted to the decode engine, which waits for the
KV over the link (prompt tokens it does not hold x KV bytes per token / link
bandwidth, `EngineConfig.link_bytes_per_s`) before decoding.

Load comes from `users` closed-loop clients: each sends a request, waits for its
last token, and sends the next at once, so concurrency is fixed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvrouter.config import DisaggConfig
from kvrouter.engines.sim.engine import RequestMode, RequestUpdate, SimRequest
from kvrouter.engines.sim.profile import EngineProfile
from kvrouter.fleet.simulator import FleetConfig, FleetSimulator, Wakeups
from kvrouter.planner import Plan, Planner, PlanPath, Pool, Prompt, build_pools, prefill_id
from kvrouter.registry import Role


@dataclass(frozen=True, slots=True)
class WorkloadClass:
    name: str
    input_tokens: int
    output_tokens: int


@dataclass
class ClosedLoop:
    """`users` clients, each drawing its next request's class uniformly from `classes`."""

    classes: Sequence[WorkloadClass]
    users: int
    requests: int  # total requests issued
    jitter: float = 0.1  # lengths vary uniformly by +-jitter
    seed: int = 0


@dataclass(slots=True)
class DoneRequest:
    cls: str
    path: str
    pool: str
    arrival: float
    first_token: float
    finish: float
    prompt_tokens: int
    output_tokens: int
    user: int = -1


@dataclass(slots=True)
class _Flight:
    user: int
    cls: str
    plan: Plan
    arrival: float
    prompt_tokens: int
    output_tokens: int
    hashes: list[int]
    first_token: float = math.nan


@dataclass
class ClosedLoopResult:
    done: list[DoneRequest]
    gpus: int
    sim_end_s: float
    wall_s: float
    window: tuple[float, float] = (0.0, 0.0)
    engine_busy_s: list[float] = field(default_factory=list)


class DisaggFleetSimulator(FleetSimulator):
    """Engines with roles and pools; requests planned by kvrouter.planner."""

    def __init__(self, profile: EngineProfile, config: FleetConfig,
                 workers: Sequence[tuple[Role, str | None]], disagg: DisaggConfig | None = None,
                 mode: str = "auto") -> None:
        config.num_workers = len(workers)
        super().__init__(profile, config)
        self.roles = list(workers)
        self.mode = mode
        self.planner = Planner(self.scheduler, disagg or DisaggConfig(),
                               block_size=config.engine.block_size,
                               prefill_weight=config.weights.prefill_weight)
        self.pools: dict[str, Pool] = build_pools(
            (w, role, pool) for w, (role, pool) in enumerate(workers))
        self._flights: dict[str, _Flight] = {}
        self._done: list[DoneRequest] = []
        self._next_arrivals: list[tuple[float, int]] = []  # (time, user) to issue
        self._now = 0.0

    # -- engine updates ------------------------------------------------------------------
    def _apply_updates(self, w: int, updates: list[RequestUpdate]) -> None:
        sched = self.scheduler
        for u in updates:
            r = u.request
            rid = r.request_id
            if rid.endswith("/prefill"):
                fl = self._flights[rid[: -len("/prefill")]]
                if u.kind == "finished":
                    sched.release(rid)
                    fl.plan.reservations.remove(rid)
                    fl.first_token = u.time
                    if fl.output_tokens <= 1:
                        self._finish(fl, u.time)
                        continue
                    gen = SimRequest(request_id=fl.plan.request_id, hashes=fl.hashes,
                                     prompt_tokens=fl.prompt_tokens,
                                     max_tokens=fl.output_tokens - 1,
                                     mode=RequestMode.GENERATION_ONLY)
                    self._submit(fl.plan.worker, gen, max(u.time, self._now))
                elif u.kind == "rejected":
                    raise RuntimeError(f"context request {rid} rejected (prompt too large)")
                continue
            fl = self._flights[rid]
            if u.kind == "first_token":
                sched.mark_prefill_done(rid, now=u.time)
                if math.isnan(fl.first_token):
                    fl.first_token = u.time
            elif u.kind == "finished":
                self._finish(fl, u.time)
            elif u.kind == "rejected":
                raise RuntimeError(f"request {rid} rejected (prompt too large for one engine)")

    def _finish(self, fl: _Flight, t: float) -> None:
        self.planner.release(fl.plan)
        del self._flights[fl.plan.request_id]
        self._done.append(DoneRequest(fl.cls, fl.plan.path.value, fl.plan.pool, fl.arrival,
                                      fl.first_token, t, fl.prompt_tokens, fl.output_tokens,
                                      fl.user))
        self._next_arrivals.append((t, fl.user))

    # -- submission ------------------------------------------------------------------------
    def _submit(self, w: int, req: SimRequest, t: float) -> None:
        self.engines[w].submit(req, t)
        self._touched.add(w)

    def _arrive(self, user: int, t: float, cls: WorkloadClass, prompt_tokens: int,
                output_tokens: int, rid: str, rng: np.random.Generator) -> None:
        bs = self.config.engine.block_size
        hashes = [int(h) for h in rng.integers(1, 2**63, prompt_tokens // bs, dtype=np.int64)]
        plan = self.planner.plan(Prompt.from_hashes(hashes, prompt_tokens), rid, output_tokens,
                                 self.pools, self.mode, now=t)
        self._flights[rid] = _Flight(user, cls.name, plan, t, prompt_tokens, output_tokens, hashes)
        if plan.path is PlanPath.DISAGGREGATED:
            assert plan.prefill_worker is not None
            ctx = SimRequest(request_id=prefill_id(rid), hashes=hashes,
                             prompt_tokens=prompt_tokens, max_tokens=1,
                             mode=RequestMode.CONTEXT_ONLY)
            self._submit(plan.prefill_worker, ctx, t)
        else:
            self._submit(plan.worker, SimRequest(request_id=rid, hashes=hashes,
                                                 prompt_tokens=prompt_tokens,
                                                 max_tokens=output_tokens), t)

    # -- main loop --------------------------------------------------------------------------
    def run_closed_loop(self, load: ClosedLoop) -> ClosedLoopResult:
        wall0 = time.perf_counter()
        rng = np.random.default_rng(load.seed)
        engines = self.engines
        wakeups = Wakeups(engines)
        wake = wakeups.wake
        self._touched: set[int] = set()

        def settle(t: float) -> None:
            # engines that got requests or updates: apply their events, reschedule them
            while self._touched:
                w = self._touched.pop()
                self._sync(w, t)
                wake(w)

        issued = 0

        def issue(t: float, user: int) -> None:
            nonlocal issued
            if issued >= load.requests:
                return
            cls = load.classes[int(rng.integers(len(load.classes)))]
            j = load.jitter
            n_in = max(1, round(cls.input_tokens * rng.uniform(1 - j, 1 + j)))
            n_out = max(1, round(cls.output_tokens * rng.uniform(1 - j, 1 + j)))
            self._arrive(user, t, cls, n_in, n_out, f"u{user}-{issued}", rng)
            issued += 1

        # users start spread over the first 100 ms, as if they had just connected
        starts = sorted(rng.uniform(0, 0.1, load.users))
        last_issue = 0.0
        for u, t0 in enumerate(starts):
            self._now = float(t0)
            issue(self._now, u)
            settle(self._now)
        while (due := wakeups.pop()) is not None:
            t, w = due
            self._now = t
            engines[w].run_until(t)
            self._touched.add(w)
            settle(t)
            while self._next_arrivals:
                arrivals, self._next_arrivals = self._next_arrivals, []
                for _tf, user in arrivals:
                    if issued < load.requests:
                        last_issue = t
                    issue(t, user)
                settle(t)
        if self._flights:
            raise RuntimeError(f"{len(self._flights)} requests never finished")
        done = sorted(self._done, key=lambda d: d.arrival)
        return ClosedLoopResult(done=done, gpus=len(engines), sim_end_s=self._now,
                                wall_s=time.perf_counter() - wall0,
                                window=(_warm_start(done), last_issue),
                                engine_busy_s=[e.stats.busy_s for e in engines])


def _warm_start(done: Sequence[DoneRequest]) -> float:
    """When the start-up transient is over. The users all start within 100 ms, so the first
    wave arrives as one burst that no steady state has; the window opens once the fleet has
    turned over once (as many requests finished as there are users) and at least a fifth of
    the requests have arrived (caches and batches warm)."""
    if not done:
        return 0.0
    users = len({d.user for d in done})
    finishes = sorted(d.finish for d in done)
    return max(finishes[min(users, len(finishes)) - 1], done[len(done) // 5].arrival)


@dataclass(frozen=True, slots=True)
class PointMetrics:
    tok_s_gpu: float  # output tokens per second per GPU, in the steady window
    tok_s_user: float  # mean over requests of output tokens / end-to-end latency
    itl_tok_s_user: float  # mean over requests of decode tokens / decode time (1 / ITL)
    ttft_p50_s: float
    ttft_p90_s: float
    requests: int
    window_s: float = 0.0  # length of the steady window the numbers come from
    ttft_p90_by_class: dict[str, float] = field(default_factory=dict)
    itl_tok_s_user_by_class: dict[str, float] = field(default_factory=dict)


def measure(res: ClosedLoopResult) -> PointMetrics:
    """Steady-state numbers over the window of `res` (start-up transient over, users still
    sending). Tokens/s per user is what a user sees of the decode: for each request,
    tokens after the first over the time from first to last token (KV transfer and any
    wait for a decode slot included), averaged over requests (1 / mean ITL)."""
    t0, t1 = res.window
    if t1 <= t0:
        t0, t1 = 0.0, res.sim_end_s
    inside = [d for d in res.done if t0 <= d.arrival <= t1] or res.done
    # tokens produced inside the window: each request's output spread over its lifetime
    tokens = 0.0
    for d in res.done:
        span = d.finish - d.arrival
        if span <= 0:
            continue
        lo, hi = max(d.arrival, t0), min(d.finish, t1)
        if hi > lo:
            tokens += d.output_tokens * (hi - lo) / span
    dur = max(t1 - t0, 1e-9)
    e2e = np.array([d.output_tokens / max(d.finish - d.arrival, 1e-9) for d in inside])
    itl = np.array([_itl_speed(d) for d in inside])
    ttft = np.array([d.first_token - d.arrival for d in inside])
    classes = sorted({d.cls for d in inside})
    by_ttft = {c: float(np.percentile([d.first_token - d.arrival for d in inside if d.cls == c],
                                      90)) for c in classes}
    by_itl = {c: _nanmean([_itl_speed(d) for d in inside if d.cls == c]) for c in classes}
    return PointMetrics(tok_s_gpu=tokens / dur / res.gpus, tok_s_user=float(e2e.mean()),
                        itl_tok_s_user=_nanmean(itl),
                        ttft_p50_s=float(np.percentile(ttft, 50)),
                        ttft_p90_s=float(np.percentile(ttft, 90)), requests=len(inside),
                        window_s=dur, ttft_p90_by_class=by_ttft,
                        itl_tok_s_user_by_class=by_itl)


def _itl_speed(d: DoneRequest) -> float:
    if d.output_tokens > 1 and d.finish > d.first_token:
        return (d.output_tokens - 1) / (d.finish - d.first_token)
    return math.nan


def _nanmean(vals: Sequence[float] | np.ndarray) -> float:
    a = np.asarray(vals, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else math.nan
