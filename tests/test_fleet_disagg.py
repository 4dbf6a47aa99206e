"""The disaggregated fleet simulator: every request completes on the path the planner chose,
no reservation is left behind, runs are deterministic, and the KV transfer shows in timing."""

from __future__ import annotations

from kvrouter.config import DisaggConfig
from kvrouter.engines.sim import EngineProfile
from kvrouter.engines.sim.engine import EngineConfig
from kvrouter.fleet import FleetConfig, SchedulerWeights
from kvrouter.fleet.disagg import ClosedLoop, DisaggFleetSimulator, WorkloadClass, measure
from kvrouter.registry import Role

MEDIUM = WorkloadClass("3k_150", 3000, 150)
SHORT = WorkloadClass("short", 200, 400)


def run(fleet: list[tuple[Role, str | None]], mode: str, link_gbps: float = 50.0, seed: int = 0,
        classes: tuple[WorkloadClass, ...] = (MEDIUM,)):  # type: ignore[no-untyped-def]
    cfg = FleetConfig(engine=EngineConfig(link_bytes_per_s=link_gbps * 1e9),
                      weights=SchedulerWeights(), seed=seed)
    sim = DisaggFleetSimulator(EngineProfile.load(), cfg, fleet, DisaggConfig(), mode=mode)
    res = sim.run_closed_loop(ClosedLoop(list(classes), users=8, requests=40, seed=seed))
    return sim, res


def test_disaggregated_fleet_completes_every_request_and_releases_load() -> None:
    fleet = [(Role.PREFILL, None), (Role.DECODE, None), (Role.DECODE, None)]
    sim, res = run(fleet, mode="disaggregated")
    assert len(res.done) == 40
    assert {d.path for d in res.done} == {"disaggregated"}
    assert all(d.arrival <= d.first_token <= d.finish for d in res.done)
    for load in sim.scheduler.loads():
        assert load.reserved_requests == 0, load
    m = measure(res)
    assert m.tok_s_gpu > 0 and m.itl_tok_s_user > 0


def test_aggregated_fleet_and_determinism() -> None:
    fleet = [(Role.AGGREGATED, None), (Role.AGGREGATED, None)]
    _, a = run(fleet, mode="aggregated", seed=3)
    _, b = run(fleet, mode="aggregated", seed=3)
    assert {d.path for d in a.done} == {"aggregated"}
    assert [(d.first_token, d.finish) for d in a.done] == [(d.first_token, d.finish) for d in b.done]


def test_a_slower_link_delays_decode_after_prefill() -> None:
    fleet = [(Role.PREFILL, None), (Role.DECODE, None)]
    _, fast = run(fleet, mode="disaggregated", link_gbps=400.0)
    _, slow = run(fleet, mode="disaggregated", link_gbps=0.5)
    def mean_decode_s(res):  # type: ignore[no-untyped-def]
        return sum(d.finish - d.first_token for d in res.done) / len(res.done)
    assert mean_decode_s(slow) > mean_decode_s(fast)
