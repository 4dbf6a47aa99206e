"""Session affinity (kvrouter.server.affinity): the table, the pin rule, and two real router
replicas sharing sessions through a real Redis (expiry there too)."""

from __future__ import annotations

import random
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import redis

from kvrouter.client import RouterClient
from kvrouter.config import AffinityConfig
from kvrouter.planner import Pool
from kvrouter.protocol import ProtocolError
from kvrouter.registry import Registry, Role, WorkerStatus
from kvrouter.server.affinity import (
    KEPT,
    MOVED,
    NEW,
    Affinity,
    Pin,
    SessionTable,
    check_session,
    pin_pools,
)
from kvrouter.testing.wait import wait_until

BS = 16


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


# ------------------------------------------------------------------ pure logic


def test_session_table_expires_and_drops_least_recently_used() -> None:
    t = SessionTable(max_sessions=2)
    t.put("m", "a", "w1", ttl_s=10, now=0)
    assert t.get("m", "a", now=9.9) == "w1"
    assert t.get("m", "a", now=10.0) is None  # expired entries are gone
    t.put("m", "a", "w1", ttl_s=10, now=0)
    t.put("m", "b", "w2", ttl_s=10, now=0)
    t.put("m", "a", "w3", ttl_s=10, now=1)  # refreshes "a": "b" is now least recent
    t.put("m", "c", "w4", ttl_s=10, now=2)
    assert (t.get("m", "a", now=3), t.get("m", "b", now=3), t.get("m", "c", now=3)) == \
        ("w3", None, "w4")
    assert t.get("other-model", "a", now=3) is None


@pytest.mark.parametrize("bad", ["", "a b", "tab\there", "nl\n", "x" * 257, "\x00"])
def test_check_session_refuses_unusable_keys(bad: str) -> None:
    with pytest.raises(ProtocolError):
        check_session(bad)


def test_check_session_accepts_printable_keys() -> None:
    assert check_session("user-42:conv/7") == "user-42:conv/7"
    assert check_session("é" * 128) == "é" * 128  # 256 bytes


def _registry() -> tuple[Registry, Any]:
    reg = Registry()
    reg.add_model("m", BS, {"lease_s": 60.0, "report_ttl_s": 10.0, "policy": "kv"})
    for name in ("w1", "w2"):
        reg.upsert_worker("m", name, role=Role.AGGREGATED, address="", metadata={})
        reg.set_status("m", name, WorkerStatus.UP)
    return reg, reg.models["m"]


def must_pin(aff: Affinity, state: Any, session: str, candidates: list[int] | None = None,
             ) -> Pin:
    pin = aff.pin(state, session, candidates)
    assert pin is not None
    return pin


def test_pin_keeps_moves_on_overload_drain_and_candidates() -> None:
    reg, state = _registry()
    aff = Affinity({"m": AffinityConfig(overload_prefill_tokens=1000)})
    w1 = state.workers["w1"].wid
    assert must_pin(aff, state, "s").outcome == NEW
    aff.record("m", "s", "w1")
    pin = must_pin(aff, state, "s")
    assert (pin.outcome, pin.wid, pin.previous) == (KEPT, w1, "w1")
    # a candidate list without the session's worker moves it
    w2 = state.workers["w2"].wid
    assert must_pin(aff, state, "s", [w2]).outcome == MOVED
    # load past the threshold moves it
    state.scheduler.reserve(w1, "big", 1001, 1)
    pin = must_pin(aff, state, "s")
    assert (pin.outcome, pin.wid) == (MOVED, None) and "overload_prefill_tokens" in pin.reason
    # ...to another worker: the decision scores the others (not w1, whatever it caches)
    assert Affinity.narrow(state, pin, None) == [w2]
    assert Affinity.narrow(state, pin, [w1]) == [w1]  # no other allowed: overloaded beats none
    state.scheduler.release("big")
    assert must_pin(aff, state, "s").outcome == KEPT
    reg.set_status("m", "w1", WorkerStatus.DRAINING, "test")
    pin = must_pin(aff, state, "s")
    assert pin.outcome == MOVED and Affinity.narrow(state, pin, None) is None  # w1 not routable
    reg.remove_worker("m", "w1")
    assert must_pin(aff, state, "s").reason == "worker gone"


def test_pin_is_off_when_disabled() -> None:
    _, state = _registry()
    aff = Affinity({"m": AffinityConfig(enabled=False)})
    aff.record("m", "s", "w1")
    assert aff.pin(state, "s") is None


def test_pin_pools_narrows_to_the_sessions_worker() -> None:
    pools = {"aggregated": Pool("aggregated", aggregated=(1, 2)),
             "disaggregated": Pool("disaggregated", prefill=(3,), decode=(4, 5))}
    assert pin_pools(pools, 2) == {"aggregated": Pool("aggregated", aggregated=(2,))}
    assert pin_pools(pools, 5) == {"disaggregated": Pool("disaggregated", prefill=(3,),
                                                         decode=(5,))}
    assert pin_pools(pools, 3) == {}  # a prefill worker does not hold a session's decode KV


def test_a_redis_outage_degrades_to_this_replicas_table() -> None:
    import asyncio

    import redis.asyncio as aioredis

    from kvrouter.events.keys import Keys
    from kvrouter.server.affinity import RedisSessions
    from kvrouter.testing.processes import free_port

    _, state = _registry()

    async def run() -> Affinity:
        down = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
        aff = Affinity({"m": AffinityConfig()}, RedisSessions(down, Keys("t")))
        aff.record("m", "s", "w1")
        await aff.flush()  # refused: logged and counted, not raised
        await aff.prefetch([("m", "s")])
        await down.aclose()
        return aff

    aff = asyncio.run(run())
    assert aff.redis_errors == 2
    assert must_pin(aff, state, "s").outcome == KEPT  # the local table still knows the session


# ------------------------------------------------------------------ real routers, real Redis


@pytest.fixture(scope="module")
def replicas(module_router_server: Callable[..., Any], redis_url: str) -> Any:
    """Two router replicas sharing one Redis namespace and workers w1, w2 (module-wide:
    each test uses its own session keys)."""
    ns = f"aff{uuid.uuid4().hex[:10]}"
    cfg = {"router": {"redis_url": redis_url, "event_plane": {"namespace": ns}},
           "models": [{"name": "default", "block_size": BS, "vocab_size": 32000,
                       "affinity": {"ttl_s": 30, "overload_prefill_tokens": 4000}}]}
    a, b = module_router_server(cfg, metrics=True), module_router_server(cfg)
    ca, cb = RouterClient(a.target), RouterClient(b.target)
    for w in ("w1", "w2"):
        ca.register_worker("default", w, block_size=BS)
    wait_until(lambda: {w.name for w in cb.list_workers() if w.routable} == {"w1", "w2"}, 20,
               what="replica B sees both workers")
    r = redis.Redis.from_url(redis_url)
    yield ca, cb, r, ns, b.target, a
    ca.close()
    cb.close()
    for key in r.scan_iter(match=f"{ns}:*"):
        r.delete(key)


def test_replicas_share_sessions_through_redis_and_move_off_an_overloaded_worker(
        replicas: Any) -> None:
    ca, cb, r, ns, _, _ = replicas
    first = ca.route(tokens(1, 64), session_id="conv-1")
    assert first.affinity == NEW
    home = first.worker
    other = ({"w1", "w2"} - {home}).pop()
    # Redis holds the session with the configured TTL as its expiry
    assert r.get(f"{ns}:sess:default:conv-1") == home.encode()
    assert 0 < r.pttl(f"{ns}:sess:default:conv-1") <= 30_000
    # the other replica sends the session's next turn (a different prompt) to the same worker,
    # and Explain says affinity decided
    ex = cb.explain(tokens(2, 64), session_id="conv-1")
    assert (ex.worker, ex.affinity) == (home, KEPT)
    assert [c.worker for c in ex.candidates] == [home]
    # load the home worker past overload_prefill_tokens on replica B: the session moves there
    held = cb.route(tokens(3, 4096), candidates=[home])
    moved = cb.route(tokens(4, 64), session_id="conv-1")
    assert (moved.worker, moved.affinity) == (other, MOVED)
    assert r.get(f"{ns}:sess:default:conv-1") == other.encode()
    # ...and replica A follows the move
    again = ca.explain(tokens(5, 64), session_id="conv-1")
    assert (again.worker, again.affinity) == (other, KEPT)
    cb.release(held.request_id)
    cb.release(moved.request_id)
    ca.release(first.request_id)


def test_a_session_that_expired_in_redis_starts_anew(replicas: Any) -> None:
    ca, cb, r, ns, _, _ = replicas
    first = ca.route(tokens(6, 32), session_id="conv-2", dry_run=False)
    r.delete(f"{ns}:sess:default:conv-2")  # what the expiry does, without waiting 30 s
    assert cb.explain(tokens(7, 32), session_id="conv-2").affinity == NEW
    # a dry run (Explain) records nothing
    assert r.get(f"{ns}:sess:default:conv-2") is None
    ca.release(first.request_id)


def test_bad_session_key_is_invalid_argument_and_reserves_nothing(replicas: Any) -> None:
    ca, _, r, ns, _, _ = replicas
    before = {w.name: w.reserved_requests for w in ca.list_workers()}
    with pytest.raises(grpc.RpcError) as e:
        ca.route(tokens(8, 32), session_id="has space", request_id="bad-session")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id" in (e.value.details() or "")
    assert {w.name: w.reserved_requests for w in ca.list_workers()} == before
    assert r.get(f"{ns}:sess:default:has space") is None


def test_route_stream_honours_sessions(replicas: Any) -> None:
    from kvrouter._proto.v1 import router_pb2, router_pb2_grpc
    from kvrouter.client import route_request

    ca, cb, _, _, b_target, _ = replicas
    home = ca.route(tokens(9, 32), session_id="conv-3")
    with grpc.insecure_channel(b_target) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        items = [router_pb2.RouteStreamItem(route=route_request(tokens(10 + i, 32),
                                                                session_id="conv-3"))
                 for i in range(3)]
        reply = next(iter(stub.RouteStream(iter([router_pb2.RouteStreamRequest(seq=1,
                                                                               items=items)]))))
    got = [(res.route.worker, res.route.affinity) for res in reply.results]
    assert got == [(home.worker, KEPT)] * 3
    for res in reply.results:
        cb.release(res.route.request_id)
    ca.release(home.request_id)


def test_affinity_outcomes_are_counted_in_prometheus(replicas: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    ca, _, _, _, _, a = replicas

    def count(outcome: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{a.metrics_port}/metrics",
                                      timeout=10).read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text)
                   for s in fam.samples
                   if s.name == "kvrouter_session_affinity_total"
                   and s.labels == {"model": "default", "outcome": outcome})

    before = {o: count(o) for o in (NEW, KEPT)}
    first = ca.route(tokens(11, 32), session_id="conv-metrics")
    second = ca.route(tokens(12, 32), session_id="conv-metrics")
    ca.explain(tokens(13, 32), session_id="conv-metrics")  # dry runs are not counted
    assert {o: count(o) - before[o] for o in (NEW, KEPT)} == {NEW: 1, KEPT: 1}
    ca.release(first.request_id)
    ca.release(second.request_id)


def test_cli_route_shows_what_affinity_did(replicas: Any,
                                           kvrouter_cli: Callable[..., Any]) -> None:
    ca, _, _, _, b_target, _ = replicas
    first = ca.route(tokens(14, 32), session_id="conv-cli")
    out = kvrouter_cli("route", "--target", b_target, "--tokens", "1,2,3", "--session-id",
                       "conv-cli")
    assert out.returncode == 0, out.stderr
    assert "session affinity: kept" in out.stdout and f"chosen {first.worker}" in out.stdout
    ca.release(first.request_id)


def test_an_overloaded_worker_loses_the_session_even_with_its_cache(
        replicas: Any, block_store_class: type) -> None:
    ca, cb, _, _, _, _ = replicas
    first = ca.route(tokens(30, 64), session_id="conv-cached")
    home = first.worker
    other = ({"w1", "w2"} - {home}).pop()
    turn = tokens(31, 1024)
    block_store_class()(cb, "default", home, turn, BS)  # the next turn is cached on home
    wait_until(lambda: ca.explain(turn).worker == home, 20,
               what="replica A routes the cached turn to its holder")
    held = ca.route(tokens(32, 4096), candidates=[home])  # past overload_prefill_tokens
    moved = ca.route(turn, session_id="conv-cached")
    assert (moved.worker, moved.affinity) == (other, MOVED)
    for r in (first, held, moved):
        ca.release(r.request_id)
