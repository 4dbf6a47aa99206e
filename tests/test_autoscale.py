"""Autoscaling planner: sizing, prediction, decisions (hysteresis, drains, flips, limits,
bad telemetry) and the planner in the loop of the fleet simulator."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from kvrouter.autoscale import (
    SLO,
    ActionKind,
    AutoscaleConfig,
    AutoscaleMetrics,
    Autoscaler,
    Load,
    LoadPredictor,
    PerfModel,
    Phase,
    PoolTelemetry,
    WorkerView,
    erlang_c,
)
from kvrouter.autoscale.sim import SimDriver
from kvrouter.config import DisaggConfig
from kvrouter.engines.sim import EngineConfig, EngineProfile
from kvrouter.engines.sim.profile import PROFILES_DIR
from kvrouter.fleet.dynamic import DynamicFleet
from kvrouter.fleet.simulator import FleetConfig, FleetRequest
from kvrouter.registry import Role

PROFILE = EngineProfile.load(PROFILES_DIR / "h200-llama-49b-shape.json")
PERF = PerfModel(PROFILE)
P, D = Role.PREFILL, Role.DECODE


def cfg(**kw: Any) -> AutoscaleConfig:
    return AutoscaleConfig(**kw)


def sample(t: float, rate: float, prompt: float = 2000.0, output: float = 200.0,
           **kw: Any) -> PoolTelemetry:
    return PoolTelemetry("m", "disaggregated", t, 30.0, round(rate * 30), prompt, output,
                         **kw)


def fleet(p: int, d: int, phase: Phase = Phase.READY, since: float = 0.0) -> list[WorkerView]:
    return ([WorkerView(f"p{i}", P, phase, since) for i in range(p)]
            + [WorkerView(f"d{i}", D, phase, since) for i in range(d)])


def kinds(dec: object) -> list[str]:
    return [str(a.kind) for a in dec.actions]  # type: ignore[attr-defined]


# -- sizing -----------------------------------------------------------------------------------

def test_erlang_c_matches_closed_forms() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = utilisation
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(4, 0.0) == 0.0
    assert erlang_c(3, 3.0) == 1.0  # saturated


def test_need_grows_with_load_and_decode_batch_meets_itl() -> None:
    c = cfg()
    lo, hi = PERF.need(Load(5, 2000, 200), c), PERF.need(Load(20, 2000, 200), c)
    assert lo.feasible and hi.feasible
    assert hi.prefill > lo.prefill and hi.decode >= lo.decode
    ctx = 2000 + 100
    assert PROFILE.decode_time(hi.decode_batch, ctx) <= c.slo.itl_s * c.itl_margin
    kv_bound = int(0.9 * PERF.kv_tokens // 2200)  # the KV of one more would not fit
    assert PROFILE.decode_time(hi.decode_batch + 1, ctx) > c.slo.itl_s * c.itl_margin or \
        hi.decode_batch in (kv_bound, EngineConfig().max_num_seqs)
    assert PERF.need(Load(0, 0, 0), c).prefill == 0


def test_need_reports_slos_no_fleet_meets() -> None:
    # one 8K prompt alone takes ~1.4 s on this profile; a 1 s TTFT cannot be met
    n = PERF.need(Load(1, 8192, 100), cfg(slo=SLO(ttft_s=1.0)))
    assert not n.feasible and "TTFT" in n.reason
    # a single decode step takes ~26 ms
    n = PERF.need(Load(1, 1000, 100), cfg(slo=SLO(itl_s=0.01)))
    assert not n.feasible and "ITL" in n.reason
    with pytest.raises(ValueError):
        PERF.need(Load(math.nan, 1, 1), cfg())


# -- prediction ---------------------------------------------------------------------------------

def test_predictor_follows_a_ramp_and_keeps_a_burst() -> None:
    p = LoadPredictor(alpha=0.5, beta=0.3, recent=3)
    for r in (2, 4, 6, 8, 10):
        p.observe(r, 1000, 100)
    assert p.forecast(2).rate > 10  # the trend carries it past the last value
    p.observe(30, 1000, 100)  # a burst
    p.observe(5, 1000, 100)
    assert p.forecast().rate >= 30  # floored by the recent maximum
    for _ in range(3):
        p.observe(5, 1000, 100)
    assert p.forecast().rate < 30  # ... for `recent` ticks only


def test_predictor_refuses_bad_values() -> None:
    p = LoadPredictor()
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError):
            p.observe(bad, 100, 10)
    assert not p.primed


# -- decisions ------------------------------------------------------------------------------------

def test_kv_usage_near_full_adds_decode_workers_while_itl_is_met() -> None:
    reg = CollectorRegistry()
    m, c = AutoscaleMetrics(reg), cfg(recent_ticks=1)
    a = Autoscaler(PERF, c, metrics=m)
    ok_itl = {"ttft_p95_s": 0.5, "itl_p95_s": 0.01}
    calm = a.plan(30, sample(30, 1, kv_usage=0.3, kv_workers=4, **ok_itl), fleet(2, 4))
    modelled = calm.need.decode if calm.need else -1
    assert 0 < modelled < 4  # by step time alone this load needs fewer decode workers
    a = Autoscaler(PERF, c, metrics=m)
    dec = a.plan(30, sample(30, 1, kv_usage=0.95, kv_workers=4, **ok_itl), fleet(2, 4))
    # the KV held on 4 workers at 95% needs ceil(4 x 0.95 / 0.8) = 5 at the 80% target
    assert dec.target["decode"] == 5 and "KV usage 0.95" in dec.note
    # one more decode worker: started, or (here) a surplus prefill worker flipped
    more = [x for x in dec.actions if (x.kind, x.role) == (ActionKind.START, D)
            or (x.kind, x.to_role) == (ActionKind.DRAIN, D)]
    assert len(more) == 1, dec.as_log()
    assert dec.as_log()["kv_usage"] == 0.95
    assert reg.get_sample_value("kvrouter_autoscale_kv_usage",
                                {"model": "default", "pool": "disaggregated"}) == 0.95
    # KV near full also keeps decode from scaling down below what holds it
    a = Autoscaler(PERF, cfg(recent_ticks=1, down_stable_ticks=1, down_cooldown_s=0,
                             down_band=0))
    for t in (30, 60, 90):
        dec = a.plan(t, sample(t, 1, kv_usage=0.8, kv_workers=6, **ok_itl), fleet(2, 6))
        assert not [x for x in dec.actions if x.role is D], dec.as_log()


def test_kv_usage_is_read_from_the_decode_workers_load_reports() -> None:
    from kvrouter._proto.v1 import common_pb2, router_pb2
    from kvrouter.autoscale.loop import decode_kv_usage, in_pool
    from kvrouter.client import ROLES, to_workers

    def info(name: str, role: str, used: int, free: int, status: str = "up",
             pool: str = "") -> router_pb2.WorkerInfo:
        return router_pb2.WorkerInfo(
            name=name, model="m", role=ROLES[role], status=status,
            metadata={"pool": pool} if pool else {},
            load=router_pb2.WorkerLoad(reported=common_pb2.LoadReport(
                kv_used_blocks=used, kv_free_blocks=free)))

    resp = router_pb2.ListWorkersResponse(workers=[
        info("d0", "decode", 90, 10), info("d1", "decode", 50, 50),
        info("d2", "decode", 100, 0, status="draining"),  # leaving: not the pool's capacity
        info("p0", "prefill", 100, 0),  # prefill KV is transient
        info("d3", "decode", 0, 0),  # no cache reported
        info("x0", "decode", 100, 0, pool="other")])
    pool = {w.name: w for w in to_workers(resp) if in_pool(w, "disaggregated")}
    assert set(pool) == {"d0", "d1", "d2", "d3", "p0"}
    assert decode_kv_usage(resp, pool) == (0.7, 2)
    assert decode_kv_usage(router_pb2.ListWorkersResponse(), {}) == (None, 0)


def test_a_restarted_planner_finishes_the_drains_it_finds() -> None:
    # An earlier planner drained d1 (to stop) and d2 (to flip) and then restarted.
    a = Autoscaler(PERF, cfg())
    busy = [*fleet(2, 1), WorkerView("d1", D, Phase.DRAINING, 0, inflight=3),
            WorkerView("d2", D, Phase.DRAINING, 0, inflight=0)]
    dec = a.plan(30, None, busy)  # even a telemetry gap finishes drains
    assert [(x.kind, x.worker, x.reason) for x in dec.actions] == [
        (ActionKind.STOP, "d2", "drained")]
    assert dec.outcome == "gap"
    idle = [w for w in busy if w.name != "d2"]
    idle[-1] = WorkerView("d1", D, Phase.DRAINING, 0, inflight=0)
    dec = a.plan(60, sample(60, 1), idle)
    assert [(x.kind, x.worker) for x in dec.actions if x.worker == "d1"] == [
        (ActionKind.STOP, "d1")]
    # only on the first view: a drain someone else starts later is left to them
    later = [*fleet(2, 1), WorkerView("ops", D, Phase.DRAINING, 90, inflight=0)]
    dec = a.plan(90, sample(90, 1), later)
    assert not [x for x in dec.actions if x.worker == "ops"]

def test_scales_up_at_once_within_max_workers() -> None:
    a = Autoscaler(PERF, cfg(max_workers=12))
    dec = a.plan(30, sample(30, 20), fleet(1, 1))
    starts = [x for x in dec.actions if x.kind is ActionKind.START]
    assert starts and dec.outcome == "scaled"
    assert len(starts) + 2 <= 12
    assert dec.target["prefill"] > 1


def test_scale_down_waits_then_drains_then_stops() -> None:
    c = cfg(recent_ticks=1, down_stable_ticks=2, down_cooldown_s=60, down_band=0)
    a = Autoscaler(PERF, c)
    big = fleet(8, 3)
    dec = a.plan(30, sample(30, 1), big)  # far less load than 11 workers
    assert ActionKind.DRAIN not in [x.kind for x in dec.actions]  # one tick is not enough
    dec = a.plan(60, sample(60, 1), big)
    drains = [x for x in dec.actions if x.kind is ActionKind.DRAIN]
    assert drains and all(x.to_role is None for x in drains)
    assert ActionKind.STOP not in [x.kind for x in dec.actions]  # ready workers drain first
    assert len(drains) <= math.ceil(c.max_step_down_share * 8) + math.ceil(
        c.max_step_down_share * 3)
    name = drains[0].worker
    # still busy: nothing to stop yet
    busy = [WorkerView(w.name, w.role, Phase.DRAINING if w.name == name else w.phase, 60,
                       5 if w.name == name else 0) for w in big]
    dec = a.plan(90, sample(90, 1), busy)
    assert not [x for x in dec.actions if x.worker == name]
    idle = [WorkerView(w.name, w.role, w.phase, w.since, 0) for w in busy]
    dec = a.plan(120, sample(120, 1), idle)
    assert [(x.kind, x.reason) for x in dec.actions if x.worker == name] == [
        (ActionKind.STOP, "drained")]


def test_no_flapping_under_alternating_load() -> None:
    a = Autoscaler(PERF, cfg())
    workers = fleet(1, 1)
    starts = drains = 0
    for k in range(1, 25):
        rate = 15 if k % 2 else 3
        dec = a.plan(30 * k, sample(30 * k, rate), workers)
        for x in dec.actions:
            if x.kind is ActionKind.START:
                starts += 1
                workers = [*workers, WorkerView(f"n{k}-{starts}", x.role, Phase.READY, 30 * k)]
            elif x.kind is ActionKind.DRAIN:
                drains += 1
    assert drains == 0  # the recent maximum holds the capacity of the bursts
    assert 0 < starts <= 12


def test_flip_moves_a_surplus_worker_to_the_short_role() -> None:
    a = Autoscaler(PERF, cfg(recent_ticks=1))
    # decode-heavy load on a prefill-heavy fleet: long outputs, short prompts
    workers = fleet(6, 1)
    dec = a.plan(30, sample(30, 6, prompt=300, output=2000), workers)
    flips = [x for x in dec.actions if x.kind is ActionKind.DRAIN and x.to_role is D]
    assert flips, dec.as_log()
    name = flips[0].worker
    drained = [WorkerView(w.name, w.role, Phase.DRAINING if w.name == name else w.phase, 30)
               for w in workers]
    dec = a.plan(60, sample(60, 6, prompt=300, output=2000), drained)
    flip = [x for x in dec.actions if x.worker == name]
    assert [(x.kind, x.to_role) for x in flip] == [(ActionKind.FLIP, D)]
    assert dec.current["decode"] >= 2  # the flipped worker counts for decode at once


def test_unreachable_slo_runs_at_max_and_alerts(caplog: pytest.LogCaptureFixture) -> None:
    reg = CollectorRegistry()
    a = Autoscaler(PERF, cfg(max_workers=6), metrics=AutoscaleMetrics(reg))
    with caplog.at_level(logging.WARNING, logger="kvrouter.autoscale"):
        dec = a.plan(30, sample(30, 200), fleet(1, 1))
    assert dec.slo_unreachable
    assert sum(dec.target.values()) == 6
    assert len([x for x in dec.actions if x.kind is ActionKind.START]) == 4
    lab = {"model": "default", "pool": "disaggregated"}
    assert reg.get_sample_value("kvrouter_autoscale_slo_unreachable", lab) == 1.0
    assert any("unreachable" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [
    None,
    sample(-500, 10),  # stale
    sample(30, 10, prompt=math.nan),
    PoolTelemetry("m", "disaggregated", 30, 0.0, 5, 100, 10),  # empty window
    PoolTelemetry("m", "disaggregated", 30, 30, -4, 100, 10),
    sample(30, 10, kv_usage=1.5, kv_workers=2),  # a share above 1
])
def test_telemetry_gap_holds(bad: PoolTelemetry | None) -> None:
    reg = CollectorRegistry()
    a = Autoscaler(PERF, cfg(), metrics=AutoscaleMetrics(reg))
    a.plan(0, sample(0, 1), fleet(4, 2))
    dec = a.plan(30, bad, fleet(4, 2))
    assert dec.outcome == "gap" and dec.note
    assert not [x for x in dec.actions if x.kind in (ActionKind.START, ActionKind.DRAIN)]
    lab = {"model": "default", "pool": "disaggregated"}
    assert reg.get_sample_value("kvrouter_autoscale_telemetry_gaps_total", lab) == 1.0


def test_worker_never_ready_is_stopped_and_not_counted() -> None:
    reg = CollectorRegistry()
    a = Autoscaler(PERF, cfg(ready_timeout_s=120), metrics=AutoscaleMetrics(reg))
    workers = [*fleet(2, 1), WorkerView("stuck", P, Phase.STARTING, since=0)]
    dec = a.plan(200, sample(200, 4), workers)
    assert [(x.kind, x.worker) for x in dec.actions if x.worker == "stuck"] == [
        (ActionKind.STOP, "stuck")]
    assert dec.current["prefill"] == 2
    assert reg.get_sample_value("kvrouter_autoscale_workers_not_ready_total",
                                {"model": "default", "pool": "disaggregated"}) == 1.0


def test_failed_actions_keep_the_view_consistent() -> None:
    a = Autoscaler(PERF, cfg(recent_ticks=1, down_stable_ticks=1, down_cooldown_s=0))
    workers = fleet(8, 3)
    dec = a.plan(30, sample(30, 1), workers)
    drain = next(x for x in dec.actions if x.kind is ActionKind.DRAIN)
    a.action_done(drain, ok=False)  # the router refused: the worker still serves
    dec = a.plan(60, sample(60, 1), workers)
    assert drain.worker in [x.worker for x in dec.actions]  # planned again, not forgotten
    # a failed stop of a drained worker is retried at the next tick
    for x in dec.actions:
        a.action_done(x, ok=True)
    gone = {x.worker for x in dec.actions}
    drained = [WorkerView(w.name, w.role, Phase.DRAINING if w.name in gone else w.phase, 60)
               for w in workers]
    dec = a.plan(90, sample(90, 1), drained)
    stop = next(x for x in dec.actions if x.kind is ActionKind.STOP)
    a.action_done(stop, ok=False)
    dec = a.plan(120, sample(120, 1), drained)
    assert (ActionKind.STOP, stop.worker) in [(x.kind, x.worker) for x in dec.actions]
    held = a.hold(150, "actuator cannot list its workers")
    assert held.outcome == "gap" and not held.actions


def test_every_decision_is_logged_with_inputs(caplog: pytest.LogCaptureFixture) -> None:
    a = Autoscaler(PERF, cfg())
    with caplog.at_level(logging.INFO, logger="kvrouter.autoscale"):
        a.plan(30, sample(30, 20), fleet(1, 1))
    rec = next(r for r in caplog.records if r.getMessage() == "autoscale decision")
    for key in ("observed_rate", "forecast_rate", "forecast_prompt", "need_prefill",
                "target_prefill", "current_decode", "actions"):
        assert hasattr(rec, key), key


# -- in the loop of the fleet simulator ------------------------------------------------------------

def poisson_load(seed: int, phases: tuple[tuple[float, float], ...], prompt: tuple[int, int],
                 output: tuple[int, int]) -> list[FleetRequest]:
    """Poisson arrivals at each phase's (rate, until), uniform prompt/output lengths."""
    rng = np.random.default_rng(seed)
    out: list[FleetRequest] = []
    t = 0.0
    for rate, until in phases:
        while t < until:
            t += float(rng.exponential(1 / rate))
            n_in = int(rng.integers(*prompt))
            out.append(FleetRequest(f"r{len(out)}", t, n_in, int(rng.integers(*output)),
                                    [int(h) for h in rng.integers(1, 2**62, n_in // 64)]))
    return out


def _step_load(seed: int = 1) -> list[FleetRequest]:
    """2 req/s for 4 min, 14 req/s for 4 min, then 1 req/s for 6 min."""
    return poisson_load(seed, ((2.0, 240.0), (14.0, 480.0), (1.0, 840.0)), (500, 3000), (20, 300))


def test_planner_in_the_fleet_simulator_answers_everything_and_leaks_nothing() -> None:
    reqs = _step_load()
    c = cfg(start_s=30, down_cooldown_s=30, recent_ticks=4, max_workers=16)
    scaler = Autoscaler(PERF, c)
    sim = DynamicFleet(PROFILE, FleetConfig(engine=EngineConfig()), 16, [P, D],
                       disagg=DisaggConfig(mode="disaggregated"), start_s=c.start_s,
                       flip_s=c.flip_s)
    driver = SimDriver(reqs, scaler)
    done = sim.run_open_loop(reqs, 30.0, driver.on_tick)
    assert len(done) == len(reqs)  # every request answered
    assert not driver.failures
    actions = {e[1].split(":")[0] for e in sim.events}
    assert {"start", "drain", "stop"} <= actions
    peak = max(t.prefill + t.decode for t in driver.ticks)
    assert peak > 2 and driver.ticks[-1].prefill + driver.ticks[-1].decode < peak
    for w, slot in enumerate(sim.slots):
        load = sim.scheduler.load(w)
        assert load.prefill_tokens == 0 and load.decode_blocks == 0  # no reservation leaked
        if slot.role is None:  # stopped: the index forgot it
            assert sim.index.worker_router_hashes(w) == []
        assert slot.inflight == 0
