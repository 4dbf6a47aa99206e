"""In-flight prefixes (issue 14 item 4, docs/design.md §3.3): a request routed to an exact
worker counts as pending there until its prefill is done or it is released, so requests
sharing its prefix that arrive before the engine's KV events see the hit; Explain shows it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvrouter import DEFAULT_WEIGHTS, InvalidArgument, PrefixIndex, Scheduler
from kvrouter.client import RouterClient
from kvrouter.engines.sim.engine import EngineConfig
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION, EngineProfile
from kvrouter.fleet import FleetConfig, FleetSimulator, SchedulerWeights, prepare
from kvrouter.fleet.traces import synthetic_shared_prefix

BS = 4
MODEL = "m"


def _sched(**kw: Any) -> Scheduler:
    s = Scheduler(PrefixIndex(1), seed=3, **kw)
    for w in range(4):
        s.add_worker(w)
    return s


def test_a_routed_prompt_is_pending_until_prefilled_or_released() -> None:
    assert DEFAULT_WEIGHTS["pending_ttl_s"] > 0
    s = _sched()
    prompt = list(range(1, 9))
    first = s.route_hashes(prompt, 8, request_id="a", now=0.0)
    assert first.overlap_blocks == 0  # the index is empty: nothing stored yet
    d = s.route_hashes([*prompt[:4], 99], 5, request_id="b", explain=True, now=0.1)
    assert (d.worker, d.gpu_blocks) == (first.worker, 4)
    c = {x.worker: x for x in d.candidates}
    assert c[first.worker].pending_blocks == 4
    # Only checkpoint blocks are recorded (the first, every 4th, the last): a shared prefix
    # ending between two is counted to the one before (6 shared -> 4).
    e = s.route_hashes([*prompt[:6], 98], 7, explain=True, reserve=False, now=0.1)
    assert (e.worker, e.gpu_blocks) == (first.worker, 4)
    assert all(x.pending_blocks == 0 for w, x in c.items() if w != first.worker)
    # The baselines see the index only (prefix_only has no load term to stop a herd).
    assert s.route_hashes(prompt, 8, policy="prefix_only", reserve=False,
                          now=0.1).overlap_blocks == 0
    # Prefilled ("a": its blocks are in the engine's events now) and released ("b").
    assert s.mark_prefill_done("a", now=0.2)
    assert s.release("b")
    after = s.route_hashes(prompt, 8, explain=True, reserve=False, now=0.3)
    assert after.overlap_blocks == 0
    assert all(x.pending_blocks == 0 for x in after.candidates)


def test_pending_expires_and_can_be_turned_off() -> None:
    s = _sched(pending_ttl_s=5.0)
    s.route_hashes([1, 2, 3], 3, request_id="a", now=0.0)
    assert s.route_hashes([1, 2, 3], 3, reserve=False, now=4.9).overlap_blocks == 3
    assert s.route_hashes([1, 2, 3], 3, reserve=False, now=5.0).overlap_blocks == 0
    off = _sched(pending_ttl_s=0.0)
    off.route_hashes([1, 2, 3], 3, request_id="a", now=0.0)
    assert off.route_hashes([1, 2, 3], 3, reserve=False, now=0.1).overlap_blocks == 0
    # Bad settings: a clear error, nothing changes.
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument, match="pending_ttl_s"):
            _sched(pending_ttl_s=bad)
        with pytest.raises(InvalidArgument, match="pending_ttl_s"):
            s.configure(pending_ttl_s=bad)
    s.route_hashes([7, 8], 2, request_id="b", now=10.0)
    assert s.route_hashes([7, 8], 2, reserve=False, now=14.0).overlap_blocks == 2
    s.configure(pending_ttl_s=0.0)  # off: what was pending is forgotten
    assert s.route_hashes([7, 8], 2, reserve=False, now=14.0).overlap_blocks == 0


def test_approximate_workers_record_no_pending_prefix() -> None:
    s = _sched()
    for w in range(4):
        s.set_approx(w, True)
    d = s.route_hashes([1, 2], 2, request_id="a", now=0.0)
    e = s.route_hashes([1, 2], 2, reserve=False, explain=True, now=0.1)
    assert e.worker == d.worker and e.gpu_blocks == 2  # from the approximate prediction
    assert all(x.pending_blocks == 0 for x in e.candidates)


def test_a_fleet_under_overload_keeps_its_prefixes_together() -> None:
    """Shared-prefix groups arriving faster than the engines prefill them: with pending
    prefixes the engines reuse more of the prompts than with the term off."""
    prof = EngineProfile.load(DEFAULT_CALIBRATION)
    trace = synthetic_shared_prefix(num_requests=72, num_groups=6, prefix_tokens=2048,
                                    suffix_tokens=256, output_tokens=16, rate_per_s=200.0,
                                    seed=1)
    reqs = prepare(trace, 64)
    hit = {}
    for ttl in (0.0, DEFAULT_WEIGHTS["pending_ttl_s"]):
        cfg = FleetConfig(num_workers=4, weights=SchedulerWeights(pending_ttl_s=ttl),
                          engine=EngineConfig(block_size=64), seed=0)
        hit[ttl] = FleetSimulator(prof, cfg).run(reqs).report.hit_rate
    assert hit[DEFAULT_WEIGHTS["pending_ttl_s"]] > hit[0.0] + 0.1, hit


# --------------------------------------------------------------------------- the service

@pytest.fixture
def router(router_server: Callable[..., Any]) -> Any:
    return router_server({"router": {"heartbeat_timeout_s": 0},
                          "models": [{"name": MODEL, "block_size": BS}]})


def test_the_service_routes_a_shared_prefix_to_its_pending_worker(router: Any) -> None:
    prompt = list(range(100, 132))  # 8 blocks of 4 tokens
    with RouterClient(router.target) as c:
        for w in ("w0", "w1", "w2", "w3"):
            c.register_worker(MODEL, w, block_size=BS)
        first = c.route(prompt, MODEL, request_id="a")
        assert first.overlap_blocks == 0
        r = c.explain([*prompt[:16], 7, 7, 7, 7], MODEL)
        assert r.worker == first.worker and r.gpu_blocks == 4
        pend = {x.worker: x.pending_blocks for x in r.candidates}
        assert pend.pop(first.worker) == 4 and set(pend.values()) == {0}
        # A dry run reserves nothing, so it leaves nothing pending either.
        c.route(list(range(500, 508)), MODEL, dry_run=True)
        assert c.explain(list(range(500, 508)), MODEL).gpu_blocks == 0
        # Released (finished or failed): no longer pending anywhere.
        assert c.release("a", MODEL)
        r = c.explain(prompt, MODEL)
        assert r.gpu_blocks == 0 and all(x.pending_blocks == 0 for x in r.candidates)
