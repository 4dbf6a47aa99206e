"""Sessions' KV around tool calls, end to end: a router and simulated engines as real
processes (gRPC over loopback). Keep, offload and reload; and the documented fallbacks:
unknown session, Offload / Reload on a dead worker, a full host tier."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc
from kvrouter.server.sessions import KvAction, decide, pause_costs
from kvrouter.testing.processes import RouterProcess, free_port, start_router, start_sim_engine
from kvrouter.testing.wait import wait_until

BS = 16
@dataclass
class Stack:
    router: RouterProcess
    http: str  # the OpenAI-compatible front's base URL


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    port = free_port()
    cfg = {"router": {"heartbeat_timeout_s": 3.0, "event_plane": {"heartbeat_ttl_s": 3.0},
                      "http": f"127.0.0.1:{port}"},
           "models": [{"name": "default", "block_size": BS, "vocab_size": 32000}]}
    r = start_router(tmp_path, cfg, metrics=True)
    try:
        yield Stack(r, f"http://127.0.0.1:{port}")
    finally:
        r.stop(5.0)


def prompt(seed: int, n: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


def turn(stub: router_pb2_grpc.RouterStub, session: str, tokens: list[int], **kw: Any) -> str:
    req = router_pb2.RouterGenerateRequest(token_ids=tokens, session_id=session,
                                           request_id=uuid.uuid4().hex, **kw)
    req.sampling.max_tokens = 2
    out = list(stub.Generate(req, timeout=30))
    assert out[-1].finished
    return out[-1].worker


def tiers(stub: router_pb2_grpc.RouterStub, tokens: list[int]) -> dict[str, tuple[int, int]]:
    """Per worker: (gpu, host) blocks of the prompt's prefix in the router's index."""
    try:
        r = stub.Explain(router_pb2.ExplainRequest(route=router_pb2.RouteRequest(token_ids=tokens)))
    except grpc.RpcError as e:
        assert e.code() is grpc.StatusCode.UNAVAILABLE  # no routable worker (yet, or any more)
        return {}
    return {c.worker: (c.gpu_blocks, c.host_blocks) for c in r.candidates}


def resume(stub: router_pb2_grpc.RouterStub, session: str) -> router_pb2.ResumeSessionResponse:
    return stub.ResumeSession(router_pb2.ResumeSessionRequest(session_id=session), timeout=30)


def reservations(stub: router_pb2_grpc.RouterStub) -> int:
    return sum(w.load.reserved_requests for w in stub.ListWorkers(router_pb2.ListWorkersRequest()).workers)


def test_decision_is_a_cost_comparison() -> None:
    kw: dict[str, Any] = dict(context_tokens=8192, kv_bytes_per_token=131072, h2d_bytes_per_s=54e9,
              prefill_s=0.234, total_blocks=7000, block_size=64)
    idle = pause_costs(pause_s=20.0, used_blocks=100, host_free_blocks=10**6, **kw)
    assert decide(idle) is KvAction.KEEP  # nobody needs the blocks
    busy = pause_costs(pause_s=20.0, used_blocks=6000, host_free_blocks=10**6, **kw)
    assert busy.offload == pytest.approx(2 * 8192 * 131072 / 54e9)
    assert decide(busy) is KvAction.OFFLOAD
    no_host = pause_costs(pause_s=20.0, used_blocks=6000, host_free_blocks=None, **kw)
    assert decide(no_host) is KvAction.DROP  # 20 s of 128/7000 of the GPU > 0.234 s prefill
    short = pause_costs(pause_s=0.5, used_blocks=6000, host_free_blocks=None, **kw)
    assert decide(short) is KvAction.KEEP


def test_offload_reload_and_fallbacks(stack: Stack, tmp_path: Path) -> None:
    router = stack.router
    w1 = start_sim_engine(tmp_path, "w1", router=router.target, args=["--time-scale", "0.2"])
    try:
        with grpc.insecure_channel(router.target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            wait_until(lambda: "w1" in tiers(stub, prompt(0)), 20, what="w1 routable")
            # bad input first: nothing changes
            for kw, msg in (({"tool_pause_s": -1.0}, "tool_pause_s"),
                            ({"tool_pause_s": 5.0, "tool_kv_action": "shred"}, "tool_kv_action")):
                with pytest.raises(grpc.RpcError) as e:
                    turn(stub, "bad", prompt(9), **kw)
                assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details()
            for sid, code in (("never-seen", grpc.StatusCode.NOT_FOUND),
                              ("", grpc.StatusCode.INVALID_ARGUMENT)):
                with pytest.raises(grpc.RpcError) as e:
                    resume(stub, sid)
                assert e.value.code() is code

            # offload: the index moves the blocks to the host tier, reload moves them back
            p1 = prompt(1)
            assert turn(stub, "s1", p1, tool_pause_s=20.0, tool_kv_action="offload") == "w1"
            wait_until(lambda: tiers(stub, p1).get("w1") == (0, 16), 20,
                       what="s1's 16 blocks credited to w1's host tier only")
            with grpc.insecure_channel(w1.address) as ech:
                estats = engine_pb2_grpc.EngineStub(ech).Stats(engine_pb2.StatsRequest())
            assert estats.kv_host_blocks == 16
            r = resume(stub, "s1")
            assert (r.worker, r.state, r.action, r.blocks) == ("w1", "offloaded", "reloaded", 16)
            wait_until(lambda: tiers(stub, p1).get("w1") == (16, 0), 20, what="s1 back on GPU")
            # the next turn of the session (its context grown) reuses the reloaded prefix
            assert turn(stub, "s1", p1 + prompt(11, 64)) == "w1"

            # the same through the OpenAI-compatible front: session header, pause extension
            p5 = prompt(5)
            body = {"prompt": p5, "max_tokens": 2, "tool_pause_s": 20.0, "tool_kv_action": "offload"}
            r_http = httpx.post(f"{stack.http}/v1/completions", json=body,
                                headers={"x-session-id": "h1"}, timeout=30)
            assert r_http.status_code == 200, r_http.text
            wait_until(lambda: tiers(stub, p5).get("w1") == (0, 16), 20, what="h1 on host")
            r = resume(stub, "h1")
            assert (r.state, r.action, r.blocks) == ("offloaded", "reloaded", 16)
            bad = httpx.post(f"{stack.http}/v1/completions", timeout=30,
                             json={**body, "tool_kv_action": "shred"}, headers={"x-session-id": "h1"})
            assert bad.status_code == 400 and "tool_kv_action" in bad.text

            # keep: pinned on the GPU; the resume ends the pin (nothing to copy)
            p2 = prompt(2)
            turn(stub, "s2", p2, tool_pause_s=3.0, tool_kv_action="keep")
            r = resume(stub, "s2")
            assert (r.state, r.action, r.blocks) == ("kept", "unpinned", 0)
            # no override: the router's cost decision; an idle GPU has room, so it keeps
            turn(stub, "s2", p2, tool_pause_s=30.0)
            r = resume(stub, "s2")
            assert (r.state, r.action) == ("kept", "unpinned")

            # the worker dies while the session is offloaded: the resume falls back to
            # re-prefill, and no block stays credited anywhere once the worker is gone
            p3 = prompt(3)
            turn(stub, "s3", p3, tool_pause_s=20.0, tool_kv_action="offload")
            wait_until(lambda: tiers(stub, p3).get("w1") == (0, 16), 20, what="s3 on host")
            w1.kill()
            r = resume(stub, "s3")
            assert (r.state, r.action, r.blocks) == ("offloaded", "reprefill", 0)
            assert "UNAVAILABLE" in r.detail
            wait_until(lambda: "w1" not in tiers(stub, p3), 30, what="w1 dropped from the index")
            assert reservations(stub) == 0
            text = httpx.get(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=10).text
            for line in ('kvrouter_session_kv_total{event="reloaded"} 2.0',
                         'kvrouter_session_kv_total{event="unpinned"} 2.0',
                         'kvrouter_session_kv_total{event="reload_failed_unavailable"} 1.0'):
                assert line in text
    finally:
        w1.stop(5.0)


def test_full_host_tier_and_no_host_tier_fall_back(stack: Stack, tmp_path: Path) -> None:
    router = stack.router
    # one block of host tier: a 16-block session cannot be offloaded
    w2 = start_sim_engine(tmp_path, "w2", router=router.target,
                          args=["--time-scale", "0.2", "--host-kv-capacity-tokens", str(BS)])
    try:
        with grpc.insecure_channel(router.target) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            wait_until(lambda: "w2" in tiers(stub, prompt(0)), 20, what="w2 routable")
            p = prompt(4)
            turn(stub, "s4", p, tool_pause_s=20.0, tool_kv_action="offload")
            r = resume(stub, "s4")
            assert (r.state, r.action) == ("dropped", "reprefill")
            assert "RESOURCE_EXHAUSTED" in r.detail and "host KV tier full" in r.detail
            # nothing moved: the blocks are where they were, none credited to the host tier
            assert tiers(stub, p).get("w2") == (16, 0)
            with grpc.insecure_channel(w2.address) as ech:
                e = engine_pb2_grpc.EngineStub(ech)
                assert e.Stats(engine_pb2.StatsRequest()).kv_host_blocks == 0
                # the engine's own answers: unknown session, no disk tier
                with pytest.raises(grpc.RpcError) as err:
                    e.Reload(engine_pb2.ReloadRequest(session_id="nope"))
                assert err.value.code() is grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.RpcError) as err:
                    e.Offload(engine_pb2.OffloadRequest(session_id="s4", target=common_pb2.TIER_DISK))
                assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert reservations(stub) == 0
    finally:
        w2.stop(5.0)


def test_live_reload_overlaps_the_next_turns_prefill(stack: Stack, tmp_path: Path) -> None:
    """Engine.Reload answers once its copy is queued and the next turn's prefill runs
    alongside it layer by layer (SimRequest.load_until from host_tier, the path
    bench/agentic measures), instead of the router waiting for the whole copy first. A slow
    host link (0.02 GB/s: 16 blocks copy in 1.68 s) makes the copy outlast the hop from the
    Reload to the turn's Generate; the engine reports in simulated time how long its steps
    waited for copies still landing: some (the turn started during the copy), and less than
    the copy (the part spent before the prefill, or under it, is hidden)."""
    router = stack.router
    w = start_sim_engine(tmp_path, "w3", router=router.target,
                         args=["--time-scale", "1", "--h2d-gbps", "0.02"])
    copy_s = 16 * BS * 131072 / 0.02e9
    try:
        with grpc.insecure_channel(router.target) as ch, grpc.insecure_channel(w.address) as ech:
            stub = router_pb2_grpc.RouterStub(ch)
            estub = engine_pb2_grpc.EngineStub(ech)
            wait_until(lambda: "w3" in tiers(stub, prompt(0)), 20, what="w3 routable")
            p = prompt(6)
            turn(stub, "s6", p, tool_pause_s=20.0, tool_kv_action="offload")
            wait_until(lambda: tiers(stub, p).get("w3") == (0, 16), 20, what="s6 on host")
            before = estub.Stats(engine_pb2.StatsRequest()).extra
            assert before["host_load_waits"] == 0
            # the next turn: the router reloads (Engine.Reload), then sends the turn at once
            req = router_pb2.RouterGenerateRequest(token_ids=p + prompt(16, 64), session_id="s6",
                                                   request_id=uuid.uuid4().hex)
            req.sampling.max_tokens = 2
            out = list(stub.Generate(req, timeout=30))
            assert out[-1].finished and out[-1].usage.cached_tokens == 16 * BS
            extra = estub.Stats(engine_pb2.StatsRequest()).extra
            assert extra["host_load_waits"] >= 1
            assert 0.0 < extra["host_load_wait_s"] < copy_s
            assert reservations(stub) == 0
    finally:
        w.stop(5.0)


def test_offload_to_a_dead_worker_falls_back_to_reprefill() -> None:
    """The worker died between the turn and the Offload: the router's call fails (real gRPC
    to a closed port), the session is marked dropped and the resume says re-prefill."""
    from kvrouter.server.sessions import SessionKvManager
    from kvrouter.testing.processes import free_port

    async def main() -> None:
        m = SessionKvManager(timeout_s=2.0)
        try:
            m.turn_ended("default", "s", "gone", f"127.0.0.1:{free_port()}", 4096,
                         KvAction.OFFLOAD, "test")
            r = await m.resume("default", "s")
            assert (r.worker, r.state, r.action, r.blocks) == ("gone", "dropped", "reprefill", 0)
            assert "offload failed: UNAVAILABLE" in r.detail
            assert m.counts.get("offload_failed_unavailable") == 1
            with pytest.raises(KeyError, match="unknown session"):
                await m.resume("default", "other")
        finally:
            await m.close()

    asyncio.run(main())
