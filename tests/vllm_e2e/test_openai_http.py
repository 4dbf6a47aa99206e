"""kvrouter.backends.openai_http against a real vLLM server (the session fleet), and its
error paths against real sockets on loopback (these need no vLLM)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from kvrouter.backends.openai_http import (
    BackendHTTPError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    CompletionChunk,
    generate,
    parse_address,
)
from kvrouter.testing.processes import free_port
from kvrouter.testing.vllm_harness import MODEL_NAME
from tests.vllm_e2e.conftest import VllmFleetDriver


async def _collect(it: AsyncIterator[CompletionChunk]) -> list[CompletionChunk]:
    return [c async for c in it]


async def _serve(response: bytes, delay_s: float = 0.0) -> tuple[asyncio.Server, int]:
    """A loopback server that reads a request and answers `response` verbatim."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(delay_s)
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_parse_address_forms() -> None:
    assert parse_address("127.0.0.1:8000").netloc == "127.0.0.1:8000"
    ep = parse_address("http://h:9/base/")
    assert (ep.host, ep.port, ep.tls, ep.base_path) == ("h", 9, False, "/base")
    for bad in ("", "ftp://h:1", "http://:80"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_bad_arguments_are_refused_before_connecting() -> None:
    with pytest.raises(ValueError, match="token_ids is empty"):
        asyncio.run(_collect(generate("127.0.0.1:1", "m", [], 4)))
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(_collect(generate("127.0.0.1:1", "m", [1], 0)))


def test_connection_refused_is_unavailable() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}"):
        asyncio.run(_collect(generate(f"127.0.0.1:{port}", "m", [1, 2], 4)))


def test_error_status_carries_the_servers_message() -> None:
    body = b'{"error": {"message": "The model `x` does not exist.", "code": 404}}'
    resp = (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def main() -> None:
        server, port = await _serve(resp)
        async with server:
            with pytest.raises(BackendHTTPError) as info:
                await _collect(generate(f"127.0.0.1:{port}", "x", [1, 2], 4))
        assert info.value.status == 404
        assert "does not exist" in str(info.value)

    asyncio.run(main())


def test_silent_server_times_out() -> None:
    async def main() -> None:
        server, port = await _serve(b"", delay_s=5.0)
        async with server:
            with pytest.raises(BackendTimeout):
                await _collect(generate(f"127.0.0.1:{port}", "m", [1, 2], 4, read_timeout=0.3))

    asyncio.run(main())


def test_stream_cut_before_finishing_is_a_protocol_error() -> None:
    events = b'data: {"choices": [{"index": 0, "text": "a", "token_ids": [7]}]}\n\n'
    resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + f"{len(events):x}\r\n".encode() + events + b"\r\n0\r\n\r\n")

    async def main() -> None:
        server, port = await _serve(resp)
        async with server:
            with pytest.raises(BackendProtocolError, match="without a finished chunk"):
                await _collect(generate(f"127.0.0.1:{port}", "m", [1, 2], 4))

    asyncio.run(main())


@pytest.mark.vllm
def test_streams_token_ids_and_usage_from_real_vllm(driver: VllmFleetDriver) -> None:
    d = driver
    prompt = d.tokens(70)
    w = d.worker("vllm-0")
    chunks = asyncio.run(_collect(generate(w.address, MODEL_NAME, prompt, 12, ignore_eos=True,
                                           temperature=0.0)))
    assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 12 and all(0 <= t < 2048 for t in ids)
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (70, 12)
    # Same prompt again: its 2 full blocks come from the cache.
    again = asyncio.run(_collect(generate(w.address, MODEL_NAME, prompt, 12, ignore_eos=True,
                                          temperature=0.0)))
    assert len([t for c in again for t in c.token_ids]) == 12
    assert again[-1].usage is not None and again[-1].usage.cached_tokens == 64

    # vLLM's own errors come back as BackendHTTPError with its message.
    with pytest.raises(BackendHTTPError, match="out of vocabulary") as info:
        asyncio.run(_collect(generate(w.address, MODEL_NAME, [5000], 4)))
    assert info.value.status == 400
    with pytest.raises(BackendHTTPError, match="does not exist"):
        asyncio.run(_collect(generate(w.address, "no-such-model", prompt, 4)))
