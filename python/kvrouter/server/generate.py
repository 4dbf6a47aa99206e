"""Router.Generate (proxy mode): plan, call the engine(s), stream one coherent reply.

Paths (kvrouter.planner decides):

* aggregated / local prefill: one Engine.Generate on one worker;
* disaggregated: a CONTEXT_ONLY call on the prefill worker (its first token goes to
  the client at once), then a GENERATION_ONLY call on the decode worker carrying the
  context's DisaggregatedParams, from which the decode engine imports the KV.

Load: the plan reserves each stage; the prefill reservation is released when the
context phase ends (the KV is handed over), the decode one when the request ends;
`finally` releases whatever is left whatever happened, so nothing leaks.

Failures (EngineFailure.kind):

* the prefill worker fails -> the request runs whole on the chosen decode worker;
* the decode worker fails before producing a token -> generation only on another
  decode worker with the same context params; if that KV cannot be imported any more
  (KV_LOST) -> the request is prefilled again, whole, on a decode worker;
* a worker fails mid-stream -> the request continues on another worker with the
  tokens streamed so far appended to the prompt and the remaining token budget, so the
  client sees one stream;
* bad request / does not fit / no worker left -> a gRPC status for the client.

A worker whose call failed is avoided for `suspect_s` seconds (liveness proper is the
event plane's job: it removes the worker when its heartbeats lapse).
"""

from __future__ import annotations

import logging
import string
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
import numpy as np

from kvrouter._proto.v1 import common_pb2, engine_pb2
from kvrouter.backends.base import (
    DisaggParams,
    EngineCall,
    EngineChunk,
    EngineFailure,
    FailureKind,
    RequestPhase,
)
from kvrouter.backends.dispatch import Backends
from kvrouter.config import ModelConfig
from kvrouter.planner import NoWorker, Plan, Planner, PlanPath, Pool, Prompt, build_pools
from kvrouter.protocol import extra_key_for
from kvrouter.registry import ModelState, Role, WorkerInfo
from kvrouter.sampling import sampling_problem
from kvrouter.server.affinity import pin_pools
from kvrouter.server.nsample import SampleError, check_request, run_samples

log = logging.getLogger("kvrouter.server.generate")

DEFAULT_MAX_TOKENS = 16
MAX_SAMPLES = 64


class GenerateError(Exception):
    """Ends a Router.Generate call with this status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_METADATA_SAFE = "".join(c for c in string.punctuation if c != "%")


@dataclass
class GenerateTrace:
    """What the proxy did, for the reply's trailing metadata, logs and tests."""

    path: str = ""
    pool: str = ""
    request_class: str = ""
    reason: str = ""
    prefill_worker: str = ""
    worker: str = ""  # the worker that produced the last tokens
    failovers: list[str] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # n > 1: nsample.Report
    affinity: str = ""  # session affinity: kept | moved | new (server/affinity.py)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = [("kvrouter-path", self.path), ("kvrouter-pool", self.pool),
              ("kvrouter-class", self.request_class), ("kvrouter-worker", self.worker),
              ("kvrouter-prefill-worker", self.prefill_worker),
              ("kvrouter-failovers", ";".join(self.failovers)), *self.samples,
              ("kvrouter-affinity", self.affinity)]
        # gRPC metadata values are printable ASCII; names may be any UTF-8 (a worker
        # called "wörker" is valid), so they travel percent-encoded (RFC 3986).
        return tuple((k, quote(v, safe=_METADATA_SAFE)) for k, v in md if v)


@dataclass
class _Attempt:
    """One engine call's progress, which decides the failover after it fails."""

    started: bool = False  # the engine produced output (the prefill is done)
    samples_done: int = 0  # n > 1: finished samples relayed


@dataclass
class _Request:
    """One Router.Generate request while it runs."""

    rid: str
    model: ModelState
    cfg: ModelConfig
    prompt: np.ndarray  # uint32 token ids of the original prompt
    max_tokens: int
    expected_output: int
    sampling: common_pb2.SamplingParams
    extra_key: bytes  # what the prompt is hashed with (kvrouter.protocol.extra_key_for)
    lora_name: str
    session_id: str
    trace: GenerateTrace
    tool_pause_s: float = 0.0  # checked by the service (server/sessions.py)
    tool_kv_action: str = ""
    pin: int | None = None  # session affinity: plan on this worker first (server/affinity.py)
    avoid: int | None = None  # session affinity: the session's overloaded worker, plan elsewhere
    generated: list[int] = field(default_factory=list)
    excluded: set[int] = field(default_factory=set)
    cached_tokens: int = -1  # from the first engine that computed the prompt
    attempts: int = 0
    last_error: str = ""

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.generated)

    def context_tokens(self) -> np.ndarray:
        """The prompt to send now: original prompt plus what was already streamed."""
        if not self.generated:
            return self.prompt
        return np.concatenate([self.prompt, np.asarray(self.generated, dtype=np.uint32)])


class GenerateProxy:
    """Runs Router.Generate requests for the service (one per router process)."""

    def __init__(self, backends: Backends | None = None) -> None:
        self.backends = backends or Backends()
        self._planners: dict[str, Planner] = {}
        self._suspects: dict[int, float] = {}  # worker id -> avoid until (monotonic)

    async def close(self) -> None:
        await self.backends.close()

    def planner(self, state: ModelState, cfg: ModelConfig) -> Planner:
        p = self._planners.get(state.name)
        if p is None:
            p = Planner(state.scheduler, cfg.disagg, block_size=state.block_size,
                        prefill_weight=cfg.weights.prefill)
            self._planners[state.name] = p
        return p

    # -- workers ----------------------------------------------------------------------
    def _suspect(self, info: WorkerInfo, suspect_s: float) -> None:
        if suspect_s > 0:
            self._suspects[info.wid] = time.monotonic() + suspect_s

    def pools(self, r: _Request, avoid_suspects: bool = True) -> dict[str, Pool]:
        now = time.monotonic()
        for wid in [w for w, until in self._suspects.items() if until <= now]:
            del self._suspects[wid]
        out = []
        for info in list(r.model.workers.values()):
            if not info.routable or info.wid in r.excluded:
                continue
            if avoid_suspects and info.wid in self._suspects:
                continue
            role = info.role
            if role is not Role.AGGREGATED and not self.backends.supports_disaggregation(info):
                role = Role.AGGREGATED  # e.g. an OpenAI server: it runs whole requests only
            out.append((info.wid, role, info.metadata.get("pool")))
        return build_pools(out)

    def _info(self, r: _Request, wid: int) -> WorkerInfo:
        for info in list(r.model.workers.values()):
            if info.wid == wid:
                return info
        raise GenerateError(grpc.StatusCode.UNAVAILABLE,
                            f"worker #{wid} left the registry while serving the request")

    # -- entry point ------------------------------------------------------------------------
    async def run(self, state: ModelState, cfg: ModelConfig, req: Any, tokens: np.ndarray,
                  rid: str, mode: str, trace: GenerateTrace, pin: int | None = None,
                  avoid: int | None = None,
                  ) -> AsyncGenerator[engine_pb2.GenerateResponse, None]:
        sp = req.sampling
        max_tokens = sp.max_tokens or DEFAULT_MAX_TOKENS
        problem = sampling_problem(sp)
        if problem is not None:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if sp.n > MAX_SAMPLES:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"sampling.n must be 0..{MAX_SAMPLES}, got {sp.n}")
        if req.expected_output_tokens < 0:
            raise GenerateError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"expected_output_tokens must be >= 0, got "
                                f"{req.expected_output_tokens}")
        r = _Request(rid=rid, model=state, cfg=cfg, prompt=tokens, max_tokens=max_tokens,
                     expected_output=req.expected_output_tokens or max_tokens,
                     sampling=sp, extra_key=extra_key_for(req.extra_key, req.lora_name) or b"",
                     lora_name=req.lora_name,
                     session_id=req.session_id, trace=trace, pin=pin, avoid=avoid,
                     tool_pause_s=req.tool_pause_s, tool_kv_action=req.tool_kv_action)
        planner = self.planner(state, cfg)
        if sp.n > 1:  # router-side n samples: placement, fan-out, aggregation (nsample.py)
            async with aclosing(self._samples(planner, r, req)) as out:
                async for resp in out:
                    yield resp
            return
        prompt = Prompt.from_tokens(tokens, r.extra_key or None)
        plan = self._plan(planner, r, prompt, mode)
        try:
            if plan.path is PlanPath.DISAGGREGATED:
                async for resp in self._disaggregated(planner, r, plan):
                    yield resp
            else:
                async for resp in self._whole(planner, r, plan, plan.worker):
                    yield resp
        finally:
            planner.release(plan)

    async def _samples(self, planner: Planner, r: _Request, req: Any,
                       ) -> AsyncGenerator[engine_pb2.GenerateResponse, None]:
        try:
            spec = check_request(req, r.cfg)  # before anything is reserved
            pools = self.pools(r) or self.pools(r, False)  # suspects are a preference
            async with aclosing(run_samples(r, spec, planner, pools, self.backends, r.trace,
                                            self._suspect)) as out:
                async for resp in out:
                    yield resp
        except SampleError as e:
            raise GenerateError(e.code, e.message) from None

    def _plan(self, planner: Planner, r: _Request, prompt: Prompt, mode: str) -> Plan:
        choices = [lambda: self.pools(r, True), lambda: self.pools(r, False)]
        if r.pin is not None:  # the session's worker first; it was checked for overload
            pin = r.pin
            choices.insert(0, lambda: pin_pools(self.pools(r, False), pin))
        elif r.avoid is not None:  # moving off an overloaded worker: the others first
            avoid = r.avoid
            choices.insert(0, lambda: {n: p.without([avoid])
                                       for n, p in self.pools(r, True).items()})
        for pools in choices:  # suspects are a preference, not a ban
            try:
                plan = planner.plan(prompt, r.rid, r.expected_output, pools(), mode)
            except NoWorker:
                continue
            t = r.trace
            t.path, t.pool, t.request_class, t.reason = (plan.path.value, plan.pool,
                                                         plan.request_class, plan.reason)
            return plan
        n = len(r.model.workers)
        up = sum(1 for w in r.model.workers.values() if w.routable)
        raise GenerateError(grpc.StatusCode.UNAVAILABLE,
                            f"no routable worker can serve model {r.model.name!r} "
                            f"({n} registered, {up} up)")

    # -- responses ------------------------------------------------------------------------
    def _out(self, r: _Request, worker: str, tokens: list[int], sample: int = 0,
             ) -> engine_pb2.GenerateResponse:
        return engine_pb2.GenerateResponse(request_id=r.rid, token_ids=tokens, worker=worker,
                                           sample_index=sample)

    def _final(self, r: _Request, worker: str, tokens: list[int], reason: str,
               ) -> engine_pb2.GenerateResponse:
        resp = self._out(r, worker, tokens)
        resp.finished = True
        resp.finish_reason = reason or "length"
        resp.usage.CopyFrom(common_pb2.Usage(
            prompt_tokens=len(r.prompt), cached_tokens=max(0, r.cached_tokens),
            completion_tokens=len(r.generated)))
        return resp

    def _call(self, r: _Request, request_type: RequestPhase, max_tokens: int,
              disagg: DisaggParams | None = None, suffix: str = "") -> EngineCall:
        r.attempts += 1
        # engine request ids are unique per call, so that a retry on the same engine (or a
        # late cancel of an abandoned call) cannot collide with a live one
        return EngineCall(request_id=f"{r.rid}.{r.attempts}{suffix}", token_ids=r.context_tokens(),
                          max_tokens=max_tokens, sampling=r.sampling, request_type=request_type,
                          disagg=disagg, extra_key=r.extra_key, lora_name=r.lora_name,
                          session_id=r.session_id,
                          tool_pause_s=r.tool_pause_s if r.session_id else 0.0,
                          tool_kv_action=r.tool_kv_action if r.session_id else "")

    def _give_up(self, r: _Request, f: EngineFailure, what: str) -> GenerateError:
        if f.kind in (FailureKind.INVALID, FailureKind.REJECTED):
            return GenerateError(f.code, f"{what} refused by worker {f.worker!r}: {f.message}")
        return GenerateError(grpc.StatusCode.UNAVAILABLE,
                             f"{what} failed after {len(r.trace.failovers)} failed engine "
                             f"call(s) ({'; '.join(r.trace.failovers)}); last: "
                             f"worker {f.worker!r}: {f.message}")

    @staticmethod
    def _exhausted(r: _Request) -> bool:
        return len(r.trace.failovers) >= r.cfg.disagg.max_attempts

    def _failed(self, r: _Request, info: WorkerInfo, f: EngineFailure, stage: str) -> None:
        if f.kind is not FailureKind.KV_LOST:  # a lost KV is not the importing worker's fault
            r.excluded.add(info.wid)
        if f.kind is FailureKind.WORKER:
            self._suspect(info, r.cfg.disagg.suspect_s)
        r.trace.failovers.append(f"{stage}:{info.name}:{f.kind.value}")
        r.last_error = str(f)
        log.debug("engine call failed", extra={"request": r.rid, "stage": stage,
                                               "worker": info.name, "kind": f.kind.value,
                                               "error": f.message})

    async def _relay(self, planner: Planner, r: _Request, info: WorkerInfo,
                     call: EngineCall, attempt: _Attempt,
                     ) -> AsyncGenerator[engine_pb2.GenerateResponse, None]:
        """Relay one engine call to the client up to its final response. The first output
        marks the request's prefill done; parallel samples (n > 1) pass through as they
        come, one final per sample. Raises EngineFailure, also for a stream that ends
        without a finished response."""
        n = max(1, r.sampling.n)
        backend = self.backends.for_worker(info)
        async for c in backend.generate(info, r.model.name, call):
            if not attempt.started and (c.token_ids or c.finished):
                planner.scheduler.mark_prefill_done(r.rid)
                attempt.started = True
            if r.cached_tokens < 0 and c.finished:  # a decode worker's prompt KV came in
                r.cached_tokens = c.cached_tokens
            if n > 1:
                yield self._sample_out(r, info.name, c)
                attempt.samples_done += c.finished
                if attempt.samples_done >= n:
                    return
                continue
            r.generated.extend(c.token_ids)
            if c.finished:
                yield self._final(r, info.name, c.token_ids, c.finish_reason)
                return
            if c.token_ids:
                yield self._out(r, info.name, c.token_ids)
        raise EngineFailure(FailureKind.WORKER, info.name,
                            "stream ended without a finished response")

    # -- whole requests ------------------------------------------------------------------
    async def _whole(self, planner: Planner, r: _Request, plan: Plan, wid: int,
                     ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        """Run the rest of the request on one worker; fail over to others (prompt plus the
        tokens so far) while attempts last. The plan's main reservation is on `wid`."""
        n = max(1, r.sampling.n)
        while True:
            info = self._info(r, wid)
            r.trace.worker = info.name
            call = self._call(r, RequestPhase.CONTEXT_AND_GENERATION, r.remaining)
            attempt = _Attempt()
            try:
                async with aclosing(self._relay(planner, r, info, call, attempt)) as out:
                    async for resp in out:
                        yield resp
                return
            except EngineFailure as f:
                self._failed(r, info, f, "generate")
                if (f.kind not in (FailureKind.WORKER, FailureKind.KV_LOST, FailureKind.UNSUPPORTED)
                        or self._exhausted(r) or (n > 1 and attempt.started)):
                    raise self._give_up(r, f, "generation") from None
                wid = self._reroute_whole(planner, r, plan)

    def _sample_out(self, r: _Request, worker: str, c: EngineChunk) -> engine_pb2.GenerateResponse:
        resp = self._out(r, worker, c.token_ids, c.sample_index)
        if c.finished:
            resp.finished = True
            resp.finish_reason = c.finish_reason or "length"
            resp.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(r.prompt),
                                                 cached_tokens=c.cached_tokens,
                                                 completion_tokens=c.completion_tokens))
        return resp

    def _reroute_whole(self, planner: Planner, r: _Request, plan: Plan) -> int:
        """Another worker for the whole rest of the request: the plan's pool first (its
        aggregated, else decode workers), then any pool; reserves under the main id."""
        sched = planner.scheduler
        sched.release(r.rid)
        prompt = Prompt.from_tokens(r.context_tokens(), r.extra_key or None)
        for avoid in (True, False):
            pools = self.pools(r, avoid)
            order = [pools[plan.pool]] if plan.pool in pools else []
            order += [p for name, p in sorted(pools.items()) if name != plan.pool]
            for pool in order:
                cands = pool.aggregated or pool.decode
                if not cands:
                    continue
                try:
                    d = planner.route_whole(prompt, r.rid, r.remaining, cands)
                except NoWorker:
                    continue
                if r.rid not in plan.reservations:
                    plan.reservations.append(r.rid)
                return d.worker
        raise GenerateError(grpc.StatusCode.UNAVAILABLE,
                            f"no routable worker left for model {r.model.name!r} after "
                            f"failures ({'; '.join(r.trace.failovers)}); last: {r.last_error}")

    # -- disaggregated ---------------------------------------------------------------------
    async def _context(self, r: _Request, info: WorkerInfo,
                       ) -> tuple[list[int], DisaggParams, int]:
        """Run the context phase; (first tokens, params for the generation phase, cached)."""
        call = self._call(r, RequestPhase.CONTEXT_ONLY, 1, suffix="p")
        backend = self.backends.for_worker(info)
        tokens: list[int] = []
        async for c in backend.generate(info, r.model.name, call):
            tokens.extend(c.token_ids)
            if c.finished:
                if c.disagg is None:
                    raise EngineFailure(FailureKind.UNSUPPORTED, info.name,
                                        "context-only request ended without disaggregated params")
                first = list(c.disagg.first_gen_tokens) or tokens
                return first, c.disagg, c.cached_tokens
        raise EngineFailure(FailureKind.WORKER, info.name,
                            "context stream ended without a finished response")

    async def _disaggregated(self, planner: Planner, r: _Request, plan: Plan,
                             ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        sched = planner.scheduler
        assert plan.prefill_worker is not None
        pinfo = self._info(r, plan.prefill_worker)
        r.trace.prefill_worker = pinfo.name
        try:
            first, params, cached = await self._context(r, pinfo)
        except EngineFailure as f:
            sched.release(plan.prefill_request_id)
            self._failed(r, pinfo, f, "prefill")
            if f.kind is FailureKind.INVALID:
                raise self._give_up(r, f, "prefill") from None
            # prefill failed: run the request whole on the decode worker already chosen
            r.trace.path = PlanPath.LOCAL_PREFILL.value
            r.trace.prefill_worker = ""
            sched.release(r.rid)
            try:
                d = planner.route_whole(Prompt.from_tokens(r.prompt, r.extra_key or None),
                                        r.rid, r.remaining, [plan.worker])
                wid = d.worker
            except NoWorker:
                wid = self._reroute_whole(planner, r, plan)
            async for resp in self._whole(planner, r, plan, wid):
                yield resp
            return
        # the KV is handed over: the prefill worker's load for this request ends
        sched.release(plan.prefill_request_id)
        r.cached_tokens = cached
        first = first[: r.remaining]
        r.generated.extend(first)
        if r.remaining <= 0:
            r.trace.worker = pinfo.name
            yield self._final(r, pinfo.name, first, "length")
            return
        if first:
            yield self._out(r, pinfo.name, first)
        wid = plan.worker
        while True:
            dinfo = self._info(r, wid)
            r.trace.worker = dinfo.name
            call = self._call(r, RequestPhase.GENERATION_ONLY, r.remaining, disagg=params)
            call.token_ids = r.prompt  # the context's prompt: its KV is what gets imported
            attempt = _Attempt()
            try:
                async with aclosing(self._relay(planner, r, dinfo, call, attempt)) as out:
                    async for resp in out:
                        yield resp
                return
            except EngineFailure as f:
                self._failed(r, dinfo, f, "decode")
                if f.kind in (FailureKind.INVALID, FailureKind.REJECTED):
                    raise self._give_up(r, f, "decode") from None
                if self._exhausted(r):
                    raise self._give_up(r, f, "decode") from None
                nxt = None
                if f.kind is FailureKind.WORKER and not attempt.started:
                    nxt = self._another_decode(planner, r, plan)
                if nxt is None:
                    # the KV is gone or the stream broke mid-way: prefill again, whole
                    r.trace.path = PlanPath.LOCAL_PREFILL.value
                    wid = self._reroute_whole(planner, r, plan)
                    async for resp in self._whole(planner, r, plan, wid):
                        yield resp
                    return
                wid = nxt

    def _another_decode(self, planner: Planner, r: _Request, plan: Plan) -> int | None:
        """Another decode worker of the plan's pool for a generation-only retry, or None."""
        pool = self.pools(r).get(plan.pool) or self.pools(r, False).get(plan.pool)
        if pool is None or not pool.decode:
            return None
        prompt = Prompt.from_tokens(r.prompt, r.extra_key or None)
        try:
            d = planner.choose_decode(prompt, pool.decode)
        except NoWorker:
            return None
        planner.scheduler.release(r.rid)
        planner.reserve_decode(d.worker, r.rid, len(r.prompt), r.remaining)
        return d.worker
