"""`kvrouter engine sim`: the simulated engine as a real worker process.

The process serves the kvrouter.v1.Engine gRPC service around one `SimEngine`
(the calibrated core in this package) and reports to a router like any engine:

* simulated time runs on the wall clock scaled by ``--time-scale`` (1.0: real
  time, 0.1: ten times faster); a driver task advances the core to "now",
  sleeps until its next observable change and streams the generated tokens to
  the Generate callers;
* the core's KV events are re-expressed with the request's real token ids
  (BlockStored carries token_ids and the engine block size), so the router
  re-hashes them with its own hash exactly as it does for TensorRT-LLM or vLLM;
* events, heartbeats and load reports go through `EventPublisher`: to Redis
  Streams with ``--redis``, else to the router over gRPC (RegisterWorker at
  start, Heartbeat with load, PublishEvents with per-worker epoch and seq,
  DeregisterWorker on a clean shutdown) through `RouterGrpcTransport` below.

Disaggregated serving: a CONTEXT_ONLY request ends with DisaggregatedParams (first
token, a context request id unique to this process start, this worker's address and
an opaque state); its KV stays in this worker's prefix cache. A GENERATION_ONLY
request carrying those params first pulls the KV from the context worker
(Engine.TransferKv: the context worker checks that the blocks are still cached),
then the core imports it over the link (``--link-gbps``, bytes per token from the
profile) before decoding. A context worker that died or evicted the blocks makes
the pull fail, and the generation request fails with FAILED_PRECONDITION ("KV
lost"), which tells the router to prefill again.

The core has no host KV tier, so Offload / Reload answer UNIMPLEMENTED, and it
cannot cancel a request: a Generate whose caller goes away keeps its simulated
work (the engine stays busy as a real one would until it notices).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import signal
import socket
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from kvrouter._core import hash_blocks
from kvrouter._proto.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from kvrouter.engines.sim.engine import EngineConfig, RequestMode, SimEngine, SimRequest
from kvrouter.engines.sim.profile import DEFAULT_CALIBRATION, EngineProfile, ProfileError
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent, LoadReport
from kvrouter.events.publisher import (
    EventPublisher,
    OutEntry,
    PublisherTransport,
    TransportUnavailable,
    redis_publisher,
)
from kvrouter.events.wire import DumpRequest, parse_heartbeat

log = logging.getLogger("kvrouter.engines.sim")

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_LIMIT = 1 << 20
DEFAULT_ROUTER = "127.0.0.1:50051"
# The router's default model block size (kvrouter.config.ModelConfig); used with --redis
# when --block-size is not given, since there is no registration reply to learn it from.
DEFAULT_REDIS_BLOCK_SIZE = 16

_ROLE_PB = {
    "aggregated": common_pb2.WORKER_ROLE_AGGREGATED,
    "prefill": common_pb2.WORKER_ROLE_PREFILL,
    "decode": common_pb2.WORKER_ROLE_DECODE,
}
_MODE = {
    common_pb2.REQUEST_TYPE_UNSPECIFIED: RequestMode.BOTH,
    common_pb2.REQUEST_TYPE_CONTEXT_AND_GENERATION: RequestMode.BOTH,
    common_pb2.REQUEST_TYPE_CONTEXT_ONLY: RequestMode.CONTEXT_ONLY,
    common_pb2.REQUEST_TYPE_GENERATION_ONLY: RequestMode.GENERATION_ONLY,
}
# Router answers that mean "the router is not there right now": keep the data, retry.
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
})


class SetupError(RuntimeError):
    """The engine cannot start (bad option, router refused it, port taken)."""


# ----------------------------------------------------------------------------------
# Publisher transport: the router's worker RPCs


class RouterGrpcTransport(PublisherTransport):
    """Delivers a publisher's entries to a router over gRPC (no Redis).

    Entries become PublishEvents calls in order; heartbeats become Heartbeat calls
    that always carry the latest load report (the router's in-process event plane
    takes a load report as the proof of life). When the router has forgotten the
    worker (it restarted, or our heartbeats lapsed) the transport registers again
    and asks the publisher for a full dump under a new epoch, so the router's index
    is rebuilt instead of left with a gap.
    """

    def __init__(self, target: str, model: str, worker: str, *, role: str, address: str,
                 block_size: int, metadata: dict[str, str] | None = None,
                 timeout_s: float = 5.0) -> None:
        from kvrouter.client import AsyncRouterClient

        self.target = target
        self.model = model
        self.worker = worker
        self.role = role
        self.address = address
        self.block_size = block_size
        self.metadata = dict(metadata or {})
        self.client = AsyncRouterClient(target, timeout=timeout_s)
        self._last_load = LoadReport()
        self._dump_wanted = asyncio.Event()
        self._dump_reason = ""
        self.registrations = 0

    async def register(self) -> Any:
        """RegisterWorker; SetupError if the router refuses the worker (block size mismatch)."""
        resp = await self.client.register_worker(
            self.model, self.worker, role=self.role, address=self.address,
            block_size=self.block_size, metadata=self.metadata)
        self.registrations += 1
        if resp.status != "up":
            raise SetupError(f"router {self.target} did not accept worker {self.worker!r}: "
                             f"{resp.status} ({resp.status_reason})")
        return resp

    def _want_dump(self, reason: str) -> None:
        self._dump_reason = reason
        self._dump_wanted.set()

    async def _on_error(self, exc: grpc.aio.AioRpcError, what: str) -> None:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND and "worker" in (exc.details() or ""):
            log.warning("router forgot this worker; registering again",
                        extra={"worker": self.worker, "router": self.target, "during": what})
            try:
                await self.register()
            except (grpc.aio.AioRpcError, SetupError) as again:
                raise TransportUnavailable(f"re-registration failed: {again}") from again
            self._want_dump("re-registered")
            raise TransportUnavailable("re-registered with the router; resyncing")
        if code in _TRANSIENT:
            raise TransportUnavailable(f"{what}: {code.name}: {exc.details()}") from exc
        # Anything else (INVALID_ARGUMENT, NOT_FOUND for the model...) will not get better
        # by retrying the same entry: start a new epoch with a full dump instead.
        log.error("router rejected worker data; resyncing",
                  extra={"worker": self.worker, "during": what, "code": code.name,
                         "details": exc.details()})
        self._want_dump(f"{what} rejected: {code.name}")

    async def send(self, model: str, worker: str, entries: list[OutEntry]) -> None:
        for e in entries:
            try:
                await self.client.publish_events(model, worker, e.epoch, e.seq, e.payload)
            except grpc.aio.AioRpcError as exc:
                await self._on_error(exc, "PublishEvents")
                return  # rejected for good: skipped; the dump requested above replaces it

    async def beat(self, model: str, worker: str, fields: dict[bytes, bytes], ttl_s: float) -> None:
        try:
            hb = parse_heartbeat(worker, fields)
        except ValueError as exc:  # our own fields: a bug, not a transport problem
            log.error("unreadable heartbeat fields", extra={"worker": worker, "error": str(exc)})
            return
        if hb.load is not None:
            self._last_load = hb.load
        ld = self._last_load
        load = common_pb2.LoadReport(
            running=ld.running, queued=ld.queued, kv_used_blocks=ld.kv_used_blocks,
            kv_free_blocks=ld.kv_free_blocks, queued_prefill_tokens=ld.queued_prefill_tokens)
        try:
            await self.client.heartbeat(model, worker, load=load)
        except grpc.aio.AioRpcError as exc:
            await self._on_error(exc, "Heartbeat")

    async def leave(self, model: str, worker: str, ttl_s: float) -> None:
        try:
            await self.client.deregister_worker(model, worker)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise TransportUnavailable(f"DeregisterWorker: {exc.code().name}") from exc

    async def dump_requests(self, model: str, worker: str, timeout_s: float) -> list[DumpRequest]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._dump_wanted.wait(), timeout_s)
        if not self._dump_wanted.is_set():
            return []
        self._dump_wanted.clear()
        return [DumpRequest(replica=self.target, epoch="", reason=self._dump_reason, t=time.time())]

    async def close(self) -> None:
        await self.client.close()


# ----------------------------------------------------------------------------------
# The engine around the simulated core


@dataclass(slots=True)
class _Block:
    """What the router needs to know about one cached engine block."""

    tokens: tuple[int, ...]
    parent: int | None
    depth: int
    extra_key: bytes | None


@dataclass(eq=False, slots=True)
class _Sample:
    req: SimRequest
    index: int
    rng: random.Random
    sent: int = 0  # tokens already streamed
    tokens: list[int] = field(default_factory=list)
    done: bool = False


@dataclass(eq=False, slots=True)
class _Call:
    """One Generate call: its samples and the queue its stream reads from."""

    request_id: str
    prompt_len: int
    mode: RequestMode
    hashes: list[int]
    samples: list[_Sample]
    queue: asyncio.Queue[engine_pb2.GenerateResponse | BaseException]
    attached: bool = True
    open_samples: int = 0


class SimWorker:
    """A SimEngine driven in scaled wall time, with KV events translated for the router."""

    def __init__(self, engine: SimEngine, *, worker: str, model: str, time_scale: float,
                 vocab_size: int, address: str = "", stream_interval_s: float = 0.02) -> None:
        if time_scale <= 0 or not math.isfinite(time_scale):
            raise ValueError(f"time scale must be a positive number, got {time_scale}")
        self.engine = engine
        self.worker = worker
        self.model = model
        self.time_scale = time_scale
        self.vocab_size = vocab_size
        self.address = address
        self.block_size = engine.block_size
        # Streaming cadence while requests decode, in wall seconds.
        self.stream_interval_s = stream_interval_s
        self.publisher: EventPublisher | None = None
        self._t0 = time.monotonic()
        self._calls: dict[str, _Call] = {}
        self._by_req: dict[int, tuple[_Call, _Sample]] = {}
        self._blocks: dict[int, _Block] = {}
        self._pins: dict[int, int] = {}
        self._kick = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        # Context request ids: unique across restarts too, so that a restarted context worker
        # cannot hand out KV it no longer has under an old id.
        self._ctx_ids = itertools.count(random.SystemRandom().getrandbits(40) << 12)
        # KV left by finished context-only requests: ctx id -> (prompt tokens, block hashes)
        self._exports: dict[int, tuple[int, list[int]]] = {}
        self._last_report: LoadReport | None = None
        self.stats = {"requests": 0, "rejected": 0, "abandoned": 0, "events": 0, "preempted": 0}

    # time -------------------------------------------------------------------------
    def sim_now(self) -> float:
        return (time.monotonic() - self._t0) / self.time_scale

    # lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._driver is None:
            self._driver = asyncio.create_task(self._drive(), name=f"sim-driver-{self.worker}")

    async def stop(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None
        for call in list(self._calls.values()):
            call.queue.put_nowait(ConnectionAbortedError("engine shutting down"))

    # requests -----------------------------------------------------------------------
    def submit(self, request_id: str, tokens: Sequence[int], *, max_tokens: int, n: int = 1,
               mode: RequestMode = RequestMode.BOTH, extra_key: bytes | None = None,
               seed: int | None = None) -> _Call:
        """Queue a request; ValueError on bad input, KeyError if the id is in flight."""
        if request_id in self._calls:
            raise KeyError(request_id)
        prompt = len(tokens)
        if prompt <= 0:
            raise ValueError("prompt is empty")
        if not 1 <= n <= 64:
            raise ValueError(f"n (parallel samples) must be 1..64, got {n}")
        bs = self.block_size
        hashes = list(hash_blocks(tokens, bs, extra_key))
        now = self.sim_now()
        call = _Call(request_id, prompt, mode, hashes, [], asyncio.Queue())
        for i in range(n):
            rid = request_id if n == 1 else f"{request_id}#{i}"
            req = SimRequest(request_id=rid, hashes=hashes, prompt_tokens=prompt,
                             max_tokens=max_tokens, mode=mode, record_tokens=True)
            base = seed if seed is not None else zlib.crc32(request_id.encode())
            call.samples.append(_Sample(req, i, random.Random(base * 1000003 + i)))
        # Remember every full block's tokens before the core can store it.
        for i, h in enumerate(hashes):
            if h not in self._blocks:
                self._blocks[h] = _Block(tuple(tokens[i * bs:(i + 1) * bs]),
                                         hashes[i - 1] if i else None, i, extra_key or None)
            self._pins[h] = self._pins.get(h, 0) + n
        self._calls[request_id] = call
        for s in call.samples:
            self.engine.submit(s.req, now)  # raises nothing for validated input
            self._by_req[id(s.req)] = (call, s)
            call.open_samples += 1
        self.stats["requests"] += 1
        self._drain(now)  # a rejection is known at once
        self._kick.set()
        return call

    def detach(self, call: _Call) -> None:
        """The caller went away: stop streaming; the simulated work goes on."""
        if call.attached and call.open_samples:
            self.stats["abandoned"] += 1
        call.attached = False

    def load(self) -> LoadReport:
        self.engine.run_until(self.sim_now())
        self._kick.set()  # the driver streams what run_until produced
        return self.engine.load_report()

    # the driver ---------------------------------------------------------------------
    async def _drive(self) -> None:
        while True:
            try:
                now = self.sim_now()
                self.engine.run_until(now)
                self._drain(now)
                wake = self.engine.next_wakeup()
                if self._by_req:
                    # decodes in a long stretch produce tokens before next_wakeup(): stream them
                    wake = min(wake, now + self.stream_interval_s / self.time_scale)
                delay = (wake - self.sim_now()) * self.time_scale
                if not delay > 0:
                    delay = 0.0005  # run_until(now) already did what was due; never spin
            except Exception:  # the core is pure: a failure is a bug; keep serving others
                log.exception("simulated engine step failed", extra={"worker": self.worker})
                delay = 0.05
            self._kick.clear()
            timeout = None if math.isinf(delay) else delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)

    def _drain(self, now: float) -> None:
        for up in self.engine.drain_updates():
            entry = self._by_req.get(id(up.request))
            if entry is None:
                continue
            call, sample = entry
            if up.kind == "rejected":
                self._close_sample(call, sample)
                self.stats["rejected"] += 1
                if call.attached:
                    call.queue.put_nowait(_Rejected(
                        f"prompt of {call.prompt_len} tokens does not fit in the KV cache "
                        f"({self.engine.cache.num_blocks} blocks of {self.block_size})"))
            elif up.kind == "preempted":
                self.stats["preempted"] += 1
        for call, sample in list(self._by_req.values()):
            self._stream(call, sample)
        self._publish(self.engine.drain_kv_events())
        self._report_load()

    def _report_load(self) -> None:
        pub = self.publisher
        if pub is None:
            return
        report = self.engine.load_report()
        if report != self._last_report:
            # The publisher sends it as soon as its rate cap allows, even if we go idle.
            self._last_report = report
            pub.report_load(report)

    def _stream(self, call: _Call, sample: _Sample) -> None:
        req = sample.req
        times = req.token_times
        new = len(times) - sample.sent
        finished = req.finish_time is not None
        if new <= 0 and not finished:
            return
        toks = [sample.rng.randrange(self.vocab_size) for _ in range(max(0, new))]
        sample.tokens.extend(toks)
        sample.sent = len(times)
        if finished:
            self._close_sample(call, sample)
        if not call.attached:
            return
        resp = engine_pb2.GenerateResponse(request_id=call.request_id, token_ids=toks,
                                           sample_index=sample.index, worker=self.worker)
        if finished:
            reason = "length"
            if call.mode is RequestMode.CONTEXT_ONLY:
                reason = "context_done"
                ctx_id = next(self._ctx_ids)
                self._export(ctx_id, call)
                resp.disaggregated.CopyFrom(common_pb2.DisaggregatedParams(
                    request_type=common_pb2.REQUEST_TYPE_CONTEXT_ONLY,
                    first_gen_tokens=sample.tokens[:1], ctx_request_id=ctx_id,
                    ctx_worker_address=self.address,
                    opaque_state=f"sim:{self.worker}:{ctx_id}:{call.prompt_len}".encode()))
            resp.finished = True
            resp.finish_reason = reason
            hit = max(0, req.hit_blocks)
            cached = call.prompt_len if call.mode is RequestMode.GENERATION_ONLY else hit * self.block_size
            resp.usage.CopyFrom(common_pb2.Usage(prompt_tokens=call.prompt_len,
                                                 cached_tokens=min(cached, call.prompt_len),
                                                 completion_tokens=len(sample.tokens)))
        call.queue.put_nowait(resp)

    # KV handover (disaggregated serving) ------------------------------------------------
    MAX_EXPORTS = 4096

    def _export(self, ctx_id: int, call: _Call) -> None:
        self._exports[ctx_id] = (call.prompt_len, list(call.hashes))
        while len(self._exports) > self.MAX_EXPORTS:  # oldest first (dicts keep order)
            del self._exports[next(iter(self._exports))]

    def transfer_kv(self, ctx_id: int) -> int:
        """Prompt tokens of a finished context request whose KV can still be handed over;
        KeyError (with the reason) when it cannot."""
        entry = self._exports.get(ctx_id)
        if entry is None:
            raise KeyError(f"no context request {ctx_id} on worker {self.worker!r}")
        prompt_len, hashes = entry
        cache = self.engine.cache
        missing = sum(1 for h in hashes if not cache.contains(h))
        if missing:
            del self._exports[ctx_id]
            raise KeyError(f"KV of context request {ctx_id} was evicted from worker "
                           f"{self.worker!r} ({missing} of {len(hashes)} blocks gone)")
        return prompt_len

    def _close_sample(self, call: _Call, sample: _Sample) -> None:
        if sample.done:
            return
        sample.done = True
        self._by_req.pop(id(sample.req), None)
        call.open_samples -= 1
        for h in call.hashes:
            c = self._pins.get(h, 0) - 1
            if c > 0:
                self._pins[h] = c
                continue
            self._pins.pop(h, None)
            if not self.engine.cache.contains(h):
                self._blocks.pop(h, None)
        if call.open_samples == 0:
            self._calls.pop(call.request_id, None)

    # events -------------------------------------------------------------------------
    def _publish(self, events: list[KvEvent]) -> None:
        if not events:
            return
        out = [self._translate(ev) for ev in events]
        self.stats["events"] += len(out)
        if self.publisher is not None:
            self.publisher.publish(out)

    def _translate(self, ev: KvEvent) -> KvEvent:
        """The core names blocks by hash only; the router wants their token ids."""
        if isinstance(ev, BlockStored):
            blocks = [self._blocks[h] for h in ev.hashes]
            tokens = tuple(t for b in blocks for t in b.tokens)
            return BlockStored(hashes=ev.hashes, parent=ev.parent, token_ids=tokens,
                               block_size=self.block_size, tier=ev.tier,
                               extra_key=blocks[0].extra_key)
        if isinstance(ev, BlockRemoved):
            for h in ev.hashes:
                if h not in self._pins:
                    self._blocks.pop(h, None)
            return ev
        if isinstance(ev, AllCleared):
            for h in [h for h in self._blocks if h not in self._pins]:
                del self._blocks[h]
        return ev

    def dump(self) -> list[KvEvent]:
        """Every cached block as BlockStored, parents first (the publisher's full dump)."""
        held = sorted(self.engine.cache.hashes(), key=lambda h: self._blocks[h].depth)
        out: list[KvEvent] = []
        for h in held:
            b = self._blocks[h]
            out.append(BlockStored(hashes=(h,), parent=b.parent, token_ids=b.tokens,
                                   block_size=self.block_size, extra_key=b.extra_key))
        return out


class _Rejected(Exception):
    pass


# ----------------------------------------------------------------------------------
# gRPC Engine service


def _abort_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, _Rejected):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNAVAILABLE


class EngineService(engine_pb2_grpc.EngineServicer):
    def __init__(self, sim: SimWorker, role: str, max_prompt_tokens: int,
                 transfer_timeout_s: float = 5.0) -> None:
        self.sim = sim
        self.role = role
        self.max_prompt_tokens = max_prompt_tokens
        self.transfer_timeout_s = transfer_timeout_s
        self._peers: dict[str, grpc.aio.Channel] = {}
        self._rid = itertools.count(1)
        self._rid_prefix = f"{sim.worker}-{uuid.uuid4().hex[:6]}-"

    def _tokens(self, req: engine_pb2.GenerateRequest) -> list[int]:
        if req.token_ids_le:
            if len(req.token_ids):
                raise ValueError("set token_ids or token_ids_le, not both")
            if len(req.token_ids_le) % 4:
                raise ValueError(f"token_ids_le has {len(req.token_ids_le)} bytes, "
                                 "not a multiple of 4")
            tokens: list[int] = np.frombuffer(req.token_ids_le, dtype="<u4").tolist()
        else:
            tokens = list(req.token_ids)
        if not tokens:
            raise ValueError("prompt is empty: no token ids")
        if len(tokens) > self.max_prompt_tokens:
            raise ValueError(f"prompt has {len(tokens)} tokens, more than {self.max_prompt_tokens}")
        top = max(tokens)
        if top >= self.sim.vocab_size:
            raise ValueError(f"token id {top} at position {tokens.index(top)} is out of range "
                             f"(vocab_size {self.sim.vocab_size})")
        return tokens

    async def Generate(self, request: engine_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[engine_pb2.GenerateResponse]:
        sp = request.sampling
        try:
            tokens = self._tokens(request)
            max_tokens = sp.max_tokens or DEFAULT_MAX_TOKENS
            if not 0 < max_tokens <= MAX_TOKENS_LIMIT:
                raise ValueError(f"sampling.max_tokens must be 0 (default {DEFAULT_MAX_TOKENS}) "
                                 f"or 1..{MAX_TOKENS_LIMIT}, got {sp.max_tokens}")
            mode = _MODE.get(request.disaggregated.request_type)
            if mode is None:
                raise ValueError(f"unknown request_type {request.disaggregated.request_type}")
            extra = bytes(request.extra_key) or (request.lora_name.encode() or None)
            rid = request.request_id or f"{self._rid_prefix}{next(self._rid)}"
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort() always raises
        if mode is RequestMode.GENERATION_ONLY:
            lost = await self._pull_kv(request.disaggregated, len(tokens))
            if lost:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, lost)
                raise AssertionError("unreachable")  # pragma: no cover
        try:
            call = self.sim.submit(rid, tokens, max_tokens=max_tokens, n=max(1, sp.n), mode=mode,
                                   extra_key=extra, seed=sp.seed if sp.HasField("seed") else None)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort() always raises
        except KeyError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id {request.request_id!r} is already running here")
            raise
        remaining = len(call.samples)
        try:
            while remaining:
                item = await call.queue.get()
                if isinstance(item, BaseException):
                    await context.abort(_abort_code(item), str(item))
                    return
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self.sim.detach(call)

    async def _pull_kv(self, params: common_pb2.DisaggregatedParams, prompt_len: int) -> str:
        """Fetch the context's KV from the worker that computed it; '' or why it is lost.
        Without a context worker address the KV is taken as given (imported, not checked)."""
        peer = params.ctx_worker_address
        if not peer or peer == self.sim.address:
            return ""
        ch = self._peers.get(peer)
        if ch is None:
            ch = self._peers[peer] = grpc.aio.insecure_channel(peer)
        stub = engine_pb2_grpc.EngineStub(ch)
        try:
            resp = await stub.TransferKv(
                engine_pb2.TransferKvRequest(ctx_request_id=params.ctx_request_id,
                                             opaque_state=params.opaque_state,
                                             requester=self.sim.worker),
                timeout=self.transfer_timeout_s)
        except grpc.aio.AioRpcError as e:
            return (f"KV of context request {params.ctx_request_id} is lost: context worker "
                    f"{peer} answered {e.code().name}: {e.details()}")
        if resp.tokens < prompt_len - self.sim.block_size:
            # generation continues after the context's prompt: most of it must be there
            return (f"context request {params.ctx_request_id} holds KV of {resp.tokens} tokens, "
                    f"the request has {prompt_len}")
        return ""

    async def TransferKv(self, request: engine_pb2.TransferKvRequest,
                         context: grpc.aio.ServicerContext) -> engine_pb2.TransferKvResponse:
        sim = self.sim
        sim.load()  # bring the cache up to now: evictions that happened count
        try:
            tokens = sim.transfer_kv(request.ctx_request_id)
        except KeyError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
            raise AssertionError("unreachable") from None  # pragma: no cover
        return engine_pb2.TransferKvResponse(
            tokens=tokens, bytes=tokens * sim.engine.profile.kv_bytes_per_token)

    async def close(self) -> None:
        peers, self._peers = self._peers, {}
        for ch in peers.values():
            with contextlib.suppress(Exception):
                await ch.close()

    async def Stats(self, request: engine_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> engine_pb2.StatsResponse:
        sim = self.sim
        ld = sim.load()
        st = sim.engine.stats
        pub = sim.publisher.stats if sim.publisher is not None else {}
        return engine_pb2.StatsResponse(
            worker=sim.worker, model=sim.model, block_size=sim.block_size,
            load=common_pb2.LoadReport(running=ld.running, queued=ld.queued,
                                       kv_used_blocks=ld.kv_used_blocks,
                                       kv_free_blocks=ld.kv_free_blocks,
                                       queued_prefill_tokens=ld.queued_prefill_tokens),
            kv_total_blocks=sim.engine.cache.num_blocks, kv_host_blocks=0, kv_disk_blocks=0,
            events_published=int(pub.get("events", 0)),
            extra={"sim_time_s": sim.sim_now(), "time_scale": sim.time_scale,
                   "cached_blocks": float(sim.engine.cache.cached_blocks),
                   "steps": float(st.steps), "busy_s": st.busy_s,
                   "prefill_tokens": float(st.prefill_tokens),
                   "reused_tokens": float(st.reused_tokens),
                   "decode_tokens": float(st.decode_tokens),
                   "preemptions": float(st.preemptions), "finished": float(st.finished),
                   "rejected": float(st.rejected), "requests": float(sim.stats["requests"]),
                   "abandoned": float(sim.stats["abandoned"])})

    async def Offload(self, request: engine_pb2.OffloadRequest,
                      context: grpc.aio.ServicerContext) -> engine_pb2.OffloadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "the simulated engine has no host or disk KV tier: Offload is not "
                            "supported (its cache keeps GPU blocks only and evicts them LRU)")
        raise AssertionError("unreachable")  # pragma: no cover

    async def Reload(self, request: engine_pb2.ReloadRequest,
                     context: grpc.aio.ServicerContext) -> engine_pb2.ReloadResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "the simulated engine has no host or disk KV tier: Reload is not "
                            "supported")
        raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------------
# process


@dataclass
class SimOptions:
    worker_id: str
    model: str = "default"
    router: str | None = None
    redis: str | None = None
    namespace: str = "kvrouter"
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
    profile: str = str(DEFAULT_CALIBRATION)
    kv_capacity_tokens: int | None = None
    time_scale: float = 1.0
    block_size: int | None = None
    role: str = "aggregated"
    vocab_size: int = 32000
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_prompt_tokens: int = 1 << 20
    ready_file: str | None = None
    link_gbps: float = 50.0  # prefill -> decode KV link, GB/s (generation-only imports)
    pool: str = ""  # router pool (kvrouter.planner); empty: the role's default pool


def _advertised(listen: str, port: int, advertise: str | None) -> str:
    if advertise:
        return advertise
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_worker(opts: SimOptions, stop: asyncio.Event | None = None) -> None:
    """Run one simulated engine until `stop` is set (or SIGINT / SIGTERM)."""
    try:
        profile = EngineProfile.load(opts.profile)
    except ProfileError as e:
        raise SetupError(str(e)) from None
    if not opts.worker_id:
        raise SetupError("--worker-id must not be empty")
    if opts.role not in _ROLE_PB:
        raise SetupError(f"unknown role {opts.role!r} (aggregated, prefill or decode)")
    if opts.vocab_size <= 0:
        raise SetupError("--vocab-size must be > 0")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    try:
        port = server.add_insecure_port(opts.listen)
    except RuntimeError as e:
        raise SetupError(f"cannot listen on {opts.listen}: {e}") from None
    if port == 0:
        raise SetupError(f"cannot listen on {opts.listen} (address in use?)")
    address = _advertised(opts.listen, port, opts.advertise)

    meta = {"engine": "sim", "profile": profile.name}
    if opts.pool:
        meta["pool"] = opts.pool
    transport: RouterGrpcTransport | None = None
    heartbeat_interval = 1.0
    block_size = opts.block_size
    if opts.redis is None:
        target = opts.router or DEFAULT_ROUTER
        transport = RouterGrpcTransport(target, opts.model, opts.worker_id, role=opts.role,
                                        address=address, block_size=block_size or 0,
                                        metadata=meta)
        try:
            resp = await _register_with_retry(transport, deadline_s=30.0)
        except SetupError:
            await transport.close()
            raise
        block_size = block_size or int(resp.block_size)
        transport.block_size = block_size
        # The router's in-process plane forgets a worker after a few silent seconds: beat
        # at least every second whatever the router suggests.
        heartbeat_interval = min(float(resp.heartbeat_interval_s or 1.0), 1.0)
    block_size = block_size or DEFAULT_REDIS_BLOCK_SIZE
    if block_size <= 0:
        raise SetupError("--block-size must be > 0")

    if not opts.link_gbps > 0 or not math.isfinite(opts.link_gbps):
        raise SetupError(f"--link-gbps must be > 0, got {opts.link_gbps}")
    config = EngineConfig(block_size=block_size, kv_capacity_tokens=opts.kv_capacity_tokens,
                          max_num_seqs=opts.max_num_seqs,
                          max_num_batched_tokens=opts.max_num_batched_tokens,
                          link_bytes_per_s=opts.link_gbps * 1e9)
    try:
        engine = SimEngine(profile, config, name=opts.worker_id)
    except ValueError as e:
        raise SetupError(str(e)) from None
    sim = SimWorker(engine, worker=opts.worker_id, model=opts.model, time_scale=opts.time_scale,
                    vocab_size=opts.vocab_size, address=address)
    pub_opts: dict[str, Any] = {"block_size": block_size, "role": opts.role, "address": address,
                                "dump": sim.dump, "heartbeat_interval_s": heartbeat_interval,
                                "load_interval_s": 0.02,
                                "extra_meta": meta}
    if transport is not None:
        publisher = EventPublisher(transport, opts.model, opts.worker_id, **pub_opts)
    else:
        assert opts.redis is not None
        publisher = redis_publisher(opts.redis, opts.model, opts.worker_id,
                                    namespace=opts.namespace, **pub_opts)
    sim.publisher = publisher
    service = EngineService(sim, opts.role, opts.max_prompt_tokens)
    engine_pb2_grpc.add_EngineServicer_to_server(service, server)
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1.health import aio as health_aio

    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await server.start()
    sim.start()
    await publisher.start()
    publisher.report_load(engine.load_report())
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("sim engine serving", extra={
        "worker": opts.worker_id, "model": opts.model, "address": address,
        "block_size": block_size, "kv_blocks": engine.cache.num_blocks,
        "time_scale": opts.time_scale,
        "events_to": f"redis {opts.redis}" if opts.redis else f"router {transport and transport.target}"})
    if opts.ready_file:
        Path(opts.ready_file).write_text(f"{address}\n")
    try:
        await stop.wait()
    finally:
        await health.enter_graceful_shutdown()
        await server.stop(1.0)
        await service.close()
        await sim.stop()
        # Flush what is left, then deregister / mark leaving so routers drop us at once.
        await publisher.stop(leave=True)
        log.info("sim engine stopped", extra={"worker": opts.worker_id})


async def _register_with_retry(transport: RouterGrpcTransport, deadline_s: float) -> Any:
    """The router may still be starting: retry UNAVAILABLE for a bounded time."""
    end = time.monotonic() + deadline_s
    delay = 0.05
    while True:
        try:
            return await transport.register()
        except grpc.aio.AioRpcError as e:
            if e.code() not in _TRANSIENT or time.monotonic() + delay > end:
                raise SetupError(f"cannot register with router {transport.target}: "
                                 f"{e.code().name}: {e.details()}") from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


# ----------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker-id", required=True, help="worker name, unique per model")
    p.add_argument("--model", default="default", help="model name at the router (default %(default)s)")
    dest = p.add_mutually_exclusive_group()
    dest.add_argument("--router", metavar="HOST:PORT",
                      help="register with this router and send it events over gRPC "
                           f"(default {DEFAULT_ROUTER} unless --redis is given)")
    dest.add_argument("--redis", metavar="URL", help="publish events and heartbeats to Redis instead")
    p.add_argument("--namespace", default="kvrouter", help="Redis key namespace (with --redis)")
    p.add_argument("--listen", default="127.0.0.1:0",
                   help="Engine gRPC address; port 0 picks a free one (default %(default)s)")
    p.add_argument("--advertise", metavar="HOST:PORT",
                   help="address given to the router (default: the listen address)")
    p.add_argument("--profile", default=str(DEFAULT_CALIBRATION),
                   help="calibration file of the cost model (default %(default)s)")
    p.add_argument("--kv-capacity-tokens", type=int,
                   help="KV cache size in tokens (default: what fits on the profile's GPU)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per simulated second: 1 = real time, 0.1 = 10x faster")
    p.add_argument("--block-size", type=int,
                   help="KV block size in tokens (default: the router model's block size; "
                        f"{DEFAULT_REDIS_BLOCK_SIZE} with --redis)")
    p.add_argument("--role", choices=sorted(_ROLE_PB), default="aggregated")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="token ids must be below this; generated ids are drawn from it")
    p.add_argument("--max-num-seqs", type=int, default=256, help="running requests at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="token budget of one engine step (chunked prefill)")
    p.add_argument("--link-gbps", type=float, default=50.0,
                   help="bandwidth of the KV link from context workers, GB/s: a generation-only "
                        "request waits prompt tokens x KV bytes per token / this before "
                        "decoding (default %(default)s, NVLink-class; 25 for RDMA)")
    p.add_argument("--pool", default="",
                   help="router pool of this worker (registry metadata 'pool'; default: "
                        "'aggregated' for aggregated workers, 'disaggregated' otherwise)")
    p.add_argument("--ready-file", metavar="PATH",
                   help="write the engine address here once serving (for scripts)")
    p.add_argument("--log-level", default=os.environ.get("KVROUTER_LOG_LEVEL", "WARNING"),
                   help="DEBUG, INFO, WARNING (default) or ERROR")


def options_from_args(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        worker_id=args.worker_id, model=args.model, router=args.router, redis=args.redis,
        namespace=args.namespace, listen=args.listen, advertise=args.advertise,
        profile=args.profile, kv_capacity_tokens=args.kv_capacity_tokens,
        time_scale=args.time_scale, block_size=args.block_size, role=args.role,
        vocab_size=args.vocab_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, ready_file=args.ready_file,
        link_gbps=args.link_gbps, pool=args.pool)


def _cmd_sim(args: argparse.Namespace) -> int:
    from kvrouter.logs import setup_logging

    setup_logging(args.log_level.upper())
    if not args.time_scale > 0 or not math.isfinite(args.time_scale):
        print(f"kvrouter engine sim: --time-scale must be > 0, got {args.time_scale}",
              file=sys.stderr)
        return 2
    opts = options_from_args(args)
    try:
        import uvloop

        uvloop.run(run_worker(opts))
    except SetupError as e:
        print(f"kvrouter engine sim: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def register(subparsers: Any) -> None:
    """Add `sim` to the `kvrouter engine` subcommands."""
    p = subparsers.add_parser(
        "sim", help="run a simulated engine (calibrated cost model) as a worker",
        description="A simulated engine serving the Engine gRPC API in scaled wall time, "
                    "reporting KV events and load to a router (gRPC) or to Redis.")
    add_arguments(p)
    p.set_defaults(func=_cmd_sim)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvrouter engine sim")
    add_arguments(parser)
    return _cmd_sim(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
