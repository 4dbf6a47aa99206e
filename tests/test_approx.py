"""Approximate mode (issue 16 item 4, docs/design.md §3.3): for engines that publish no KV
events the router predicts each worker's cache from its own decisions (the routed prompt's
blocks, TTL expiry, LRU within the advertised capacity); `approx` in ListWorkers and the
metrics; fleets may mix exact and approximate workers."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from kvrouter import PrefixIndex, Scheduler, UnknownWorker
from kvrouter.client import RouterClient, load_report
from kvrouter.engines.sim import DEFAULT_CALIBRATION, EngineConfig, EngineProfile
from kvrouter.fleet import FleetConfig, FleetSimulator, prepare, synthetic_shared_prefix
from kvrouter.testing.wait import wait_until

BS = 4
MODEL = "m"


def test_decisions_predict_the_cache_until_ttl_and_capacity_drop_it() -> None:
    s = Scheduler(PrefixIndex(1), seed=2, approx_ttl_s=10.0)
    s.add_worker(1)
    s.set_approx(1, True)
    assert s.is_approx(1) and s.load(1).approx
    s.route_hashes([1, 2, 3, 4], 4, request_id="a", now=0.0)
    assert s.approx_blocks(1) == 4
    assert s.route_hashes([1, 2, 3, 9], 4, reserve=False, now=5.0).gpu_blocks == 3
    # Routed again at 5 s: blocks 1-2 live until 15 s, blocks 3-4 expire at 10 s.
    s.route_hashes([1, 2], 2, request_id="b", now=5.0)
    assert s.route_hashes([1, 2, 3], 3, reserve=False, now=12.0).gpu_blocks == 2
    assert s.route_hashes([1, 2, 3], 3, reserve=False, now=16.0).gpu_blocks == 0
    # The advertised capacity bounds the prediction; a prompt's tail goes first.
    s.report_load(1, 0, 0, 0, 3, now=20.0, kv_capacity_blocks=3)
    s.route_hashes([5, 6, 7, 8], 4, request_id="c", now=20.0)
    assert s.approx_blocks(1) == 3
    assert s.route_hashes([5, 6, 7, 8], 4, reserve=False, now=20.0).gpu_blocks == 3


def test_mixed_fleet_exact_events_and_predictions() -> None:
    idx = PrefixIndex(1)
    s = Scheduler(idx, seed=3)
    for w in (1, 2):
        s.add_worker(w)
    s.set_approx(2, True)
    idx.apply_stored(1, [10, 11], router_hashes=[10, 11])  # exact worker's KV events
    idx.apply_stored(2, [20, 21], router_hashes=[20, 21])  # ignored: worker 2 is approximate
    assert s.route_hashes([20, 21], 2, reserve=False, explain=True).candidates[1].gpu_blocks == 0
    s.route_hashes([30, 31, 32], 3, request_id="x", candidates=[2])
    d = s.route_hashes([30, 31, 40], 3, reserve=False, explain=True)
    assert d.worker == 2 and d.gpu_blocks == 2
    assert s.route_hashes([10, 11, 12], 3, reserve=False).worker == 1
    # Back to exact: the prediction is dropped, the index decides.
    s.set_approx(2, False)
    assert s.approx_blocks(2) == 0 and not s.is_approx(2)
    assert s.route_hashes([20, 21], 2, reserve=False, explain=True).candidates[1].gpu_blocks == 2
    with pytest.raises(UnknownWorker):
        s.set_approx(99, True)


def test_fleet_simulator_approximate_workers_hit_without_events() -> None:
    trace = synthetic_shared_prefix(num_requests=80, num_groups=4, prefix_tokens=1024,
                                    suffix_tokens=256, output_tokens=16, rate_per_s=4.0)
    profile = EngineProfile.load(DEFAULT_CALIBRATION)
    cfg = FleetConfig(num_workers=4, policy="kv", approx_workers=4,
                      engine=EngineConfig(block_size=64, kv_capacity_tokens=200_000))
    sim = FleetSimulator(profile, cfg)
    res = sim.run(prepare(trace, 64))
    assert res.report.completed == 80
    assert sum(sim.index.worker_blocks(w) for w in range(4)) == 0  # no event was applied
    assert res.report.hit_rate > 0.5 and res.report.routed_hit_rate > 0.5
    with pytest.raises(ValueError, match="approx_workers"):
        FleetSimulator(profile, FleetConfig(num_workers=2, approx_workers=3))


# --------------------------------------------------------------------------- the service

@pytest.fixture
def router(router_server: Callable[..., Any]) -> Any:
    return router_server({"router": {"heartbeat_timeout_s": 0, "expire_interval_s": 0.2},
                          "models": [{"name": MODEL, "block_size": BS}]}, metrics=True)


def test_approx_worker_over_grpc(router: Any, store_blocks: Callable[..., None]) -> None:
    prompt = list(range(200, 232))
    with RouterClient(router.target) as c:
        c.register_worker(MODEL, "guess", block_size=BS, metadata={"kv_mode": "approx"})
        c.register_worker(MODEL, "events", block_size=BS)
        modes = {w.name: w.kv_mode for w in c.list_workers(MODEL)}
        assert modes == {"guess": "approx", "events": "exact"}
        first = c.route(prompt, MODEL, candidates=["guess"])
        assert first.worker == "guess" and first.overlap_blocks == 0
        # The router's own decision predicts the cache: the same prompt follows it.
        again = c.route(prompt, MODEL, dry_run=True)
        assert (again.worker, again.overlap_blocks) == ("guess", 8)
        assert next(w.cached_blocks for w in c.list_workers(MODEL) if w.name == "guess") == 8
        # The exact worker beside it is matched from its KV events as before.
        store_blocks(c, MODEL, "events", list(range(300, 308)), BS)
        exact = c.route(list(range(300, 308)), MODEL, dry_run=True)
        assert (exact.worker, exact.overlap_blocks) == ("events", 2)
        # An advertised capacity bounds the prediction.
        c.heartbeat(MODEL, "guess", load_report(kv_free_blocks=3, kv_capacity_blocks=3))
        c.route(list(range(500, 520)), MODEL, candidates=["guess"])
        assert next(w.cached_blocks for w in c.list_workers(MODEL) if w.name == "guess") == 3

        def shown() -> bool:
            url = f"http://127.0.0.1:{router.metrics_port}/metrics"
            with urllib.request.urlopen(url) as page:
                text = page.read().decode()
            return ('kvrouter_worker_approx{model="m",worker="guess"} 1.0' in text
                    and 'kvrouter_worker_approx{model="m",worker="events"} 0.0' in text)
        wait_until(shown, 10, what="approx in the metrics")


def test_unknown_kv_mode_is_refused_and_registers_nothing(router: Any) -> None:
    with RouterClient(router.target) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.register_worker(MODEL, "w", block_size=BS, metadata={"kv_mode": "guess"})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "kv_mode" in (e.value.details() or "")
        assert c.list_workers(MODEL) == []
        # A re-registration switching an exact worker to approximate mode works.
        c.register_worker(MODEL, "w", block_size=BS)
        c.register_worker(MODEL, "w", block_size=BS, metadata={"kv_mode": "approx"})
        assert [w.kv_mode for w in c.list_workers(MODEL)] == ["approx"]
