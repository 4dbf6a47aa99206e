"""Streaming client of an OpenAI-compatible completions server (vLLM, SGLang) over HTTP,
on httpx (pooled connections, timeouts) and httpx-sse (the event stream).

    async with OpenAIHttpClient() as client:
        async for chunk in client.generate("127.0.0.1:8000", "tiny", prompt_ids, max_tokens=32):
            ...  # chunk.token_ids, chunk.text; the last one has finished=True and usage

POSTs /v1/completions with the prompt as a list of token ids and `stream: true`,
and asks the server for the generated token ids (`return_token_ids: true`,
vLLM >= 0.10.2). Servers that answer with `logprobs` tokens of the form
"token_id:N" instead (vLLM's --return-tokens-as-token-ids) work too.

`OpenAIHttpClient` keeps one `httpx.AsyncClient` per server base URL, so a finished
stream's connection is reused by the next call. Stopping the iteration early (or
cancelling the task) closes that call's connection, which makes the server abort the
request (so cancelling a proxied request frees the engine's slot). `generate` and
`request` at module level are one-shot conveniences (a client for one call).

Failures raise a BackendError subclass saying which address and what went wrong;
BackendUnavailable (nothing was sent or the server is not there) is the one a caller
may retry on another worker without side effects.

`OpenAIBackend` is the router's backend (kvrouter.backends.base.Backend) on top of it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
from httpx_sse import EventSource, SSEError

from kvrouter.backends.base import (
    EngineCall,
    EngineChunk,
    EngineFailure,
    FailureKind,
    RequestPhase,
)
from kvrouter.protocol import SERVED_MODEL_METADATA_KEY
from kvrouter.registry import WorkerInfo
from kvrouter.sampling import sampling_kwargs

COMPLETIONS_PATH = "/v1/completions"
MAX_ERROR_BODY = 64 << 10
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 120.0
# Below the servers' own idle keep-alive limit (uvicorn, so vLLM and SGLang: 5 s), so the
# pool drops an idle connection before the server closes it under a new request.
KEEPALIVE_EXPIRY_S = 4.0
MAX_IDLE_CONNECTIONS = 64  # per server: idle connections kept for reuse


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
class CompletionUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache; None when the server does not say
    (vLLM reports it with --enable-prompt-tokens-details)."""


@dataclass(frozen=True, slots=True)
class CompletionChunk:
    """Tokens generated since the previous chunk."""

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None  # "length", "stop", ... on the finished chunk
    usage: CompletionUsage | None = None  # on the finished chunk when the server reports usage


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

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.netloc}{self.base_path}"


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


# --------------------------------------------------------------------------- helpers


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # The system's trust store, built once: httpx would otherwise load certifi's for every
    # client (~40 ms), which one-shot calls would pay on their first token.
    return ssl.create_default_context()


def _transport_error(address: str, exc: httpx.TransportError, what: str,
                     timeouts: httpx.Timeout, answered: bool) -> BackendError:
    """The BackendError for an httpx transport failure `while {what}`. `answered`: the
    response's status line and headers had arrived."""
    if isinstance(exc, httpx.ConnectTimeout):
        return BackendUnavailable(address, f"connect timed out after {timeouts.connect:g}s")
    if isinstance(exc, httpx.ConnectError):
        return BackendUnavailable(address, f"cannot connect: {exc}")
    if isinstance(exc, httpx.PoolTimeout):
        return BackendUnavailable(address, f"no connection free after {timeouts.pool:g}s")
    if isinstance(exc, httpx.WriteTimeout):
        return BackendTimeout(address, "sending the request timed out")
    if isinstance(exc, httpx.ReadTimeout):
        return BackendTimeout(address, f"no data for {timeouts.read:g}s while {what}")
    if isinstance(exc, httpx.WriteError):
        return BackendUnavailable(address, f"connection lost while sending: {exc}")
    # httpcore's words for a connection closed before any byte of a response: the
    # request was not processed, so another worker may take it.
    if (not answered and isinstance(exc, httpx.RemoteProtocolError)
            and "without sending a response" in str(exc)):
        return BackendUnavailable(address, "connection closed before a response")
    return BackendProtocolError(address, f"{what}: {exc}")


async def _read_limited(resp: httpx.Response, limit: int) -> bytes:
    out = bytearray()
    async for piece in resp.aiter_bytes():
        out += piece
        if len(out) >= limit:
            break
    return bytes(out[:limit])


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


def _usage(obj: Any) -> CompletionUsage | None:
    if not isinstance(obj, Mapping):
        return None
    details = obj.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return CompletionUsage(prompt_tokens=int(obj.get("prompt_tokens") or 0),
                           completion_tokens=int(obj.get("completion_tokens") or 0),
                           cached_tokens=int(cached) if isinstance(cached, int) else None)


def _stream_error(address: str, obj: Mapping[str, Any]) -> BackendHTTPError:
    """An error the server sent as an event after the 200 (vLLM does, mid-stream)."""
    err = obj["error"]
    msg = err.get("message") if isinstance(err, dict) else err
    code = err.get("code") if isinstance(err, dict) else None
    return BackendHTTPError(address, code if isinstance(code, int) else 500, str(msg))


# --------------------------------------------------------------------------- client


class OpenAIHttpClient:
    """Calls OpenAI-compatible servers; one pooled httpx.AsyncClient per base URL, made on
    first use and reused. Use within one event loop; `aclose` (or `async with`) at the end."""

    def __init__(self, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 read_timeout: float | None = DEFAULT_READ_TIMEOUT_S,
                 max_idle_connections: int = MAX_IDLE_CONNECTIONS) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # No cap on open connections: each one is a request the engine is running, and the
        # engine's own scheduler (whose queue the router sees) should hold the waiting ones,
        # not a pool in the router.
        self._limits = httpx.Limits(max_connections=None,
                                    max_keepalive_connections=max_idle_connections,
                                    keepalive_expiry=KEEPALIVE_EXPIRY_S)
        self._clients: dict[str, httpx.AsyncClient] = {}

    def _client(self, ep: Endpoint) -> httpx.AsyncClient:
        client = self._clients.get(ep.base_url)
        if client is None:
            # trust_env=False: engines are reached directly, never through an HTTP(S)_PROXY
            # meant for the outside world
            client = httpx.AsyncClient(base_url=ep.base_url, limits=self._limits,
                                       verify=_tls_context(), trust_env=False,
                                       headers={"User-Agent": "kvrouter"})
            self._clients[ep.base_url] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()

    async def __aenter__(self) -> OpenAIHttpClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def request(self, address: str, method: str, path: str, body: Any = None, *,
                      timeout: float = 10.0, headers: Mapping[str, str] | None = None,
                      ) -> tuple[int, bytes]:
        """One small HTTP call (health, /metrics, admin endpoints): (status, body).
        `body` is sent as JSON unless it is bytes. Raises BackendError on transport failure,
        not on an error status; `timeout` bounds each step and the whole call."""
        client = self._client(parse_address(address))
        hdrs = dict(headers or {})
        data: bytes | None = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif method.upper() in ("POST", "PUT"):
            data = b""
        timeouts = httpx.Timeout(timeout)

        async def call() -> tuple[int, bytes]:
            answered = False
            try:
                async with client.stream(method.upper(), path, content=data, headers=hdrs,
                                         timeout=timeouts) as resp:
                    answered = True
                    return resp.status_code, await resp.aread()
            except httpx.TransportError as exc:
                raise _transport_error(address, exc, f"{method} {path}", timeouts,
                                       answered) from None

        try:
            return await asyncio.wait_for(call(), timeout)
        except TimeoutError:
            raise BackendTimeout(address, f"{method} {path} took longer than {timeout:g}s"
                                 ) from None

    async def generate(
        self,
        address: str,
        model: str,
        token_ids: Sequence[int],
        max_tokens: int,
        *,
        read_timeout: float | None = None,
        total_timeout: float | None = None,
        request_id: str | None = None,
        api_key: str | None = None,
        path: str = COMPLETIONS_PATH,
        **sampling: Any,
    ) -> AsyncGenerator[CompletionChunk, None]:
        """Stream a completion of `token_ids` from the OpenAI-compatible server at `address`.

        `sampling` goes into the request body as is (temperature, top_p, top_k, seed,
        ignore_eos, stop_token_ids, ...: the names both vLLM and SGLang accept).
        `read_timeout` (default: the client's) bounds the silence between two pieces of
        the response (the first one includes queueing and prefill); `total_timeout` the
        whole call. Stopping the iteration early closes the connection, which aborts the
        request on the server.
        """
        if not token_ids:
            raise ValueError("token_ids is empty: nothing to complete")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
        if not model:
            raise ValueError("model name is empty")
        client = self._client(parse_address(address))
        body: dict[str, Any] = {
            "model": model,
            "prompt": [int(t) for t in token_ids],
            "max_tokens": int(max_tokens),
            "stream": True,
            "return_token_ids": True,
            "stream_options": {"include_usage": True},
        }
        body.update(sampling)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "Cache-Control": "no-store"}
        if request_id:
            headers["X-Request-Id"] = request_id
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        read = self.read_timeout if read_timeout is None else read_timeout
        deadline = None if total_timeout is None else time.monotonic() + total_timeout

        def check_deadline() -> None:
            if deadline is not None and time.monotonic() >= deadline:
                raise BackendTimeout(address, f"completion took longer than {total_timeout:g}s")

        if total_timeout is not None:
            read = total_timeout if read is None else min(read, total_timeout)
        timeouts = httpx.Timeout(self.connect_timeout, read=read, write=read,
                                 pool=self.connect_timeout)
        request = client.build_request("POST", path, content=json.dumps(body).encode(),
                                       headers=headers, timeout=timeouts)
        try:
            resp = await client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _transport_error(address, exc, "waiting for the response", timeouts,
                                   answered=False) from None
        try:
            if not resp.is_success:
                try:
                    err = await _read_limited(resp, MAX_ERROR_BODY)
                except httpx.TransportError as exc:
                    raise _transport_error(address, exc, "reading the error body", timeouts,
                                           answered=True) from None
                raise BackendHTTPError(address, resp.status_code, _error_text(err))
            held: CompletionChunk | None = None  # the finished chunk, waiting for usage
            done = False
            events = EventSource(resp).aiter_sse()
            try:
                async for event in events:
                    if done:
                        continue  # read to the end, so the connection can be reused
                    check_deadline()
                    data = event.data
                    if not data.strip():
                        continue
                    if data.strip() == "[DONE]":
                        done = True
                        continue
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise BackendProtocolError(address, f"event is not JSON: {data[:80]!r}"
                                                   ) from None
                    if not isinstance(obj, dict):
                        raise BackendProtocolError(address,
                                                   f"event is not an object: {data[:80]!r}")
                    if "error" in obj and "choices" not in obj:
                        raise _stream_error(address, obj)
                    choices = obj.get("choices") or []
                    usage = _usage(obj.get("usage"))
                    if not choices:
                        if usage is not None and held is not None:
                            held = CompletionChunk(held.token_ids, held.text, True,
                                                   held.finish_reason, usage)
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
                        held = CompletionChunk(list(ids), text, True, str(reason), usage)
                    elif ids or text:
                        yield CompletionChunk(list(ids), text, False)
            except SSEError as exc:
                raise BackendProtocolError(address, f"not an event stream: {exc}") from None
            except httpx.TransportError as exc:
                # After [DONE] the answer is complete; only the connection's end misbehaved
                # (closing it below is all that is left to do).
                if not (done and held is not None):
                    raise _transport_error(address, exc, "reading the stream", timeouts,
                                           answered=True) from None
            finally:
                await events.aclose()
            if held is None:
                # Cut off (connection closed) or ended ([DONE]) before any finish_reason.
                how = "[DONE] came" if done else "the stream ended"
                raise BackendProtocolError(address, f"{how} without a finished chunk")
            yield held
        finally:
            # A fully read response goes back to the pool; one still streaming is closed,
            # which is how the server learns to abort the request.
            await resp.aclose()


async def generate(address: str, model: str, token_ids: Sequence[int], max_tokens: int, *,
                   connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                   read_timeout: float | None = DEFAULT_READ_TIMEOUT_S,
                   **kwargs: Any) -> AsyncGenerator[CompletionChunk, None]:
    """OpenAIHttpClient.generate with a client for this call only (tests, tools); a
    long-lived caller keeps an OpenAIHttpClient to reuse connections."""
    async with OpenAIHttpClient(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                max_idle_connections=0) as client:
        stream = client.generate(address, model, token_ids, max_tokens, **kwargs)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()


async def request(address: str, method: str, path: str, body: Any = None, *,
                  timeout: float = 10.0, headers: Mapping[str, str] | None = None,
                  ) -> tuple[int, bytes]:
    """OpenAIHttpClient.request with a client for this call only."""
    async with OpenAIHttpClient(connect_timeout=timeout, max_idle_connections=0) as client:
        return await client.request(address, method, path, body, timeout=timeout,
                                    headers=headers)


# --------------------------------------------------------------------------- router backend


class OpenAIBackend:
    """The router's backend for OpenAI-compatible completions servers (vLLM, SGLang):
    aggregated requests only; the model is the worker's ``served_model`` metadata, else
    the router's model name."""

    supports_disaggregation = False

    def __init__(self, read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        self.client = OpenAIHttpClient(connect_timeout=connect_timeout_s,
                                       read_timeout=read_timeout_s)

    async def generate(self, worker: WorkerInfo, model: str, call: EngineCall,
                       ) -> AsyncIterator[EngineChunk]:
        if call.request_type is not RequestPhase.CONTEXT_AND_GENERATION:
            raise EngineFailure(FailureKind.UNSUPPORTED, worker.name,
                                "OpenAI-compatible workers serve aggregated requests only",
                                grpc.StatusCode.UNIMPLEMENTED)
        served = worker.metadata.get(SERVED_MODEL_METADATA_KEY) or model
        stream = self.client.generate(worker.address, served, call.token_ids.tolist(),
                                      call.max_tokens, request_id=call.request_id,
                                      **sampling_kwargs(call.sampling))
        try:
            async for c in stream:
                chunk = EngineChunk(token_ids=list(c.token_ids), finished=c.finished,
                                    finish_reason=c.finish_reason or "")
                if c.usage is not None:
                    chunk.prompt_tokens = c.usage.prompt_tokens
                    chunk.completion_tokens = c.usage.completion_tokens
                    chunk.cached_tokens = c.usage.cached_tokens or 0
                yield chunk
        except BackendHTTPError as e:
            if 400 <= e.status < 500 and e.status not in (408, 429):
                raise EngineFailure(FailureKind.INVALID, worker.name, str(e),
                                    grpc.StatusCode.INVALID_ARGUMENT) from None
            raise EngineFailure(FailureKind.WORKER, worker.name, str(e)) from None
        except BackendError as e:
            raise EngineFailure(FailureKind.WORKER, worker.name, str(e)) from None
        except ValueError as e:
            raise EngineFailure(FailureKind.INVALID, worker.name, str(e),
                                grpc.StatusCode.INVALID_ARGUMENT) from None
        finally:
            await stream.aclose()  # now, not at garbage collection: aborts the engine's request

    async def close(self) -> None:
        await self.client.aclose()
