"""The OpenAI-compatible HTTP front of the router (`kvrouter serve --http HOST:PORT`).

POST /v1/completions and /v1/chat/completions (streaming as server-sent events in
OpenAI's chunk format, or one JSON reply), GET /v1/models, GET /health (the process is
up) and GET /ready (every model has a routable worker). Served by aiohttp on the
router's own event loop (docs/http-front.md says why aiohttp).

A request is tokenised here, once, and becomes the very RouterGenerateRequest a gRPC
client would send; `RouterService.generate` plans, reserves, calls the engine(s) with
the token ids and streams GenerateResponses back (failover, disaggregation, n, load
release and whatever else Router.Generate does apply to HTTP unchanged). Here those
responses are decoded to text, stop strings applied, and formatted as OpenAI chunks.

A client that disconnects cancels its handler (aiohttp's handler_cancellation): the
cancellation runs through the generate generator's `finally` blocks, which cancel the
engine call and release the reservation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web
from pydantic import ValidationError

from kvrouter._proto.v1 import common_pb2, engine_pb2, router_pb2
from kvrouter.admission import PRIORITY_HEADER, TENANT_HEADER
from kvrouter.config import DEFAULT_MODEL, Config, ModelConfig
from kvrouter.http.errors import HttpError
from kvrouter.http.schema import ChatRequest, CompletionRequest, _Sampling
from kvrouter.http.tokenizer import Detokenizer, ModelTokenizer, TemplateError, TokenizerError
from kvrouter.server.generate import DEFAULT_MAX_TOKENS, GenerateTrace

log = logging.getLogger("kvrouter.http")

MAX_BODY_BYTES = 64 << 20
# Longer texts are tokenised on a worker thread, so that the event loop keeps serving
# other requests meanwhile (the Rust tokenizer releases the GIL).
THREAD_TOKENIZE_CHARS = 32 << 10
SESSION_HEADER = "x-session-id"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "Connection": "keep-alive"}
_FINISH = {"length": "length", "stop": "stop", "": "stop"}

GenerateFn = Callable[[router_pb2.RouterGenerateRequest, GenerateTrace],
                      AsyncGenerator[engine_pb2.GenerateResponse, None]]


# one encoder for every reply (json.dumps with options builds a new one per call)
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# a str as a JSON string, as _encode writes it (the C escaper json itself calls)
_json_str = json.encoder.encode_basestring


def _dumps(obj: Any) -> bytes:
    return _encode(obj).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


@dataclass
class _Model:
    cfg: ModelConfig
    tokenizer: ModelTokenizer | None
    created: int

    @property
    def max_model_len(self) -> int | None:
        return self.tokenizer.model_max_length if self.tokenizer else None


@dataclass
class _Choice:
    """One sample's output while it streams: decoding, stop strings, counts. With
    `stream` and no stop strings, `text` holds only what `take` has not returned yet (a
    streamed reply never needs the whole text); otherwise all of it."""

    index: int
    detok: Detokenizer | None
    stops: list[str]
    stream: bool = False
    text: str = ""
    sent: int = 0  # len(text) already sent to the client
    token_ids: list[int] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    usage: common_pb2.Usage | None = None
    closed: bool = False  # its last chunk went out
    hold: int = 0  # characters held back: a stop string may be starting there

    def __post_init__(self) -> None:
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, ids: Sequence[int]) -> None:
        """Decode `ids`; a stop string ends the choice at the token that completed it."""
        if not self.stops:  # nothing can end the choice early: the whole chunk at once
            if self.finish_reason is None:
                self.tokens += len(ids)
                self.token_ids.extend(ids)
                if self.detok is not None:
                    self.text += self.detok.steps(ids)
            return
        for t in ids:
            if self.finish_reason is not None:
                return
            self.tokens += 1
            self.token_ids.append(t)
            if self.detok is None:
                continue
            piece = self.detok.step(t)
            if not piece:
                continue
            start = max(0, len(self.text) - self.hold)
            self.text += piece
            if self.stops:
                cut = min((p for s in self.stops if (p := self.text.find(s, start)) >= 0),
                          default=-1)
                if cut >= 0:
                    self.text = self.text[:cut]
                    self.finish_reason = "stop"

    def take(self, final: bool) -> str:
        """Text ready to send: all of it at the end, else all but what could still turn
        out to be the start of a stop string."""
        if self.stream and not self.stops:  # nothing held back, nothing kept
            out, self.text = self.text, ""
            return out
        end = len(self.text) if final or self.finish_reason else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out


class HttpFront:
    """The router's OpenAI-compatible HTTP server; `await start(host, port)`, `await stop()`."""

    def __init__(self, config: Config, generate: GenerateFn,
                 ready: Callable[[str], bool] | None = None, metrics: Any = None) -> None:
        self.config = config
        # RouterMetrics.http_requests (endpoint, status) when given
        self._counter = metrics.http_requests if metrics is not None else None
        self.generate = generate
        self.ready = ready or (lambda model: True)
        now = int(time.time())
        self.models: dict[str, _Model] = {}
        for m in config.models:
            tok = None
            if m.tokenizer:
                try:
                    tok = ModelTokenizer.load(m.tokenizer)
                except TokenizerError as e:
                    raise RuntimeError(f"model {m.name!r}: {e}") from None
            self.models[m.name] = _Model(cfg=m, tokenizer=tok, created=now)
        self.app = web.Application(client_max_size=MAX_BODY_BYTES,
                                   middlewares=[self._errors])
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/ready", self.readiness)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str, port: int, ssl_context: Any = None) -> int:
        # handler_cancellation: a client that goes away cancels its request (and thereby
        # the engine call and the reservation), instead of generating for nobody
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise RuntimeError(f"cannot serve HTTP on {host}:{port}: {e}") from None
        self._runner = runner
        addrs = runner.addresses
        self.port = int(addrs[0][1]) if addrs else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                      ) -> web.StreamResponse:
        status = 499  # unless an answer goes out: the client went away (cancelled)
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except HttpError as e:
            status = e.status
            return web.Response(status=e.status, body=e.json_bytes(), headers=e.headers())
        except web.HTTPException as e:  # aiohttp's own: 404 path, 405 method, 413 size
            status = e.status
            err = HttpError(e.status, e.reason or "error",
                            "invalid_request_error" if e.status < 500 else "internal_error")
            return web.Response(status=e.status, body=err.json_bytes(), headers=err.headers())
        except Exception:
            status = 500  # aiohttp answers it (and logs the bug)
            raise
        finally:
            if self._counter is not None:
                route = request.match_info.route.resource
                endpoint = route.canonical if route is not None else "other"
                self._counter.labels(endpoint, str(status)).inc()

    async def _body(self, request: web.Request, cls: type[_Sampling]) -> Any:
        raw = await request.read()
        try:
            body = cls.model_validate_json(raw)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            if err.get("type") == "json_invalid":
                raise HttpError.bad_request(f"the body is not valid JSON: {err.get('msg')}"
                                            ) from None
            raise HttpError.bad_request(f"{loc or 'body'}: {err.get('msg')}",
                                        param=loc or None) from None
        for name, why in body.unsupported():
            raise HttpError.bad_request(why, param=name)
        return body

    def _model(self, name: str) -> _Model:
        m = self.models.get(name or DEFAULT_MODEL)
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise HttpError(404, f"The model `{name}` does not exist (known models: {known})",
                            code="model_not_found", param="model")
        return m

    async def _encode(self, tok: ModelTokenizer, fn: Callable[[], list[int]], size: int,
                      ) -> list[int]:
        if size > THREAD_TOKENIZE_CHARS:
            return await asyncio.to_thread(fn)
        return fn()

    def _check_ids(self, m: _Model, ids: Sequence[int]) -> None:
        if m.tokenizer is not None and not m.cfg.vocab_size:
            vocab = m.tokenizer.vocab_size
            top = max(ids)
            if top >= vocab:
                raise HttpError.bad_request(
                    f"token id {top} is out of range for the model's tokenizer "
                    f"(vocabulary of {vocab})", param="prompt")

    def _budget(self, m: _Model, prompt_len: int, requested: int | None) -> int:
        """max_tokens after the model's context limit (vLLM's rule and message)."""
        limit = m.max_model_len
        if limit is None:
            return requested if requested is not None else DEFAULT_MAX_TOKENS
        if prompt_len >= limit:
            raise HttpError.bad_request(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"request has {prompt_len} input tokens. Please reduce the length of the "
                f"input.", param="messages")
        if requested is None:
            return limit - prompt_len
        if prompt_len + requested > limit:
            raise HttpError.bad_request(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_len + requested} tokens ({prompt_len} in the input, "
                f"{requested} in the completion). Please reduce the length of the input "
                f"or completion.", param="max_tokens")
        return requested

    def _generate_request(self, request: web.Request, m: _Model, body: _Sampling,
                          ids: Sequence[int], max_tokens: int, rid: str,
                          ) -> router_pb2.RouterGenerateRequest:
        sp = common_pb2.SamplingParams(max_tokens=max_tokens, n=body.n,
                                       ignore_eos=body.ignore_eos)
        if body.temperature is not None:
            sp.temperature = body.temperature
        if body.top_p is not None:
            sp.top_p = body.top_p
        if body.top_k is not None and body.top_k > 0:
            sp.top_k = body.top_k
        if body.seed is not None:
            sp.seed = body.seed
        if body.stop_token_ids:
            sp.stop_token_ids.extend(body.stop_token_ids)
        session = request.headers.get(SESSION_HEADER) or body.user or ""
        return router_pb2.RouterGenerateRequest(
            model=m.cfg.name, token_ids_le=np.asarray(ids, dtype="<u4").tobytes(),
            request_id=rid, sampling=sp, session_id=session, aggregator=body.aggregator,
            answer_regex=body.answer_regex, scorer=body.scorer,
            tool_pause_s=body.tool_pause_s, tool_kv_action=body.tool_kv_action,
            # admission control reads the same names gRPC clients send as metadata
            priority=request.headers.get(PRIORITY_HEADER, ""),
            tenant=request.headers.get(TENANT_HEADER, ""))

    # ------------------------------------------------------------------ endpoints
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readiness(self, request: web.Request) -> web.Response:
        waiting = [name for name in self.models if not self.ready(name)]
        if waiting:
            return web.json_response({"status": "not ready", "models_without_workers": waiting},
                                     status=503)
        return web.json_response({"status": "ready"})

    async def list_models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "created": m.created, "owned_by": "kvrouter",
                 "max_model_len": m.max_model_len} for name, m in sorted(self.models.items())]
        return web.json_response({"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body: CompletionRequest = await self._body(request, CompletionRequest)
        m = self._model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise HttpError.bad_request("batched prompts are not supported: send one "
                                            "prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            tok = self._need_tokenizer(m, "text prompts")
            p = prompt
            ids = await self._encode(tok, lambda: tok.encode(p, body.add_special_tokens), len(p))
        else:
            ids = list(prompt)  # type: ignore[arg-type]
            if ids:
                self._check_ids(m, ids)
        if not ids:
            raise HttpError.bad_request("the prompt is empty", param="prompt")
        return await self._run(request, m, body, ids, self._budget(m, len(ids), body.max_tokens),
                               chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body: ChatRequest = await self._body(request, ChatRequest)
        m = self._model(body.model)
        tok = self._need_tokenizer(m, "chat completions")
        messages = [msg.for_template() for msg in body.messages]
        kwargs = dict(body.chat_template_kwargs or {})
        for k in ("messages", "add_generation_prompt"):
            kwargs.pop(k, None)
        size = sum(len(str(x.get("content") or "")) for x in messages)
        try:
            ids = await self._encode(
                tok, lambda: tok.encode_chat(messages, body.add_generation_prompt, **kwargs), size)
        except TemplateError as e:
            raise HttpError.bad_request(str(e), param="messages") from None
        if not ids:
            raise HttpError.bad_request("the chat template rendered an empty prompt",
                                        param="messages")
        return await self._run(request, m, body, ids, self._budget(m, len(ids), body.token_budget),
                               chat=True)

    def _need_tokenizer(self, m: _Model, what: str) -> ModelTokenizer:
        if m.tokenizer is None:
            raise HttpError.bad_request(
                f"model {m.cfg.name!r} has no tokenizer configured (models[].tokenizer), so "
                f"it serves {what} only as token ids", param="prompt")
        return m.tokenizer

    # ------------------------------------------------------------------ generation
    async def _run(self, request: web.Request, m: _Model, body: _Sampling, ids: list[int],
                   max_tokens: int, chat: bool) -> web.StreamResponse:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        req = self._generate_request(request, m, body, ids, max_tokens, rid)
        stops = body.stops()
        # an aggregator other than "all" makes the n samples one reply (server/nsample.py)
        n_choices = body.n if body.aggregator in ("", "all") else 1
        choices = [_Choice(i, m.tokenizer.decoder() if m.tokenizer else None, stops,
                           stream=body.stream) for i in range(n_choices)]
        trace = GenerateTrace()
        created = int(time.time())
        async with aclosing(self.generate(req, trace)) as gen:
            try:
                first = await anext(gen, None)  # errors before any output get their status
            except Exception as e:
                if isinstance(e, HttpError):
                    raise
                raise HttpError.from_exception(e) from None
            if body.stream:
                return await self._stream(request, m, body, chat, rid, created, choices, gen,
                                          first, len(ids), trace)
            resp = first
            try:
                while resp is not None:
                    if self._apply(choices, resp):
                        break
                    resp = await anext(gen, None)
            except Exception as e:
                raise HttpError.from_exception(e) from None
        whole = self._whole(m, body, chat, rid, created, choices, len(ids))
        if trace.samples:  # what the n samples did (the gRPC reply's trailing metadata)
            whole["kvrouter"] = {k.removeprefix("kvrouter-"): v for k, v in trace.samples}
        return web.Response(body=_dumps(whole), content_type="application/json",
                            headers=_trace_headers(trace))

    @staticmethod
    def _apply(choices: list[_Choice], resp: engine_pb2.GenerateResponse) -> bool:
        """Feed one response; True once every choice has finished."""
        idx = resp.sample_index if len(choices) > 1 else 0  # an aggregated reply: one choice
        if idx < len(choices):
            c = choices[idx]
            c.feed(resp.token_ids)
            if resp.finished:
                HttpFront._finish(c, resp)
        return all(c.finish_reason is not None for c in choices)

    @staticmethod
    def _finish(c: _Choice, resp: engine_pb2.GenerateResponse) -> None:
        """The engine's final response for choice `c`."""
        c.usage = resp.usage
        if c.finish_reason is None:
            c.finish_reason = _FINISH.get(resp.finish_reason, resp.finish_reason)

    @staticmethod
    def _usage(choices: list[_Choice], prompt_len: int) -> dict[str, Any]:
        completion = sum(c.tokens for c in choices)
        reported = [c.usage for c in choices if c.usage is not None]
        usage: dict[str, Any] = {"prompt_tokens": prompt_len, "completion_tokens": completion,
                                 "total_tokens": prompt_len + completion}
        # the engine's count of prompt tokens served from its prefix cache; a choice cut
        # short by a stop string ends before the engine reported it (then: null)
        usage["prompt_tokens_details"] = (
            {"cached_tokens": int(reported[0].cached_tokens)} if reported else None)
        return usage

    def _whole(self, m: _Model, body: _Sampling, chat: bool, rid: str, created: int,
               choices: list[_Choice], prompt_len: int) -> dict[str, Any]:
        out_choices = []
        for c in choices:
            text = c.text
            item: dict[str, Any]
            if chat:
                item = {"index": c.index, "message": {"role": "assistant", "content": text},
                        "logprobs": None, "finish_reason": c.finish_reason}
            else:
                item = {"index": c.index, "text": text, "logprobs": None,
                        "finish_reason": c.finish_reason}
            if body.return_token_ids or m.tokenizer is None:
                item["token_ids"] = c.token_ids
            out_choices.append(item)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": m.cfg.name, "choices": out_choices,
                "usage": self._usage(choices, prompt_len)}

    async def _stream(self, request: web.Request, m: _Model, body: _Sampling, chat: bool,
                      rid: str, created: int, choices: list[_Choice],
                      gen: AsyncGenerator[engine_pb2.GenerateResponse, None],
                      first: engine_pb2.GenerateResponse | None, prompt_len: int,
                      trace: GenerateTrace) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **_trace_headers(trace)})
        await resp.prepare(request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": m.cfg.name}
        tail: dict[str, Any] = {"usage": None} if include_usage else {}
        frame = (b"data: " + _dumps(head)[:-1] + b',"choices":[',
                 b"]" + (b',"usage":null' if include_usage else b"") + b"}\n\n")
        if chat:  # OpenAI opens each choice with the assistant role
            for c in choices:
                await resp.write(_sse({**head, "choices": [
                    {"index": c.index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}], **tail}))
        with_ids = body.return_token_ids or m.tokenizer is None
        # per choice: the bytes of a mid-stream chunk before and after its JSON text
        mids = [(frame[0] + pre, post + frame[1])
                for pre, post in (_mid_chunk(c.index, chat) for c in choices)]
        single = choices[0] if len(choices) == 1 else None
        write, step = resp.write, gen.__anext__
        item = first
        try:
            while item is not None:
                ch: _Choice | None
                if single is not None:  # the common case, without _apply's generality
                    ch = single
                    ch.feed(item.token_ids)
                    if item.finished:
                        self._finish(ch, item)
                    done = ch.finish_reason is not None
                else:
                    done = self._apply(choices, item)
                    ch = choices[item.sample_index] if item.sample_index < len(choices) else None
                if ch is not None and not ch.closed:
                    data = self._chunk(mids, frame, ch, chat, with_ids, item.token_ids)
                    if data:
                        await write(data)
                if done:
                    break
                try:
                    item = await step()
                except StopAsyncIteration:
                    break
        except Exception as e:  # after the 200: OpenAI's error object as an event
            err = HttpError.from_exception(e)
            await resp.write(_sse(err.body()))
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if include_usage:
            await resp.write(_sse({**head, "choices": [],
                                   "usage": self._usage(choices, prompt_len)}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    @staticmethod
    def _chunk(mids: list[tuple[bytes, bytes]], frame: tuple[bytes, bytes], c: _Choice,
               chat: bool, with_ids: bool, ids: Sequence[int]) -> bytes | None:
        """The SSE event for what choice `c` has to send now (None: nothing yet)."""
        finished = c.closed = c.finish_reason is not None
        text = c.take(finished)
        if not finished and not with_ids:
            if not text:
                return None
            # the hot path (a token's text mid-stream): only the text is serialised; the
            # bytes are those of the dict below (same key order, same separators)
            pre, post = mids[c.index]
            return pre + _json_str(text).encode() + post
        item: dict[str, Any]
        if chat:
            item = {"index": c.index, "delta": {"content": text} if text or not finished else {},
                    "logprobs": None, "finish_reason": c.finish_reason}
        else:
            item = {"index": c.index, "text": text, "logprobs": None,
                    "finish_reason": c.finish_reason}
        if with_ids:
            item["token_ids"] = list(ids)
        # one chunk = the request's constant fields around this choice (pre-encoded)
        return frame[0] + _dumps(item) + frame[1]

def _mid_chunk(index: int, chat: bool) -> tuple[bytes, bytes]:
    """The bytes of a mid-stream choice around its JSON-encoded text."""
    if chat:
        return (b'{"index":%d,"delta":{"content":' % index,
                b'},"logprobs":null,"finish_reason":null}')
    return b'{"index":%d,"text":' % index, b',"logprobs":null,"finish_reason":null}'



def _trace_headers(trace: GenerateTrace) -> dict[str, str]:
    """What the proxy did, as Router.Generate's trailing metadata says it (x-kvrouter-path,
    x-kvrouter-worker, ...); a stream's headers go out with its first tokens, when the
    worker is known."""
    return {f"x-{k}": v for k, v in trace.metadata()}


def model_ready(service: Any) -> Callable[[str], bool]:
    """Readiness of one model for the service: some worker of it is routable."""
    def ready(name: str) -> bool:
        m = service.models.get(name)
        return m is not None and any(w.routable for w in list(m.state.workers.values()))
    return ready
