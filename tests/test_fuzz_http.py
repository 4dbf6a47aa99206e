"""Fuzz the OpenAI HTTP front (issue 13, item 6): random methods and paths, malformed,
huge and deeply nested JSON, a wrong-typed or extreme value for every field of the
completion and chat schemas, invalid UTF-8, bad headers, random token-id prompts, and
streams the client drops mid-way.

Checked for every request: the answer is never a 5xx other than the documented 503 (no
routable worker) and 504 (deadline), and every error body is OpenAI's error JSON. At the
end the router still serves (a real completion through the front), no reservation is
left (ListWorkers reserved counts back to 0) and the engine is still registered.
A real `kvrouter serve --http` process and one sim engine over loopback. The seed is
fixed so a failure reproduces; KVROUTER_FUZZ_SEED and KVROUTER_FUZZ_ROUNDS widen a local
run (the conventions of tests/test_fuzz_rpc.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from kvrouter.http.tokenizer import build_sim_tokenizer
from kvrouter.testing.processes import RouterProcess, free_port, start_router
from tests.generate_helpers import Engines, reservations, wait_no_reservations, wait_routable

SEED = int(os.environ.get("KVROUTER_FUZZ_SEED", "1616"))
ROUNDS = int(os.environ.get("KVROUTER_FUZZ_ROUNDS", "80"))
VOCAB = 32000
MAX_LEN = 2048
ALLOWED_5XX = {503, 504}

# One value of each JSON type and the edges; every field gets each in turn.
_WRONG: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**64, -(2**63), 1.5, -0.0, 1e308,
                     "", "x", "\x00\x1b[31m", "y" * 5000, [], [1, "a"], {}, {"a": {"b": []}},
                     [[1, 2], [3]], [-1], [2**40]]
# The sweep's share of them: one of each JSON type, and the integer edges of the proto.
_SWEEP: list[Any] = [None, True, 0, -1, 2**31, 2**64, 1.5, 1e308, "", "\x00\x1b[31m", [], {},
                     [-1]]
_SAMPLING = ["model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
             "stream_options", "user", "presence_penalty", "frequency_penalty", "logit_bias",
             "top_k", "stop_token_ids", "ignore_eos", "return_token_ids", "aggregator",
             "answer_regex", "scorer", "tool_pause_s", "tool_kv_action"]
COMPLETION_FIELDS = [*_SAMPLING, "prompt", "echo", "logprobs", "best_of", "suffix",
                     "add_special_tokens"]
CHAT_FIELDS = [*_SAMPLING, "messages", "max_completion_tokens", "logprobs", "top_logprobs",
               "tools", "tool_choice", "response_format", "add_generation_prompt",
               "chat_template_kwargs"]
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready",
         "/", "/v1", "/v1/completions/", "/v1/../etc/passwd", "/%00", "/v1/embeddings",
         "/metrics", "/" + "a" * 3000]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RouterProcess, str]]:
    work = tmp_path_factory.mktemp("fuzzhttp")
    tok = build_sim_tokenizer(work / "tok", VOCAB, MAX_LEN)
    port = free_port()
    cfg = {"router": {"heartbeat_timeout_s": 30.0, "http": f"127.0.0.1:{port}"},
           "models": [{"name": "default", "block_size": 16, "vocab_size": VOCAB,
                       "tokenizer": str(tok)}]}
    router = start_router(work, cfg)
    engines = Engines(work / "engines", router.target)
    engines.workdir.mkdir(parents=True)
    try:
        engines.start("aggregated", name="sim-0")
        wait_routable(router.target, {"sim-0"})
        yield router, f"http://127.0.0.1:{port}"
    finally:
        engines.stop_all()
        router.stop()


def _valid(rng: random.Random, chat: bool) -> dict[str, Any]:
    """A small body the front accepts; fuzzing then breaks one or more of its fields."""
    body: dict[str, Any] = {"model": "default", "max_tokens": rng.randrange(1, 6)}
    if chat:
        body["messages"] = [{"role": "user", "content": "hello there " * rng.randrange(1, 8)}]
    elif rng.random() < 0.5:
        body["prompt"] = [rng.randrange(0, VOCAB) for _ in range(rng.randrange(1, 80))]
    else:
        body["prompt"] = "once upon a time " * rng.randrange(1, 8)
    return body


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth if depth % 2 else '{"a":' * depth + "1" + "}" * depth


def _body(rng: random.Random, chat: bool) -> bytes:
    pick = rng.randrange(10)
    if pick == 0:  # raw garbage, invalid UTF-8 included
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    if pick == 1:  # deeply nested JSON, alone or in a field
        nest = _nested(rng.choice([100, 5000, 100_000]))
        return nest.encode() if rng.random() < 0.5 else \
            b'{"model":"default","prompt":' + nest.encode() + b"}"
    if pick == 2:  # JSON that is not an object, truncated JSON, NaN literals
        return rng.choice([b"[]", b"null", b"1", b'"x"', b'{"model":', b"{,}",
                           b'{"model":"default","prompt":"a","max_tokens":NaN}',
                           b'{"model":"default","prompt":"\xff\xfe"}',
                           b'{"model":"default","prompt":"\\ud800"}'])
    body = _valid(rng, chat)
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for _ in range(rng.choice([1, 1, 2, 4])):
        body[rng.choice(fields)] = rng.choice(_WRONG)
    if pick == 3:  # random (often out-of-vocabulary) token ids
        body.pop("messages", None)
        body["prompt"] = [rng.choice([0, VOCAB - 1, VOCAB, 2**32 - 1, 2**32, -1,
                                      rng.randrange(VOCAB)]) for _ in range(rng.randrange(0, 40))]
    if pick == 4 and chat:  # odd messages
        body["messages"] = rng.choice([
            [], [{}], [{"role": ""}], [{"role": "user", "content": [{"type": "image"}]}],
            [{"role": "user", "content": [{"type": "text", "text": 3}]}],
            [{"role": "tool", "content": None}], [{"role": "user", "content": "\x00" * 10}]])
    if pick == 5:  # huge (over the context limit, and beyond the body limit)
        key = "messages" if chat else "prompt"
        body[key] = [{"role": "user", "content": "z " * 50_000}] if chat else \
            rng.choice(["z " * 50_000, list(range(MAX_LEN + 1)), "q" * 3_000_000])
    if pick == 6:
        body["unknown_field_" + str(rng.randrange(9))] = rng.choice(_WRONG)
    if pick == 7 and isinstance(body.get("tool_pause_s"), float) \
            and not math.isfinite(body["tool_pause_s"]):
        body["tool_pause_s"] = 1e308
    return json.dumps(body).encode()


def _headers(rng: random.Random) -> dict[str, str]:
    h = {"content-type": rng.choice(["application/json", "text/plain", "", "application/json;"
                                     " charset=latin-1", "multipart/form-data"])}
    if rng.random() < 0.3:
        h[rng.choice(["x-session-id", "x-kvrouter-priority", "x-kvrouter-tenant",
                      "authorization", "accept"])] = rng.choice(
            ["", "high", "-1", "x" * 4000, "a\tb", "tenant a", "nan"])
    return h


def _check(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500 or r.status_code in ALLOWED_5XX, \
        f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400 and r.request.method != "HEAD":
        err = r.json().get("error")
        assert isinstance(err, dict) and isinstance(err.get("message"), str), f"{what}: {r.text[:300]}"


def _raw(base: str, data: bytes) -> bytes:
    """Bytes httpx would refuse to send (bad request lines, bad headers)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\":",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Bad\xff\xfe: \x00\x01\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nx-session-id: \xff\xfe\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"POST /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
]


def _status_of(raw: bytes) -> int | None:
    if not raw.startswith(b"HTTP/1."):
        return None  # the server closed the connection without an answer: allowed
    return int(raw.split(b" ", 2)[1])


def _drop_stream(base: str, rng: random.Random, chat: bool) -> None:
    """Start a stream, read a few events, and go away."""
    body = _valid(rng, chat)
    body["stream"] = True
    body["max_tokens"] = rng.randrange(20, 200)
    if rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.Client(timeout=15) as c, c.stream("POST", base + path, json=body) as r:
        _check_stream_status(r)
        for i, _ in enumerate(r.iter_lines()):
            if i >= rng.randrange(0, 4):
                break


def _check_stream_status(r: httpx.Response) -> None:
    assert r.status_code < 500 or r.status_code in ALLOWED_5XX, r.status_code


def test_fuzz_the_http_front(front: tuple[RouterProcess, str]) -> None:
    router, base = front
    rng = random.Random(SEED)

    def request(c: httpx.Client) -> None:
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if rng.random() < 0.15:
            path, method = rng.choice(PATHS), rng.choice(METHODS)
        else:
            method = "POST"
        data = _body(rng, chat)
        r = c.request(method, base + path, content=data, headers=_headers(rng))
        _check(r, f"{method} {path} {data[:200]!r}")

    def raw(c: httpx.Client) -> None:
        data = rng.choice(RAW_REQUESTS)
        status = _status_of(_raw(base, data))
        assert status is None or status < 500 or status in ALLOWED_5XX, (data[:200], status)

    def stream(c: httpx.Client) -> None:
        _drop_stream(base, rng, rng.random() < 0.5)

    actions: list[Callable[[httpx.Client], None]] = [request] * 8
    actions += [raw, stream]
    with httpx.Client(timeout=15) as c:
        # every field of both schemas gets every odd value once (top_k of 2^31 was a 500)
        for chat, path, fields in ((False, "/v1/completions", COMPLETION_FIELDS),
                                   (True, "/v1/chat/completions", CHAT_FIELDS)):
            for field in fields:
                for value in _SWEEP:
                    body = {**_valid(rng, chat), field: value}
                    if isinstance(body.get("stream"), bool) and body["stream"]:
                        body["max_tokens"] = 1
                    r = c.post(base + path, content=json.dumps(body).encode(),
                               headers={"content-type": "application/json"})
                    _check(r, f"{path} {field}={str(value)[:40]}")
        for _ in range(ROUNDS):
            rng.choice(actions)(c)
        # still serving: a real completion through the front, and nothing left reserved
        ok = c.post(base + "/v1/completions",
                    json={"model": "default", "prompt": "the end", "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 3
        assert c.get(base + "/health").status_code == 200
    wait_no_reservations(router.target)
    assert set(reservations(router.target)) == {"sim-0"}
    assert router.alive()
