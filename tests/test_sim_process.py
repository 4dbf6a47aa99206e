"""`kvrouter engine sim` as a real process registered to a real `kvrouter serve` over gRPC
(no Redis): KV events reach the router's index, Stats reports load, and a worker that
dies or stops leaves routing."""

from __future__ import annotations

import random
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.client import RouterClient
from kvrouter.testing.processes import (
    RouterProcess,
    SimEngineProcess,
    sim_engine,
    start_sim_engine,
    wait_engine_serving,
)
from kvrouter.testing.wait import wait_until

BS = 16
T = TypeVar("T")

# Short liveness so that a killed engine leaves routing within seconds.
ROUTER_CONFIG = {
    "router": {"heartbeat_timeout_s": 3.0, "event_plane": {"heartbeat_ttl_s": 2.0}},
    "models": [{"name": "default", "block_size": BS}],
}


def eventually(fn: Callable[[], T], timeout: float, what: str) -> T:
    return wait_until(fn, timeout, what=what)


def start_engine(workdir: Path, target: str, name: str, *extra: str) -> SimEngineProcess:
    return start_sim_engine(workdir, name, router=target, args=("--time-scale", "0.2", *extra))


@pytest.fixture(scope="module")
def fleet(module_router_server: Callable[..., RouterProcess],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    router = module_router_server(ROUTER_CONFIG)
    workdir = tmp_path_factory.mktemp("engines")
    engines: list[SimEngineProcess] = []
    try:
        for i in range(2):
            engines.append(start_engine(workdir, router.target, f"sim-{i}-{uuid.uuid4().hex[:6]}"))
        yield {"router": router, "engines": engines, "workdir": workdir}
    finally:
        for e in engines:
            e.stop()


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


def _generate(address: str, prompt: list[int], max_tokens: int,
              request_id: str = "") -> list[engine_pb2.GenerateResponse]:
    with grpc.insecure_channel(address) as ch:
        stub = engine_pb2_grpc.EngineStub(ch)
        req = engine_pb2.GenerateRequest(request_id=request_id or uuid.uuid4().hex,
                                         token_ids=prompt,
                                         sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
        return list(stub.Generate(req, timeout=60))


def _workers(target: str) -> dict[str, Any]:
    with RouterClient(target) as rc:
        return {w.name: w for w in rc.list_workers()}


def test_engines_register_with_address(fleet: dict[str, Any]) -> None:
    workers = _workers(fleet["router"].target)
    for e in fleet["engines"]:
        w = workers[e.name]
        assert w.address == e.address
        assert w.routable and w.status == "up" and w.role == "aggregated"


def test_generate_streams_tokens_and_router_learns_the_prefix(fleet: dict[str, Any]) -> None:
    target = fleet["router"].target
    eng = fleet["engines"][1]
    prompt = _prompt(1, 20 * BS + 5)  # 20 full blocks and a partial one
    out = _generate(eng.address, prompt, max_tokens=12)
    final = out[-1]
    assert final.finished and final.finish_reason == "length"
    assert sum(len(r.token_ids) for r in out) == 12
    assert all(r.worker == eng.name for r in out)
    assert final.usage.prompt_tokens == len(prompt)
    assert final.usage.cached_tokens == 0
    assert final.usage.completion_tokens == 12

    # A new prompt sharing the first 18 blocks: the router (fed by the engine's KV events
    # over PublishEvents, token ids re-hashed) sees the overlap on that worker only.
    probe = prompt[: 18 * BS] + _prompt(2, 3 * BS)
    with RouterClient(target) as rc:
        def overlap() -> Any:
            d = rc.explain(probe)
            return d if d.worker == eng.name and d.overlap_blocks == 18 else None

        d = eventually(overlap, 15, "the router to index the engine's blocks")
        by_worker = {c.worker: c for c in d.candidates}
        assert by_worker[eng.name].gpu_blocks == 18
        others = [c for name, c in by_worker.items() if name != eng.name]
        assert others and all(c.gpu_blocks == 0 for c in others)

    # The engine itself reuses the same prefix: the cached tokens it reports match.
    again = _generate(eng.address, probe, max_tokens=2)
    assert again[-1].usage.cached_tokens == 18 * BS


def test_stats_reflect_running_requests(fleet: dict[str, Any]) -> None:
    eng = fleet["engines"][0]
    with grpc.insecure_channel(eng.address) as ch:
        stub = engine_pb2_grpc.EngineStub(ch)
        before = stub.Stats(engine_pb2.StatsRequest(), timeout=10)
        assert before.worker == eng.name and before.block_size == BS
        assert before.kv_total_blocks > 0
        # ~2000 decode steps of several ms at time scale 0.2: running for seconds
        req = engine_pb2.GenerateRequest(request_id=uuid.uuid4().hex, token_ids=_prompt(3, 100),
                                         sampling=common_pb2.SamplingParams(max_tokens=2000))
        stream = stub.Generate(req, timeout=120)
        first = next(stream)
        assert first.token_ids
        during = stub.Stats(engine_pb2.StatsRequest(), timeout=10)
        assert during.load.running == 1
        assert during.load.kv_used_blocks > before.load.kv_used_blocks
        rest = list(stream)
        assert rest[-1].finished
        after = eventually(lambda: (s := stub.Stats(engine_pb2.StatsRequest(), timeout=10))
                           and s.load.running == 0 and s, 10, "the request to leave the engine")
        assert after.load.kv_used_blocks == before.load.kv_used_blocks
        assert after.extra["finished"] >= before.extra["finished"] + 1


def test_bad_requests_get_clear_errors(fleet: dict[str, Any]) -> None:
    eng = fleet["engines"][0]
    with grpc.insecure_channel(eng.address) as ch:
        stub = engine_pb2_grpc.EngineStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(engine_pb2.GenerateRequest(request_id="empty"), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(engine_pb2.GenerateRequest(token_ids=[1, 2, 40000]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "40000" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(engine_pb2.GenerateRequest(token_ids_le=b"\x01\x00\x00"), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            stub.Offload(engine_pb2.OffloadRequest(session_id="s"), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND  # a session it never served
        assert "unknown session" in e.value.details()
        # nothing above reached the engine core
        assert stub.Stats(engine_pb2.StatsRequest(), timeout=10).load.running == 0


def test_killed_engine_leaves_routing(fleet: dict[str, Any]) -> None:
    target = fleet["router"].target
    eng = start_engine(fleet["workdir"], target, f"victim-{uuid.uuid4().hex[:6]}")
    try:
        prompt = _prompt(4, 12 * BS)
        _generate(eng.address, prompt, max_tokens=2)
        with RouterClient(target) as rc:
            eventually(lambda: rc.explain(prompt).worker == eng.name, 15,
                       "the router to route the prompt to the engine that cached it")
            eng.proc.send_signal(signal.SIGKILL)
            eng.proc.wait(10)

            def gone() -> bool:
                w = _workers(target).get(eng.name)
                return w is None or not w.routable

            eventually(gone, 30, "the killed engine to leave routing")
            d = rc.explain(prompt)
            assert d.worker != eng.name
            assert all(c.worker != eng.name for c in d.candidates)
    finally:
        eng.stop()


def test_terminated_engine_deregisters(fleet: dict[str, Any]) -> None:
    target = fleet["router"].target
    eng = start_engine(fleet["workdir"], target, f"leaver-{uuid.uuid4().hex[:6]}")
    assert eng.name in _workers(target)
    eng.proc.send_signal(signal.SIGTERM)
    assert eng.proc.wait(15) == 0
    # DeregisterWorker was sent on the way out: gone at once, not after a liveness TTL.
    assert eng.name not in _workers(target)
    assert "Traceback" not in eng.logs()


def test_engine_publishes_to_redis(router_server: Callable[..., RouterProcess],
                                   tmp_path: Path) -> None:
    """With --redis the same engine reports through Redis Streams and heartbeats."""
    import redis

    url = "redis://127.0.0.1:6379/0"
    ns = f"test-sim-{uuid.uuid4().hex[:8]}"
    router = router_server({"router": {"redis_url": url, "event_plane": {"namespace": ns}},
                            "models": [{"name": "default", "block_size": BS}]})
    name = f"redis-sim-{uuid.uuid4().hex[:6]}"
    eng = sim_engine(tmp_path, name, redis=url, namespace=ns,
                     args=("--block-size", str(BS), "--time-scale", "0.2")).start()
    proc = eng.proc
    client = redis.Redis.from_url(url)
    try:
        wait_engine_serving(eng, 60)
        # (the first stream entry may make the worker known before its first heartbeat)
        eventually(lambda: (w := _workers(router.target).get(name)) and w.address == eng.address,
                   30, "the router to see the engine's heartbeat with its address")
        prompt = _prompt(5, 10 * BS)
        _generate(eng.address, prompt, max_tokens=3)
        with RouterClient(router.target) as rc:
            eventually(lambda: rc.explain(prompt).overlap_blocks == 10, 15,
                       "the router to index the engine's blocks from Redis")
        assert any(k.startswith(f"{ns}:".encode()) for k in client.scan_iter(match=f"{ns}:*"))
        eng.stop()
        assert proc.returncode == 0, eng.logs()
        eventually(lambda: name not in _workers(router.target), 15,
                   "the router to drop the engine that left")
    finally:
        eng.stop()
        keys = list(client.scan_iter(match=f"{ns}:*"))
        if keys:
            client.delete(*keys)
        client.close()
