"""The router's overlap against what real vLLM CPU servers actually reuse.

Each test starts with empty caches (the `driver` fixture resets both engines and
waits until the router has forgotten their blocks). Engine block size 32, router
block size 16: every engine block is two router blocks, so a router overlap of n
blocks claims n * 16 prompt tokens, which must be exactly vLLM's reported
prefix-cache hit for that request (usage.prompt_tokens_details.cached_tokens, and
the delta of its vllm:prefix_cache_hits counter).
"""

from __future__ import annotations

import pytest

from kvrouter.testing.vllm_harness import MODEL_NAME
from tests.vllm_e2e.conftest import ROUTER_BLOCK_SIZE, Completion, VllmFleetDriver

pytestmark = pytest.mark.vllm


def _send_measured(d: VllmFleetDriver, worker: str, prompt: list[int], max_tokens: int = 8,
                   ) -> tuple[Completion, float, float]:
    """Send a request; returns it with vLLM's counter deltas (hit tokens, query tokens)."""
    before = d.counters(worker)
    done = d.complete(worker, prompt, max_tokens)
    # The engine's counters are updated by its output loop; wait for this request's.
    d.wait_for(f"{worker} counts the request's prefix-cache queries",
               lambda: (d.counters(worker) - before).queries >= len(prompt))
    delta = d.counters(worker) - before
    return done, delta.hits, delta.queries


def test_overlap_equals_engine_hits_for_a_shared_prefix(driver: VllmFleetDriver) -> None:
    d = driver
    prefix = d.tokens(128)  # 4 engine blocks
    a = prefix + d.tokens(40)
    b = prefix + d.tokens(40)

    first, hits, queries = _send_measured(d, "vllm-0", a)
    assert first.usage.cached_tokens == 0 and hits == 0 and queries == len(a)
    d.settle("vllm-0")

    predicted = d.overlaps(b)
    assert predicted == {"vllm-0": 128 // ROUTER_BLOCK_SIZE, "vllm-1": 0}
    decision = d.router.explain(b, MODEL_NAME)
    assert decision.worker == "vllm-0"

    second, hits, queries = _send_measured(d, "vllm-0", b)
    assert queries == len(b)
    assert second.usage.cached_tokens == predicted["vllm-0"] * ROUTER_BLOCK_SIZE
    assert hits == second.usage.cached_tokens


def test_overlap_includes_blocks_filled_during_generation(driver: VllmFleetDriver) -> None:
    """A second turn (prompt + the model's real output + more) reuses blocks that were
    completed by generated tokens; the router learns them from the engine's events."""
    d = driver
    turn1 = d.complete("vllm-1", d.tokens(168), max_tokens=40)  # 208 tokens: 6 full blocks
    d.settle("vllm-1")
    turn2 = turn1.sequence + d.tokens(20)

    predicted = d.overlap("vllm-1", turn2)
    done, hits, _ = _send_measured(d, "vllm-1", turn2)
    assert predicted * ROUTER_BLOCK_SIZE == done.usage.cached_tokens == hits
    # More than the first turn's prompt alone: block 5 (tokens 160..191) was filled by output.
    assert done.usage.cached_tokens > 160
    assert d.overlap("vllm-0", turn2) == 0


def test_eviction_removes_blocks_from_the_index(driver: VllmFleetDriver) -> None:
    d = driver
    fleet = d.fleet
    x = d.tokens(200)
    d.complete("vllm-0", x)
    d.settle("vllm-0")
    full = d.overlap("vllm-0", x)
    assert full == 192 // ROUTER_BLOCK_SIZE  # the 6 full engine blocks of 200 prompt tokens

    # A 12-block cache cannot hold two more 7-block sequences next to x's blocks.
    for _ in range(2):
        d.complete("vllm-0", d.tokens(200))
    held = d.settle("vllm-0")

    predicted = d.overlap("vllm-0", x)
    assert predicted < full, "the engine evicted x's blocks but the router still claims them"
    # Three 6-block sequences went in; the router holds no more than the engine can
    # (12 engine blocks = 24 router blocks): it applied the engine's removals.
    assert held <= fleet.config.num_gpu_blocks * (32 // ROUTER_BLOCK_SIZE)

    again, hits, _ = _send_measured(d, "vllm-0", x)
    assert again.usage.cached_tokens == predicted * ROUTER_BLOCK_SIZE == hits


def test_reset_prefix_cache_clears_the_worker_in_the_router(driver: VllmFleetDriver) -> None:
    d = driver
    p = d.tokens(100)
    d.complete("vllm-1", p)
    d.wait_for("router sees vllm-1's blocks", lambda: d.overlap("vllm-1", p) == 96 // 16)

    # vLLM publishes AllBlocksCleared with its next step: the one-token request after
    # the reset (which stores nothing) is that step.
    d.reset_prefix_cache("vllm-1", nudge=False)
    d.nudge("vllm-1")
    d.wait_for("router forgets vllm-1's blocks", lambda: d.cached_blocks("vllm-1") == 0)
    assert d.overlap("vllm-1", p) == 0

    again, hits, _ = _send_measured(d, "vllm-1", p)
    assert again.usage.cached_tokens == 0 == hits
