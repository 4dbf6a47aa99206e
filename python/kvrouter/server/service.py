"""The kvrouter.v1.Router servicer: request validation, the decision hot path and worker RPCs.

The per-request Python path is kept thin on purpose: validate, one Rust call
(`Scheduler.route`: hash + match + score + reserve), build the reply. Nothing
is logged per request; metrics are pre-bound counters.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, cast

import grpc
import numpy as np

from kvrouter._core import (
    Decision,
    InvalidArgument,
    MalformedPayload,
    NoRoutableWorker,
    Scheduler,
    decode_payload,
)
from kvrouter._proto.v1 import common_pb2, engine_pb2, router_pb2, router_pb2_grpc
from kvrouter.config import DEFAULT_MODEL, POLICIES, Config, ModelConfig, PolicyName
from kvrouter.events.model import LoadReport
from kvrouter.protocol import (
    ProtocolError,
    check_address,
    check_block_size,
    check_expected_output_tokens,
    check_name,
    check_worker_metadata,
    clamp_i64,
    clamp_load,
    decode_prompt,
    excerpt,
    extra_key_for,
)
from kvrouter.registry import ModelState, Registry, Role, UnknownModel, UnknownWorkerName, WorkerStatus
from kvrouter.server.admission import (
    PRIORITY_HEADER,
    TENANT_HEADER,
    AdmissionGate,
    AdmissionRefused,
    admission_pb,
    deadline_from,
)
from kvrouter.server.affinity import Affinity, Pin, check_session
from kvrouter.server.generate import GenerateError, GenerateProxy, GenerateTrace
from kvrouter.server.metrics import RouterMetrics
from kvrouter.server.sessions import (
    MAX_SESSION_ID_BYTES,
    SessionKvManager,
    Turn,
    UnknownSession,
    check_pause,
)

log = logging.getLogger("kvrouter.server")

ROLE_FROM_PB: dict[common_pb2.WorkerRole, Role] = {
    common_pb2.WORKER_ROLE_UNSPECIFIED: Role.AGGREGATED,
    common_pb2.WORKER_ROLE_AGGREGATED: Role.AGGREGATED,
    common_pb2.WORKER_ROLE_PREFILL: Role.PREFILL,
    common_pb2.WORKER_ROLE_DECODE: Role.DECODE,
}
ROLE_TO_PB: dict[Role, common_pb2.WorkerRole] = {
    Role.AGGREGATED: common_pb2.WORKER_ROLE_AGGREGATED,
    Role.PREFILL: common_pb2.WORKER_ROLE_PREFILL,
    Role.DECODE: common_pb2.WORKER_ROLE_DECODE,
}


_GENERATE_MODES: dict[int, str] = {
    router_pb2.GENERATE_MODE_UNSPECIFIED: "",
    router_pb2.GENERATE_MODE_AUTO: "auto",
    router_pb2.GENERATE_MODE_AGGREGATED: "aggregated",
    router_pb2.GENERATE_MODE_DISAGGREGATED: "disaggregated",
}


class RequestError(Exception):
    """A request the router refuses; becomes a gRPC status (or a StreamError item)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # admission control's hint (RESOURCE_EXHAUSTED)


def _retry_after_md(e: Exception) -> tuple[tuple[str, str], ...]:
    """Trailing metadata `retry-after` (whole seconds) for an error that carries a hint."""
    after = getattr(e, "retry_after_s", None)
    return (("retry-after", str(max(1, round(after)))),) if after else ()


class _aborting:
    """`async with _aborting(context):` a RequestError raised inside ends the RPC with its
    gRPC status (context.abort raises, so nothing after the block runs)."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if isinstance(exc, RequestError):
            if exc.retry_after_s:
                self.context.set_trailing_metadata(_retry_after_md(exc))
            await self.context.abort(exc.code, exc.message)


def _invalid(message: str) -> NoReturn:
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _non_negative(value: int, name: str) -> int:
    if value < 0:
        _invalid(f"{name} must be >= 0, got {value}")
    return value


# RouteStream items decided per event-loop turn (a few ms at most; see RouteStream).
STREAM_SLICE_ITEMS = 256
# ListWorkers page sizes (page_size 0: the default).
LIST_PAGE_DEFAULT = 1000
LIST_PAGE_MAX = 10000


def _page_token(model: str, worker: str) -> str:
    """ListWorkers' opaque page token: where the next page starts after."""
    return base64.urlsafe_b64encode(json.dumps([model, worker]).encode()).decode()


def _page_after(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        v = json.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v):
            return v[0], v[1]
    except (ValueError, UnicodeError):
        pass
    _invalid(f"page_token {excerpt(token)} is not one this router gave")

_OUTCOME = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.UNAVAILABLE: "no_worker",
    grpc.StatusCode.ALREADY_EXISTS: "duplicate_request_id",
}


@dataclass
class ModelRuntime:
    """What the service keeps per model beside the registry's ModelState."""

    cfg: ModelConfig
    state: ModelState

    @property
    def scheduler(self) -> Scheduler:
        return self.state.scheduler


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, config: Config, registry: Registry, metrics: RouterMetrics,
                 event_plane: Any, proxy: GenerateProxy | None = None,
                 affinity: Affinity | None = None) -> None:
        self.config = config
        self.proxy = proxy or GenerateProxy()
        # Session affinity (server/affinity.py); app.py gives it the Redis table when shared.
        self.affinity = affinity or Affinity({m.name: m.affinity for m in config.models})
        # Sessions' KV around tool calls: keep / offload / reload (server/sessions.py).
        self.sessions = SessionKvManager(
            on_count=lambda event: metrics.session_kv.labels(event).inc())
        self.registry = registry
        self.metrics = metrics
        self.event_plane = event_plane
        self.models: dict[str, ModelRuntime] = {}
        for mcfg in config.models:
            state = registry.models.get(mcfg.name)
            if state is None:
                raise ValueError(f"model {mcfg.name!r} is not in the registry")
            self.models[mcfg.name] = ModelRuntime(cfg=mcfg, state=state)
        # Admission control per model (server/admission.py, docs/admission.md).
        self.admission = {name: AdmissionGate(name, m.state.scheduler, m.cfg.admission, metrics)
                          for name, m in self.models.items()}
        self._max_tokens = config.router.max_prompt_tokens
        # Router-made request ids: unique per process start, cheap to produce.
        self._rid_prefix = f"r{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}-"
        self._rid_counter = itertools.count(1)

    # ------------------------------------------------------------------ helpers
    def _model(self, name: str) -> ModelRuntime:
        name = name or DEFAULT_MODEL
        m = self.models.get(name)
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown model {excerpt(name)} (known models: {known})")
        return m

    def _worker(self, m: ModelRuntime, name: str) -> Any:
        if not name:
            _invalid("worker name is empty")
        info = m.state.workers.get(name)
        if info is None:
            try:
                check_name("worker", name)
            except ProtocolError as e:
                _invalid(str(e))
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown worker {excerpt(name)} for model {m.cfg.name!r}")
        return info

    def _tokens(self, m: ModelRuntime, token_ids: Any, token_ids_le: bytes) -> np.ndarray:
        """The prompt as a u32 array `Scheduler.route` reads in place, range checked."""
        try:
            return decode_prompt(token_ids, token_ids_le, max_prompt_tokens=self._max_tokens,
                                 vocab_size=m.cfg.vocab_size)
        except ProtocolError as e:
            _invalid(f"{e} (model {m.cfg.name!r})")

    def _candidates(self, m: ModelRuntime, names: Iterable[str],
                    role: common_pb2.WorkerRole) -> list[int]:
        workers = m.state.workers
        names = list(names)
        if names:
            out = []
            for name in names:
                info = workers.get(name)
                if info is None:
                    raise RequestError(grpc.StatusCode.NOT_FOUND,
                                       f"unknown candidate worker {excerpt(name)} for model "
                                       f"{m.cfg.name!r}")
                out.append(info)
        else:
            out = list(workers.values())
        if role:
            want = ROLE_FROM_PB.get(role)
            if want is None:
                _invalid(f"unknown worker role {role}")
            out = [w for w in out if w.role is want]
        return [w.wid for w in out]

    def _no_worker_message(self, m: ModelRuntime, filtered: bool) -> str:
        n = len(m.state.workers)
        up = sum(1 for w in m.state.workers.values() if w.routable)
        what = "matching the request's candidates/role " if filtered else ""
        return (f"no routable worker {what}for model {m.cfg.name!r} "
                f"({n} registered, {up} up)")

    def _pin(self, m: ModelRuntime, session: str, candidates: list[int] | None) -> Pin | None:
        """Session affinity's say (server/affinity.py): None without a session key."""
        if not session:
            return None
        try:
            check_session(session)
        except ProtocolError as e:
            _invalid(str(e))
        return self.affinity.pin(m.state, session, candidates)

    async def decide_async(self, req: router_pb2.RouteRequest, explain: bool = False,
                           dry_run: bool = False,
                           context: grpc.aio.ServicerContext | None = None,
                           ) -> router_pb2.RouteResponse:
        """decide() behind admission control (Route, ext_proc: it may wait while the
        model's fleet is saturated; dry runs never wait), with the shared session table
        read before and written after (Redis round trips only for requests that carry a
        session key)."""
        grant = None if dry_run else await self._admit_route(req, context)
        try:
            if not req.session_id:
                return self.decide(req, explain, dry_run)
            await self.affinity.prefetch([(req.model or DEFAULT_MODEL, req.session_id)])
            try:
                return self.decide(req, explain, dry_run)
            finally:
                await self.affinity.flush()
        finally:
            if grant is not None:
                self.admission[grant[0]].settled(grant[1])

    # ------------------------------------------------------------------ admission control
    def _admission_from_context(self, request: router_pb2.RouterGenerateRequest,
                                context: grpc.aio.ServicerContext,
                                ) -> router_pb2.RouterGenerateRequest:
        """Generate over gRPC: the x-kvrouter-priority / x-kvrouter-tenant metadata and the
        call's gRPC deadline fill the admission fields the request leaves unset."""
        md = dict(context.invocation_metadata() or ())
        priority = request.priority or str(md.get(PRIORITY_HEADER, ""))
        tenant = request.tenant or str(md.get(TENANT_HEADER, ""))
        deadline_ms = request.deadline_unix_ms
        remaining = context.time_remaining()
        if remaining is not None and deadline_ms >= 0:
            by_grpc = int((time.time() + remaining) * 1e3)
            deadline_ms = min(deadline_ms, by_grpc) if deadline_ms else by_grpc
        if (priority, tenant, deadline_ms) == (request.priority, request.tenant,
                                                request.deadline_unix_ms):
            return request
        out = router_pb2.RouterGenerateRequest()
        out.CopyFrom(request)
        out.priority, out.tenant, out.deadline_unix_ms = priority, tenant, deadline_ms
        return out

    async def _admit(self, m: ModelRuntime, priority: str, tenant: str, deadline_unix_ms: int,
                     time_remaining: float | None = None, eligible: list[int] | None = None,
                     ) -> tuple[str, Any] | None:
        """Wait while every eligible worker of the model is saturated (server/admission.py).
        Returns (model, ticket) to settle once the request has routed, or None."""
        gate = self.admission[m.cfg.name]
        try:
            deadline = deadline_from(deadline_unix_ms, time_remaining)
            ticket = await gate.enter(priority, tenant, deadline, eligible)
        except ValueError as e:
            _invalid(f"{e} (model {m.cfg.name!r})")
        except AdmissionRefused as e:
            self.metrics.failed(m.cfg.name, m.cfg.policy, e.code.name.lower())
            raise RequestError(e.code, e.message, e.retry_after_s) from None
        return (m.cfg.name, ticket) if ticket is not None else None

    async def _admit_route(self, req: router_pb2.RouteRequest,
                           context: grpc.aio.ServicerContext | None,
                           ) -> tuple[str, Any] | None:
        """Route's admission: a dry run does not load the fleet and is never held."""
        m = self._model(req.model)
        gate = self.admission[m.cfg.name]
        if req.dry_run or not (gate.enabled or req.priority or req.tenant
                               or req.deadline_unix_ms):
            return None  # nothing to check or wait for: the hot path stays as it was
        priority, tenant = req.priority, req.tenant
        if gate.enabled:
            md = dict(context.invocation_metadata() or ()) if context is not None else {}
            priority = priority or str(md.get(PRIORITY_HEADER, ""))
            tenant = tenant or str(md.get(TENANT_HEADER, ""))
            self._tokens(m, req.token_ids, req.token_ids_le)  # a bad prompt fails before waiting
        eligible = None
        if gate.enabled and (req.candidates or req.role):
            eligible = self._candidates(m, req.candidates, req.role)
        return await self._admit(m, priority, tenant, req.deadline_unix_ms,
                                 context.time_remaining() if context is not None else None,
                                 eligible)

    def _admit_stream(self, req: router_pb2.RouteRequest) -> None:
        """RouteStream answers in order and cannot hold one item back: a route item that
        would have to wait fails with RESOURCE_EXHAUSTED (and a retry-after hint) instead."""
        m = self._model(req.model)
        gate = self.admission[m.cfg.name]
        if req.dry_run or not (gate.enabled or req.priority or req.tenant
                               or req.deadline_unix_ms):
            return
        try:
            gate.try_now(req.priority, req.tenant, deadline_from(req.deadline_unix_ms))
        except ValueError as e:
            _invalid(f"{e} (model {m.cfg.name!r})")
        except AdmissionRefused as e:
            self.metrics.failed(m.cfg.name, m.cfg.policy, e.code.name.lower())
            raise RequestError(e.code, e.message, e.retry_after_s) from None

    # ------------------------------------------------------------------ decision hot path
    def decide(self, req: router_pb2.RouteRequest, explain: bool = False,
               dry_run: bool = False) -> router_pb2.RouteResponse:
        t0 = time.perf_counter()
        m = self._model(req.model)
        policy = req.policy or None
        try:
            tokens = self._tokens(m, req.token_ids, req.token_ids_le)
            if policy is not None and policy not in POLICIES:
                _invalid(f"unknown policy {policy!r} (expected one of {', '.join(POLICIES)})")
            try:
                expected = check_expected_output_tokens(req.expected_output_tokens)
            except ProtocolError as e:
                _invalid(str(e))
            filtered = bool(req.candidates) or bool(req.role)
            candidates = self._candidates(m, req.candidates, req.role) if filtered else None
            dry_run = dry_run or req.dry_run
            explain = explain or req.explain
            sched = m.state.scheduler
            rid: str | None = None
            if not dry_run:
                rid = req.request_id or f"{self._rid_prefix}{next(self._rid_counter)}"
                if req.request_id and sched.has_reservation(rid):
                    raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                                       f"request_id {rid!r} already holds a reservation on model "
                                       f"{m.cfg.name!r}; Release it or use a new id")
            if candidates is not None and not candidates:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, self._no_worker_message(m, True))
            pin = self._pin(m, req.session_id, candidates)
            try:
                # cast to a string type: `PolicyName | None` would build a typing Union per call
                d: Decision = sched.route(
                    tokens, extra_key=extra_key_for(req.extra_key), request_id=rid,
                    expected_output_tokens=expected,
                    candidates=self.affinity.narrow(m.state, pin, candidates),
                    policy=cast("PolicyName | None", policy), explain=explain, reserve=not dry_run)
            except NoRoutableWorker:
                raise RequestError(grpc.StatusCode.UNAVAILABLE,
                                   self._no_worker_message(m, filtered)) from None
            except InvalidArgument as e:
                _invalid(str(e))
        except RequestError as e:
            self.metrics.failed(m.cfg.name, policy or m.cfg.policy, _OUTCOME.get(e.code, "error"))
            raise
        by_wid = self.registry.by_wid
        chosen = by_wid(d.worker)
        reply = router_pb2.RouteResponse(
            worker=chosen.name, address=chosen.address, request_id=rid or "",
            overlap_blocks=d.overlap_blocks, gpu_blocks=d.gpu_blocks,
            prompt_blocks=d.prompt_blocks, prompt_tokens=d.prompt_tokens,
            block_size=m.state.block_size, policy=d.policy, model=m.cfg.name)
        if pin is not None:
            reply.affinity = pin.outcome
            if not dry_run:
                self.affinity.record(m.cfg.name, req.session_id, chosen.name)
                self.metrics.session_affinity.labels(m.cfg.name, pin.outcome).inc()
        if explain:
            # Load terms are u64 sums in the core: clamped so the reply always encodes.
            reply.candidates.extend(
                router_pb2.CandidateScore(
                    worker=by_wid(c.worker).name, gpu_blocks=c.gpu_blocks,
                    host_blocks=c.host_blocks, disk_blocks=c.disk_blocks,
                    new_prefill_tokens=clamp_i64(c.new_prefill_tokens),
                    decode_blocks=clamp_i64(c.decode_blocks),
                    queue=clamp_i64(c.queue), cost=c.cost, chosen=c.worker == d.worker,
                    evicted_blocks=clamp_i64(c.evicted_blocks), pressure_cost=c.pressure_cost,
                    pending_blocks=c.pending_blocks)
                for c in d.candidates)
        ratio = d.overlap_blocks / d.prompt_blocks if d.prompt_blocks else 0.0
        self.metrics.decided(m.cfg.name, d.policy, time.perf_counter() - t0, ratio,
                             d.prompt_tokens, expected)
        return reply

    def _check_holder(self, m: ModelRuntime, request_id: str, worker: str, what: str) -> None:
        """The worker a Release / MarkPrefillDone names must be the one holding the
        reservation (FAILED_PRECONDITION, nothing changed, otherwise)."""
        given = self._worker(m, worker)
        holder = m.state.scheduler.reservation_worker(request_id)
        if holder is not None and holder != given.wid:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"request_id {request_id!r} is reserved on worker "
                f"{self.registry.by_wid(holder).name!r}, not {worker!r}; {what}")

    def release(self, req: router_pb2.ReleaseRequest) -> router_pb2.ReleaseResponse:
        m = self._model(req.model)
        if not req.request_id:
            _invalid("request_id is empty")
        if req.worker:
            self._check_holder(m, req.request_id, req.worker, "nothing released")
        released = m.state.scheduler.release(req.request_id)
        self.metrics.released.labels(m.cfg.name, "released" if released else "unknown").inc()
        if released:
            self.admission[m.cfg.name].kick()
        return router_pb2.ReleaseResponse(released=released)

    def prefill_done(self, req: router_pb2.MarkPrefillDoneRequest,
                     ) -> router_pb2.MarkPrefillDoneResponse:
        m = self._model(req.model)
        if not req.request_id:
            _invalid("request_id is empty")
        if req.worker:
            self._check_holder(m, req.request_id, req.worker, "nothing marked")
        found = m.state.scheduler.mark_prefill_done(req.request_id)
        if found:
            self.admission[m.cfg.name].kick()
        return router_pb2.MarkPrefillDoneResponse(found=found)

    # ------------------------------------------------------------------ client RPCs
    async def Route(self, request: router_pb2.RouteRequest,
                    context: grpc.aio.ServicerContext) -> router_pb2.RouteResponse:
        async with _aborting(context):
            return await self.decide_async(request, context=context)

    async def Explain(self, request: router_pb2.ExplainRequest,
                      context: grpc.aio.ServicerContext) -> router_pb2.RouteResponse:
        async with _aborting(context):
            return await self.decide_async(request.route, explain=True, dry_run=True)

    async def Release(self, request: router_pb2.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> router_pb2.ReleaseResponse:
        async with _aborting(context):
            return self.release(request)

    async def MarkPrefillDone(self, request: router_pb2.MarkPrefillDoneRequest,
                              context: grpc.aio.ServicerContext,
                              ) -> router_pb2.MarkPrefillDoneResponse:
        async with _aborting(context):
            return self.prefill_done(request)

    def _stream_item(self, item: router_pb2.RouteStreamItem) -> router_pb2.RouteStreamResult:
        try:
            op = item.WhichOneof("op")
            if op == "route":
                self._admit_stream(item.route)
                return router_pb2.RouteStreamResult(route=self.decide(item.route))
            if op == "release":
                return router_pb2.RouteStreamResult(release=self.release(item.release))
            if op == "prefill_done":
                return router_pb2.RouteStreamResult(
                    prefill_done=self.prefill_done(item.prefill_done))
            _invalid("stream item has no operation set")
        except RequestError as e:
            return router_pb2.RouteStreamResult(
                error=router_pb2.StreamError(code=e.code.value[0], message=e.message))

    async def RouteStream(self, request_iterator: AsyncIterator[router_pb2.RouteStreamRequest],
                          context: grpc.aio.ServicerContext,
                          ) -> AsyncIterator[router_pb2.RouteStreamResponse]:
        # Items of one message are decided in slices of STREAM_SLICE_ITEMS, yielding to the
        # event loop between slices: a huge message (issue 13 finding 3: 350K items froze the
        # loop for 16 s) cannot starve heartbeats, liveness, lease expiry or other clients.
        # Small messages (the usual batches) take the one-shot path.
        item = self._stream_item
        affinity = self.affinity
        async for req in request_iterator:
            # (~1 us per item: only scanned when sessions are shared through Redis)
            sessions = [(i.route.model or DEFAULT_MODEL, i.route.session_id) for i in req.items
                        if i.route.session_id and i.WhichOneof("op") == "route"
                        ] if affinity.shared is not None else None
            if sessions:  # one Redis round trip per message for the whole batch
                await affinity.prefetch(sessions)
            items = req.items
            if len(items) <= STREAM_SLICE_ITEMS:
                resp = router_pb2.RouteStreamResponse(seq=req.seq,
                                                      results=[item(i) for i in items])
            else:
                # The reply is filled slice by slice too (copying 100Ks of results into it
                # at once would be one more long turn).
                resp = router_pb2.RouteStreamResponse(seq=req.seq)
                for lo in range(0, len(items), STREAM_SLICE_ITEMS):
                    resp.results.extend([item(i) for i in items[lo:lo + STREAM_SLICE_ITEMS]])
                    await asyncio.sleep(0)
            if sessions:
                await affinity.flush()
            yield resp

    async def Generate(self, request: router_pb2.RouterGenerateRequest,
                       context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        """Proxy mode: plan (kvrouter.planner), call the engine(s), stream (server/generate.py)."""
        trace = GenerateTrace()
        try:
            if not (request.priority and request.tenant and request.deadline_unix_ms):
                request = self._admission_from_context(request, context)
            async for resp in self.generate(request, trace):
                yield resp
        except (RequestError, GenerateError) as e:
            context.set_trailing_metadata(trace.metadata() + _retry_after_md(e))
            await context.abort(e.code, e.message)
        context.set_trailing_metadata(trace.metadata())

    async def generate(self, request: router_pb2.RouterGenerateRequest, trace: GenerateTrace,
                       ) -> AsyncGenerator[engine_pb2.GenerateResponse, None]:
        """Router.Generate without a gRPC context, shared by every front (gRPC, the HTTP
        front in kvrouter.http): raises RequestError / GenerateError with a gRPC status
        code; closing the iterator early cancels the engine call and releases the load."""
        m = self._model(request.model)
        tokens = self._tokens(m, request.token_ids, request.token_ids_le)
        mode = _GENERATE_MODES.get(request.mode)
        if mode is None:
            _invalid(f"unknown generate mode {request.mode}")
        if request.disaggregated:
            if mode not in ("", "disaggregated"):
                _invalid("disaggregated=true contradicts the requested mode")
            mode = "disaggregated"
        mode = mode or m.cfg.disagg.mode
        rid = request.request_id or f"{self._rid_prefix}{next(self._rid_counter)}"
        if request.request_id and m.state.scheduler.has_reservation(rid):
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request_id {rid!r} already holds a reservation on model "
                               f"{m.cfg.name!r}; use a new id")
        gate = self.admission[m.cfg.name]
        grant = None
        if gate.enabled or request.priority or request.tenant or request.deadline_unix_ms:
            grant = await self._admit(m, request.priority, request.tenant,
                                      request.deadline_unix_ms)
        try:
            session = request.session_id
            pin = None
            if session:
                await self.affinity.prefetch([(m.cfg.name, session)])
                pin = self._pin(m, session, None)
                if pin is not None:
                    trace.affinity = pin.outcome
                    self.metrics.session_affinity.labels(m.cfg.name, pin.outcome).inc()
        finally:
            # The next waiter is let go once the proxy's plan below has reserved `rid`, so
            # its saturation check sees this request's load.
            if grant is not None:
                gate.settle_on_reserve(grant[1], rid)
        turn = await self._session_turn(m, request)
        t0, first, n_out = time.perf_counter(), 0.0, 0  # the autoscaler's TTFT/ITL per pool
        async with aclosing(self.proxy.run(m.state, m.cfg, request, tokens, rid, mode, trace,
                                           pin=pin.wid if pin is not None else None,
                                           avoid=pin.avoid if pin is not None else None)) as out:
            try:
                async for resp in out:
                    if turn is not None:
                        turn.observe(resp)
                    if resp.token_ids and not first:
                        first = time.perf_counter()
                    n_out += len(resp.token_ids)
                    yield resp
            finally:
                # after the final response, also when the caller closes the stream there
                # (the HTTP front does): a turn ending in a tool call is kept/offloaded/dropped
                if turn is not None and turn.finished and trace.worker:
                    self.sessions.end(turn, m.state, trace.worker, len(tokens))
                if pin is not None and trace.worker:  # the worker that finished holds the KV
                    self.affinity.record(m.cfg.name, session, trace.worker)
                if grant is not None:  # a request that failed before it reserved
                    gate.settled(grant[1])
                if gate.enabled:  # after the proxy has released this request's load
                    asyncio.get_running_loop().call_soon(gate.kick)
        if first:
            self.metrics.generated(m.cfg.name, trace.pool, len(tokens), n_out, first - t0,
                                   time.perf_counter() - first, trace.request_class)
        if pin is not None:
            await self.affinity.flush()

    async def _session_turn(self, m: ModelRuntime, request: router_pb2.RouterGenerateRequest,
                            ) -> Turn | None:
        """A session's Generate: check the tool-pause hint, and bring the session's KV back
        if it was kept or offloaded (failures fall back to re-prefill)."""
        if not request.session_id:
            if request.tool_pause_s or request.tool_kv_action:
                _invalid("tool_pause_s and tool_kv_action need a session_id")
            return None
        problem = check_pause(request.tool_pause_s, request.tool_kv_action)
        if problem is not None:
            _invalid(problem)
        return await self.sessions.begin(m.cfg.name, request.session_id, request.tool_pause_s,
                                         request.tool_kv_action)

    async def ResumeSession(self, request: router_pb2.ResumeSessionRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> router_pb2.ResumeSessionResponse:
        """Prefetch a session's KV before its next turn (server/sessions.py)."""
        async with _aborting(context):
            m = self._model(request.model)
            n = len(request.session_id.encode())
            if not 0 < n <= MAX_SESSION_ID_BYTES:
                _invalid(f"session_id must be 1..{MAX_SESSION_ID_BYTES} bytes, got {n}")
            try:
                r = await self.sessions.resume(m.cfg.name, request.session_id)
            except UnknownSession as e:
                raise RequestError(grpc.StatusCode.NOT_FOUND, str(e.args[0])) from None
        return router_pb2.ResumeSessionResponse(worker=r.worker, state=r.state, action=r.action,
                                                blocks=r.blocks, detail=r.detail)

    def _worker_pb(self, m: ModelRuntime, info: Any, now: float) -> router_pb2.WorkerInfo:
        load = m.state.scheduler.load(info.wid)
        c = clamp_i64  # the core's u64 loads (reports arrive through Redis too) fit int64 fields
        return router_pb2.WorkerInfo(
            name=info.name, model=m.cfg.name, role=ROLE_TO_PB[info.role], address=info.address,
            status=info.status.value, status_reason=info.status_reason,
            last_seen_age_s=max(0.0, now - info.last_seen),
            cached_blocks=(m.state.scheduler.approx_blocks(info.wid) if load.approx
                           else m.state.index.worker_blocks(info.wid)),
            routable=info.routable, metadata=info.metadata,
            kv_mode="approx" if load.approx else "exact",
            load=router_pb2.WorkerLoad(
                reserved_prefill_tokens=c(load.reserved_prefill_tokens),
                reserved_decode_blocks=c(load.reserved_decode_blocks),
                reserved_requests=c(load.reserved_requests),
                waiting_requests=c(load.waiting_requests),
                reported=common_pb2.LoadReport(
                    running=c(load.reported_running), queued=c(load.reported_queued),
                    kv_used_blocks=c(load.reported_kv_used_blocks),
                    kv_free_blocks=c(load.reported_kv_free_blocks),
                    kv_capacity_blocks=c(load.kv_capacity_blocks),
                    kv_cached_blocks=c(load.reported_kv_cached_blocks)),
                prefill_tokens=c(load.prefill_tokens), decode_blocks=c(load.decode_blocks),
                queue=c(load.queue)))

    async def ListWorkers(self, request: router_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> router_pb2.ListWorkersResponse:
        async with _aborting(context):
            models = ([self._model(request.model)] if request.model
                      else [self.models[n] for n in sorted(self.models)])
            if request.page_size < 0:
                _invalid(f"page_size must be >= 0, got {request.page_size}")
            size = min(request.page_size or LIST_PAGE_DEFAULT, LIST_PAGE_MAX)
            after = _page_after(request.page_token)
        now = time.monotonic()
        out = router_pb2.ListWorkersResponse()
        # A page also ends before the reply would outgrow half the message limit, so that
        # workers with large metadata cannot make ListWorkers fail (issue 13 finding 7).
        budget, used = self.config.router.max_message_bytes // 2, 0
        for m in models:
            if after is not None and m.cfg.name < after[0]:
                continue
            for info in sorted(m.state.workers.values(), key=lambda w: w.name):
                if after is not None and (m.cfg.name, info.name) <= after:
                    continue
                pb = self._worker_pb(m, info, now)
                n = pb.ByteSize()
                if len(out.workers) >= size or (out.workers and used + n > budget):
                    last = out.workers[-1]
                    out.next_page_token = _page_token(last.model, last.name)
                    return out
                out.workers.append(pb)
                used += n
            out.admission.append(admission_pb(m.cfg.name, self.admission[m.cfg.name].state()))
        return out

    async def ListModels(self, request: router_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> router_pb2.ListModelsResponse:
        out = router_pb2.ListModelsResponse()
        for name, m in sorted(self.models.items()):
            out.models.append(router_pb2.ModelInfo(
                name=name, block_size=m.state.block_size, vocab_size=m.cfg.vocab_size or 0,
                policy=m.scheduler.policy, workers=len(m.state.workers),
                indexed_blocks=m.state.index.num_entries(),
                admission=admission_pb(name, self.admission[name].state())))
        return out

    # ------------------------------------------------------------------ worker RPCs
    async def RegisterWorker(self, request: router_pb2.RegisterWorkerRequest,
                             context: grpc.aio.ServicerContext,
                             ) -> router_pb2.RegisterWorkerResponse:
        async with _aborting(context):
            # Everything is validated before any state changes: a refused registration
            # leaves nothing registered.
            m = self._model(request.model)
            if not request.worker:
                _invalid("worker name is empty")
            role = ROLE_FROM_PB.get(request.role)
            if role is None:
                _invalid(f"unknown worker role {request.role}")
            bs = _non_negative(request.block_size, "block_size")
            try:
                check_name("worker", request.worker)
                check_address(request.address)
                check_worker_metadata(request.metadata)
            except ProtocolError as e:
                _invalid(str(e))
        existed = request.worker in m.state.workers
        try:
            # Routable at once; the event plane then tracks its liveness from heartbeats.
            info = self.registry.upsert_worker(m.cfg.name, request.worker, role=role,
                                               address=request.address,
                                               metadata=dict(request.metadata))
        except ValueError as e:  # e.g. metadata merged with an earlier registration's
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        try:
            self.event_plane.submit_heartbeat(m.cfg.name, info.name, role=role.value,
                                              address=request.address, block_size=bs)
        except ValueError as e:
            if not existed:  # refused: leave no half-registered worker behind
                self.registry.remove_worker(m.cfg.name, info.name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        model_bs = m.state.block_size
        mismatch = check_block_size(bs, model_bs) if bs else None  # 0: the engine did not say
        if mismatch is not None:
            reason = f"model {m.cfg.name!r}: {mismatch}"
            self.registry.set_status(m.cfg.name, info.name, WorkerStatus.MISMATCH, reason)
            log.warning("worker block size mismatch",
                        extra={"model": m.cfg.name, "worker": info.name, "reason": reason})
        elif info.status is not WorkerStatus.UP:
            self.registry.set_status(m.cfg.name, info.name, WorkerStatus.UP)
        log.info("worker registered", extra={"model": m.cfg.name, "worker": info.name,
                                              "role": role.value, "address": request.address})
        return router_pb2.RegisterWorkerResponse(
            status=info.status.value, status_reason=info.status_reason, block_size=model_bs,
            heartbeat_interval_s=self.config.router.heartbeat_interval_s)

    async def Heartbeat(self, request: router_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> router_pb2.HeartbeatResponse:
        async with _aborting(context):
            m = self._model(request.model)
            info = self._worker(m, request.worker)
            report = None
            if request.HasField("load"):
                lr = request.load
                # Negative values are refused, absurd ones clamped (protocol.MAX_LOAD_VALUE).
                report = LoadReport(
                    running=clamp_load(_non_negative(lr.running, "load.running")),
                    queued=clamp_load(_non_negative(lr.queued, "load.queued")),
                    kv_used_blocks=clamp_load(_non_negative(lr.kv_used_blocks,
                                                            "load.kv_used_blocks")),
                    kv_free_blocks=clamp_load(_non_negative(lr.kv_free_blocks,
                                                            "load.kv_free_blocks")),
                    queued_prefill_tokens=clamp_load(_non_negative(
                        lr.queued_prefill_tokens, "load.queued_prefill_tokens")),
                    # Not clamped: an absurd capacity is ignored (and counted) by the scheduler.
                    kv_capacity_blocks=_non_negative(lr.kv_capacity_blocks,
                                                     "load.kv_capacity_blocks"),
                    kv_cached_blocks=clamp_load(_non_negative(lr.kv_cached_blocks,
                                                              "load.kv_cached_blocks")))
        info.last_seen = time.monotonic()
        try:
            self.event_plane.submit_heartbeat(
                m.cfg.name, info.name, role=info.role.value, address=info.address,
                epoch=request.epoch, seq=request.last_seq if request.HasField("last_seq") else -1,
                load=report)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        if report is not None:
            self.admission[m.cfg.name].kick()
        return router_pb2.HeartbeatResponse(status=info.status.value)

    async def DrainWorker(self, request: router_pb2.DrainWorkerRequest,
                          context: grpc.aio.ServicerContext) -> router_pb2.DrainWorkerResponse:
        async with _aborting(context):
            m = self._model(request.model)
            info = self._worker(m, request.worker)
        self.registry.set_status(m.cfg.name, info.name, WorkerStatus.DRAINING, "drain requested")
        log.info("worker draining", extra={"model": m.cfg.name, "worker": info.name})
        load = m.state.scheduler.load(info.wid)
        return router_pb2.DrainWorkerResponse(reserved_requests=load.reserved_requests)

    async def DeregisterWorker(self, request: router_pb2.DeregisterWorkerRequest,
                               context: grpc.aio.ServicerContext,
                               ) -> router_pb2.DeregisterWorkerResponse:
        async with _aborting(context):
            m = self._model(request.model)
            self._worker(m, request.worker)
        dropped = self.registry.remove_worker(m.cfg.name, request.worker)
        # Tell the event plane too, so it stops tracking the worker's liveness (the name
        # passed check_name when it registered, so the plane accepts it).
        self.event_plane.submit_heartbeat(m.cfg.name, request.worker, leaving=True)
        log.info("worker deregistered", extra={"model": m.cfg.name, "worker": request.worker,
                                                "dropped_reservations": len(dropped)})
        return router_pb2.DeregisterWorkerResponse(dropped_reservations=len(dropped))

    async def PublishEvents(self, request: router_pb2.PublishEventsRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> router_pb2.PublishEventsResponse:
        try:
            m = self._model(request.model)
            self._worker(m, request.worker)
            if not request.payload:
                _invalid("payload is empty")
            try:
                # The plane applies batches later; decode once here so that a malformed
                # batch is refused to its sender instead of silently counted and dropped.
                decode_payload(request.payload)
            except MalformedPayload as e:
                _invalid(f"malformed event payload: {e}")
            try:
                self.event_plane.submit(m.cfg.name, request.worker, request.epoch, request.seq,
                                        request.payload)
            except (UnknownModel, UnknownWorkerName) as e:
                raise RequestError(grpc.StatusCode.NOT_FOUND, str(e)) from None
            except ValueError as e:
                _invalid(f"events rejected: {e}")
        except RequestError as e:
            self.metrics.event_batches.labels(request.model or DEFAULT_MODEL,
                                              _OUTCOME.get(e.code, "error")).inc()
            await context.abort(e.code, e.message)
            raise  # abort() always raises; this tells type checkers so
        self.metrics.event_batches.labels(m.cfg.name, "accepted").inc()
        return router_pb2.PublishEventsResponse()

    # ------------------------------------------------------------------ maintenance
    def expire_leases(self, now: float | None = None) -> int:
        total = 0
        for name, m in self.models.items():
            expired = m.state.scheduler.expire(now)
            if expired:
                total += len(expired)
                self.metrics.expired.labels(name).inc(len(expired))
                log.debug("reservations expired", extra={"model": name, "count": len(expired)})
        return total
