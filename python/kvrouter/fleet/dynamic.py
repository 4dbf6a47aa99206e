"""Open-loop trace replay on a disaggregated pool whose workers change during the run.

A hook for autoscaling (``bench/planner.py`` drives it with `kvrouter.autoscale`):
`DisaggFleetSimulator` with `max_workers` engine slots, of which only the live ones
are in the pool. During the replay, at every tick, a callback may

* `start(role)` a worker: a fresh engine (empty cache) that joins the pool after
  `start_s` (a cold start: model load, warm-up);
* `drain(name)`: the worker leaves the pool (no new requests) and finishes its own;
* `stop(name)`: a drained (idle) or still-starting worker is switched off and the
  index forgets it;
* `flip(name, role)`: a drained worker changes role and rejoins after `flip_s`.

Aggregated workers (role aggregated) form the aggregated pool, which the request
planner's specialiser uses in mode ``auto`` (short requests; the others fall back to it
only when no decode worker is up).

A request counts as in flight on its decode worker from its plan to its last token
(the decode stage is reserved at plan time) and on its prefill worker until its
prompt is done, so a drain is complete exactly when no plan still needs the worker.
GPU time is counted from `start` to `stop`, starting and draining included.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvrouter.config import DisaggConfig
from kvrouter.engines.sim.engine import RequestMode, RequestUpdate, SimEngine, SimRequest
from kvrouter.engines.sim.profile import EngineProfile
from kvrouter.fleet.disagg import DisaggFleetSimulator, DoneRequest, _Flight
from kvrouter.fleet.simulator import FleetConfig, FleetRequest, Wakeups
from kvrouter.planner import AGGREGATED_POOL, PlanPath, Prompt, build_pools, prefill_id
from kvrouter.registry import Role

STARTING, READY, DRAINING = "starting", "ready", "draining"


@dataclass
class Slot:
    name: str = ""
    role: Role | None = None  # None: switched off
    phase: str = ""
    since: float = 0.0
    ready_at: float = math.inf
    on_at: float = 0.0
    inflight: int = 0


class DynamicFleet(DisaggFleetSimulator):
    def __init__(self, profile: EngineProfile, config: FleetConfig, max_workers: int,
                 initial: Sequence[Role], *, disagg: DisaggConfig | None = None,
                 mode: str = "disaggregated", pool: str = "disaggregated",
                 start_s: float = 60.0, flip_s: float = 5.0) -> None:
        if len(initial) > max_workers:
            raise ValueError("more initial workers than max_workers")
        super().__init__(profile, config, [(Role.DECODE, pool)] * max_workers, disagg, mode)
        self.pool_name = pool
        self.start_s, self.flip_s = start_s, flip_s
        self.slots = [Slot() for _ in range(max_workers)]
        self._by_name: dict[str, int] = {}
        self._serial = 0
        self.gpu_s = 0.0
        self.events: list[tuple[float, str, str]] = []  # (time, action, worker)
        for role in initial:  # the initial fleet is up at t = 0
            w = self._slot_on(role, 0.0)
            self.slots[w].phase, self.slots[w].ready_at = READY, 0.0
        self._rebuild()

    # -- control (the actuator's primitives) -------------------------------------------
    def _slot_on(self, role: Role, now: float) -> int:
        w = next((i for i, s in enumerate(self.slots) if s.role is None), None)
        if w is None:
            raise RuntimeError("no free slot: max_workers reached")
        self._serial += 1
        name = f"{role.value}-{self._serial}"
        self.slots[w] = Slot(name, role, STARTING, now, now + self.start_s, now)
        self._by_name[name] = w
        self.engines[w] = SimEngine(self.profile, self.config.engine, name=name)
        self.engines[w].clock = now
        self.index.clear_worker(w)
        return w

    def _slot(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown worker {name!r}") from None

    def start(self, role: Role, now: float) -> str:
        w = self._slot_on(role, now)
        self.events.append((now, "start", self.slots[w].name))
        return self.slots[w].name

    def drain(self, name: str, now: float) -> None:
        s = self.slots[self._slot(name)]
        if s.phase != READY:
            raise ValueError(f"worker {name} is {s.phase}, not ready")
        s.phase, s.since = DRAINING, now
        self._rebuild()
        self.events.append((now, "drain", name))

    def stop(self, name: str, now: float) -> None:
        w = self._slot(name)
        s = self.slots[w]
        if s.inflight:
            raise ValueError(f"worker {name} still has {s.inflight} requests")
        self.gpu_s += now - s.on_at
        del self._by_name[name]
        self.slots[w] = Slot()
        self.index.clear_worker(w)
        self._rebuild()
        self.events.append((now, "stop", name))

    def flip(self, name: str, role: Role, now: float) -> None:
        w = self._slot(name)
        s = self.slots[w]
        if s.phase != DRAINING or s.inflight:
            raise ValueError(f"worker {name} is not drained")
        s.role, s.phase, s.since, s.ready_at = role, STARTING, now, now + self.flip_s
        self.index.clear_worker(w)  # a role change restarts the engine: its cache is gone
        self.engines[w] = SimEngine(self.profile, self.config.engine, name=name)
        self.engines[w].clock = now
        self._rebuild()
        self.events.append((now, f"flip:{role.value}", name))

    def live(self) -> list[Slot]:
        return [s for s in self.slots if s.role is not None]

    def _rebuild(self) -> None:
        # aggregated workers form the aggregated pool (the specialiser's short requests in
        # mode auto); prefill and decode workers the pool of `pool`
        self.pools = build_pools(
            (w, s.role, AGGREGATED_POOL if s.role is Role.AGGREGATED else self.pool_name)
            for w, s in enumerate(self.slots) if s.role is not None and s.phase == READY)

    def _promote(self, now: float) -> None:
        changed = False
        for s in self.slots:
            if s.role is not None and s.phase == STARTING and s.ready_at <= now:
                s.phase, s.since = READY, s.ready_at
                changed = True
        if changed:
            self._rebuild()

    def _next_ready(self) -> float:
        return min((s.ready_at for s in self.slots if s.role is not None and s.phase == STARTING),
                   default=math.inf)

    # -- in-flight accounting -------------------------------------------------------------
    def _apply_updates(self, w: int, updates: list[RequestUpdate]) -> None:
        for u in updates:
            if u.kind == "finished" and u.request.request_id.endswith("/prefill"):
                self.slots[w].inflight -= 1
        super()._apply_updates(w, updates)

    def _finish(self, fl: _Flight, t: float) -> None:
        self.slots[fl.plan.worker].inflight -= 1
        super()._finish(fl, t)
        self._next_arrivals.clear()  # open loop: nobody sends a follow-up

    def _arrive_open(self, fr: FleetRequest, t: float) -> None:
        plan = self.planner.plan(Prompt.from_hashes(fr.hashes, fr.prompt_tokens), fr.request_id,
                                 fr.output_tokens, self.pools, self.mode, now=t)
        self._flights[fr.request_id] = _Flight(-1, plan.request_class, plan, t, fr.prompt_tokens,
                                               fr.output_tokens, list(fr.hashes))
        self.slots[plan.worker].inflight += 1
        if plan.path is PlanPath.DISAGGREGATED:
            assert plan.prefill_worker is not None
            self.slots[plan.prefill_worker].inflight += 1
            self._submit(plan.prefill_worker, SimRequest(
                request_id=prefill_id(fr.request_id), hashes=fr.hashes,
                prompt_tokens=fr.prompt_tokens, max_tokens=1, mode=RequestMode.CONTEXT_ONLY), t)
        else:
            self._submit(plan.worker, SimRequest(request_id=fr.request_id, hashes=fr.hashes,
                                                 prompt_tokens=fr.prompt_tokens,
                                                 max_tokens=fr.output_tokens), t)

    # -- main loop ---------------------------------------------------------------------------
    def run_open_loop(self, requests: Sequence[FleetRequest], tick_s: float,
                      on_tick: Callable[[float, DynamicFleet], None],
                      until_s: float | None = None) -> list[DoneRequest]:
        """Replay `requests` (arrival order), calling `on_tick(t, self)` every `tick_s` of
        simulated time until every request is done (and at least until `until_s`)."""
        engines = self.engines
        wakeups = Wakeups(engines)
        self._touched: set[int] = set()
        next_tick = tick_s

        def settle(t: float) -> None:
            while self._touched:
                w = self._touched.pop()
                self._sync(w, t)
                wakeups.wake(w)

        def advance(limit: float) -> None:
            nonlocal next_tick
            while True:
                control = min(next_tick, self._next_ready())
                bound = min(control, limit)
                while (due := wakeups.pop(bound, inclusive=False)) is not None:
                    t, w = due
                    self._now = t
                    engines[w].run_until(t)
                    self._touched.add(w)
                    settle(t)
                if control >= limit:
                    return
                self._now = control
                self._promote(control)
                if control == next_tick:
                    on_tick(control, self)
                    next_tick += tick_s

        order = sorted(requests, key=lambda r: r.arrival_s)
        for fr in order:
            advance(fr.arrival_s)
            self._now = fr.arrival_s
            self._promote(fr.arrival_s)
            self._arrive_open(fr, fr.arrival_s)
            settle(fr.arrival_s)
        end = max(until_s or 0.0, order[-1].arrival_s if order else 0.0)
        while self._flights or next_tick <= end:
            if next_tick > end + 86400:
                raise RuntimeError(f"{len(self._flights)} requests never finished")
            advance(next_tick + 1e-9)
        for s in self.slots:
            if s.role is not None:
                self.gpu_s += self._now - s.on_at
                s.on_at = self._now
        return sorted(self._done, key=lambda d: d.arrival)


def merge_heaps(*streams: Sequence[FleetRequest]) -> list[FleetRequest]:
    """Requests of several streams in arrival order (ids kept; they must be unique)."""
    return list(heapq.merge(*streams, key=lambda r: r.arrival_s))
