"""The autoscaling planner's decision step: telemetry and the fleet in, actions out.

Pure and synchronous (no I/O, the clock is an argument) so that the live loop
(`kvrouter.autoscale.loop`) and the fleet-simulator bench (`bench/planner.py`) run the
very same code. One `Autoscaler` plans one pool of one model:

1. Finish drains it started: a draining worker with nothing in flight is stopped, or,
   when it was drained to change role, flipped (prefill <-> decode). On its first view
   of the fleet it adopts the draining workers an earlier planner left (a restart): they
   are stopped once idle.
2. Stop workers that never became ready (`ready_timeout_s`).
3. Telemetry: the last interval's arrivals and mean lengths feed the predictor; the
   observed TTFT/ITL tails correct the modelled need up when they miss the SLO without a
   backlog to explain it (a backlog is sized directly: queued prompt tokens must clear
   within `backlog_drain_s`). Missing,
   stale or malformed telemetry is a gap: the planner holds (no scaling either way).
4. Size: forecast -> `PerfModel.need` -> target prefill/decode workers (decode at least
   what the KV the decode workers report holding needs at `kv_usage_target`), clamped to the
   minimums and `max_workers` (an SLO that cannot be met there runs at the maximum and
   raises the `slo_unreachable` metric). When the telemetry splits off the requests the
   specialiser sends to the aggregated pool (class "short": short prompts, or outputs long
   next to them), a second layout is sized too: those on aggregated workers
   (`PerfModel.need_aggregated`) and the rest on prefill/decode. The layout with fewer
   GPUs wins, with hysteresis: a change must save `layout_margin` workers for
   `down_stable_ticks` ticks in a row. Without an aggregated worker the specialiser sends
   short requests to the disaggregated pool, so the first layout is "no aggregated pool".
5. Reconcile with hysteresis: scale up at once (after `up_cooldown_s`); scale down only
   when the surplus exceeds `down_band` for `down_stable_ticks` ticks and
   `down_cooldown_s` has passed, by at most `max_step_down_share` of the role, draining first
   (starting workers are cancelled before ready ones are drained). When one role is
   short while the other has a surplus, a worker of the surplus role is drained and
   flipped instead (`flip_s` is well under a cold start, `start_s`).

Every tick returns a `Decision` holding its inputs, forecast, need, target and actions;
it is logged (logger ``kvrouter.autoscale``) and exported as metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from kvrouter.autoscale.config import AutoscaleConfig
from kvrouter.autoscale.metrics import AutoscaleMetrics
from kvrouter.autoscale.predictor import Forecast, LoadPredictor
from kvrouter.autoscale.sizing import Load, Need, PerfModel
from kvrouter.registry import Role

log = logging.getLogger("kvrouter.autoscale")

ROLES = (Role.PREFILL, Role.DECODE, Role.AGGREGATED)
DISAGGREGATED_LAYOUT = "disaggregated"  # prefill + decode workers only
MIXED_LAYOUT = "with_aggregated"  # short requests on aggregated workers, the rest disaggregated


class Phase(StrEnum):
    STARTING = "starting"  # asked for, not yet serving
    READY = "ready"  # serving (routable)
    DRAINING = "draining"  # no new requests; finishing its own


class ActionKind(StrEnum):
    START = "start"  # start one worker of `role`
    DRAIN = "drain"  # stop routing to `worker`; finish with STOP or FLIP once idle
    STOP = "stop"  # stop `worker` (idle, or never ready)
    FLIP = "flip"  # change an idle, drained `worker` to `to_role`


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as the actuator reports it."""

    name: str
    role: Role
    phase: Phase
    since: float  # when it entered `phase`, planner clock
    inflight: int = 0  # requests still on it


@dataclass(frozen=True, slots=True)
class PoolTelemetry:
    """The router's view of one pool over the last interval."""

    model: str
    pool: str
    t: float  # end of the interval, planner clock
    window_s: float
    arrivals: int
    prompt_tokens: float  # means over the interval's arrivals
    output_tokens: float
    ttft_p95_s: float | None = None  # observed tails; None: not measured
    itl_p95_s: float | None = None
    queue: int = 0  # requests waiting for admission on the pool's engines
    queued_prefill_tokens: int = 0  # prompt tokens not yet prefilled (engines' reports)
    # Share of the decode workers' KV blocks held by requests (their load reports: used /
    # (used + free)), over `kv_workers` ready decode workers; None: not reported.
    kv_usage: float | None = None
    kv_workers: int = 0
    # Of `arrivals`, those of the specialiser's "short" class (the aggregated pool's
    # requests; kvrouter.planner.LengthSpecialiser) and their mean lengths; None: the
    # telemetry does not split them (no aggregated pool is sized).
    short_arrivals: int | None = None
    short_prompt_tokens: float = 0.0
    short_output_tokens: float = 0.0

    def problem(self) -> str:
        """Why this sample cannot be used ('' when it can)."""
        nums = (self.window_s, self.prompt_tokens, self.output_tokens,
                self.short_prompt_tokens, self.short_output_tokens)
        if not all(math.isfinite(v) and v >= 0 for v in nums) or min(
                self.arrivals, self.queue, self.queued_prefill_tokens, self.kv_workers,
                self.short_arrivals or 0) < 0:
            return "non-finite or negative values"
        if self.short_arrivals is not None and self.short_arrivals > self.arrivals:
            return f"{self.short_arrivals} short arrivals of {self.arrivals}"
        if self.kv_usage is not None and not 0.0 <= self.kv_usage <= 1.0:
            return f"KV usage {self.kv_usage} outside [0, 1]"
        if self.window_s <= 0:
            return "empty window"
        return ""


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    role: Role
    worker: str | None = None
    to_role: Role | None = None
    reason: str = ""


@dataclass
class Decision:
    t: float
    model: str
    pool: str
    outcome: str  # scaled | held | gap | steady
    observed_rate: float | None = None
    forecast: Forecast | None = None
    need: Need | None = None
    target: dict[str, int] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    slo_unreachable: bool = False
    kv_usage: float | None = None
    layout: str = DISAGGREGATED_LAYOUT
    layouts: dict[str, int] = field(default_factory=dict)  # GPUs each layout sized needs
    note: str = ""

    def as_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 3), "model": self.model, "pool": self.pool,
                               "outcome": self.outcome}
        if self.observed_rate is not None:
            out["observed_rate"] = round(self.observed_rate, 4)
        if self.forecast is not None:
            out.update(forecast_rate=round(self.forecast.rate, 4),
                       forecast_prompt=round(self.forecast.prompt_tokens, 1),
                       forecast_output=round(self.forecast.output_tokens, 1))
        if self.kv_usage is not None:
            out["kv_usage"] = round(self.kv_usage, 3)
        if self.need is not None:
            out.update(need_prefill=self.need.prefill, need_decode=self.need.decode,
                       need_aggregated=self.need.aggregated,
                       decode_batch=self.need.decode_batch)
        out["layout"] = self.layout
        for k, v in self.layouts.items():
            out[f"layout_{k}"] = v
        for k, v in self.target.items():
            out[f"target_{k}"] = v
        for k, v in self.current.items():
            out[f"current_{k}"] = v
        out["actions"] = ",".join(
            f"{a.kind}:{a.worker or a.role}{'->' + a.to_role if a.to_role else ''}"
            for a in self.actions) or "-"
        if self.slo_unreachable:
            out["slo_unreachable"] = True
        if self.note:
            out["note"] = self.note
        return out


class Autoscaler:
    """Plans one pool of one model (module doc)."""

    def __init__(self, perf: PerfModel, config: AutoscaleConfig | None = None, *,
                 model: str = "default", pool: str = "disaggregated",
                 metrics: AutoscaleMetrics | None = None) -> None:
        self.cfg = cfg = config or AutoscaleConfig()
        self.perf = perf
        self.model, self.pool = model, pool
        self.metrics = metrics
        self.predictor = LoadPredictor(cfg.ewma_alpha, cfg.trend_beta, cfg.recent_ticks)
        # the two classes apart (telemetry with a short/rest split): the mixed layout's loads
        self.short = LoadPredictor(cfg.ewma_alpha, cfg.trend_beta, cfg.recent_ticks)
        self.rest = LoadPredictor(cfg.ewma_alpha, cfg.trend_beta, cfg.recent_ticks)
        self.layout: str | None = None  # from the first view of the fleet
        self._layout_streak = 0
        self.correction = {Role.PREFILL: 1.0, Role.DECODE: 1.0}
        self._last_up = {r: -math.inf for r in ROLES}
        self._last_down = {r: -math.inf for r in ROLES}
        self._streak = {r: 0 for r in ROLES}
        self._intents: dict[str, Role | None] = {}  # drained by us: then flip to role / stop
        self._adopted = False  # drains left by an earlier planner taken over (first view)
        self.decisions: list[Decision] = []
        self.keep_decisions = True

    # -- helpers -----------------------------------------------------------------------
    def _observe(self, s: PoolTelemetry) -> float:
        rate = s.arrivals / s.window_s
        self.predictor.observe(rate, s.prompt_tokens if s.arrivals else 0.0,
                               s.output_tokens if s.arrivals else 0.0)
        if s.short_arrivals is not None:
            k, n = s.short_arrivals, s.arrivals - s.short_arrivals

            def rest_mean(total: float, short: float) -> float:
                m = (s.arrivals * total - k * short) / n if n else 0.0
                return m if m > 0 else total  # inconsistent sums: the pool's mean

            self.short.observe(k / s.window_s, s.short_prompt_tokens if k else 0.0,
                               s.short_output_tokens if k else 0.0)
            self.rest.observe(n / s.window_s, rest_mean(s.prompt_tokens, s.short_prompt_tokens),
                              rest_mean(s.output_tokens, s.short_output_tokens))
        slo, step, cap = self.cfg.slo, self.cfg.correction_step, self.cfg.correction_max
        for role, seen, limit in ((Role.PREFILL, s.ttft_p95_s, slo.ttft_s),
                                  (Role.DECODE, s.itl_p95_s, slo.itl_s)):
            if seen is None or not math.isfinite(seen) or s.arrivals == 0:
                continue
            if role is Role.PREFILL and s.queued_prefill_tokens > 0 and seen > limit:
                continue  # a backlog explains the miss: sized below, not a model error
            c = self.correction[role]
            if seen > limit:
                c = min(cap, c * step)
            elif seen < 0.6 * limit:  # comfortably met: relax slowly back to the model
                c = max(1.0, c / step ** 0.25)
            self.correction[role] = c
        return rate

    def _kv_floor(self, s: PoolTelemetry) -> int:
        """Decode workers the KV in use needs at `kv_usage_target` (0: not reported). The
        cost model sizes decode by step time; a pool of long contexts fills its caches
        first (engines then preempt or queue), which only more workers relieve: the KV
        held spreads over them in proportion."""
        if s.kv_usage is None or s.kv_workers <= 0:
            return 0
        return math.ceil(s.kv_workers * s.kv_usage / self.cfg.kv_usage_target - 1e-9)

    def _targets(self, need: Need) -> tuple[dict[Role, int], bool]:
        cfg = self.cfg
        a = need.aggregated
        if a and need.prefill == need.decode == 0:
            # everything on aggregated workers: the floor of workers that finish requests
            return self._clamp({Role.PREFILL: 0, Role.DECODE: 0,
                                Role.AGGREGATED: max(cfg.min_decode, a)}, not need.feasible)
        p = max(cfg.min_prefill, need.prefill)
        d = max(cfg.min_decode, need.decode)
        unreachable = not need.feasible
        if not need.feasible and need.decode == 0:
            # nothing to size decode with: run at the maximum, keep the split balanced
            p, d = cfg.max_workers // 2, cfg.max_workers - cfg.max_workers // 2
        if a:
            return self._clamp({Role.PREFILL: p, Role.DECODE: d, Role.AGGREGATED: a},
                               unreachable)
        if p + d > cfg.max_workers:
            unreachable = True
            d = max(cfg.min_decode, min(cfg.max_workers - cfg.min_prefill,
                                        round(cfg.max_workers * d / (p + d))))
            p = cfg.max_workers - d
        return {Role.PREFILL: p, Role.DECODE: d, Role.AGGREGATED: 0}, unreachable

    def _clamp(self, t: dict[Role, int], unreachable: bool) -> tuple[dict[Role, int], bool]:
        """Targets over max_workers shrunk in proportion (each role keeps at least one
        worker it had, the aggregated pool the rest)."""
        total, cap = sum(t.values()), self.cfg.max_workers
        if total <= cap:
            return t, unreachable
        out = {r: max(1 if n else 0, math.floor(cap * n / total)) for r, n in t.items()}
        out[Role.AGGREGATED] += cap - sum(out.values())
        return out, True

    def _choose_layout(self, dec: Decision, single: Need, mixed: Need | None) -> Need:
        """The layout to size for (module doc, step 4): hysteresis on a change."""
        cost = {DISAGGREGATED_LAYOUT: self._targets(single)[0]}
        if mixed is not None:
            cost[MIXED_LAYOUT] = self._targets(mixed)[0]
        dec.layouts = {k: sum(v.values()) for k, v in cost.items()}
        cur = self.layout or DISAGGREGATED_LAYOUT
        other = MIXED_LAYOUT if cur == DISAGGREGATED_LAYOUT else DISAGGREGATED_LAYOUT
        if cur not in dec.layouts or (
                other in dec.layouts
                and dec.layouts[other] + self.cfg.layout_margin <= dec.layouts[cur]):
            self._layout_streak += 1  # cheaper elsewhere, or the mixed one cannot be sized
        else:
            self._layout_streak = 0
        if self._layout_streak >= self.cfg.down_stable_ticks:
            cur, self._layout_streak = other, 0
        self.layout = dec.layout = cur
        if cur == MIXED_LAYOUT and mixed is not None:
            return mixed
        return single

    # -- one tick ----------------------------------------------------------------------
    def plan(self, now: float, sample: PoolTelemetry | None,
             workers: Sequence[WorkerView]) -> Decision:
        cfg = self.cfg
        dec = Decision(t=now, model=self.model, pool=self.pool, outcome="steady")
        actions = dec.actions
        gone: set[str] = set()
        flipping: dict[str, Role] = {}  # flipped this tick: capacity of their new role
        names = {w.name for w in workers}
        for name in [n for n in self._intents if n not in names]:
            del self._intents[name]  # vanished (stopped elsewhere): forget the intent
        if not self._adopted:
            self._adopt(workers)
        if self.layout is None:  # as found: aggregated workers serving or starting, or not
            self.layout = MIXED_LAYOUT if any(
                w.role is Role.AGGREGATED and w.phase is not Phase.DRAINING
                for w in workers) else DISAGGREGATED_LAYOUT
        # 1. drains that are done
        for w in workers:
            if w.phase is Phase.DRAINING and w.inflight <= 0 and w.name in self._intents:
                to = self._intents.pop(w.name)
                if to is None:
                    actions.append(Action(ActionKind.STOP, w.role, w.name, reason="drained"))
                    gone.add(w.name)
                else:
                    actions.append(Action(ActionKind.FLIP, w.role, w.name, to, reason="drained"))
                    flipping[w.name] = to
        # 2. never ready
        for w in workers:
            if w.phase is Phase.STARTING and now - w.since > cfg.ready_timeout_s:
                actions.append(Action(ActionKind.STOP, w.role, w.name,
                                      reason=f"not ready after {now - w.since:.0f}s"))
                gone.add(w.name)
                if self.metrics:
                    self.metrics.not_ready.labels(self.model, self.pool).inc()
        # 3. telemetry
        problem = ("no telemetry" if sample is None else
                   f"telemetry {now - sample.t:.0f}s old" if now - sample.t > cfg.telemetry_max_age_s
                   else sample.problem())
        if problem or sample is None:
            dec.outcome, dec.note = "gap", problem
            self._streak = {r: 0 for r in ROLES}
            return self._finish(dec, workers)
        dec.observed_rate = self._observe(sample)
        dec.kv_usage = sample.kv_usage
        # 4. size
        horizon = 1.0 + cfg.start_s / cfg.interval_s  # capacity asked now serves after a start
        fc = dec.forecast = self.predictor.forecast(horizon)
        # queued prompts must clear too: as extra arrivals over backlog_drain_s
        backlog = (sample.queued_prefill_tokens / max(fc.prompt_tokens, 1.0)
                   / cfg.backlog_drain_s)
        cp, cd = self.correction[Role.PREFILL], self.correction[Role.DECODE]
        single = self.perf.need(Load(fc.rate * (1 + cfg.headroom) + backlog, fc.prompt_tokens,
                                     fc.output_tokens), cfg, cp, cd)
        kv_floor = self._kv_floor(sample)
        floored: list[Need] = []  # the needs the KV floor raised
        if single.feasible and kv_floor > single.decode:
            single = replace(single, decode=kv_floor)
            floored.append(single)
        mixed: Need | None = None
        if cfg.aggregated and sample.short_arrivals is not None and self.short.primed:
            fs, fr = self.short.forecast(horizon), self.rest.forecast(horizon)
            agg = self.perf.need_aggregated(
                Load(fs.rate * (1 + cfg.headroom), fs.prompt_tokens, fs.output_tokens), cfg,
                max(cp, cd))
            rest = self.perf.need(Load(fr.rate * (1 + cfg.headroom) + backlog, fr.prompt_tokens,
                                       fr.output_tokens), cfg, cp, cd)
            if agg.feasible and rest.feasible and agg.aggregated > 0:
                mixed = replace(rest, aggregated=agg.aggregated,
                                aggregated_exact=agg.aggregated_exact)
                if kv_floor > rest.decode > 0:
                    mixed = replace(mixed, decode=kv_floor)
                    floored.append(mixed)
        need = dec.need = self._choose_layout(dec, single, mixed)
        if any(need is f for f in floored):
            dec.note = (f"decode sized for KV usage {sample.kv_usage:.2f} on "
                        f"{sample.kv_workers} worker(s)")
        target, dec.slo_unreachable = self._targets(need)
        if dec.slo_unreachable:
            dec.note = "; ".join(x for x in (dec.note, need.reason or f"SLO needs {need.prefill}"
                                             f"+{need.decode}+{need.aggregated} > max_workers")
                                 if x)
            log.warning("SLO unreachable within max_workers; running at the maximum",
                        extra={"model": self.model, "pool": self.pool, "reason": dec.note})
        # 5. reconcile
        active = [w for w in workers if w.name not in gone]
        current = {r: 0 for r in ROLES}
        for w in active:
            if w.phase is not Phase.DRAINING:
                if w.role in current:
                    current[w.role] += 1
            elif (to := self._intents.get(w.name, flipping.get(w.name))) is not None \
                    and to in current:
                current[to] += 1  # flipping towards `to`: capacity on its way
        dec.target = {str(r): target[r] for r in ROLES}
        dec.current = {str(r): current[r] for r in ROLES}
        delta = {r: target[r] - current[r] for r in ROLES}
        for r in ROLES:
            self._streak[r] = self._streak[r] + 1 if delta[r] < 0 else 0
        held: list[str] = []
        flipped_up: set[Role] = set()
        # flips: a short role takes idle-able workers from a role with a surplus
        if cfg.flip_s < cfg.start_s:
            for short, donor in ((a, b) for a in ROLES for b in ROLES if a is not b):
                n = min(delta[short], -delta[donor])
                if Role.AGGREGATED in (short, donor):
                    # a layout change moves a pool's traffic: a share of the donor per tick
                    # (its requests still arrive until the other pool serves), starts for
                    # the rest
                    n = min(n, max(1, math.ceil(cfg.max_step_down_share * current[donor])))
                if n <= 0:
                    continue
                for w in self._pick(active, donor, n, ready_only=True,
                                    keep_last=self._keep_last(donor, target, active)):
                    self._intents[w.name] = short
                    actions.append(Action(ActionKind.DRAIN, donor, w.name, short,
                                          reason=f"flip to {short}"))
                    delta[short] -= 1
                    delta[donor] += 1
                    self._last_down[donor] = now
                    if Role.AGGREGATED in (short, donor):
                        flipped_up.add(short)  # the rest may start this tick
                    else:
                        self._last_up[short] = now
        total = len(active)
        for r in ROLES:
            if delta[r] > 0:
                if now - self._last_up[r] < cfg.up_cooldown_s:
                    held.append(f"{r} up cooldown")
                    continue
                k = min(delta[r], cfg.max_workers - total)
                if k <= 0:
                    held.append(f"{r} at max_workers")
                    continue
                actions.extend(Action(ActionKind.START, r, reason="below target")
                               for _ in range(k))
                total += k
                self._last_up[r] = now
            elif delta[r] < -cfg.down_band or (delta[r] < 0 and target[r] == 0):
                # (no band for a role sized to none: its pool would still draw requests)
                if self._streak[r] < cfg.down_stable_ticks:
                    held.append(f"{r} surplus for {self._streak[r]} tick(s)")
                    continue
                if now - max(self._last_down[r], self._last_up[r]) < cfg.down_cooldown_s:
                    held.append(f"{r} down cooldown")
                    continue
                n = min(-delta[r], max(1, math.ceil(cfg.max_step_down_share * current[r])))
                for w in self._pick(active, r, n, ready_only=False,
                                    keep_last=self._keep_last(r, target, active)):
                    if w.phase is Phase.STARTING:
                        actions.append(Action(ActionKind.STOP, r, w.name, reason="cancel start"))
                    else:
                        self._intents[w.name] = None
                        actions.append(Action(ActionKind.DRAIN, r, w.name, reason="above target"))
                self._last_down[r] = now
        for r in flipped_up:
            self._last_up[r] = now
        if any(a.kind in (ActionKind.START, ActionKind.DRAIN) for a in actions):
            dec.outcome = "scaled"
        elif held:
            dec.outcome = "held"
        dec.note = "; ".join(x for x in (dec.note, *held) if x)
        return self._finish(dec, workers)

    def _adopt(self, workers: Sequence[WorkerView]) -> None:
        """On the first view of the fleet, take over the drains an earlier planner (before a
        restart) started: draining workers the actuator runs that this planner has no
        intent for are stopped once idle. Their old intent (stop or flip) is not known;
        stopping is the safe reading, and sizing starts what is then missing."""
        self._adopted = True
        for w in workers:
            if w.phase is Phase.DRAINING and w.name not in self._intents:
                self._intents[w.name] = None
                log.info("adopting a drain started before this planner", extra={
                    "model": self.model, "pool": self.pool, "worker": w.name,
                    "inflight": w.inflight})

    def hold(self, now: float, note: str) -> Decision:
        """A tick without a view of the fleet (the actuator could not list it): nothing is
        planned and the drain intents are kept for the next tick."""
        return self._finish(Decision(t=now, model=self.model, pool=self.pool, outcome="gap",
                                     note=note), None)

    def _keep_last(self, role: Role, target: dict[Role, int],
                   workers: Sequence[WorkerView]) -> bool:
        """Whether the last ready worker of `role` stays: yes while the role has a target;
        with none, a prefill worker may go (decode workers prefill locally) and a decode or
        aggregated one once the other of the two serves (the router sends its requests
        there)."""
        if target[role] > 0:
            return True
        if role is Role.PREFILL:
            return False
        other = Role.AGGREGATED if role is Role.DECODE else Role.DECODE
        return not any(w.role is other and w.phase is Phase.READY and w.name not in self._intents
                       for w in workers)

    def _pick(self, workers: Sequence[WorkerView], role: Role, n: int, *,
              ready_only: bool, keep_last: bool = True) -> list[WorkerView]:
        """Up to n workers of `role` to take away: starting ones first (nothing to drain),
        then the ready ones with the least in flight. `keep_last`: never the last ready
        one (off only when the role's target is 0: other pools take its requests)."""
        pool = [w for w in workers if w.role is role and w.name not in self._intents
                and (w.phase is Phase.READY or (not ready_only and w.phase is Phase.STARTING))]
        pool.sort(key=lambda w: (w.phase is not Phase.STARTING, w.inflight, w.name))
        # never take the last ready worker of a role while others only start
        ready = sum(1 for w in pool if w.phase is Phase.READY)
        out: list[WorkerView] = []
        for w in pool:
            if len(out) >= n:
                break
            if w.phase is Phase.READY:
                if ready <= 1 and keep_last:
                    break
                ready -= 1
            out.append(w)
        return out

    def _finish(self, dec: Decision, workers: Sequence[WorkerView] | None) -> Decision:
        m = self.metrics
        if m is not None:
            lab = (self.model, self.pool)
            m.decisions.labels(*lab, dec.outcome).inc()
            if dec.outcome == "gap":
                m.telemetry_gaps.labels(*lab).inc()
            for r in ROLES:
                for ph in Phase:
                    if workers is not None:
                        m.workers.labels(*lab, str(r), str(ph)).set(
                            sum(1 for w in workers if w.role is r and w.phase is ph))
                m.correction.labels(*lab, str(r)).set(self.correction.get(r, max(
                    self.correction.values())))  # aggregated: the larger of the two
                if dec.target:
                    m.target.labels(*lab, str(r)).set(dec.target[str(r)])
            if dec.observed_rate is not None:
                m.observed_rate.labels(*lab).set(dec.observed_rate)
            if dec.kv_usage is not None:
                m.kv_usage.labels(*lab).set(dec.kv_usage)
            for layout, n in dec.layouts.items():
                m.layout_workers.labels(*lab, layout).set(n)
            if dec.forecast is not None:
                m.predicted_rate.labels(*lab).set(dec.forecast.rate)
                m.slo_unreachable.labels(*lab).set(1.0 if dec.slo_unreachable else 0.0)
        level = logging.INFO if dec.actions or dec.outcome == "gap" else logging.DEBUG
        log.log(level, "autoscale decision", extra=dec.as_log())
        if self.keep_decisions:
            self.decisions.append(dec)
        return dec

    def action_done(self, action: Action, ok: bool) -> None:
        """The actuator's outcome of an action (metrics; a failed drain forgets its intent,
        so the worker counts as serving again and the next tick re-plans)."""
        if self.metrics is not None:
            self.metrics.actions.labels(self.model, self.pool, str(action.kind),
                                        "ok" if ok else "failed").inc()
        if ok or not action.worker:
            return
        if action.kind is ActionKind.DRAIN:
            self._intents.pop(action.worker, None)
        elif action.kind is ActionKind.FLIP or (action.kind is ActionKind.STOP
                                                and action.reason == "drained"):
            self._intents[action.worker] = action.to_role  # still drained: retry next tick
