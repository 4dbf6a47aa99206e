"""Streaming client of an OpenAI-compatible completions server (vLLM, SGLang) over HTTP/1.1.

    async for chunk in generate("127.0.0.1:8000", "tiny", prompt_ids, max_tokens=32):
        ...  # chunk.token_ids, chunk.text; the last one has finished=True and usage

POSTs /v1/completions with the prompt as a list of token ids and `stream: true`,
and asks the server for the generated token ids (`return_token_ids: true`,
vLLM >= 0.10.2). Servers that answer with `logprobs` tokens of the form
"token_id:N" instead (vLLM's --return-tokens-as-token-ids) work too.

Only the standard library is used (asyncio streams): the request path must not
depend on an HTTP package the router does not otherwise need. Each call opens
one connection and closes it when the stream ends or the caller stops
iterating, which makes the server abort the request (so cancelling a proxied
request frees the engine's slot).

Failures raise a BackendError subclass saying which address and what went
wrong; BackendUnavailable (nothing was sent or the server is not there) is the
one a caller may retry on another worker without side effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

COMPLETIONS_PATH = "/v1/completions"
MAX_ERROR_BODY = 64 << 10
MAX_LINE = 1 << 20  # one SSE line (a chunk of a few tokens is far smaller)


# --------------------------------------------------------------------------- errors


class BackendError(Exception):
    """A call to an engine's HTTP endpoint failed."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address
        self.message = message


class BackendUnavailable(BackendError):
    """Cannot connect (refused, unreachable, connect timeout): no request was sent."""


class BackendTimeout(BackendError):
    """The server accepted the request but went silent longer than the read timeout,
    or the whole call exceeded its total timeout."""


class BackendHTTPError(BackendError):
    """The server answered with a non-2xx status (message: its error text)."""

    def __init__(self, address: str, status: int, message: str) -> None:
        super().__init__(address, f"HTTP {status}: {message}")
        self.status = status


class BackendProtocolError(BackendError):
    """The response is not what an OpenAI-compatible streaming server sends."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache; None when the server does not say
    (vLLM reports it with --enable-prompt-tokens-details)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens generated since the previous chunk."""

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None  # "length", "stop", ... on the finished chunk
    usage: Usage | None = None  # on the finished chunk when the server reports usage


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: bool
    base_path: str

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(address: str) -> Endpoint:
    """"host:port", "http://host:port" or "https://host[:port][/base]" (ValueError otherwise)."""
    if not address:
        raise ValueError("backend address is empty")
    url = address if "://" in address else f"http://{address}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"backend address {address!r}: scheme must be http or https")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"backend address {address!r}: bad port") from exc
    if not parts.hostname:
        raise ValueError(f"backend address {address!r}: no host")
    tls = parts.scheme == "https"
    return Endpoint(host=parts.hostname, port=port or (443 if tls else 80), tls=tls,
                    base_path=parts.path.rstrip("/"))


# --------------------------------------------------------------------------- HTTP/1.1


@dataclass(slots=True)
class _Response:
    status: int
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


async def _read(address: str, aw: Any, timeout: float | None, what: str) -> Any:
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        raise BackendTimeout(address, f"no data for {timeout:g}s while {what}") from None
    except asyncio.IncompleteReadError as exc:
        raise BackendProtocolError(address, f"connection closed while {what} "
                                            f"({len(exc.partial)} bytes read)") from None
    except asyncio.LimitOverrunError:
        raise BackendProtocolError(address, f"line longer than {MAX_LINE} bytes while "
                                            f"{what}") from None
    except (ConnectionError, OSError) as exc:
        raise BackendProtocolError(address, f"connection lost while {what}: {exc}") from None


async def _open(address: str, ep: Endpoint, method: str, path: str, body: bytes | None,
                headers: Mapping[str, str], connect_timeout: float,
                read_timeout: float | None) -> _Response:
    ctx = ssl.create_default_context() if ep.tls else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(ep.host, ep.port, ssl=ctx, limit=MAX_LINE), connect_timeout)
    except TimeoutError:
        raise BackendUnavailable(address, f"connect timed out after {connect_timeout:g}s") from None
    except OSError as exc:
        raise BackendUnavailable(address, f"cannot connect: {exc.strerror or exc}") from None
    try:
        lines = [f"{method} {ep.base_path}{path} HTTP/1.1", f"Host: {ep.netloc}",
                 "Connection: close", "User-Agent: kvrouter"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        try:
            await asyncio.wait_for(writer.drain(), read_timeout)
        except TimeoutError:
            raise BackendTimeout(address, "sending the request timed out") from None
        except (ConnectionError, OSError) as exc:
            raise BackendUnavailable(address, f"connection lost while sending: {exc}") from None
        status_line = await _read(address, reader.readline(), read_timeout,
                                  "waiting for the response")
        if not status_line:
            # Closed before answering anything: the request was not processed.
            raise BackendUnavailable(address, "connection closed before a response")
        try:
            proto, code, *_ = status_line.decode("latin-1").split(" ", 2)
            status = int(code)
            if not proto.startswith("HTTP/1."):
                raise ValueError(proto)
        except ValueError:
            raise BackendProtocolError(address, f"not an HTTP/1.x status line: "
                                                f"{status_line[:80]!r}") from None
        hdrs: dict[str, str] = {}
        while True:
            line = await _read(address, reader.readline(), read_timeout, "reading headers")
            if line in (b"\r\n", b"\n", b""):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                hdrs[name.strip().lower()] = value.strip()
        return _Response(status, hdrs, reader, writer)
    except BaseException:
        writer.close()
        raise


async def _body(address: str, resp: _Response, read_timeout: float | None,
                limit: int | None = None) -> AsyncIterator[bytes]:
    """The response body's bytes as they arrive (chunked, Content-Length or until close)."""
    reader = resp.reader
    te = resp.headers.get("transfer-encoding", "").lower()
    got = 0
    if "chunked" in te:
        while True:
            size_line = await _read(address, reader.readline(), read_timeout, "reading a chunk")
            if not size_line:
                raise BackendProtocolError(address, "connection closed inside a chunked body")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BackendProtocolError(address, f"bad chunk size line {size_line[:40]!r}"
                                           ) from None
            if size == 0:
                # Trailers (rare) end with an empty line; the connection closes anyway.
                with contextlib.suppress(BackendError):
                    await _read(address, reader.readline(), 1.0, "reading trailers")
                return
            data = await _read(address, reader.readexactly(size + 2), read_timeout,
                               "reading a chunk")
            got += size
            yield data[:size]
            if limit is not None and got >= limit:
                return
    elif "content-length" in resp.headers:
        try:
            remaining = int(resp.headers["content-length"])
        except ValueError:
            raise BackendProtocolError(address, "bad Content-Length") from None
        if limit is not None:
            remaining = min(remaining, limit)
        while remaining > 0:
            data = await _read(address, reader.read(min(remaining, 1 << 16)), read_timeout,
                               "reading the body")
            if not data:
                raise BackendProtocolError(address, "connection closed inside the body")
            remaining -= len(data)
            yield data
    else:
        while True:
            data = await _read(address, reader.read(1 << 16), read_timeout, "reading the body")
            if not data:
                return
            got += len(data)
            yield data
            if limit is not None and got >= limit:
                return


async def _read_all(address: str, resp: _Response, read_timeout: float | None,
                    limit: int | None = None) -> bytes:
    return b"".join([d async for d in _body(address, resp, read_timeout, limit)])


def _error_text(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}} or {"message"})."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
    return text[:500]


async def request(address: str, method: str, path: str, body: Any = None, *,
                  timeout: float = 10.0, headers: Mapping[str, str] | None = None,
                  ) -> tuple[int, bytes]:
    """One small HTTP call (health, /metrics, admin endpoints): (status, body).
    `body` is sent as JSON unless it is bytes. Raises BackendError on transport failure,
    not on an error status."""
    ep = parse_address(address)
    hdrs = dict(headers or {})
    data: bytes | None = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    elif method.upper() in ("POST", "PUT"):
        data = b""
    deadline = time.monotonic() + timeout

    async def call() -> tuple[int, bytes]:
        resp = await _open(address, ep, method.upper(), path, data, hdrs, timeout, timeout)
        try:
            return resp.status, await _read_all(address, resp, timeout)
        finally:
            resp.writer.close()

    try:
        return await asyncio.wait_for(call(), max(0.001, deadline - time.monotonic()))
    except TimeoutError:
        raise BackendTimeout(address, f"{method} {path} took longer than {timeout:g}s") from None


# --------------------------------------------------------------------------- SSE


async def _sse_data(address: str, body: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines)."""
    buf = b""
    data: list[str] = []
    async for piece in body:
        buf += piece
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1:]
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
                continue
            if line.startswith(b":"):
                continue  # comment / keep-alive
            name, _, value = line.partition(b":")
            if name == b"data":
                data.append(value[1:].decode() if value.startswith(b" ") else value.decode())
        if len(buf) > MAX_LINE:
            raise BackendProtocolError(address, f"event line longer than {MAX_LINE} bytes")
    if buf.strip():
        line = buf.rstrip(b"\r")
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" ").decode())
    if data:
        yield "\n".join(data)


def _token_ids(address: str, choice: Mapping[str, Any]) -> list[int] | None:
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        if not all(isinstance(t, int) for t in ids):
            raise BackendProtocolError(address, "token_ids holds non-integers")
        return ids
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, Mapping) and isinstance(logprobs.get("tokens"), list):
        out = []
        for tok in logprobs["tokens"]:
            if not (isinstance(tok, str) and tok.startswith("token_id:")):
                return None
            try:
                out.append(int(tok[len("token_id:"):]))
            except ValueError:
                return None
        return out
    return None


def _usage(obj: Any) -> Usage | None:
    if not isinstance(obj, Mapping):
        return None
    details = obj.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return Usage(prompt_tokens=int(obj.get("prompt_tokens") or 0),
                 completion_tokens=int(obj.get("completion_tokens") or 0),
                 cached_tokens=int(cached) if isinstance(cached, int) else None)


# --------------------------------------------------------------------------- generate


async def generate(
    address: str,
    model: str,
    token_ids: Sequence[int],
    max_tokens: int,
    *,
    connect_timeout: float = 5.0,
    read_timeout: float | None = 120.0,
    total_timeout: float | None = None,
    request_id: str | None = None,
    api_key: str | None = None,
    path: str = COMPLETIONS_PATH,
    **sampling: Any,
) -> AsyncIterator[Chunk]:
    """Stream a completion of `token_ids` from the OpenAI-compatible server at `address`.

    `sampling` goes into the request body as is (temperature, top_p, top_k, seed,
    ignore_eos, stop_token_ids, ...: the names both vLLM and SGLang accept).
    `read_timeout` bounds the silence between two pieces of the response (the first
    one includes queueing and prefill); `total_timeout` the whole call. Stopping the
    iteration early closes the connection, which aborts the request on the server.
    """
    if not token_ids:
        raise ValueError("token_ids is empty: nothing to complete")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    if not model:
        raise ValueError("model name is empty")
    ep = parse_address(address)
    body: dict[str, Any] = {
        "model": model,
        "prompt": [int(t) for t in token_ids],
        "max_tokens": int(max_tokens),
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    body.update(sampling)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if request_id:
        headers["X-Request-Id"] = request_id
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = None if total_timeout is None else time.monotonic() + total_timeout

    def budget() -> float | None:
        if deadline is None:
            return read_timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackendTimeout(address, f"completion took longer than {total_timeout:g}s")
        return left if read_timeout is None else min(left, read_timeout)

    resp = await _open(address, ep, "POST", path, json.dumps(body).encode(), headers,
                       connect_timeout, budget())
    try:
        if not 200 <= resp.status < 300:
            err = await _read_all(address, resp, budget(), MAX_ERROR_BODY)
            raise BackendHTTPError(address, resp.status, _error_text(err))
        held: Chunk | None = None  # the finished chunk, waiting for the usage event
        done = False
        async for data in _sse_data(address, _body(address, resp, budget())):
            budget()
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                raise BackendProtocolError(address, f"event is not JSON: {data[:80]!r}") from None
            if not isinstance(obj, dict):
                raise BackendProtocolError(address, f"event is not an object: {data[:80]!r}")
            if "error" in obj and "choices" not in obj:
                err = obj["error"]
                msg = err.get("message") if isinstance(err, dict) else err
                raise BackendHTTPError(address, int(err.get("code", 500))
                                       if isinstance(err, dict) and isinstance(err.get("code"), int)
                                       else 500, str(msg))
            choices = obj.get("choices") or []
            usage = _usage(obj.get("usage"))
            if not choices:
                if usage is not None and held is not None:
                    held = Chunk(held.token_ids, held.text, True, held.finish_reason, usage)
                continue
            choice = choices[0]
            ids = _token_ids(address, choice)
            text = str(choice.get("text") or "")
            reason = choice.get("finish_reason")
            if ids is None:
                if text:
                    raise BackendProtocolError(
                        address, "the server sent text without token ids (it needs "
                                 "'return_token_ids' support, vLLM >= 0.10.2)")
                ids = []
            if held is not None:
                # Finished already, yet more came (another choice index): pass it on.
                yield held
                held = None
            if reason is not None:
                held = Chunk(list(ids), text, True, str(reason), usage)
            elif ids or text:
                yield Chunk(list(ids), text, False)
        if held is None:
            # Cut off (connection closed) or ended ([DONE]) before any finish_reason.
            how = "[DONE] came" if done else "the stream ended"
            raise BackendProtocolError(address, f"{how} without a finished chunk")
        yield held
    finally:
        resp.writer.close()
