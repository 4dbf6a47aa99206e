"""The autoscaler on the fleet simulator: telemetry from the replay, actions on its workers.

`bench/planner.py` and the tests drive `kvrouter.fleet.dynamic.DynamicFleet` through this
adapter; the decisions come from the same `Autoscaler.plan` the live loop calls. The
telemetry is what the router sees of the pool in the interval: arrivals and their
prompt lengths, output lengths of the requests finished, and TTFT/ITL tails.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvrouter.autoscale.core import Action, ActionKind, Autoscaler, Phase, PoolTelemetry, WorkerView
from kvrouter.fleet.disagg import DoneRequest
from kvrouter.fleet.dynamic import DRAINING, READY, STARTING, DynamicFleet
from kvrouter.fleet.simulator import FleetRequest
from kvrouter.planner import LengthSpecialiser, RequestClass
from kvrouter.registry import Role

_PHASE = {STARTING: Phase.STARTING, READY: Phase.READY, DRAINING: Phase.DRAINING}


def itl_s(d: DoneRequest) -> float:
    """Mean inter-token latency of one request (0 for a single-token answer)."""
    if d.output_tokens > 1 and d.finish > d.first_token:
        return (d.finish - d.first_token) / (d.output_tokens - 1)
    return 0.0


@dataclass
class TickRecord:
    t: float
    rate: float
    prefill: int  # serving or starting, by role
    decode: int
    draining: int
    target_prefill: int
    target_decode: int
    aggregated: int = 0
    target_aggregated: int = -1
    layout: str = ""
    layouts: dict[str, int] = field(default_factory=dict)  # GPUs each layout needed


@dataclass
class SimDriver:
    """One replay: feeds the autoscaler every tick and applies its actions to the fleet."""

    requests: Sequence[FleetRequest]
    autoscaler: Autoscaler | None  # None: a static fleet
    model: str = "default"
    pool: str = "disaggregated"
    # the router's request classes (short: the aggregated pool's); None: no split reported
    specialiser: LengthSpecialiser | None = field(default_factory=LengthSpecialiser)
    ticks: list[TickRecord] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._arrivals = [r.arrival_s for r in self.requests]
        self._prompts = np.cumsum([0] + [r.prompt_tokens for r in self.requests])
        sp = self.specialiser
        short = [sp is not None and sp.classify(r.prompt_tokens, r.output_tokens)
                 is RequestClass.SHORT for r in self.requests]
        self._short_n = np.cumsum([0] + [int(k) for k in short])
        self._short_prompts = np.cumsum(
            [0] + [r.prompt_tokens if k else 0 for r, k in zip(self.requests, short, strict=True)])

    def telemetry(self, t: float, window: float, fleet: DynamicFleet) -> PoolTelemetry:
        lo = bisect.bisect_right(self._arrivals, t - window)
        hi = bisect.bisect_right(self._arrivals, t)
        n = hi - lo
        prompt = float(self._prompts[hi] - self._prompts[lo]) / n if n else 0.0
        done = [d for d in fleet._done[-4 * max(n, 50):] if t - window < d.finish <= t]
        first = [d.first_token - d.arrival for d in fleet._done[-4 * max(n, 50):]
                 if t - window < d.first_token <= t]
        out = float(np.mean([d.output_tokens for d in done])) if done else 0.0
        k = int(self._short_n[hi] - self._short_n[lo])
        short_prompt = float(self._short_prompts[hi] - self._short_prompts[lo]) / k if k else 0.0
        short_done = [d.output_tokens for d in done if d.cls == RequestClass.SHORT]
        short_out = float(np.mean(short_done)) if short_done else 0.0
        queued = tokens = kv_used = kv_total = kv_workers = 0
        for w, sl in enumerate(fleet.slots):
            if sl.role is not None:
                rep = fleet.engines[w].load_report()
                queued += rep.queued
                if sl.role is not Role.AGGREGATED:  # the disaggregated pool's backlog
                    tokens += rep.queued_prefill_tokens
                if sl.role is Role.DECODE and sl.phase == READY:  # as RouterTelemetry reads it
                    kv_used += rep.kv_used_blocks
                    kv_total += rep.kv_used_blocks + rep.kv_free_blocks
                    kv_workers += 1
        return PoolTelemetry(
            self.model, self.pool, t, window, n, prompt, out, queue=queued,
            short_arrivals=k if self.specialiser is not None else None,
            short_prompt_tokens=short_prompt, short_output_tokens=short_out,
            queued_prefill_tokens=tokens,
            kv_usage=kv_used / kv_total if kv_total else None, kv_workers=kv_workers,
            ttft_p95_s=float(np.percentile(first, 95)) if first else None,
            itl_p95_s=float(np.percentile([itl_s(d) for d in done], 95)) if done else None)

    def views(self, fleet: DynamicFleet) -> list[WorkerView]:
        return [WorkerView(s.name, s.role, _PHASE[s.phase], s.since, s.inflight)
                for s in fleet.live() if s.role is not None]

    def apply(self, a: Action, t: float, fleet: DynamicFleet) -> None:
        try:
            if a.kind is ActionKind.START:
                fleet.start(a.role, t)
            elif a.kind is ActionKind.DRAIN:
                assert a.worker is not None
                fleet.drain(a.worker, t)
            elif a.kind is ActionKind.STOP:
                assert a.worker is not None
                fleet.stop(a.worker, t)
            elif a.kind is ActionKind.FLIP:
                assert a.worker is not None and a.to_role is not None
                fleet.flip(a.worker, a.to_role, t)
            ok = True
        except (KeyError, ValueError, RuntimeError) as e:
            self.failures.append(f"{t:.0f}s {a.kind} {a.worker or a.role}: {e}")
            ok = False
        if self.autoscaler is not None:
            self.autoscaler.action_done(a, ok)

    def on_tick(self, t: float, fleet: DynamicFleet) -> None:
        window = self.autoscaler.cfg.interval_s if self.autoscaler else 30.0
        tel = self.telemetry(t, window, fleet)
        tp = td = ta = -1
        layout, layouts = "", {}
        if self.autoscaler is not None:
            dec = self.autoscaler.plan(t, tel, self.views(fleet))
            for a in dec.actions:
                self.apply(a, t, fleet)
            tp = dec.target.get(Role.PREFILL.value, -1)
            td = dec.target.get(Role.DECODE.value, -1)
            ta = dec.target.get(Role.AGGREGATED.value, -1)
            layout, layouts = dec.layout, dict(dec.layouts)
        live = fleet.live()

        def serving(role: Role) -> int:
            return sum(1 for s in live if s.role is role and s.phase != DRAINING)

        self.ticks.append(TickRecord(
            t, tel.arrivals / window, serving(Role.PREFILL), serving(Role.DECODE),
            sum(1 for s in live if s.phase == DRAINING), tp, td, serving(Role.AGGREGATED), ta,
            layout, layouts))


def within_slo(d: DoneRequest, ttft_s: float, itl_limit_s: float) -> bool:
    return (d.first_token - d.arrival) <= ttft_s and itl_s(d) <= itl_limit_s and \
        math.isfinite(d.finish)
