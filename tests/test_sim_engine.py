"""Step-based engine core: chunked prefill budget, continuous batching, reuse, load."""

from __future__ import annotations

import math

import pytest

from kvrouter.engines.sim import (
    DEFAULT_CALIBRATION,
    EngineConfig,
    EngineProfile,
    RequestMode,
    SimEngine,
    SimRequest,
)
from kvrouter.events.model import BlockRemoved, BlockStored

BS = 64


@pytest.fixture(scope="module")
def profile() -> EngineProfile:
    return EngineProfile.load(DEFAULT_CALIBRATION)


def req(rid: str, prompt: int, out: int, base: int = 0, shared: int = 0) -> SimRequest:
    """`shared` leading blocks are common to every request; the rest unique to `base`."""
    n = prompt // BS
    hashes = [i + 1 for i in range(min(shared, n))] + [base * 10_000 + i for i in range(n - shared)]
    return SimRequest(rid, hashes=hashes, prompt_tokens=prompt, max_tokens=out)


def engine(profile: EngineProfile, **kw: object) -> SimEngine:
    cfg = EngineConfig(block_size=BS, record_steps=True, **kw)  # type: ignore[arg-type]
    return SimEngine(profile, cfg)


def test_chunked_prefill_respects_budget(profile: EngineProfile) -> None:
    e = engine(profile, max_num_batched_tokens=1024, kv_capacity_tokens=1 << 20)
    for i in range(4):
        e.submit(req(f"r{i}", 3000, 50, base=i + 1), 0.0)
    e.run_until(math.inf)
    log = e.stats.step_log
    assert all(s.prefill_tokens + s.decodes <= 1024 for s in log if s.steps == 1)
    assert sum(s.prefill_tokens for s in log) == 4 * 3000
    # a 3000-token prompt cannot finish prefill in one 1024-token step
    assert sum(1 for s in log if s.prefill_tokens) >= math.ceil(4 * 3000 / 1024)
    assert e.stats.finished == 4 and e.cache.used_blocks == 0


def test_continuous_batching(profile: EngineProfile) -> None:
    e = engine(profile, kv_capacity_tokens=1 << 20)
    a = req("a", 512, 400, base=1)
    e.submit(a, 0.0)
    e.run_until(0.5)
    assert a.first_token_time is not None and a.finish_time is None
    b = req("b", 512, 400, base=2)
    e.submit(b, 0.5)
    e.run_until(math.inf)
    assert b.first_token_time is not None and a.finish_time is not None
    # b's prefill happened while a was decoding: a did not wait for b, nor b for a
    assert b.first_token_time - 0.5 < 0.1
    assert a.finish_time < b.finish_time
    assert any(s.decodes == 2 for s in e.stats.step_log), "a and b never decoded together"
    assert any(s.decodes >= 1 and s.prefill_tokens > 0 for s in e.stats.step_log)


def test_ttft_grows_with_load(profile: EngineProfile) -> None:
    def mean_ttft(n: int) -> float:
        e = engine(profile, kv_capacity_tokens=1 << 21)
        reqs = [req(f"r{i}", 4096, 64, base=i + 1) for i in range(n)]
        for i, r in enumerate(reqs):
            e.submit(r, i * 0.01)
        e.run_until(math.inf)
        return sum(r.first_token_time - r.arrival for r in reqs) / n  # type: ignore[operator]

    light, heavy = mean_ttft(2), mean_ttft(40)
    assert heavy > 3 * light


def test_prefix_reuse_and_events(profile: EngineProfile) -> None:
    e = engine(profile, kv_capacity_tokens=1 << 20)
    first = req("a", 8192, 2, base=1, shared=100)
    e.submit(first, 0.0)
    e.run_until(math.inf)
    second = req("b", 8192, 2, base=2, shared=100)
    e.submit(second, 10.0)
    e.run_until(math.inf)
    assert first.hit_blocks == 0 and second.hit_blocks == 100
    assert (second.first_token_time - 10.0) < (first.first_token_time - 0.0)  # type: ignore[operator]
    stored = [ev for ev in e.drain_kv_events() if isinstance(ev, BlockStored)]
    held: set[int] = set()
    for ev in stored:
        assert ev.parent is None or ev.parent in held
        held.update(ev.hashes)
    assert held == e.cache.hashes()
    assert len(held) == 100 + 28 + 28  # shared prefix stored once


def test_eviction_and_preemption_under_small_memory(profile: EngineProfile) -> None:
    # 64 blocks of 64 tokens: four 900-token prompts growing by 600 tokens cannot all fit
    e = engine(profile, num_blocks=64)
    reqs = [req(f"r{i}", 900, 600, base=i + 1) for i in range(4)]
    for r in reqs:
        e.submit(r, 0.0)
    e.run_until(math.inf)
    assert all(r.finish_time is not None and r.generated == 600 for r in reqs)
    assert e.stats.preemptions > 0
    evs = e.drain_kv_events()
    held: set[int] = set()
    for ev in evs:
        if isinstance(ev, BlockStored):
            held.update(ev.hashes)
        elif isinstance(ev, BlockRemoved):
            held.difference_update(ev.hashes)
    assert held == e.cache.hashes()
    assert e.cache.used_blocks == 0


def test_oversized_request_is_rejected(profile: EngineProfile) -> None:
    e = engine(profile, num_blocks=8)
    r = req("big", 64 * 20, 4, base=1)
    e.submit(r, 0.0)
    ups = e.drain_updates()
    assert [u.kind for u in ups] == ["rejected"]
    assert not e.busy


def test_load_report(profile: EngineProfile) -> None:
    e = engine(profile, kv_capacity_tokens=1 << 20, max_num_batched_tokens=2048)
    for i in range(3):
        e.submit(req(f"r{i}", 4096, 8, base=i + 1), 0.0)
    e.run_until(0.0)  # plan the first step
    rep = e.load_report()
    assert rep.running >= 1 and rep.queued + rep.running == 3
    assert rep.queued_prefill_tokens == 3 * 4096
    assert rep.kv_used_blocks > 0
    e.run_until(math.inf)
    rep = e.load_report()
    assert (rep.running, rep.queued, rep.kv_used_blocks, rep.queued_prefill_tokens) == (0, 0, 0, 0)


def test_disaggregated_modes(profile: EngineProfile) -> None:
    e = engine(profile, kv_capacity_tokens=1 << 20, link_bytes_per_s=10e9)
    ctx = req("ctx", 4096, 100, base=1)
    ctx.mode = RequestMode.CONTEXT_ONLY
    e.submit(ctx, 0.0)
    e.run_until(math.inf)
    assert ctx.generated == 1 and ctx.finish_time == ctx.first_token_time
    assert e.cache.cached_blocks == 64  # its KV stays for a decode worker to fetch
    gen = req("gen", 4096, 10, base=2)
    gen.mode = RequestMode.GENERATION_ONLY
    gen.record_tokens = True
    e.submit(gen, 10.0)
    e.run_until(math.inf)
    transfer = 4096 * profile.kv_bytes_per_token / 10e9
    assert gen.first_token_time is not None and gen.first_token_time >= 10.0 + transfer
    assert gen.generated == 10 and len(gen.token_times) == 10
    assert gen.token_times == sorted(gen.token_times)


def test_token_times_match_stretches(profile: EngineProfile) -> None:
    # the same requests, one engine recording every token: stretches and single steps agree
    e = engine(profile, kv_capacity_tokens=1 << 20)
    rs = [req(f"r{i}", 1024, 200 + 50 * i, base=i + 1) for i in range(3)]
    for r in rs:
        r.record_tokens = True
        e.submit(r, 0.0)
    e.run_until(math.inf)
    for r in rs:
        assert len(r.token_times) == r.max_tokens
        assert r.token_times[0] == r.first_token_time
        assert r.token_times[-1] == pytest.approx(r.finish_time)
    assert any(s.steps > 1 for s in e.stats.step_log)
