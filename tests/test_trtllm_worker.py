"""TensorRT-LLM worker wiring, end to end without a GPU: a stand-in LLM offering the
same async methods as tensorrt_llm.LLM (generate_async with streaming results,
get_kv_cache_events_async / get_stats_async yielding dicts in TensorRT-LLM's
documented shape) -> TrtllmWorker -> real Redis -> the router's Redis event plane,
and the Engine gRPC service over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.engines.trtllm.worker import TrtllmApi, TrtllmWorker, load_from_stats, serve_worker
from kvrouter.events.publisher import EventPublisher, redis_publisher
from tests.event_helpers import redis_router, reported_load
from tests.test_bridge_vllm import eventually

REDIS_URL = "redis://127.0.0.1:6379/0"
TPB = 32  # tokens_per_block
pytestmark = pytest.mark.timeout(60)


class StandInLLM:
    """Behaves like tensorrt_llm.LLM for the worker: a prefix cache of full blocks that
    emits KV cache events as TensorRT-LLM documents them."""

    def __init__(self, tokens_per_block: int, num_blocks: int = 1000) -> None:
        self.tpb = tokens_per_block
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.stats: asyncio.Queue[Any] = asyncio.Queue()
        self.event_id = 0
        self.cached: dict[tuple[int, ...], int] = {}  # prefix tokens -> block hash
        self.requests: list[tuple[list[int], Any, Any]] = []
        self.rng = random.Random(0)
        self.next_ctx_id = 1000
        self.emit({"type": "created", "num_blocks_per_cache_level": [num_blocks, 0]})

    def emit(self, data: dict[str, Any], rank: int | None = None, skip_ids: int = 0) -> None:
        self.event_id += skip_ids
        ev = {"event_id": self.event_id, "window_size": 4096, "data": data}
        if rank is not None:
            ev["attention_dp_rank"] = rank
        self.event_id += 1
        self.events.put_nowait(ev)

    def store(self, tokens: list[int], rank: int | None = None) -> list[int]:
        """Cache the prompt's full blocks (only the new ones are announced, chained)."""
        parent: int | None = None
        new: list[dict[str, Any]] = []
        first_parent: int | None = None
        hashes = []
        for i in range(len(tokens) // self.tpb):
            prefix = tuple(tokens[: (i + 1) * self.tpb])
            h = self.cached.get(prefix)
            if h is None:
                h = self.rng.getrandbits(64)  # u64, often >= 2**63
                self.cached[prefix] = h
                if not new:
                    first_parent = parent
                new.append({"type": "stored_block", "block_hash": h, "lora_id": None,
                            "cache_level": 0, "priority": 35,
                            "tokens": [{"type": "unique_token", "token_id": t,
                                        "token_extra_id": 0}
                                       for t in tokens[i * self.tpb:(i + 1) * self.tpb]]})
            parent = h
            hashes.append(h)
        if new:
            self.emit({"type": "stored", "parent_hash": first_parent, "blocks": new}, rank)
        return hashes

    def evict(self, hashes: list[int]) -> None:
        self.cached = {k: v for k, v in self.cached.items() if v not in hashes}
        self.emit({"type": "removed", "block_hashes": hashes})

    # the tensorrt_llm.LLM surface the worker uses ------------------------------------
    def generate_async(self, inputs: list[int], sampling_params: Any, streaming: bool = False,
                       disaggregated_params: Any = None) -> AsyncIterator[Any]:
        self.requests.append((list(inputs), sampling_params, disaggregated_params))
        dp = disaggregated_params
        kind = getattr(dp, "request_type", "context_and_generation")
        n_out = sampling_params.max_tokens
        if kind == "generation_only":
            assert dp.opaque_state and dp.first_gen_tokens
            start = list(dp.first_gen_tokens)
        else:
            self.store(list(inputs))
            start = []
        ctx_id = self.next_ctx_id
        self.next_ctx_id += 1

        async def run() -> AsyncIterator[Any]:
            out = list(start)
            while len(out) < n_out:
                out.append((len(inputs) + len(out)) % 997)
                await asyncio.sleep(0)
                done = len(out) >= n_out
                o = SimpleNamespace(token_ids=list(out), finish_reason="length" if done else None,
                                    disaggregated_params=None)
                if done and kind == "context_only":
                    o.disaggregated_params = SimpleNamespace(
                        request_type="context_only", first_gen_tokens=list(out),
                        ctx_request_id=ctx_id, opaque_state=f"state-{ctx_id}".encode(),
                        draft_tokens=None)
                yield SimpleNamespace(outputs=[o], finished=done, cached_tokens=0)

        return run()

    def get_kv_cache_events_async(self, timeout: float = 2) -> AsyncIterator[dict[str, Any]]:
        return _until_quiet(self.events, timeout)

    def get_stats_async(self, timeout: float = 2) -> AsyncIterator[Any]:
        return _until_quiet(self.stats, timeout)


async def _until_quiet(queue: asyncio.Queue[Any], timeout: float) -> AsyncIterator[Any]:
    """The queue's items until none comes for `timeout` s: how TensorRT-LLM's event and
    stats iterators end."""
    while True:
        try:
            item = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            return
        yield item


API = TrtllmApi(sampling_params=SimpleNamespace, disaggregated_params=SimpleNamespace)


@contextlib.asynccontextmanager
async def stack(role: str = "aggregated", dp: int = 0, worker: str = "trt",
                router_block_size: int = TPB) -> AsyncIterator[Any]:
    """The router side (redis_router) and a TensorRT-LLM worker on a stand-in LLM, serving
    the Engine gRPC API."""
    async with redis_router(router_block_size) as rr:
        ns, model = rr.ns, rr.model
        llm = StandInLLM(TPB)

        def factory(name: str) -> EventPublisher:
            return redis_publisher(REDIS_URL, model, name, namespace=ns, role=role,
                                   block_size=TPB, heartbeat_ttl_s=2.0)

        w = TrtllmWorker(llm, API, model=model, worker=worker, tokens_per_block=TPB,
                         publisher_factory=factory, role=role, attention_dp_size=dp,
                         events_timeout_s=0.2, stats_timeout_s=0.2)
        await w.start()
        server = await serve_worker(w, "127.0.0.1:0")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        env = SimpleNamespace(ns=ns, model=model, registry=rr.registry, plane=rr.plane, llm=llm,
                              worker=w, stub=engine_pb2_grpc.EngineStub(channel),
                              overlap=rr.overlap)
        try:
            yield env
        finally:
            await channel.close()
            await server.stop(1)
            await w.stop()


async def collect(call: Any) -> list[engine_pb2.GenerateResponse]:
    return [resp async for resp in call]


def prompt(seed: int, tokens: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 32000) for _ in range(tokens)]


def test_generate_publishes_blocks_into_router_index() -> None:
    p = prompt(1, 3 * TPB + 5)  # 3 full blocks and a partial one (never indexed)
    other = prompt(2, 2 * TPB)

    async def main() -> None:
        async with stack() as env:
            req = engine_pb2.GenerateRequest(request_id="r1", token_ids=p,
                                             sampling=common_pb2.SamplingParams(max_tokens=4))
            out = await collect(env.stub.Generate(req))
            tokens = [t for r in out for t in r.token_ids]
            assert len(tokens) == 4 and out[-1].finished and out[-1].finish_reason == "length"
            assert out[-1].usage.prompt_tokens == len(p)
            sent_tokens, sampling, dp = env.llm.requests[0]
            assert sent_tokens == p and sampling.max_tokens == 4 and dp is None
            await eventually(lambda: env.overlap("trt", p) == 3, what="prompt blocks indexed")
            assert env.overlap("trt", other) == 0
            # A shared prefix then an eviction of the last block.
            hashes = env.llm.store(p[:TPB] + other[:TPB])
            await eventually(lambda: env.overlap("trt", p[:TPB] + other[:TPB]) == 2,
                             what="branch")
            env.llm.evict([hashes[1]])
            await eventually(lambda: env.overlap("trt", p[:TPB] + other[:TPB]) == 1,
                             what="eviction")
            assert env.overlap("trt", p) == 3
            assert env.worker.capacity == {0: 1000, 1: 0}

    asyncio.run(main())


def test_disaggregated_context_then_generation() -> None:
    p = prompt(3, 2 * TPB)

    async def main() -> None:
        async with stack(role="prefill", worker="pre") as pre, \
                stack(role="decode", worker="dec") as dec:
            ctx = engine_pb2.GenerateRequest(
                request_id="c1", token_ids=p, sampling=common_pb2.SamplingParams(max_tokens=64),
                disaggregated=common_pb2.DisaggregatedParams(
                    request_type=common_pb2.REQUEST_TYPE_CONTEXT_ONLY))
            out = await collect(pre.stub.Generate(ctx))
            final = out[-1]
            assert final.finished
            d = final.disaggregated
            assert d.request_type == common_pb2.REQUEST_TYPE_CONTEXT_ONLY
            assert list(d.first_gen_tokens) == [t for r in out for t in r.token_ids]
            assert len(d.first_gen_tokens) == 1  # context phase: exactly the first token
            assert d.opaque_state == f"state-{d.ctx_request_id}".encode()
            _, sampling, dp = pre.llm.requests[0]
            assert sampling.max_tokens == 1 and dp.request_type == "context_only"
            await eventually(lambda: pre.overlap("pre", p) == 2, what="prefill worker cached")

            gen = engine_pb2.GenerateRequest(
                request_id="g1", token_ids=p, sampling=common_pb2.SamplingParams(max_tokens=5),
                disaggregated=common_pb2.DisaggregatedParams(
                    request_type=common_pb2.REQUEST_TYPE_GENERATION_ONLY,
                    first_gen_tokens=d.first_gen_tokens, ctx_request_id=d.ctx_request_id,
                    opaque_state=d.opaque_state))
            out2 = await collect(dec.stub.Generate(gen))
            _, _, gdp = dec.llm.requests[0]
            assert gdp.request_type == "generation_only"
            assert gdp.ctx_request_id == d.ctx_request_id
            assert gdp.opaque_state == d.opaque_state
            assert gdp.first_gen_tokens == list(d.first_gen_tokens)
            assert out2[-1].finished and out2[-1].usage.completion_tokens == 5

            # Wrong phase for the role, or missing state: clear errors, engine untouched.
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(dec.stub.Generate(ctx))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            bad = engine_pb2.GenerateRequest(
                request_id="g2", token_ids=p, disaggregated=common_pb2.DisaggregatedParams(
                    request_type=common_pb2.REQUEST_TYPE_GENERATION_ONLY))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(dec.stub.Generate(bad))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(dec.stub.Generate(engine_pb2.GenerateRequest(request_id="e")))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(dec.llm.requests) == 1

    asyncio.run(main())


def test_stats_become_load_reports() -> None:
    async def main() -> None:
        async with stack() as env:
            await collect(env.stub.Generate(engine_pb2.GenerateRequest(
                request_id="r", token_ids=prompt(4, TPB))))
            env.llm.stats.put_nowait('{"numActiveRequests": 2, "numQueuedRequests": 7, '
                                     '"kvCacheStats": {"maxNumBlocks": 1000, '
                                     '"usedNumBlocks": 120, "tokensPerBlock": 32}}')

            await eventually(lambda: reported_load(env.registry, env.model, "trt") == (2, 7, 120, 880),
                             what="load in the router")
            st = await env.stub.Stats(engine_pb2.StatsRequest())
            assert (st.load.running, st.load.queued, st.kv_total_blocks, st.block_size) == \
                (2, 7, 1000, TPB)
            assert st.events_published >= 1

    asyncio.run(main())
    assert load_from_stats({"numActiveRequests": 1, "kvCacheStats": {
        "usedNumBlocks": 3, "freeNumBlocks": 5}}).kv_free_blocks == 5
    assert load_from_stats("not json") is None


def test_attention_dp_ranks_are_workers_and_event_gap_starts_over() -> None:
    p0, p1 = prompt(5, 2 * TPB), prompt(6, 3 * TPB)

    async def main() -> None:
        async with stack(dp=2) as env:
            env.llm.store(p0, rank=0)
            env.llm.store(p1, rank=1)
            await eventually(lambda: env.overlap("trt/dp0", p0) == 2
                             and env.overlap("trt/dp1", p1) == 3, what="per-rank workers")
            assert env.overlap("trt/dp0", p1) == 0
            epoch = env.plane.core.tracks[(env.model, "trt/dp1")].epoch
            # Event ids jump on rank 1: its events were lost; it starts over, empty.
            p2 = prompt(7, TPB)
            env.llm.event_id += 5
            env.llm.store(p2, rank=1)
            await eventually(lambda: env.plane.core.tracks[(env.model, "trt/dp1")].epoch != epoch
                             and env.overlap("trt/dp1", p2) == 1
                             and env.overlap("trt/dp1", p1) == 0, what="rank 1 new epoch")
            assert env.overlap("trt/dp0", p0) == 2  # rank 0 unaffected
            assert env.worker.epochs_lost == 1

    asyncio.run(main())
