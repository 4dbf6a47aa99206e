"""kvrouter.planner: specialisation, pools, path choice and stage reservations (pure logic
with the real Rust index and scheduler in process)."""

from __future__ import annotations

import pytest

from kvrouter._core import PrefixIndex, Scheduler, hash_blocks
from kvrouter.config import DisaggConfig, SpecialisationConfig
from kvrouter.planner import (
    AGGREGATED_POOL,
    DISAGGREGATED_POOL,
    LONG_CONTEXT_POOL,
    LengthSpecialiser,
    NoWorker,
    Planner,
    PlanPath,
    Pool,
    Prompt,
    RequestClass,
    build_pools,
    prefill_id,
)
from kvrouter.registry import Role

BS = 16


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 30000 for i in range(n)]


def setup(**cfg: object) -> tuple[PrefixIndex, Scheduler, Planner, dict[str, Pool]]:
    index = PrefixIndex(BS)
    sched = Scheduler(index, seed=1)
    for w in range(1, 6):
        sched.add_worker(w)
    pools = build_pools([(1, Role.AGGREGATED, None), (2, Role.PREFILL, None),
                         (3, Role.DECODE, None), (4, Role.DECODE, None),
                         (5, Role.PREFILL, None)])
    planner = Planner(sched, DisaggConfig(**cfg), block_size=BS)  # type: ignore[arg-type]
    return index, sched, planner, pools


def test_length_classes_and_fallbacks() -> None:
    sp = LengthSpecialiser(SpecialisationConfig(short_input_tokens=1024, long_input_tokens=16384))
    assert sp.classify(200, 1000) is RequestClass.SHORT
    assert sp.classify(3000, 150) is RequestClass.MEDIUM
    assert sp.classify(3000, 4000) is RequestClass.SHORT  # output dominates
    assert sp.classify(32000, 200) is RequestClass.LONG
    agg, dis = Pool(AGGREGATED_POOL, aggregated=(1,)), Pool(DISAGGREGATED_POOL, (), (2,), (3,))
    assert sp.choose(32000, 200, {AGGREGATED_POOL: agg, DISAGGREGATED_POOL: dis}) == DISAGGREGATED_POOL
    assert sp.choose(200, 1000, {DISAGGREGATED_POOL: dis}) == DISAGGREGATED_POOL
    # a pool of prefill workers alone cannot serve anything
    with pytest.raises(NoWorker):
        sp.choose(3000, 100, {LONG_CONTEXT_POOL: Pool(LONG_CONTEXT_POOL, prefill=(5,))})
    with pytest.raises(ValueError):
        LengthSpecialiser(SpecialisationConfig(short_input_tokens=100, long_input_tokens=100))


def test_pools_from_roles_and_metadata() -> None:
    pools = build_pools([(1, Role.AGGREGATED, None), (2, Role.PREFILL, "long-context"),
                         (3, Role.DECODE, "long-context"), (4, Role.DECODE, None)])
    assert pools[AGGREGATED_POOL] == Pool(AGGREGATED_POOL, (1,))
    assert pools[LONG_CONTEXT_POOL] == Pool(LONG_CONTEXT_POOL, (), (2,), (3,))
    assert pools[DISAGGREGATED_POOL] == Pool(DISAGGREGATED_POOL, (), (), (4,))
    assert pools[LONG_CONTEXT_POOL].without([3]).usable is False


def test_aggregated_plan_reserves_and_releases() -> None:
    _, sched, planner, pools = setup()
    plan = planner.plan(Prompt.from_tokens(tokens(1, 100)), "a", 500, pools)
    assert plan.path is PlanPath.AGGREGATED and plan.worker == 1 and plan.pool == AGGREGATED_POOL
    ld = sched.load(1)
    assert ld.reserved_requests == 1 and ld.reserved_prefill_tokens == 100
    planner.release(plan)
    assert sched.load(1).reserved_requests == 0 and not sched.has_reservation("a")


def test_remote_prefill_reserves_each_stage() -> None:
    _, sched, planner, pools = setup()
    plan = planner.plan(Prompt.from_tokens(tokens(2, 3000)), "m", 150, pools)
    assert plan.path is PlanPath.DISAGGREGATED and plan.pool == DISAGGREGATED_POOL
    assert plan.worker in (3, 4) and plan.prefill_worker in (2, 5)
    assert plan.reservations == ["m", prefill_id("m")]
    dec, pre = sched.load(plan.worker), sched.load(plan.prefill_worker)
    # decode: blocks of prompt + output, no prefill work; prefill: the prompt tokens
    assert (dec.reserved_prefill_tokens, dec.reserved_decode_blocks) == (0, -(-3150 // BS))
    assert pre.reserved_prefill_tokens == 3000
    # a second request avoids the loaded prefill worker
    plan2 = planner.plan(Prompt.from_tokens(tokens(3, 3000)), "m2", 150, pools)
    assert plan2.prefill_worker != plan.prefill_worker
    planner.release(plan)
    planner.release(plan2)
    assert all(ld.reserved_requests == 0 for ld in sched.loads())


def test_decode_worker_holding_the_prefix_prefills_locally() -> None:
    index, sched, planner, pools = setup()
    t = tokens(4, 3000)
    hs = hash_blocks(t, BS)
    index.apply_stored(4, hs, router_hashes=hs)
    plan = planner.plan(Prompt.from_tokens([*t, 1, 2, 3]), "l", 150, pools)
    assert plan.path is PlanPath.LOCAL_PREFILL and plan.worker == 4
    assert "uncached" in plan.reason
    assert sched.load(4).reserved_prefill_tokens == 3003 - len(hs) * BS
    planner.release(plan)


def test_saturated_prefill_pool_prefills_locally() -> None:
    _, sched, planner, pools = setup(prefill_queue_max_tokens=1000)
    for w in (2, 5):
        sched.reserve(w, f"busy{w}", 5000, 10)
    plan = planner.plan(Prompt.from_tokens(tokens(5, 3000)), "s", 150, pools)
    assert plan.path is PlanPath.LOCAL_PREFILL and plan.reason == "prefill pool saturated"
    # forced disaggregation ignores saturation
    planner.release(plan)
    plan = planner.plan(Prompt.from_tokens(tokens(5, 3000)), "s", 150, pools, mode="disaggregated")
    assert plan.path is PlanPath.DISAGGREGATED
    planner.release(plan)


def test_modes_and_hash_prompts() -> None:
    _, _, planner, pools = setup()
    t = tokens(6, 3000)
    plan = planner.plan(Prompt.from_tokens(t), "x", 150, pools, mode="aggregated")
    assert plan.path is PlanPath.AGGREGATED and plan.worker == 1
    planner.release(plan)
    # the fleet simulator passes router hashes instead of tokens: same decisions
    plan = planner.plan(Prompt.from_hashes(hash_blocks(t, BS), 3000), "y", 150, pools)
    assert plan.path is PlanPath.DISAGGREGATED
    planner.release(plan)
    only_decode = {DISAGGREGATED_POOL: Pool(DISAGGREGATED_POOL, decode=(3,))}
    plan = planner.plan(Prompt.from_tokens(t), "z", 150, only_decode, mode="disaggregated")
    assert plan.path is PlanPath.LOCAL_PREFILL and plan.reason == "no prefill worker"
    planner.release(plan)
    with pytest.raises(NoWorker):
        planner.plan(Prompt.from_tokens(t), "w", 150, {})


def test_transfer_weight_is_restored() -> None:
    _, sched, planner, _pools = setup(transfer_weight=0.01)
    planner.choose_decode(Prompt.from_tokens(tokens(7, 500)), (3, 4))
    d = sched.route(tokens(8, 1600), candidates=[3], explain=True, reserve=False)
    assert d.candidates[0].cost == pytest.approx(100.0)  # prefill weight 1 per block again
