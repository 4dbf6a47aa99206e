"""Sessions' tool pauses on the TensorRT-LLM worker (engines/trtllm/retention.py), against
TensorRT-LLM's documented API shapes: KvCacheRetentionConfig at submission, host-tier
moves as `updated` events with a cache_level change, Offload / Reload confirming."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.engines.trtllm.retention import (
    KEEP_PRIORITY,
    OFFLOAD_PRIORITY,
    SessionRetentions,
    retention_for,
)
from kvrouter.engines.trtllm.worker import TrtllmApi, TrtllmWorker, serve_worker
from kvrouter.events.publisher import EventPublisher, redis_publisher
from tests.event_helpers import redis_router
from tests.test_bridge_vllm import eventually
from tests.test_trtllm_worker import REDIS_URL, TPB, StandInLLM, prompt

pytestmark = pytest.mark.timeout(60)


class RetentionLLM(StandInLLM):
    """The stand-in LLM, also taking kv_cache_retention_config (as tensorrt_llm.LLM does)
    and moving blocks to its host tier the way TensorRT-LLM reports it."""

    def __init__(self, tpb: int) -> None:
        super().__init__(tpb)
        self.retention: list[Any] = []

    def generate_async(self, inputs: list[int], sampling_params: Any, streaming: bool = False,
                       disaggregated_params: Any = None,
                       kv_cache_retention_config: Any = None) -> AsyncIterator[Any]:
        self.retention.append(kv_cache_retention_config)
        return super().generate_async(inputs, sampling_params, streaming, disaggregated_params)

    def to_host(self, hashes: list[int]) -> None:
        for h in hashes:  # GPU eviction with a host cache: the block moves to cache level 1
            self.emit({"type": "updated", "block_hash": h,
                       "cache_level": {"old_value": 0, "new_value": 1}, "priority": None})


def ctor(**kw: Any) -> SimpleNamespace:
    return SimpleNamespace(**kw)


def token_range(start: int, end: int | None, priority: int, duration: Any) -> SimpleNamespace:
    return SimpleNamespace(token_start=start, token_end=end, priority=priority,
                           duration_ms=duration)


API = TrtllmApi(sampling_params=SimpleNamespace, disaggregated_params=SimpleNamespace,
                kv_retention=ctor, token_range=token_range)


def test_retention_mapping_and_lapse() -> None:
    assert retention_for(0.0, "keep") is None  # no pause: TensorRT-LLM's defaults
    r = retention_for(10.0, "")
    assert r is not None and (r.action, r.priority, r.duration_s) == ("offload", OFFLOAD_PRIORITY, 20.0)
    keep = retention_for(3.0, "keep")
    assert keep is not None and keep.priority == KEEP_PRIORITY
    with pytest.raises(ValueError, match="tool_kv_action"):
        retention_for(3.0, "shred")
    now = [0.0]
    book = SessionRetentions(clock=lambda: now[0])
    book.record("s", keep)
    assert book.get("s") == keep
    now[0] = 6.1  # 2 x the 3 s pause
    assert book.get("s") is None


def test_tool_pause_sets_retention_and_offload_reload_confirm() -> None:
    async def main() -> None:
        async with redis_router(TPB) as rr:
            llm = RetentionLLM(TPB)

            def factory(name: str) -> EventPublisher:
                return redis_publisher(REDIS_URL, rr.model, name, namespace=rr.ns,
                                       block_size=TPB, heartbeat_ttl_s=2.0)

            w = TrtllmWorker(llm, API, model=rr.model, worker="trt", tokens_per_block=TPB,
                             publisher_factory=factory, events_timeout_s=0.2,
                             stats_timeout_s=0.2)
            await w.start()
            server = await serve_worker(w, "127.0.0.1:0")
            ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            stub = engine_pb2_grpc.EngineStub(ch)
            try:
                p = prompt(5, 3 * TPB)
                req = engine_pb2.GenerateRequest(
                    request_id="t1", token_ids=p, session_id="agent-1", tool_pause_s=15.0,
                    sampling=common_pb2.SamplingParams(max_tokens=2))
                out = [r async for r in stub.Generate(req)]
                assert out[-1].finished
                cfg = llm.retention[-1]
                assert cfg.decode_retention_priority == OFFLOAD_PRIORITY
                assert cfg.decode_duration_ms == timedelta(seconds=30)
                (rng,) = cfg.token_range_retention_configs
                assert (rng.token_start, rng.token_end, rng.priority) == (0, None, OFFLOAD_PRIORITY)
                resp = await stub.Offload(engine_pb2.OffloadRequest(session_id="agent-1"))
                assert (resp.blocks, resp.tier) == (0, common_pb2.TIER_HOST)
                assert (await stub.Reload(engine_pb2.ReloadRequest(session_id="agent-1"))).blocks == 0

                # the engine moves the blocks itself; the index follows its tier-tagged events
                await eventually(lambda: rr.overlap("trt", p) == 3, what="blocks indexed")
                llm.to_host(list(llm.cached.values()))
                state = rr.registry.model(rr.model)
                wid = state.workers["trt"].wid

                def tiers() -> tuple[int, int, int]:
                    got: tuple[int, int, int] = state.index.find_matches_tokens(p).get(wid, (0, 0, 0))
                    return got

                await eventually(lambda: tiers() == (0, 3, 0), what="blocks on the host tier")

                # a request without a pause, an unknown session, a bad action, no disk tier
                plain = engine_pb2.GenerateRequest(request_id="t2", token_ids=p, session_id="agent-2",
                                                   sampling=common_pb2.SamplingParams(max_tokens=2))
                _ = [r async for r in stub.Generate(plain)]
                assert llm.retention[-1] is None
                for call in (stub.Offload(engine_pb2.OffloadRequest(session_id="agent-2")),
                             stub.Reload(engine_pb2.ReloadRequest(session_id="nobody"))):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call
                    assert e.value.code() is grpc.StatusCode.NOT_FOUND
                bad = engine_pb2.GenerateRequest(request_id="t3", token_ids=p, session_id="agent-3",
                                                 tool_pause_s=5.0, tool_kv_action="shred",
                                                 sampling=common_pb2.SamplingParams(max_tokens=2))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    _ = [r async for r in stub.Generate(bad)]
                assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert len(llm.requests) == 2  # the bad one never reached the engine
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Offload(engine_pb2.OffloadRequest(session_id="agent-1",
                                                                 target=common_pb2.TIER_DISK))
                assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
            finally:
                await ch.close()
                await server.stop(1)
                await w.stop()

    asyncio.run(main())
