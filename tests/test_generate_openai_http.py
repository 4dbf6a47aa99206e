"""The OpenAI-compatible HTTP backend (kvrouter.backends.openai_http) against a fake
completions server speaking real HTTP/1.1 + SSE over loopback (http.server, keep-alive):
the request it sends, pooled connections, early stop and cancellation aborting the
server's stream, error mapping, and Router.Generate proxying to it from a router process.
Runs without vLLM (tests/vllm_e2e covers the real server)."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from kvrouter._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from kvrouter.backends.base import (
    EngineCall,
    EngineChunk,
    EngineFailure,
    FailureKind,
    RequestPhase,
)
from kvrouter.backends.openai_http import (
    BackendHTTPError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    CompletionChunk,
    OpenAIBackend,
    OpenAIHttpClient,
    generate,
    request,
)
from kvrouter.client import RouterClient
from kvrouter.registry import Role, WorkerInfo
from kvrouter.testing.processes import free_port
from kvrouter.testing.wait import wait_until
from tests.generate_helpers import generate as router_generate
from tests.generate_helpers import prompt, router_config, wait_no_reservations, wait_routable

CACHED = 32  # what the fake reports as prompt tokens served from its cache


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeOpenAI:
    """What the fake server answers (set before a call) and what it saw."""

    status: int = 200
    error_message: str = "bad request"
    tokens_per_chunk: int = 2
    delay_s: float = 0.0  # between chunks
    stall_after: int | None = None  # chunks sent, then silence (until the client leaves)
    error_event_after: int | None = None  # chunks sent, then an error event
    content_type: str = "text/event-stream"
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    aborted: list[str] = field(default_factory=list)  # X-Request-Id of streams cut by the client
    completed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


def _tokens_for(body: dict[str, Any]) -> list[int]:
    """The completion the fake 'generates': deterministic from the prompt."""
    last = int(body["prompt"][-1])
    return [(last + 1 + i) % 1000 for i in range(int(body["max_tokens"]))]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: connections can be reused
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.fake.lock:
            self.server.fake.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _client_gone(self, wait_s: float = 0.05) -> bool:
        readable, _, _ = select.select([self.connection], [], [], wait_s)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, obj: Any) -> None:
        self._chunk(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rid = self.headers.get("X-Request-Id", "")
        with fake.lock:
            fake.requests.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()},
                                      body))
        if fake.status != 200:
            err = json.dumps({"error": {"message": fake.error_message, "code": fake.status}})
            self.send_response(fake.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            self.wfile.write(err.encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", fake.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        toks = _tokens_for(body)
        n = fake.tokens_per_chunk
        pieces = [toks[i:i + n] for i in range(0, len(toks), n)]
        try:
            for k, piece in enumerate(pieces):
                if fake.error_event_after == k:
                    self._event({"error": {"message": "engine died", "code": 503}})
                    break
                if fake.stall_after == k:
                    while not self._client_gone():  # silent until the client leaves
                        pass
                    raise ConnectionResetError
                last = k == len(pieces) - 1
                self._event({"choices": [{"index": 0, "text": "x" * len(piece),
                                          "token_ids": piece,
                                          "finish_reason": "length" if last else None}]})
                time.sleep(fake.delay_s)
            else:
                self._event({"choices": [], "usage": {
                    "prompt_tokens": len(body["prompt"]), "completion_tokens": len(toks),
                    "prompt_tokens_details": {"cached_tokens": CACHED}}})
                self._event("[DONE]")
            self._chunk(b"")  # the chunked body's end: the connection can serve another request
            with fake.lock:
                fake.completed.append(rid)
        except (BrokenPipeError, ConnectionResetError):
            with fake.lock:
                fake.aborted.append(rid)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI


@pytest.fixture
def fake_server() -> Iterator[Callable[[], FakeOpenAI]]:
    servers: list[_Server] = []

    def start() -> FakeOpenAI:
        srv = _Server(("127.0.0.1", 0), _Handler)
        srv.fake = FakeOpenAI(url=f"http://127.0.0.1:{srv.server_address[1]}")
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv.fake

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def fake(fake_server: Callable[[], FakeOpenAI]) -> FakeOpenAI:
    return fake_server()


async def _collect(client: OpenAIHttpClient, address: str, toks: list[int], n: int,
                   **kw: Any) -> list[CompletionChunk]:
    return [c async for c in client.generate(address, "tiny", toks, n, **kw)]


# --------------------------------------------------------------------------- the client


def test_streams_token_ids_and_usage_with_the_openai_request(fake: FakeOpenAI) -> None:
    async def main() -> list[CompletionChunk]:
        async with OpenAIHttpClient() as client:
            return await _collect(client, fake.url, [5, 6, 7], 5, request_id="r-1",
                                  temperature=0.0, ignore_eos=True)

    chunks = asyncio.run(main())
    assert [c.token_ids for c in chunks] == [[8, 9], [10, 11], [12]]
    assert [c.finished for c in chunks] == [False, False, True]
    last = chunks[-1]
    assert last.finish_reason == "length" and last.text == "x"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.cached_tokens) == (3, 5, CACHED)
    (seen,) = fake.requests
    assert seen.path == "/v1/completions"
    assert seen.body == {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 5, "stream": True,
                         "return_token_ids": True, "stream_options": {"include_usage": True},
                         "temperature": 0.0, "ignore_eos": True}
    assert seen.headers["x-request-id"] == "r-1"
    assert seen.headers["accept"] == "text/event-stream"
    # the server notes the stream as complete just after its last write: poll
    wait_until(lambda: fake.completed == ["r-1"], 10, what="server finished the stream")


def test_one_pooled_connection_per_server_is_reused(fake_server: Callable[[], FakeOpenAI],
                                                    ) -> None:
    a, b = fake_server(), fake_server()

    async def main() -> None:
        async with OpenAIHttpClient() as client:
            for i in range(3):
                chunks = await _collect(client, a.url, [i + 1], 4)
                assert chunks[-1].finished
            await _collect(client, b.url + "/base/", [1], 2)  # a base path, another server
            status, body = await client.request(a.url, "GET", "/health")
            assert (status, body) == (200, b"ok")

    asyncio.run(main())
    assert (a.connections, len(a.requests)) == (1, 3)
    assert (b.connections, [s.path for s in b.requests]) == (1, ["/base/v1/completions"])


def test_stopping_early_aborts_the_servers_stream_and_the_pool_recovers(
        fake: FakeOpenAI) -> None:
    fake.delay_s = 0.02

    async def main() -> None:
        async with OpenAIHttpClient() as client:
            stream = client.generate(fake.url, "tiny", [1], 400, request_id="stopped")
            first = await anext(stream)
            assert first.token_ids == [2, 3]
            await stream.aclose()
            await asyncio.to_thread(wait_until, lambda: fake.aborted == ["stopped"], 10,
                                    what="server saw the client leave")
            # the next call gets a fresh connection and completes
            fake.delay_s = 0.0
            assert (await _collect(client, fake.url, [1], 3))[-1].finished

    asyncio.run(main())
    assert fake.connections == 2


def test_cancelling_the_task_aborts_the_servers_stream(fake: FakeOpenAI) -> None:
    fake.stall_after = 1

    async def main() -> None:
        async with OpenAIHttpClient() as client:
            got: list[CompletionChunk] = []

            async def consume() -> None:
                async for c in client.generate(fake.url, "tiny", [1], 100, request_id="cx"):
                    got.append(c)

            task = asyncio.create_task(consume())
            await asyncio.to_thread(wait_until, lambda: got, 10, what="first chunk")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(wait_until, lambda: fake.aborted == ["cx"], 10,
                                    what="server saw the client leave")

    asyncio.run(main())


def test_errors_map_to_backend_errors(fake: FakeOpenAI) -> None:
    async def main() -> None:
        async with OpenAIHttpClient(connect_timeout=2.0) as client:
            fake.status, fake.error_message = 404, "The model `tiny` does not exist."
            with pytest.raises(BackendHTTPError, match="does not exist") as info:
                await _collect(client, fake.url, [1], 4)
            assert info.value.status == 404
            fake.status = 200
            fake.error_event_after = 1
            with pytest.raises(BackendHTTPError, match="engine died") as info:
                await _collect(client, fake.url, [1], 8)
            assert info.value.status == 503
            fake.error_event_after = None
            fake.content_type = "application/json"
            with pytest.raises(BackendProtocolError, match="not an event stream"):
                await _collect(client, fake.url, [1], 4)
            fake.content_type = "text/event-stream"
            fake.stall_after = 1
            with pytest.raises(BackendTimeout, match=r"no data for 0\.3s"):
                await _collect(client, fake.url, [1], 8, read_timeout=0.3)
            fake.stall_after = None
            with pytest.raises(BackendUnavailable, match="cannot connect"):
                await _collect(client, f"127.0.0.1:{free_port()}", [1], 4)
            with pytest.raises(ValueError, match="scheme"):
                await _collect(client, "ftp://h:1", [1], 4)

    asyncio.run(main())


def test_one_shot_helpers(fake: FakeOpenAI) -> None:
    async def main() -> None:
        chunks = [c async for c in generate(fake.url, "tiny", [3], 2)]
        assert chunks[-1].finished and chunks[-1].token_ids == [4, 5]
        assert await request(fake.url, "GET", "/health") == (200, b"ok")

    asyncio.run(main())


# --------------------------------------------------------------------------- router backend


def _worker(url: str, **meta: str) -> WorkerInfo:
    return WorkerInfo(name="oa", wid=1, model="default", role=Role.AGGREGATED, address=url,
                      metadata=meta)


def _call(phase: RequestPhase = RequestPhase.CONTEXT_AND_GENERATION) -> EngineCall:
    return EngineCall(request_id="q.1", token_ids=np.array([9, 8, 7], dtype=np.uint32),
                      max_tokens=3, sampling=common_pb2.SamplingParams(temperature=0.5),
                      request_type=phase)


def test_backend_maps_chunks_and_failures(fake: FakeOpenAI) -> None:
    async def run(worker: WorkerInfo, call: EngineCall) -> list[EngineChunk]:
        backend = OpenAIBackend(read_timeout_s=5.0)
        try:
            return [c async for c in backend.generate(worker, "default", call)]
        finally:
            await backend.close()

    chunks = asyncio.run(run(_worker(fake.url, served_model="tiny"), _call()))
    assert [c.token_ids for c in chunks] == [[8, 9], [10]]
    assert (chunks[-1].finished, chunks[-1].finish_reason, chunks[-1].prompt_tokens,
            chunks[-1].completion_tokens, chunks[-1].cached_tokens) == (True, "length", 3, 3, CACHED)
    seen = fake.requests[-1]
    assert (seen.body["model"], seen.body["temperature"], seen.headers["x-request-id"]) == \
        ("tiny", 0.5, "q.1")
    asyncio.run(run(_worker(fake.url), _call()))
    assert fake.requests[-1].body["model"] == "default"  # no served_model: the router's name

    def failure(worker: WorkerInfo, call: EngineCall) -> EngineFailure:
        with pytest.raises(EngineFailure) as info:
            asyncio.run(run(worker, call))
        return info.value

    f = failure(_worker(fake.url), _call(RequestPhase.CONTEXT_ONLY))
    assert (f.kind, f.code) == (FailureKind.UNSUPPORTED, grpc.StatusCode.UNIMPLEMENTED)
    for status, kind in ((400, FailureKind.INVALID), (429, FailureKind.WORKER),
                         (503, FailureKind.WORKER)):
        fake.status = status
        f = failure(_worker(fake.url), _call())
        assert f.kind is kind, status
        assert f"HTTP {status}" in f.message
    assert failure(_worker(fake.url), _call()).code == grpc.StatusCode.UNAVAILABLE
    fake.status = 200
    f = failure(_worker(f"127.0.0.1:{free_port()}"), _call())
    assert f.kind is FailureKind.WORKER and "cannot connect" in f.message


# --------------------------------------------------------------------------- Router.Generate


def _register(target: str, name: str, url: str) -> None:
    with RouterClient(target) as rc:
        rc.register_worker("default", name, address=url,
                           metadata={"backend": "openai", "served_model": "tiny"})


def test_router_generate_proxies_to_openai_workers(router_server: Callable[..., Any],
                                                   fake_server: Callable[[], FakeOpenAI],
                                                   tmp_path: Path) -> None:
    router = router_server(router_config())
    good, bad = fake_server(), fake_server()
    bad.status = 503
    _register(router.target, "good", good.url)
    _register(router.target, "bad", bad.url)
    wait_routable(router.target, {"good", "bad"})

    # Disaggregated mode still runs whole on OpenAI workers (no disaggregation there). A
    # worker answering 503 is failed over, then avoided; ties between the two idle workers
    # are broken at random, so requests go on until the bad one has been tried.
    failovers = []
    for seed in range(20):
        toks = prompt(seed, 40)
        rep = router_generate(router.target, toks, 6,
                              mode=router_pb2.GENERATE_MODE_DISAGGREGATED)
        assert rep.code == grpc.StatusCode.OK, rep.details
        assert rep.tokens == [(toks[-1] + 1 + i) % 1000 for i in range(6)]
        assert rep.workers == ["good"] and rep.final.finished
        assert rep.final.usage.cached_tokens == CACHED
        assert rep.final.usage.prompt_tokens == 40
        assert rep.final.usage.completion_tokens == 6
        failovers.append(rep.metadata.get("kvrouter-failovers", ""))
        if bad.requests and len(failovers) >= 3:
            break
    assert len(bad.requests) == 1
    assert sorted(set(failovers)) == ["", "generate:bad:worker"]
    assert failovers.count("generate:bad:worker") == 1
    # the router reuses its pooled connection (a new one only after an idle keep-alive expiry)
    assert good.connections < len(good.requests), (good.connections, len(good.requests))
    assert all(s.body["model"] == "tiny" and s.body["prompt"][:40] for s in good.requests)
    wait_no_reservations(router.target)

    # A client that cancels mid-stream: the router closes its stream, the engine aborts.
    good.delay_s = 0.05
    with grpc.insecure_channel(router.target) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(router_pb2.RouterGenerateRequest(
            token_ids=prompt(9, 40), request_id="cancelled",
            sampling=common_pb2.SamplingParams(max_tokens=500)), timeout=60)
        next(call)
        call.cancel()
    wait_until(lambda: len(good.aborted) == 1, 10, what="engine stream aborted")
    assert good.aborted[0].startswith("cancelled.")
    wait_no_reservations(router.target)

    # The engine refusing the request is the client's error, with the engine's words.
    good.status, good.error_message = 400, "prompt too long"
    bad.status = 400
    rep = router_generate(router.target, prompt(10, 40), 4)
    assert rep.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt too long" in rep.details
    wait_no_reservations(router.target)
