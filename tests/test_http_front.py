"""The OpenAI-compatible HTTP front (kvrouter.http) end to end: a real `kvrouter serve
--http` process, two simulated engines, and the official `openai` SDK as the client
(raw httpx where the test needs a body the SDK would not send)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from kvrouter._proto.v1 import engine_pb2, engine_pb2_grpc
from kvrouter.client import RouterClient
from kvrouter.http.tokenizer import ModelTokenizer, build_sim_tokenizer
from kvrouter.testing.processes import RouterProcess, free_port, start_router
from kvrouter.testing.wait import wait_until
from tests.generate_helpers import Engines, reservations, wait_no_reservations, wait_routable

MAX_LEN = 8192  # the test tokenizer's model_max_length: the context limit the front enforces


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sim_tokenizer(tmp_path_factory.mktemp("tok"), 32000, MAX_LEN)


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.load(tokenizer_dir)


class Front:
    def __init__(self, router: RouterProcess, base: str, engines: Engines) -> None:
        self.router = router
        self.base = base
        self.engines = engines
        self.sdk = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                 timeout=60)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Iterator[Front]:
    work = tmp_path_factory.mktemp("front")
    http_port = free_port()
    cfg = {"router": {"heartbeat_timeout_s": 30.0, "http": f"127.0.0.1:{http_port}"},
           "models": [{"name": "default", "block_size": 16, "vocab_size": 32000,
                       "tokenizer": str(tokenizer_dir)},
                      {"name": "ids-only", "block_size": 16}]}
    router = start_router(work, cfg, metrics=True)
    engines = Engines(work / "engines", router.target)
    engines.workdir.mkdir(parents=True)
    try:
        for i in range(2):
            engines.start("aggregated", name=f"sim-{i}")
        wait_routable(router.target, {"sim-0", "sim-1"})
        yield Front(router, f"http://127.0.0.1:{http_port}", engines)
    finally:
        engines.stop_all()
        router.stop()


def _text(words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(words))


# ----------------------------------------------------------------------------- happy paths


def test_completion_text_and_token_ids(front: Front, tok: ModelTokenizer) -> None:
    prompt = _text(30)
    ids = tok.encode(prompt)
    out = front.sdk.completions.create(model="default", prompt=prompt, max_tokens=8,
                                       extra_body={"return_token_ids": True})
    assert out.object == "text_completion" and len(out.choices) == 1
    ch = out.choices[0]
    assert ch.finish_reason == "length"
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(ids)  # the router tokenised exactly this
    assert out.usage.completion_tokens == 8
    gen = (ch.model_extra or {})["token_ids"]
    assert len(gen) == 8 and ch.text == tok.decode(gen)
    # the same prompt as token ids: same prompt length, served from the engine's cache
    again = front.sdk.completions.create(model="default", prompt=ids, max_tokens=4)
    assert again.usage is not None and again.usage.prompt_tokens == len(ids)
    details = again.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert 0 < details.cached_tokens <= len(ids) and details.cached_tokens % 16 == 0


def _indexed_blocks(front: Front) -> int:
    with RouterClient(front.router.target) as rc:
        return sum(w.cached_blocks for w in rc.list_workers())


def test_streaming_chunks_and_usage(front: Front, tok: ModelTokenizer) -> None:
    prompt = _text(60, seed=1)
    n_prompt = len(tok.encode(prompt))
    before = _indexed_blocks(front)
    front.sdk.completions.create(model="default", prompt=prompt, max_tokens=1)  # warm the cache
    # the engine's KV events reach the router's index before the next request is routed
    wait_until(lambda: _indexed_blocks(front) >= before + n_prompt // 16, 10,
               what="the prompt's blocks in the router's index")
    stream = front.sdk.completions.create(model="default", prompt=prompt, max_tokens=12,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"return_token_ids": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2  # streamed, not one blob
    assert all(c.usage is None for c in text_chunks)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    ids = [t for c in text_chunks for t in (c.choices[0].model_extra or {})["token_ids"]]
    assert "".join(c.choices[0].text for c in text_chunks) == tok.decode(ids)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == n_prompt and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens_details is not None
    cached = last.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached >= (n_prompt // 16 - 1) * 16


def test_chat_with_the_template(front: Front, tok: ModelTokenizer) -> None:
    msgs: list[Any] = [{"role": "system", "content": "be brief"},
                       {"role": "user", "content": _text(10, seed=2)}]
    want = tok.encode_chat(msgs)
    assert tok.decode(want).endswith("<|assistant|>\n")  # the generation prompt is there
    out = front.sdk.chat.completions.create(model="default", messages=msgs, max_tokens=5)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage is not None and out.usage.prompt_tokens == len(want)
    assert out.usage.completion_tokens == 5
    # streamed: the role first, then content deltas, then an empty delta with the reason
    chunks = list(front.sdk.chat.completions.create(model="default", messages=msgs,
                                                    max_tokens=5, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_samples_and_session_header(front: Front) -> None:
    out = front.sdk.completions.create(model="default", prompt=_text(5, seed=3), max_tokens=3,
                                       n=2, extra_headers={"x-session-id": "s-1"})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage is not None and out.usage.completion_tokens == 6


def test_models_health_ready(front: Front) -> None:
    models = front.sdk.models.list()
    assert [m.id for m in models.data] == ["default", "ids-only"]
    assert (models.data[0].model_extra or {})["max_model_len"] == MAX_LEN
    assert httpx.get(front.base + "/health").status_code == 200
    r = httpx.get(front.base + "/ready")  # "ids-only" has no worker
    assert r.status_code == 503 and r.json()["models_without_workers"] == ["ids-only"]


# ----------------------------------------------------------------------------- bad input


def _post(front: Front, path: str, body: Any) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(front.base + path, content=data,
                      headers={"Content-Type": "application/json"}, timeout=30)


def _error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return dict(err)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"model": "default", "prompt": "hi", "temperature": "hot"},
     "temperature"),
    ("/v1/completions", {"model": "default", "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "default", "prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"model": "default", "prompt": [1, 2, 99999]}, None),
    ("/v1/completions", {"model": "default", "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": "default", "prompt": "hi", "echo": True}, "echo"),
    ("/v1/chat/completions", {"model": "default", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "default", "messages": [{"role": "tool",
                                                                "content": "x"}]}, "messages"),
    ("/v1/completions", {"model": "ids-only", "prompt": "text"}, "prompt"),
])
def test_bad_requests_are_400(front: Front, path: str, body: Any, param: str | None) -> None:
    err = _error(_post(front, path, body), 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    assert not any(reservations(front.router.target).values())


def test_over_the_context_limit(front: Front) -> None:
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {MAX_LEN}"):
        front.sdk.completions.create(model="default", prompt=list(range(10, 10 + MAX_LEN)),
                                     max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        front.sdk.completions.create(model="default", prompt=[5] * 100, max_tokens=MAX_LEN)


def test_unknown_model_404_and_no_worker_503(front: Front) -> None:
    with pytest.raises(openai.NotFoundError) as e404:
        front.sdk.completions.create(model="nope", prompt="hi", max_tokens=1)
    assert e404.value.code == "model_not_found"
    with pytest.raises(openai.InternalServerError) as e503:
        front.sdk.completions.create(model="ids-only", prompt=[1, 2, 3], max_tokens=1)
    assert e503.value.status_code == 503 and "no routable worker" in e503.value.message
    # unknown fields are ignored, as OpenAI-compatible servers do
    r = _post(front, "/v1/completions", {"model": "default", "prompt": "hi", "max_tokens": 1,
                                         "some_future_field": {"x": 1}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    assert r.headers["x-kvrouter-worker"] in {"sim-0", "sim-1"}  # what the proxy did


def _engine_stats(address: str) -> engine_pb2.StatsResponse:
    with grpc.insecure_channel(address) as ch:
        return engine_pb2_grpc.EngineStub(ch).Stats(engine_pb2.StatsRequest(), timeout=10)


def test_disconnect_mid_stream_cancels_and_releases(front: Front) -> None:
    addrs = [e.address for e in front.engines.procs.values()]
    abandoned = sum(_engine_stats(a).extra["abandoned"] for a in addrs)
    # ~8 s of generation at the engines' time scale: the client leaves long before the end
    body = json.dumps({"model": "default", "prompt": _text(20, seed=4), "max_tokens": 6000,
                       "stream": True, "ignore_eos": True}).encode()
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    port = int(front.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(req)
        got = b""
        while b"\r\n\r\n" not in got or got.count(b"data: ") < 2:  # generation under way
            part = s.recv(65536)
            assert part, f"the stream ended early: {got!r}"
            got += part
        assert got.startswith(b"HTTP/1.1 200 "), got[:200]
        assert sum(reservations(front.router.target).values()) == 1
    # the client is gone: the engine request is cancelled and the load released
    wait_no_reservations(front.router.target)
    wait_until(lambda: all(_engine_stats(a).load.running == 0 for a in addrs), 10,
               what="engines no longer running the abandoned request")
    assert sum(_engine_stats(a).extra["abandoned"] for a in addrs) == abandoned + 1
    assert httpx.get(front.base + "/health").status_code == 200
    metrics = httpx.get(f"http://127.0.0.1:{front.router.metrics_port}/metrics").text
    assert 'kvrouter_http_requests_total{endpoint="/v1/completions",status="499"} 1.0' in metrics
    assert 'kvrouter_http_requests_total{endpoint="/v1/completions",status="200"}' in metrics


def test_admission_headers_reach_the_router(front: Front) -> None:
    """x-kvrouter-tenant / x-kvrouter-priority are the gRPC metadata names admission
    control reads; over HTTP they fill the same request fields (a bad tenant is a 400)."""
    r = httpx.post(front.base + "/v1/completions", timeout=30,
                   json={"model": "default", "prompt": [1, 2, 3], "max_tokens": 1},
                   headers={"x-kvrouter-tenant": "no spaces {allowed}",
                            "x-kvrouter-priority": "high"})
    err = _error(r, 400)
    assert "tenant" in err["message"]
    ok = httpx.post(front.base + "/v1/completions", timeout=30,
                    json={"model": "default", "prompt": [1, 2, 3], "max_tokens": 1},
                    headers={"x-kvrouter-tenant": "team-a", "x-kvrouter-priority": "high"})
    assert ok.status_code == 200, ok.text


def test_overloaded_is_429_with_retry_after(tmp_path: Path) -> None:
    """Admission control sheds (RESOURCE_EXHAUSTED): the SDK sees RateLimitError and the
    reply carries Retry-After. One worker, saturated by one request in flight, no queue."""
    http_port = free_port()
    cfg = {"router": {"heartbeat_timeout_s": 30.0, "http": f"127.0.0.1:{http_port}"},
           "models": [{"name": "default", "block_size": 16, "vocab_size": 32000,
                       "admission": {"enabled": True, "max_running_requests": 1,
                                     "max_queue": 0}}]}
    router = start_router(tmp_path / "r", cfg)
    engines = Engines(tmp_path / "engines", router.target)
    engines.workdir.mkdir(parents=True)
    base = f"http://127.0.0.1:{http_port}"
    try:
        engines.start("aggregated", name="sim-0")
        wait_routable(router.target, {"sim-0"})
        sdk = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        long = sdk.completions.create(model="default", prompt=[7] * 32, max_tokens=6000,
                                      stream=True, extra_body={"ignore_eos": True})
        first = next(iter(long))  # in flight: the worker is at max_running_requests
        assert first.choices[0].text == ""  # no tokenizer: no text, the ids instead
        assert (first.choices[0].model_extra or {})["token_ids"]
        assert sum(reservations(router.target).values()) == 1
        with pytest.raises(openai.RateLimitError) as e:
            sdk.completions.create(model="default", prompt=[8] * 32, max_tokens=1)
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body is not None  # OpenAI's error object
        long.close()
        wait_no_reservations(router.target)
        ok = sdk.completions.create(model="default", prompt=[8] * 32, max_tokens=1)
        assert ok.usage is not None and ok.usage.completion_tokens == 1
    finally:
        engines.stop_all()
        router.stop()


def test_serve_refuses_a_bad_http_setup(tmp_path: Path) -> None:
    """A taken port or an unreadable tokenizer stops `serve` with the reason (no
    half-started router)."""
    import subprocess

    from kvrouter.testing.processes import child_env, kvrouter_cmd

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    base = kvrouter_cmd("serve", "--listen", "127.0.0.1:0", "--metrics-port", "0")
    try:
        for extra, want in ((["--http", f"127.0.0.1:{port}"], "cannot serve HTTP"),
                            (["--http", "127.0.0.1:0", "--model",
                              f"default,tokenizer={tmp_path / 'none'}"], "cannot load tokenizer")):
            r = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60,
                               env=child_env())
            assert r.returncode == 1 and want in r.stderr, r.stderr
    finally:
        taken.close()
