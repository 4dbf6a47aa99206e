"""Real vLLM workers dying and coming back, as the router sees them.

These tests kill processes; the `driver` fixture restarts whatever a previous test
left dead, so each one starts from two live workers with empty caches.
"""

from __future__ import annotations

import pytest
import redis

from kvrouter.events.keys import Keys
from kvrouter.events.wire import parse_heartbeat
from kvrouter.testing.vllm_harness import MODEL_NAME, VllmFleet
from tests.vllm_e2e.conftest import HEARTBEAT_TTL_S, VllmFleetDriver

pytestmark = pytest.mark.vllm

# Liveness: the router drops a worker whose heartbeat is older than the TTL, checked
# every TTL/6 at most; the bound below leaves room for a loaded 2-core machine.
LAPSE_BOUND_S = 3 * HEARTBEAT_TTL_S + 5


def heartbeat_epoch(fleet: VllmFleet, worker: str) -> str:
    """The epoch the worker's publisher last reported as written (from its heartbeat)."""
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        h = client.hgetall(Keys(fleet.config.namespace).heartbeat(MODEL_NAME, worker))
    finally:
        client.close()
    return parse_heartbeat(worker, h).epoch if h else ""


def test_node_loss_leaves_routing_within_the_ttl_and_returns_as_a_new_epoch(
        driver: VllmFleetDriver, record_property: pytest.RecordProperty) -> None:
    d = driver
    fleet = d.fleet
    w1 = d.worker("vllm-1")
    p = d.tokens(100)
    d.complete("vllm-1", p)
    d.wait_for("router sees vllm-1's blocks", lambda: d.overlap("vllm-1", p) == 6)
    epoch_before = heartbeat_epoch(fleet, "vllm-1")
    assert epoch_before

    # The whole node goes: engine and bridge (SIGKILL, no goodbye).
    fleet.kill_engine(w1)
    fleet.kill_bridge(w1)
    took = d.wait_for("vllm-1 leaves routing", lambda: "vllm-1" not in d.routable(),
                      timeout=LAPSE_BOUND_S)
    record_property("lapse_s", round(took, 2))
    decisions = {d.router.explain(prompt, MODEL_NAME).worker
                 for prompt in [p, *(d.tokens(60) for _ in range(8))]}
    assert decisions == {"vllm-0"}

    fleet.start_engine(w1)
    fleet.start_bridge(w1)
    fleet.wait_routable(["vllm-1"])
    d.wait_for("a new epoch for vllm-1",
               lambda: heartbeat_epoch(fleet, "vllm-1") not in ("", epoch_before))
    # The new process starts empty and so does the router's view of it.
    assert d.cached_blocks("vllm-1") == 0
    assert d.overlap("vllm-1", p) == 0
    assert d.complete("vllm-1", p).usage.cached_tokens == 0


def test_engine_restart_behind_a_live_bridge_starts_a_new_epoch(driver: VllmFleetDriver) -> None:
    d = driver
    fleet = d.fleet
    w0 = d.worker("vllm-0")
    p = d.tokens(100)
    d.complete("vllm-0", p)
    d.wait_for("router sees vllm-0's blocks", lambda: d.overlap("vllm-0", p) == 6)
    epoch_before = heartbeat_epoch(fleet, "vllm-0")

    fleet.kill_engine(w0)
    fleet.start_engine(w0)  # same ports: the bridge's ZMQ sockets reconnect by themselves
    assert w0.bridge is not None and w0.bridge.alive()

    q = d.tokens(100)
    d.complete("vllm-0", q)  # the new process's first events: sequence back to 0
    d.wait_for("a new epoch for vllm-0",
               lambda: heartbeat_epoch(fleet, "vllm-0") not in ("", epoch_before))
    # vLLM takes longer than the heartbeat TTL to start: the bridge took the worker out
    # of routing while /health failed and announces it again now, as a new epoch.
    fleet.wait_routable(["vllm-0"])
    d.wait_for("router sees the new process's blocks", lambda: d.overlap("vllm-0", q) == 6)
    # The old process's blocks are gone from the index, as they are from the engine.
    assert d.overlap("vllm-0", p) == 0
    assert d.complete("vllm-0", p).usage.cached_tokens == 0


def test_engine_crash_behind_a_live_bridge_leaves_routing_within_the_ttl(
        driver: VllmFleetDriver) -> None:
    d = driver
    fleet = d.fleet
    w0 = d.worker("vllm-0")
    d.complete("vllm-0", d.tokens(100))
    fleet.kill_engine(w0)
    assert w0.bridge is not None and w0.bridge.alive()
    d.wait_for("vllm-0 leaves routing after its engine died",
               lambda: "vllm-0" not in d.routable(), timeout=LAPSE_BOUND_S)
