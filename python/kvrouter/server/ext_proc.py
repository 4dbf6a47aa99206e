"""The Gateway API Inference Extension endpoint picker: Envoy's ext_proc service over the
router's decision path (docs/gateway.md).

A Gateway API gateway (Envoy underneath) asks the picker where each inference request goes,
over Envoy's external-processing stream (envoy.service.ext_proc.v3.ExternalProcessor, protos
from the `xds-protos` package). The contract is the Inference Extension's "Endpoint Picker
Protocol" (gateway-api-inference-extension docs/proposals/004-endpoint-picker-protocol):

* the picker answers with the chosen endpoint(s) as the `x-gateway-destination-endpoint`
  request header (`ip:port`, or a comma list: primary first, then fallbacks) and the same
  value in the ext_proc response's dynamic metadata under the `envoy.lb` namespace;
* the gateway may restrict the choice with a subset in the request's filter metadata
  (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`): only those endpoints
  may be picked, and none eligible (or an empty list) is a 503 ImmediateResponse;
* errors are ImmediateResponses with an HTTP status (400 bad request, 404 unknown model,
  503 no endpoint), never gRPC errors;
* the gateway reports the endpoint that served the request in the response phase's metadata
  (`envoy.lb` / `x-gateway-destination-endpoint-served`);
* gRPC health answers for "", `liveness`, `readiness` and the ext_proc service name.

Body modes (Envoy's ProcessingMode.BodySendMode; the first message's protocol_config says
which, else RouterConfig.ext_proc_body_mode):

* FULL_DUPLEX_STREAMED (what current Inference Extension deployments configure): the picker
  answers nothing until the whole request body arrived (end_of_stream, or the trailers), then
  sends the request-headers response (destination header, dynamic metadata, cleared route
  cache), then the body back as StreamedBodyResponses of at most 64 KiB, the last with
  end_of_stream (then the trailers response when trailers came). Response bodies are echoed
  chunk by chunk the same way.
* BUFFERED (older gateways): the headers are answered at once (Envoy waits for that before
  it sends the body), the whole body arrives in one message, and its BodyResponse carries
  the destination header mutation and the dynamic metadata.
* NONE / STREAMED: the body cannot be seen before the upstream is chosen, so the picker
  routes on an empty prompt (load only) when the headers arrive.

The decision is RouterService.decide (the one decision path: scoring, reservations, session
affinity from `x-session-id` or the body's `user`). The prompt is the OpenAI body tokenised
by an injected PromptEncoder (the HTTP front's tokenizers by default). On the response
headers the request's prefill is marked done; the reservation is released when the response
ends, or when the stream ends early for any reason.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2

from kvrouter._proto.v1 import router_pb2
from kvrouter.config import DEFAULT_MODEL, Config
from kvrouter.grpc_server import GrpcServer
from kvrouter.protocol import check_expected_output_tokens, excerpt

log = logging.getLogger("kvrouter.server.ext_proc")

EXT_PROC_SERVICE = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
HEALTH_NAMES = ("liveness", "readiness")  # the protocol's health services besides ""

DESTINATION_HEADER = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SESSION_HEADER = "x-session-id"
# Worker metadata naming the ip:port the gateway sends a worker's HTTP traffic to; without
# it a worker's registered address (scheme and path dropped) is its endpoint.
ENDPOINT_METADATA_KEY = "gateway_endpoint"
MAX_CHUNK_BYTES = 64 * 1024  # Envoy's recommended largest streamed body response
MAX_FALLBACKS = 2  # endpoints after the primary in the destination list

_BodyMode = processing_mode_pb2.ProcessingMode.BodySendMode
FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
_BUFFERED_LIKE = (processing_mode_pb2.ProcessingMode.BUFFERED,
                  processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL)
_MODE_NAMES = {"full_duplex_streamed": FULL_DUPLEX, "buffered": BUFFERED}

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}


class BadPrompt(ValueError):
    """The body cannot be turned into a prompt (the client gets a 400)."""


class PromptEncoder(Protocol):
    """An OpenAI request body (parsed JSON) to the prompt's token ids for `model`; raises
    BadPrompt for a body the gateway's client must fix."""

    def __call__(self, model: str, body: Mapping[str, Any]) -> Sequence[int]: ...


class Refusal(Exception):
    """Ends the exchange with an ImmediateResponse of this HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def endpoint_of(info: Any) -> str:
    """The ip:port a gateway reaches a worker at (see ENDPOINT_METADATA_KEY)."""
    ep = info.metadata.get(ENDPOINT_METADATA_KEY, "")
    if ep:
        return str(ep)
    addr = str(info.address)
    if "://" in addr:
        addr = addr.split("://", 1)[1]
    return addr.split("/", 1)[0]


def immediate(status: int, message: str) -> pb.ProcessingResponse:
    """An ImmediateResponse with an OpenAI-shaped error body."""
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": status}}).encode()
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=pb.HeaderMutation(set_headers=[_header("content-type", "application/json")]),
        body=body, details=f"kvrouter_epp_{status}"))


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key,
                                                                  raw_value=value.encode()))


def _headers(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


def _metadata(req: pb.ProcessingRequest, namespace: str) -> struct_pb2.Struct | None:
    if not req.HasField("metadata_context"):
        return None
    fm = req.metadata_context.filter_metadata
    return fm[namespace] if namespace in fm else None


@dataclass
class _Exchange:
    """One HTTP request's ext_proc stream."""

    body_mode: int
    response_mode: int
    max_body: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    subset: list[str] | None = None
    request_trailers: bool = False
    decided: bool = False
    model: str = ""
    request_id: str = ""  # the reservation, "" when none
    session: str = ""  # the session key (x-session-id, else the body's user)
    worker: str = ""
    endpoints: list[str] = field(default_factory=list)
    prefill_done: bool = False

    def note_subset(self, req: pb.ProcessingRequest) -> None:
        hint = _metadata(req, SUBSET_NAMESPACE)
        if hint is None or SUBSET_KEY not in hint.fields or self.subset is not None:
            return
        v = hint.fields[SUBSET_KEY]
        kind = v.WhichOneof("kind")
        if kind == "list_value":
            items = [x.string_value for x in v.list_value.values]
        elif kind == "string_value":  # some gateways send one comma-separated string
            items = [s for s in v.string_value.split(",") if s]
        else:
            items = []
        self.subset = [s.strip() for s in items if s.strip()]


class EndpointPicker(pb_grpc.ExternalProcessorServicer):
    """ExternalProcessor.Process over a RouterService (see the module doc)."""

    def __init__(self, service: Any, encoder: PromptEncoder, config: Config) -> None:
        self.service = service
        self.encoder = encoder
        self.default_mode = _MODE_NAMES[config.router.ext_proc_body_mode]
        self.max_body = config.router.max_message_bytes
        self.served = 0
        self.refused = 0

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],
                      context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[pb.ProcessingResponse]:
        x: _Exchange | None = None
        try:
            async for req in request_iterator:
                if x is None:
                    mode, rmode = self.default_mode, self.default_mode
                    if req.HasField("protocol_config"):
                        mode = req.protocol_config.request_body_mode
                        rmode = req.protocol_config.response_body_mode
                    x = _Exchange(mode, rmode, self.max_body)
                x.note_subset(req)
                try:
                    out = await self._step(x, req)
                except Refusal as r:
                    self.refused += 1
                    self._count(str(r.status))
                    self._release(x)
                    yield immediate(r.status, r.message)
                    return  # the gateway answers the client; nothing more to process
                for resp in out:
                    yield resp
        finally:
            # the stream ended, normally or early (gateway gone, client reset): nothing
            # of this request may stay reserved
            if x is not None:
                self._release(x)

    # ------------------------------------------------------------------ phases
    async def _step(self, x: _Exchange, req: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        phase = req.WhichOneof("request")
        if phase == "request_headers":
            x.headers = _headers(req.request_headers)
            if req.request_headers.end_of_stream or x.body_mode not in (FULL_DUPLEX,
                                                                         *_BUFFERED_LIKE):
                # no body (GET /v1/models) or one the picker cannot see first: load only
                await self._decide(x, None)
                return [self._headers_response(x)]
            if x.body_mode in _BUFFERED_LIKE:  # Envoy waits for this before sending the body
                return [pb.ProcessingResponse(request_headers=pb.HeadersResponse())]
            return []  # full duplex: answer once the whole body is here
        if phase == "request_body":
            if x.decided:  # STREAMED / NONE gateways: the upstream is chosen; pass through
                return [pb.ProcessingResponse(request_body=pb.BodyResponse())]
            x.body += req.request_body.body
            if len(x.body) > x.max_body:
                raise Refusal(413, f"request body over {x.max_body} bytes")
            if not req.request_body.end_of_stream:
                return []
            return await self._body_complete(x)
        if phase == "request_trailers":
            x.request_trailers = True
            out: list[pb.ProcessingResponse] = []
            if not x.decided:
                out = await self._body_complete(x)
            return [*out, pb.ProcessingResponse(request_trailers=pb.TrailersResponse())]
        if phase == "response_headers":
            await self._served(x, req)
            if req.response_headers.end_of_stream:
                self._release(x)
            return [pb.ProcessingResponse(response_headers=pb.HeadersResponse())]
        if phase == "response_body":
            chunk = req.response_body
            if chunk.end_of_stream:
                self._release(x)
            if x.response_mode == FULL_DUPLEX:  # the body reaches the client only through us
                return [pb.ProcessingResponse(response_body=pb.BodyResponse(
                    response=pb.CommonResponse(body_mutation=pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(
                            body=chunk.body, end_of_stream=chunk.end_of_stream)))))]
            return [pb.ProcessingResponse(response_body=pb.BodyResponse())]
        if phase == "response_trailers":
            self._release(x)
            return [pb.ProcessingResponse(response_trailers=pb.TrailersResponse())]
        raise Refusal(400, f"ext_proc message without a known phase ({phase})")

    async def _body_complete(self, x: _Exchange) -> list[pb.ProcessingResponse]:
        try:
            body = json.loads(bytes(x.body)) if x.body else None
        except (ValueError, UnicodeDecodeError) as e:
            raise Refusal(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise Refusal(400, "the request body must be a JSON object")
        await self._decide(x, body)
        if x.body_mode in _BUFFERED_LIKE:
            return [self._destination(pb.ProcessingResponse(request_body=pb.BodyResponse(
                response=pb.CommonResponse(header_mutation=self._mutation(x),
                                           clear_route_cache=True))), x)]
        out = [self._headers_response(x)]
        data = bytes(x.body)
        chunks = [data[i:i + MAX_CHUNK_BYTES] for i in range(0, len(data), MAX_CHUNK_BYTES)]
        for i, c in enumerate(chunks or [b""]):
            last = i == max(0, len(chunks) - 1) and not x.request_trailers
            out.append(pb.ProcessingResponse(request_body=pb.BodyResponse(
                response=pb.CommonResponse(body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(body=c, end_of_stream=last))))))
        return out

    # ------------------------------------------------------------------ decision
    async def _decide(self, x: _Exchange, body: dict[str, Any] | None) -> None:
        """Route (reserving load when there is a prompt) within the subset; fills
        x.worker/x.endpoints. Refusal for anything the client or the gateway must fix."""
        svc = self.service
        name = DEFAULT_MODEL
        if body is not None:
            model = body.get("model", "")
            if not isinstance(model, str):
                raise Refusal(400, "model must be a string")
            name = model or DEFAULT_MODEL
        if name not in svc.models:
            if body is None and len(svc.models) == 1:
                name = next(iter(svc.models))  # a bodyless request (GET) names no model
            else:
                known = ", ".join(sorted(svc.models)) or "none"
                raise Refusal(404, f"The model `{excerpt(name)}` does not exist (known "
                                   f"models: {known})")
        m = svc.models[name]
        by_endpoint: dict[str, str] = {}
        for info in list(m.state.workers.values()):
            by_endpoint.setdefault(endpoint_of(info), info.name)
        names: list[str] = []
        if x.subset is not None:
            names = sorted({by_endpoint[e] for e in x.subset if e in by_endpoint})
            if not names:
                raise Refusal(503, "none of the gateway's subset endpoints "
                                   f"({', '.join(excerpt(e) for e in x.subset[:8]) or 'empty'}) "
                                   f"is a worker of model {name!r}")
        if body is None:
            self._least_loaded(x, m, names)
            return
        req = router_pb2.RouteRequest(model=name, candidates=names)
        try:
            ids = self.encoder(name, body)
        except BadPrompt as e:
            raise Refusal(400, str(e)) from None
        if len(ids) == 0:
            raise Refusal(400, "the prompt is empty")
        try:
            req.token_ids_le = np.asarray(ids, dtype="<u4").tobytes()
        except (OverflowError, ValueError, TypeError):
            raise Refusal(400, "prompt token ids must be integers in 0..2^32-1") from None
        req.expected_output_tokens = _expected_output(body)
        req.request_id = f"epp-{uuid.uuid4().hex}"
        session = x.headers.get(SESSION_HEADER) or body.get("user") or ""
        if not isinstance(session, str):
            raise Refusal(400, "user must be a string")
        req.session_id = x.session = session
        try:
            reply = await svc.decide_async(req, explain=True)
        except Exception as e:  # RequestError (a gRPC status) from the decision path
            code = getattr(e, "code", None)
            if code is None:
                raise
            raise Refusal(_HTTP_STATUS.get(code, 500), getattr(e, "message", str(e))) from None
        x.decided, x.model, x.worker = True, name, reply.worker
        x.request_id = reply.request_id
        workers = m.state.workers
        chosen = workers.get(reply.worker)
        endpoints = [endpoint_of(chosen)] if chosen is not None else []
        # fallbacks: the next cheapest candidates, for gateways that retry down the list
        for c in sorted(reply.candidates, key=lambda c: c.cost):
            info = workers.get(c.worker)
            if len(endpoints) > MAX_FALLBACKS or info is None or not info.routable:
                continue
            ep = endpoint_of(info)
            if ep and ep not in endpoints:
                endpoints.append(ep)
        if not endpoints or not endpoints[0]:
            self._release(x)
            raise Refusal(503, f"worker {reply.worker!r} has no gateway endpoint (address or "
                               f"{ENDPOINT_METADATA_KEY} metadata)")
        x.endpoints = endpoints
        self.served += 1
        self._count("picked")

    def _least_loaded(self, x: _Exchange, m: Any, names: list[str]) -> None:
        """A request without a body (GET /v1/models) has no prompt to score: the routable
        worker with the least load answers it, nothing reserved."""
        allowed = set(names) if x.subset is not None else None
        best: tuple[tuple[int, int, int], str, str] | None = None
        for info in list(m.state.workers.values()):
            if not info.routable or (allowed is not None and info.name not in allowed):
                continue
            ep = endpoint_of(info)
            if not ep:
                continue
            ld = m.state.scheduler.load(info.wid)
            key = ((ld.prefill_tokens, ld.decode_blocks, ld.queue), info.name, ep)
            if best is None or key < best:
                best = key
        if best is None:
            raise Refusal(503, f"no routable worker with a gateway endpoint for model "
                               f"{m.cfg.name!r}")
        x.decided, x.model, x.worker, x.endpoints = True, m.cfg.name, best[1], [best[2]]
        self.served += 1
        self._count("picked")

    def _mutation(self, x: _Exchange) -> pb.HeaderMutation:
        hdrs = [_header(DESTINATION_HEADER, ",".join(x.endpoints))]
        if x.body:  # as the reference picker does; Envoy drops it in full-duplex mode
            hdrs.append(_header("content-length", str(len(x.body))))
        return pb.HeaderMutation(set_headers=hdrs)

    def _destination(self, resp: pb.ProcessingResponse, x: _Exchange) -> pb.ProcessingResponse:
        """The same endpoint list in the dynamic metadata (namespace envoy.lb)."""
        resp.dynamic_metadata.fields[LB_NAMESPACE].struct_value.fields[
            DESTINATION_HEADER].string_value = ",".join(x.endpoints)
        return resp

    def _headers_response(self, x: _Exchange) -> pb.ProcessingResponse:
        return self._destination(pb.ProcessingResponse(request_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=self._mutation(x),
                                       clear_route_cache=True))), x)

    # ------------------------------------------------------------------ response phase
    async def _served(self, x: _Exchange, req: pb.ProcessingRequest) -> None:
        """The upstream answered: its prefill is done. A gateway that fell back to another
        endpoint says which in the metadata; the session follows it."""
        if not x.request_id or x.prefill_done:
            return
        x.prefill_done = True
        svc = self.service
        svc.prefill_done(router_pb2.MarkPrefillDoneRequest(model=x.model,
                                                           request_id=x.request_id))
        lb = _metadata(req, LB_NAMESPACE)
        if lb is None or SERVED_KEY not in lb.fields:
            return
        served = lb.fields[SERVED_KEY].string_value.strip()
        if not served or served == (x.endpoints[0] if x.endpoints else ""):
            return
        m = svc.models.get(x.model)
        if m is None:
            return
        for info in list(m.state.workers.values()):
            if endpoint_of(info) == served:
                if x.session:
                    svc.affinity.record(x.model, x.session, info.name)
                    await svc.affinity.flush()  # other replicas follow the move too
                x.worker = info.name
                return

    def _count(self, outcome: str) -> None:
        metrics = getattr(self.service, "metrics", None)
        if metrics is not None:
            metrics.ext_proc.labels(outcome).inc()

    def _release(self, x: _Exchange) -> None:
        if x.request_id:
            rid, x.request_id = x.request_id, ""
            self.service.release(router_pb2.ReleaseRequest(model=x.model, request_id=rid))


def _expected_output(body: Mapping[str, Any]) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            try:
                return check_expected_output_tokens(v)
            except ValueError:
                raise Refusal(400, f"{key} is out of range") from None
    return 0


# ---------------------------------------------------------------------- prompts


class TokenIdPrompts:
    """Prompts given as token ids only (`prompt`: a list of ints, or a list holding one):
    the encoder when no tokenizer is configured for a model."""

    def __call__(self, model: str, body: Mapping[str, Any]) -> Sequence[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in prompt):
            return prompt
        if "messages" in body or isinstance(prompt, str):
            raise BadPrompt(f"model {model!r} has no tokenizer configured (models[].tokenizer): "
                            "send the prompt as token ids")
        raise BadPrompt("the body needs `prompt` (token ids or text) or `messages`")


class OpenAIPrompts:
    """OpenAI bodies to token ids with the HTTP front's tokenizer of each model
    (kvrouter.http.tokenizer: the same text -> ids and chat template rendering as the front
    and the engines); token-id prompts need none."""

    def __init__(self, tokenizers: Mapping[str, Any]) -> None:
        self.tokenizers = dict(tokenizers)
        self.ids = TokenIdPrompts()

    @classmethod
    def from_config(cls, config: Config) -> OpenAIPrompts:
        toks: dict[str, Any] = {}
        for m in config.models:
            path = getattr(m, "tokenizer", None)
            if path:
                from kvrouter.http.tokenizer import ModelTokenizer, TokenizerError

                try:
                    toks[m.name] = ModelTokenizer.load(path)
                except TokenizerError as e:
                    raise RuntimeError(f"model {m.name!r}: {e}") from None
        return cls(toks)

    def __call__(self, model: str, body: Mapping[str, Any]) -> Sequence[int]:
        tok = self.tokenizers.get(model)
        prompt = body.get("prompt")
        if tok is None or (prompt is not None and not _has_text(prompt)):
            return self.ids(model, body)
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(msg, dict) for msg in messages):
                raise BadPrompt("messages must be a non-empty list of objects")
            from kvrouter.http.tokenizer import TemplateError

            add = body.get("add_generation_prompt", True)
            try:
                return list(tok.encode_chat(messages, bool(add)))
            except TemplateError as e:
                raise BadPrompt(str(e)) from None
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadPrompt("batched prompts are not supported: one prompt per request")
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadPrompt("prompt must be text or token ids")
        return list(tok.encode(prompt, bool(body.get("add_special_tokens", True))))


def _has_text(prompt: Any) -> bool:
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                       and all(isinstance(p, str) for p in prompt))


# ---------------------------------------------------------------------- serving


class ExtProcServer:
    """The picker's own gRPC listener (`kvrouter serve --ext-proc HOST:PORT`) with gRPC
    health for "", liveness, readiness and the ext_proc service."""

    def __init__(self, listen: str, picker: EndpointPicker,
                 options: Sequence[tuple[str, Any]] = (), tls: Any = None) -> None:
        self.picker = picker
        self.grpc = GrpcServer(listen, [EXT_PROC_SERVICE], options=options, reflect=False,
                               tls=tls)
        pb_grpc.add_ExternalProcessorServicer_to_server(picker, self.grpc.server)
        self.port = self.grpc.port

    async def start(self) -> None:
        await self.grpc.start()
        await self.grpc.set_serving()
        for name in HEALTH_NAMES:
            await self.grpc.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None) -> None:
        await self.grpc.stop(grace)


def make_picker(service: Any, config: Config,
                encoder: PromptEncoder | None = None,
                ) -> EndpointPicker:
    return EndpointPicker(service, encoder or OpenAIPrompts.from_config(config), config)
