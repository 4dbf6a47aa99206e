"""Fleet simulator: traces, re-blocking, oracle, determinism, index == engine caches."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kvrouter._core import hash_blocks
from kvrouter.engines.sim import DEFAULT_CALIBRATION, EngineConfig, EngineProfile
from kvrouter.fleet import (
    FleetConfig,
    FleetSimulator,
    Trace,
    TraceError,
    TraceRequest,
    load_azure,
    load_mooncake,
    pooled_lru,
    prepare,
    synthetic_sessions,
    synthetic_shared_prefix,
    trace_hashes,
)
from kvrouter.fleet.traces import AZURE_CONV, MOONCAKE_CONVERSATION, synthetic_tokens


@pytest.fixture(scope="module")
def profile() -> EngineProfile:
    return EngineProfile.load(DEFAULT_CALIBRATION)


def write_mooncake(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_oracle_hand_computed() -> None:
    # capacity 3: [1,2] -> miss miss; [1,2,3] -> 2 hits; [4] -> miss, evicts the LRU block 3
    # (order after request 2, oldest first: 3, 2, 1); [1,2,3] -> hits 1, 2 then misses 3
    res = pooled_lru([[1, 2], [1, 2, 3], [4], [1, 2, 3]], capacity_blocks=3)
    assert (res.hit_blocks, res.total_blocks) == (4, 9)
    assert res.hit_rate == pytest.approx(4 / 9)
    # a contiguous prefix only: a hit after a miss does not count
    assert pooled_lru([[1, 2], [9, 2]], 10).hit_blocks == 0
    with pytest.raises(ValueError):
        pooled_lru([[1]], 0)


def test_reblocking_is_deterministic_prefix_chain(tmp_path: Path) -> None:
    p = write_mooncake(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [7, 8, 9]},
        {"timestamp": 5, "input_length": 1300, "output_length": 5, "hash_ids": [7, 8, 11]},
        {"timestamp": 9, "input_length": 700, "output_length": 5, "hash_ids": [8, 7]},
    ])
    tr = load_mooncake(p)
    hs = trace_hashes(tr, 64)
    assert [len(h) for h in hs] == [1100 // 64, 1300 // 64, 700 // 64]  # partial tail dropped
    assert hs[0][:16] == hs[1][:16]  # the two shared 512-token ids = 16 router blocks
    assert hs[0][16] != hs[1][16]
    assert hs[2][0] != hs[0][0]  # same ids in another order are different content
    assert hs == trace_hashes(load_mooncake(p), 64)  # deterministic
    toks = synthetic_tokens((7, 8), 512, 1024)
    assert hash_blocks(toks, 64) == hs[0][:16]  # the router's one hasher
    assert trace_hashes(tr, 128)[0][:8] == hash_blocks(toks, 128)  # any router block size


def test_trace_errors_are_clear(tmp_path: Path) -> None:
    bad = write_mooncake(tmp_path / "bad.jsonl", [
        {"timestamp": 0, "input_length": 100, "output_length": 5, "hash_ids": [1]},
        {"timestamp": 1, "input_length": 2000, "output_length": 5, "hash_ids": [1]},
    ])
    with pytest.raises(TraceError, match=r"bad\.jsonl:2"):
        load_mooncake(bad)
    (tmp_path / "junk.jsonl").write_text("{oops\n")
    with pytest.raises(TraceError, match=r"junk\.jsonl:1"):
        load_mooncake(tmp_path / "junk.jsonl")
    with pytest.raises(TraceError):
        load_mooncake(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not MOONCAKE_CONVERSATION.exists(), reason="traces not mounted")
def test_real_trace_loaders() -> None:
    tr = load_mooncake(MOONCAKE_CONVERSATION, limit=200)
    assert len(tr) == 200 and tr.id_block == 512
    assert all(r.content_ids[0] == 0 for r in tr)  # every conversation request starts with block 0
    az = load_azure(AZURE_CONV, limit=300)
    assert len(az) == 300 and az.requests[0].arrival_s == 0.0
    ids = [i for r in az for i in r.content_ids]
    assert len(ids) == len(set(ids))  # unique prompts
    assert az.speedup(2.0).duration_s == pytest.approx(az.duration_s / 2)


def test_synthetic_workloads_share_what_they_should() -> None:
    sp = synthetic_shared_prefix(num_requests=50, num_groups=3, prefix_tokens=1024, seed=1)
    hs = trace_hashes(sp, 64)
    by_group: dict[int, set[tuple[int, ...]]] = {}
    for r, h in zip(sp, hs, strict=True):
        by_group.setdefault(r.session, set()).add(tuple(h[:16]))
    assert all(len(v) == 1 for v in by_group.values()) and len(by_group) > 1
    ss = synthetic_sessions(num_sessions=5, turns=3, seed=2)
    assert len(ss) == 15
    turns = [r for r in ss if r.session == 0]
    for a, b in itertools.pairwise(turns):
        assert b.content_ids[: len(a.content_ids)] == a.content_ids  # history grows
    assert synthetic_sessions(num_sessions=5, turns=3, seed=2).requests == ss.requests


def small_trace() -> Trace:
    reqs = []
    for i in range(160):
        group = i % 5
        n_ids = 3 + (i * 7) % 6
        ids = tuple([1000 + group, 2000 + group]) + tuple(10_000 + i * 10 + k for k in range(n_ids))
        reqs.append(TraceRequest(arrival_s=i * 0.05, input_length=n_ids * 512 + 1024 - 100,
                                 output_length=20 + (i * 13) % 80, content_ids=ids))
    return Trace(name="small", id_block=512, requests=reqs)


def run_small(profile: EngineProfile, policy: str, seed: int,
              capacity: int = 60_000) -> tuple[FleetSimulator, list[object]]:
    cfg = FleetConfig(num_workers=4, policy=policy, seed=seed,
                      engine=EngineConfig(block_size=64, kv_capacity_tokens=capacity))
    sim = FleetSimulator(profile, cfg)
    res = sim.run(prepare(small_trace(), 64, speedup=4.0))
    return sim, [(r.request_id, r.worker, r.first_token_s, r.finish_s, r.hit_blocks)
                 for r in res.records]


@pytest.mark.parametrize("policy", ["random", "kv"])
def test_deterministic_under_seed(profile: EngineProfile, policy: str) -> None:
    _, a = run_small(profile, policy, seed=3)
    _, b = run_small(profile, policy, seed=3)
    assert a == b and len(a) == 160
    if policy == "random":
        _, c = run_small(profile, policy, seed=4)
        assert [x[1] for x in a] != [x[1] for x in c]  # type: ignore[index]


@pytest.mark.parametrize("policy", ["round_robin", "kv", "prefix_only"])
def test_index_equals_engine_caches(profile: EngineProfile, policy: str) -> None:
    # a small cache forces evictions, so removals are exercised as well as stores
    sim, _ = run_small(profile, policy, seed=1, capacity=20_000)
    assert sum(e.cache.evicted_blocks for e in sim.engines) > 0
    assert sim.index_matches_engines() == []
    assert sim.apply_totals["orphan_events"] == 0 and sim.apply_totals["unknown_removals"] == 0
    for w, e in enumerate(sim.engines):
        assert sim.index.worker_blocks(w) == e.cache.cached_blocks
    # every reservation was released when its request finished
    assert all(ld.reserved_requests == 0 for ld in sim.scheduler.loads(now=1e9))


def test_report_metrics_are_consistent(profile: EngineProfile) -> None:
    cfg = FleetConfig(num_workers=4, policy="kv",
                      engine=EngineConfig(block_size=64, kv_capacity_tokens=60_000))
    res = FleetSimulator(profile, cfg).run(prepare(small_trace(), 64, speedup=4.0))
    rep = res.report
    assert rep.completed == 160 and rep.rejected == 0
    assert 0 < rep.ttft_ms["p50"] <= rep.ttft_ms["p90"] <= rep.ttft_ms["p99"]
    assert rep.e2e_ms["p50"] >= rep.ttft_ms["p50"]
    assert 0 < rep.hit_rate < 1 and rep.imbalance >= 1.0
    assert sum(w["requests"] for w in rep.per_worker) == 160
    assert rep.output_tokens_per_s_per_gpu * 4 == pytest.approx(rep.output_tokens_per_s)
    # the router's view at decision time never exceeds what the fleet held then
    assert rep.routed_hit_rate > 0
