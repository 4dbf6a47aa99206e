"""The cost's cache-pressure term (issue 14 item 1, docs/design.md §3.3): engines report KV
capacity, the cost charges a worker for the cached blocks a request would evict weighted by
their reuse likelihood, Explain shows it; missing, zero or absurd capacities turn the term
off for that worker and are counted."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from kvrouter import DEFAULT_WEIGHTS, InvalidArgument, PrefixIndex, Scheduler
from kvrouter.client import RouterClient, load_report
from kvrouter.engines.sim.engine import EngineConfig, SimEngine
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION, EngineProfile
from kvrouter.events.model import LoadReport
from kvrouter.events.wire import H_LOAD, encode_load, parse_heartbeat
from kvrouter.testing.wait import wait_until

BS = 4
MODEL = "m"


def _full_worker_fleet(pressure_weight: float | None = None) -> tuple[PrefixIndex, Scheduler]:
    """Worker 1's 8-block cache is full and the blocks it evicted are asked for again;
    worker 2 is empty. Both report a capacity of 8 blocks."""
    idx = PrefixIndex(1)
    prompt = list(range(1, 13))
    idx.apply_stored(1, prompt, router_hashes=prompt)
    idx.apply_removed(1, [9, 10, 11, 12])  # evicted: the cache holds blocks 1-8
    s = Scheduler(idx, seed=1, pressure_weight=pressure_weight)
    for w in (1, 2):
        s.add_worker(w)
        s.report_load(w, 0, 0, 0, 8, now=0.0, kv_capacity_blocks=8)
    for i in range(5):  # each asks for the 4 evicted blocks again: its evictions cost
        d = s.route_hashes(prompt, 12, request_id=f"warm{i}", candidates=[1], now=0.0)
        s.release(d.request_id or "")
    return idx, s


def test_a_full_reused_cache_sends_a_cold_prompt_elsewhere() -> None:
    _, s = _full_worker_fleet()
    cold = [1, 50, 51, 52, 53, 54]  # one block of worker 1's cache, then new blocks
    d = s.route_hashes(cold, 6, explain=True, reserve=False, now=0.0)
    assert d.worker == 2
    c1 = next(c for c in d.candidates if c.worker == 1)
    assert s.load(1, now=0.0).reuse == pytest.approx(1.0)
    assert (c1.evicted_blocks, c1.pressure_cost) == (5, pytest.approx(
        5 * DEFAULT_WEIGHTS["pressure_weight"]))
    assert c1.cost == pytest.approx(5 * DEFAULT_WEIGHTS["prefill_weight"] + c1.pressure_cost)
    # A prompt whose whole prefix is cached stays with its cache.
    assert s.route_hashes([*range(1, 9), 60], 9, reserve=False, now=0.0).worker == 1
    # No capacity known for worker 1 any more: the term is off, the one-block hit wins.
    s.report_load(1, 0, 0, 0, 8, now=0.0)
    assert s.route_hashes(cold, 6, reserve=False, now=0.0).worker == 1


def test_pressure_weight_zero_is_the_cost_without_the_term() -> None:
    _, s = _full_worker_fleet(pressure_weight=0.0)
    for w in (1, 2):
        s.report_load(w, 0, 0, 0, 8, now=0.0, kv_capacity_blocks=8)
    d = s.route_hashes([1, 50, 51, 52, 53, 54], 6, explain=True, reserve=False, now=0.0)
    assert d.worker == 1
    c1 = next(c for c in d.candidates if c.worker == 1)
    assert c1.evicted_blocks == 5 and c1.pressure_cost == 0.0


@pytest.mark.parametrize(("capacity", "used", "reason"), [
    (0, 0, "missing"), (1 << 40, 0, "absurd"), (3, 5, "absurd")])
def test_missing_zero_or_absurd_capacity_turns_the_term_off_and_is_counted(
        capacity: int, used: int, reason: str) -> None:
    _, s = _full_worker_fleet()
    s.report_load(1, 0, 0, 0, 8, now=0.0, kv_capacity_blocks=8)
    before = s.capacity_reports()
    s.report_load(1, 0, 0, used, 8, now=0.0, kv_capacity_blocks=capacity)
    after = s.capacity_reports()
    assert after[reason] == before[reason] + 1
    assert s.load(1, now=0.0).kv_capacity_blocks == 0
    d = s.route_hashes([1, 50, 51], 3, explain=True, reserve=False, now=0.0)
    assert all(c.evicted_blocks == 0 and c.pressure_cost == 0.0 for c in d.candidates)


def test_negative_capacity_is_refused_and_changes_nothing() -> None:
    _, s = _full_worker_fleet()
    s.report_load(1, 0, 0, 0, 8, now=0.0, kv_capacity_blocks=8)
    with pytest.raises(InvalidArgument, match="kv_capacity_blocks"):
        s.report_load(1, 0, 0, 0, 8, now=0.0, kv_capacity_blocks=-1)
    with pytest.raises(InvalidArgument, match="pressure_weight"):
        s.configure(pressure_weight=-1.0)
    assert s.load(1, now=0.0).kv_capacity_blocks == 8


def test_sim_engine_reports_capacity_and_the_heartbeat_carries_it() -> None:
    eng = SimEngine(EngineProfile.load(DEFAULT_CALIBRATION),
                    EngineConfig(block_size=16, kv_capacity_tokens=16 * 100), name="w")
    rep = eng.load_report()
    assert rep.kv_capacity_blocks == 100 and rep.kv_cached_blocks == 0
    hb = parse_heartbeat("w", {H_LOAD: encode_load(rep, t=5.0)})
    assert hb.load == rep and hb.load_t == 5.0
    # A six-element load (written before capacity existed) still parses: capacity unknown.
    import msgpack
    old = msgpack.packb([1, 2, 3, 4, 5, 6.0])
    assert parse_heartbeat("w", {H_LOAD: old}).load == LoadReport(1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="bad heartbeat"):
        parse_heartbeat("w", {H_LOAD: msgpack.packb([1, 2, 3, 4, 5, 6.0, -7, 0])})


# --------------------------------------------------------------------------- the service

@pytest.fixture
def router(router_server: Callable[..., Any]) -> Any:
    return router_server({"router": {"heartbeat_timeout_s": 0, "expire_interval_s": 0.2},
                          "models": [{"name": MODEL, "block_size": BS}]}, metrics=True)


def _capacity(c: RouterClient, worker: str) -> int:
    return next(w.kv_capacity_blocks for w in c.list_workers(MODEL) if w.name == worker)


def test_heartbeat_capacity_drives_explain_and_bad_capacities_are_counted(
        router: Any, store_blocks: Callable[..., None]) -> None:
    prompt = list(range(100, 132))  # 8 blocks of 4 tokens
    with RouterClient(router.target) as c:
        for w in ("full", "empty"):
            c.register_worker(MODEL, w, block_size=BS)
        store_blocks(c, MODEL, "full", prompt[:8], BS)
        wait_until(lambda: c.route(prompt, MODEL, dry_run=True).overlap_blocks == 2, 10,
                   what="index holds worker full's blocks")
        c.heartbeat(MODEL, "full", load_report(kv_used_blocks=0, kv_free_blocks=2,
                                               kv_capacity_blocks=2))
        c.heartbeat(MODEL, "empty", load_report(kv_free_blocks=100, kv_capacity_blocks=100))
        assert _capacity(c, "full") == 2
        r = c.explain(prompt, MODEL, expected_output_tokens=8)
        full = next(x for x in r.candidates if x.worker == "full")
        empty = next(x for x in r.candidates if x.worker == "empty")
        # 6 uncached prompt blocks + 2 output blocks on a full 2-block cache: both cached
        # blocks go; the reuse estimate is its prior (1/4) before any eviction.
        assert (full.evicted_blocks, full.pressure_cost) == (
            2, pytest.approx(2 * 0.25 * DEFAULT_WEIGHTS["pressure_weight"]))
        assert (empty.evicted_blocks, empty.pressure_cost) == (0, 0.0)
        # Absurd (used above capacity), then missing: ignored, the term off, counted.
        c.heartbeat(MODEL, "full", load_report(kv_used_blocks=9, kv_capacity_blocks=3))
        c.heartbeat(MODEL, "full", load_report(kv_used_blocks=0))
        assert _capacity(c, "full") == 0
        assert next(x for x in c.explain(prompt, MODEL).candidates
                    if x.worker == "full").evicted_blocks == 0
        # Negative: INVALID_ARGUMENT, and the load it carried is not applied.
        with pytest.raises(grpc.RpcError) as e:
            c.heartbeat(MODEL, "full", load_report(kv_used_blocks=50, kv_capacity_blocks=-1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "kv_capacity_blocks" in (e.value.details() or "")

        def counted() -> bool:
            url = f"http://127.0.0.1:{router.metrics_port}/metrics"
            with urllib.request.urlopen(url) as page:
                text = page.read().decode()
            return ('kvrouter_capacity_reports_ignored_total{model="m",reason="absurd"} 1.0'
                    in text and 'kvrouter_worker_kv_capacity_blocks{model="m",worker="empty"}'
                    ' 100.0' in text)
        wait_until(counted, 10, what="ignored capacity reports in the metrics")
