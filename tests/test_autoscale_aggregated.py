"""The planner's aggregated pool: sizing (prefill and decode interfering on one worker),
the layout choice with its hysteresis, flips into and out of the aggregated role, the
fleet simulator with the specialiser sending short requests to aggregated workers, the
router telemetry that splits them off, and both actuators for the aggregated role."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubernetes import client as k8s
from prometheus_client import CollectorRegistry, generate_latest

from kvrouter.autoscale import (
    SLO,
    ActionKind,
    AutoscaleConfig,
    AutoscaleMetrics,
    Autoscaler,
    Load,
    Phase,
    PoolTelemetry,
    WorkerView,
)
from kvrouter.autoscale.actuators.kubernetes import KubernetesActuator
from kvrouter.autoscale.actuators.local import LocalActuator
from kvrouter.autoscale.core import DISAGGREGATED_LAYOUT, MIXED_LAYOUT
from kvrouter.autoscale.loop import in_pool, parse_counters
from kvrouter.autoscale.sim import SimDriver
from kvrouter.client import WorkerState
from kvrouter.config import DisaggConfig
from kvrouter.engines.sim import EngineConfig
from kvrouter.fleet.dynamic import DynamicFleet
from kvrouter.fleet.simulator import FleetConfig, FleetRequest
from kvrouter.planner import AGGREGATED_POOL, LengthSpecialiser, RequestClass
from kvrouter.registry import Role
from kvrouter.server.metrics import RouterMetrics
from tests.test_autoscale import PERF, PROFILE, fleet, poisson_load
from tests.test_autoscale_actuators import ApiServer

P, D, A = Role.PREFILL, Role.DECODE, Role.AGGREGATED
CFG = AutoscaleConfig(slo=SLO(ttft_s=2.0, itl_s=0.04))


def total(n: Any) -> int:
    return int(n.prefill + n.decode + n.aggregated)


# -- sizing -----------------------------------------------------------------------------------
def test_short_prompts_with_long_outputs_need_fewer_gpus_aggregated() -> None:
    for rate in (2.0, 8.0):
        load = Load(rate, 128, 1024)
        agg, disagg = PERF.need_aggregated(load, CFG), PERF.need(load, CFG)
        assert agg.feasible and agg.prefill == agg.decode == 0
        # no prefill GPU, no KV transfer, decode batches almost as large
        assert agg.aggregated < total(disagg), (rate, agg, disagg)
        assert 0.8 * disagg.decode_batch <= agg.decode_batch <= disagg.decode_batch


def test_long_prompts_or_short_outputs_cost_more_aggregated() -> None:
    # a long prompt's prefill stalls every decode on its worker: the ITL budget leaves
    # room for little of it, so aggregated workers run at a fraction of their prefill rate
    for load in (Load(4.0, 4000, 100), Load(10.0, 900, 50), Load(20.0, 600, 250)):
        agg, disagg = PERF.need_aggregated(load, CFG), PERF.need(load, CFG)
        assert agg.aggregated > total(disagg), (load, agg, disagg)


def test_aggregated_need_grows_with_load_and_interference() -> None:
    ns = [PERF.need_aggregated(Load(r, 300, 600), CFG).aggregated for r in (0.5, 2, 8, 16)]
    assert ns == sorted(ns) and ns[0] >= 1 and ns[-1] > ns[0]
    assert PERF.need_aggregated(Load(0.0, 300, 600), CFG).aggregated == 0
    # a larger prompt share leaves smaller decode batches (more interference)
    small = PERF.need_aggregated(Load(4, 100, 600), CFG)
    big = PERF.need_aggregated(Load(4, 1000, 600), CFG)
    assert big.decode_batch < small.decode_batch and big.aggregated >= small.aggregated


def test_aggregated_need_reports_slos_no_fleet_meets() -> None:
    n = PERF.need_aggregated(Load(1.0, 20_000, 10), CFG)
    assert not n.feasible and "TTFT" in n.reason
    tight = AutoscaleConfig(slo=SLO(ttft_s=2.0, itl_s=0.02))
    n = PERF.need_aggregated(Load(1.0, 100, 100), tight)
    assert not n.feasible and "ITL" in n.reason
    with pytest.raises(ValueError):
        PERF.need_aggregated(Load(float("nan"), 1, 1), CFG)


# -- decisions --------------------------------------------------------------------------------
def mixed_sample(t: float, rate: float, short_share: float, short: tuple[float, float],
                 rest: tuple[float, float] = (3000.0, 150.0)) -> PoolTelemetry:
    n = round(rate * 30)
    k = round(n * short_share)
    prompt = (k * short[0] + (n - k) * rest[0]) / n
    output = (k * short[1] + (n - k) * rest[1]) / n
    return PoolTelemetry("m", "disaggregated", t, 30.0, n, prompt, output, short_arrivals=k,
                         short_prompt_tokens=short[0] if k else 0.0,
                         short_output_tokens=short[1] if k else 0.0)


def views(p: int, d: int, a: int = 0) -> list[WorkerView]:
    return fleet(p, d) + [WorkerView(f"a{i}", A, Phase.READY, 0.0) for i in range(a)]


def test_short_long_output_mix_gets_aggregated_workers_after_hysteresis() -> None:
    reg = CollectorRegistry()
    sc = Autoscaler(PERF, CFG, model="m", metrics=AutoscaleMetrics(reg))
    fleet = views(1, 6)
    first = sc.plan(30.0, mixed_sample(30.0, 8.0, 1.0, (128, 1024)), fleet)
    # cheaper, but one tick is not enough to change the layout
    assert first.layouts[MIXED_LAYOUT] < first.layouts[DISAGGREGATED_LAYOUT]
    assert first.layout == DISAGGREGATED_LAYOUT and first.target["aggregated"] == 0
    dec = sc.plan(60.0, mixed_sample(60.0, 8.0, 1.0, (128, 1024)), fleet)
    assert dec.layout == MIXED_LAYOUT
    assert dec.target == {"prefill": 0, "decode": 0,
                          "aggregated": dec.layouts[MIXED_LAYOUT]}
    # a layout change flips a share of the donors (never the last decode worker while no
    # aggregated worker serves) and starts the rest
    flips = [a for a in dec.actions if a.kind is ActionKind.DRAIN and a.to_role is A]
    starts = [a for a in dec.actions if a.kind is ActionKind.START]
    assert flips and all(a.role in (P, D) for a in flips)
    assert len(flips) + len(starts) == dec.target["aggregated"]
    assert sum(1 for a in flips if a.role is D) < 6
    assert reg.get_sample_value("kvrouter_autoscale_target_workers",
                                {"model": "m", "pool": "disaggregated",
                                 "role": "aggregated"}) == dec.target["aggregated"]
    assert reg.get_sample_value("kvrouter_autoscale_layout_workers",
                                {"model": "m", "pool": "disaggregated",
                                 "layout": MIXED_LAYOUT}) == dec.layouts[MIXED_LAYOUT]
    log = dec.as_log()
    assert log["layout"] == MIXED_LAYOUT and log["need_aggregated"] == dec.target["aggregated"]
    assert log["target_aggregated"] == dec.target["aggregated"]


def test_long_prompt_mix_gets_no_aggregated_worker() -> None:
    sc = Autoscaler(PERF, CFG)
    for k in range(1, 8):
        dec = sc.plan(30.0 * k, mixed_sample(30.0 * k, 4.0, 0.0, (0, 0), (4000, 100)),
                      views(5, 1))
        assert dec.layout == DISAGGREGATED_LAYOUT and dec.target["aggregated"] == 0
        assert not any(a.role is A or a.to_role is A for a in dec.actions)
    # short requests that the aggregated workers would serve at a worse rate (long-ish
    # prompts, short outputs): still none
    sc = Autoscaler(PERF, CFG)
    for k in range(1, 8):
        dec = sc.plan(30.0 * k, mixed_sample(30.0 * k, 10.0, 0.6, (900, 50)), views(4, 2))
        assert dec.layouts[MIXED_LAYOUT] > dec.layouts[DISAGGREGATED_LAYOUT]
        assert dec.target["aggregated"] == 0


def test_without_a_class_split_or_when_disabled_no_aggregated_pool_is_sized() -> None:
    s = mixed_sample(30.0, 8.0, 1.0, (128, 1024))
    plain = PoolTelemetry("m", "disaggregated", 30.0, 30.0, s.arrivals, s.prompt_tokens,
                          s.output_tokens)
    for sc, sample in ((Autoscaler(PERF, CFG), plain),
                       (Autoscaler(PERF, CFG.model_copy(update={"aggregated": False})), s)):
        for k in range(1, 5):
            dec = sc.plan(30.0 * k, sample, views(1, 6))
            assert dec.target["aggregated"] == 0 and MIXED_LAYOUT not in dec.layouts


def test_layout_does_not_flap_and_returns_when_short_requests_go() -> None:
    # alternating mixes (short chat / long prompts): at most one layout change
    sc = Autoscaler(PERF, CFG)
    layouts = []
    for k in range(1, 13):
        s = (mixed_sample(30.0 * k, 8.0, 1.0, (128, 1024)) if k % 2 else
             mixed_sample(30.0 * k, 4.0, 0.0, (0, 0), (4000, 100)))
        layouts.append(sc.plan(30.0 * k, s, views(0, 0, 6)).layout)
    assert layouts[0] == MIXED_LAYOUT  # as found: aggregated workers serving
    assert sum(a != b for a, b in itertools.pairwise(layouts)) <= 1
    # the short requests stop: after the hysteresis the aggregated pool is drained, down
    # to its last worker once decode workers serve
    sc = Autoscaler(PERF, CFG)
    fleet = views(0, 0, 6)
    t = 0.0
    layouts = []
    for _ in range(3):
        t += 30.0
        layouts.append(sc.plan(t, mixed_sample(t, 4.0, 0.0, (0, 0), (4000, 100)), fleet).layout)
    assert layouts == [MIXED_LAYOUT, DISAGGREGATED_LAYOUT, DISAGGREGATED_LAYOUT]
    assert sc.decisions[-1].target["aggregated"] == 0
    moved = [a for d in sc.decisions for a in d.actions if a.kind is ActionKind.DRAIN
             and a.role is A]
    assert moved and all(a.to_role in (P, D) for a in moved)  # flipped where short
    assert len(moved) < 6  # never the last aggregated worker while no decode worker serves
    served = [*views(5, 1), WorkerView("a9", A, Phase.READY, 0.0)]
    for _ in range(6):
        t += 60.0
        dec = sc.plan(t, mixed_sample(t, 4.0, 0.0, (0, 0), (4000, 100)), served)
        if any(a.worker == "a9" for a in dec.actions):
            break
    assert [a.kind for a in dec.actions if a.worker == "a9"] == [ActionKind.DRAIN]


def test_bad_class_split_is_a_gap() -> None:
    sc = Autoscaler(PERF, CFG)
    bad = PoolTelemetry("m", "disaggregated", 30.0, 30.0, 10, 100.0, 100.0, short_arrivals=11)
    dec = sc.plan(30.0, bad, views(1, 1))
    assert dec.outcome == "gap" and "short" in dec.note and not dec.actions


# -- the fleet simulator ----------------------------------------------------------------------
def _chat_load(seed: int = 3) -> list[FleetRequest]:
    """Short prompts with long answers (the aggregated class) at ~4 req/s for 5 minutes."""
    return poisson_load(seed, ((4.0, 300.0),), (64, 400), (400, 900))


def test_fleet_simulator_moves_short_requests_onto_aggregated_workers() -> None:
    reqs = _chat_load()
    assert all(LengthSpecialiser().classify(r.prompt_tokens, r.output_tokens)
               is RequestClass.SHORT for r in reqs)
    c = CFG.model_copy(update={"start_s": 30.0, "down_cooldown_s": 30.0, "recent_ticks": 4,
                               "max_workers": 16})
    scaler = Autoscaler(PERF, c)
    sim = DynamicFleet(PROFILE, FleetConfig(engine=EngineConfig()), 16, [P, D, D],
                       disagg=DisaggConfig(mode="auto", local_prefill_max_tokens=0),
                       mode="auto", start_s=c.start_s, flip_s=c.flip_s)
    driver = SimDriver(reqs, scaler)
    done = sim.run_open_loop(reqs, 30.0, driver.on_tick)
    assert len(done) == len(reqs) and not driver.failures  # every request answered
    assert max(t.aggregated for t in driver.ticks) >= 1
    assert any(t.layout == MIXED_LAYOUT for t in driver.ticks)
    paths = {d.path for d in done}
    assert "aggregated" in paths  # served whole on aggregated workers
    assert {d.pool for d in done if d.path == "aggregated"} == {AGGREGATED_POOL}
    late = [t for t in driver.ticks if t.t >= 180.0]
    assert late and all(t.prefill + t.decode == 0 for t in late)  # all on aggregated workers
    for w, slot in enumerate(sim.slots):
        load = sim.scheduler.load(w)
        assert load.prefill_tokens == 0 and load.decode_blocks == 0  # no reservation leaked
        if slot.role is None:
            assert sim.index.worker_router_hashes(w) == []
        assert slot.inflight == 0


# -- router telemetry and actuators -----------------------------------------------------------
def test_router_telemetry_splits_the_short_class_and_counts_the_aggregated_pool() -> None:
    rm = RouterMetrics()
    before = parse_counters(generate_latest(rm.registry).decode(), "m", "disaggregated")
    assert before.short == (0.0, 0.0, 0.0)  # exported by this router, nothing yet
    rm.generated("m", "disaggregated", 3000, 100, 0.5, 1.0, "medium")
    rm.generated("m", "aggregated", 200, 800, 0.1, 20.0, "short")
    rm.generated("m", "disaggregated", 300, 700, 0.2, 20.0, "short")  # fell back
    rm.generated("m", "long-context", 30000, 10, 3.0, 0.1, "long")  # not this planner's
    after = parse_counters(generate_latest(rm.registry).decode(), "m", "disaggregated")
    d = after.minus(before)
    assert d is not None
    assert (d.requests, d.prompt_tokens, d.output_tokens) == (3, 3500, 1600)
    assert d.short == (2, 500, 1500)
    assert sum(c for le, c in d.ttft if le == float("inf")) == 3
    # a router without the class counters: no split (None), so no aggregated sizing
    old = "\n".join(line for line in generate_latest(rm.registry).decode().splitlines()
                    if "generate_class" not in line)
    assert parse_counters(old, "m", "disaggregated").short is None

    def ws(role: str, pool: str | None) -> WorkerState:  # what in_pool reads of one
        return cast(WorkerState, SimpleNamespace(role=role,
                                                 metadata={"pool": pool} if pool else {}))

    assert in_pool(ws("aggregated", None), "disaggregated", AGGREGATED_POOL)
    assert not in_pool(ws("aggregated", "other"), "disaggregated", AGGREGATED_POOL)
    assert in_pool(ws("decode", None), "disaggregated", AGGREGATED_POOL)
    assert not in_pool(ws("aggregated", None), "disaggregated")  # not asked for


def test_kubernetes_actuator_scales_the_aggregated_deployment() -> None:
    server = ApiServer()
    ac = k8s.ApiClient(k8s.Configuration())
    ac.call_api = server.call_api  # type: ignore[method-assign]
    act = KubernetesActuator("kvrouter", "kvrouter", api_client=ac)
    server.pod("kvrouter-decode-def", "decode")
    server.pod("kvrouter-aggregated-xyz", "aggregated")
    ws = asyncio.run(act.workers())
    assert {(w.name, w.role) for w in ws} == {("kvrouter-decode-def", D),
                                               ("kvrouter-aggregated-xyz", A)}
    asyncio.run(act.start(A))
    assert server.replicas["kvrouter-aggregated"] == 1
    assert ("PATCH", "/apis/apps/v1/namespaces/kvrouter/deployments/kvrouter-aggregated/scale") \
        in [(m, p) for m, p, _ in server.calls]
    # a flip decode -> aggregated moves a replica between the two Deployments
    asyncio.run(act.set_role("kvrouter-decode-def", A))
    assert server.replicas["kvrouter-decode"] == 0 and server.replicas["kvrouter-aggregated"] == 2
    asyncio.run(act.stop("kvrouter-aggregated-xyz"))  # the drained pod goes first
    assert server.pods["kvrouter-aggregated-xyz"]["metadata"]["annotations"]
    assert server.replicas["kvrouter-aggregated"] == 1


def test_local_actuator_starts_aggregated_workers_in_the_aggregated_pool(tmp_path: Path) -> None:
    act = LocalActuator(tmp_path, router="127.0.0.1:9", pool="disaggregated")
    cmd = act.command("auto-aggregated-1", A)
    assert cmd[cmd.index("--role") + 1] == "aggregated"
    assert cmd[cmd.index("--pool") + 1] == AGGREGATED_POOL
    cmd = act.command("auto-decode-1", D)
    assert cmd[cmd.index("--pool") + 1] == "disaggregated"
    template = ("python3", "-c", "pass", "{role}", "{pool}")
    other = LocalActuator(tmp_path, router="x", template=template, aggregated_pool="chat")
    assert other.command("n", A)[-2:] == ["aggregated", "chat"]
