"""Python client of the kvrouter.v1.Router service, blocking (RouterClient) and asyncio
(AsyncRouterClient, with a multiplexed RouteStream session for high request rates).

    from kvrouter.client import RouterClient

    with RouterClient("127.0.0.1:50051") as router:
        d = router.route(prompt_token_ids, model="llama", expected_output_tokens=128)
        ...  # send the request to d.worker / d.address
        router.release(d.request_id, model="llama")

Unary calls raise grpc.RpcError on failure (code() and details() say why); failed items
of a stream raise StreamItemError with the same code and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import grpc
import numpy as np

from kvrouter._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from kvrouter.security.channels import ClientSecurity, aio_channel, sync_channel

TokenLike = Sequence[int] | bytes | bytearray | memoryview | np.ndarray
DEFAULT_TARGET = "127.0.0.1:50051"

ROLES: dict[str, common_pb2.WorkerRole] = {
    "": common_pb2.WORKER_ROLE_UNSPECIFIED,
    "aggregated": common_pb2.WORKER_ROLE_AGGREGATED,
    "prefill": common_pb2.WORKER_ROLE_PREFILL,
    "decode": common_pb2.WORKER_ROLE_DECODE,
}
_ROLE_NAMES = {v: k for k, v in ROLES.items()}


class StreamItemError(Exception):
    """One operation of a RouteStream failed (the stream itself goes on)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(frozen=True, slots=True)
class Candidate:
    worker: str
    gpu_blocks: int
    host_blocks: int
    disk_blocks: int
    new_prefill_tokens: int
    decode_blocks: int
    queue: int
    cost: float
    chosen: bool
    evicted_blocks: int = 0  # cached blocks the request would evict (cache pressure)
    pressure_cost: float = 0.0  # what they add to cost
    pending_blocks: int = 0  # leading blocks in flight to the worker (counted in gpu_blocks)


@dataclass(frozen=True, slots=True)
class RouteResult:
    worker: str
    address: str
    request_id: str
    overlap_blocks: int
    gpu_blocks: int
    prompt_blocks: int
    prompt_tokens: int
    block_size: int
    policy: str
    model: str
    candidates: tuple[Candidate, ...] = ()
    affinity: str = ""  # kept | moved | new when the request had a session_id

    @property
    def overlap_ratio(self) -> float:
        return self.overlap_blocks / self.prompt_blocks if self.prompt_blocks else 0.0


@dataclass(frozen=True, slots=True)
class WorkerState:
    name: str
    model: str
    role: str
    address: str
    status: str
    status_reason: str
    routable: bool
    last_seen_age_s: float
    cached_blocks: int
    reserved_prefill_tokens: int
    reserved_decode_blocks: int
    reserved_requests: int
    prefill_tokens: int
    decode_blocks: int
    queue: int
    reported_running: int
    reported_queued: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    kv_mode: str = "exact"  # exact (KV events) | approx (predicted from routing decisions)
    kv_capacity_blocks: int = 0  # the capacity the cache-pressure term uses (0: off)


@dataclass(frozen=True, slots=True)
class ModelSummary:
    name: str
    block_size: int
    vocab_size: int | None
    policy: str
    workers: int
    indexed_blocks: int


# ---------------------------------------------------------------------- conversions
def tokens_le(tokens: TokenLike) -> bytes:
    """Token ids as little-endian u32 bytes (the compact wire form)."""
    if isinstance(tokens, bytes | bytearray | memoryview):
        return bytes(tokens)
    if isinstance(tokens, np.ndarray):
        if tokens.size and (tokens.min() < 0 or int(tokens.max()) > 0xFFFFFFFF):
            raise ValueError("token ids must fit in an unsigned 32-bit integer")
        return tokens.astype("<u4", copy=False).tobytes()
    try:
        arr = array("I", tokens)
    except OverflowError:
        raise ValueError("token ids must fit in an unsigned 32-bit integer") from None
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()


def _key(extra_key: bytes | str | None) -> bytes:
    if extra_key is None:
        return b""
    return extra_key.encode() if isinstance(extra_key, str) else bytes(extra_key)


def route_request(
    tokens: TokenLike, model: str = "", *, request_id: str = "",
    extra_key: bytes | str | None = None, expected_output_tokens: int = 0,
    candidates: Iterable[str] = (), role: str = "", policy: str = "", explain: bool = False,
    dry_run: bool = False, session_id: str = "",
) -> router_pb2.RouteRequest:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    return router_pb2.RouteRequest(
        model=model, token_ids_le=tokens_le(tokens), extra_key=_key(extra_key),
        request_id=request_id, expected_output_tokens=expected_output_tokens,
        candidates=list(candidates), role=ROLES[role], policy=policy, explain=explain,
        dry_run=dry_run, session_id=session_id)


def to_result(r: router_pb2.RouteResponse) -> RouteResult:
    return RouteResult(
        worker=r.worker, address=r.address, request_id=r.request_id,
        overlap_blocks=r.overlap_blocks, gpu_blocks=r.gpu_blocks, prompt_blocks=r.prompt_blocks,
        prompt_tokens=r.prompt_tokens, block_size=r.block_size, policy=r.policy, model=r.model,
        candidates=tuple(
            Candidate(worker=c.worker, gpu_blocks=c.gpu_blocks, host_blocks=c.host_blocks,
                      disk_blocks=c.disk_blocks, new_prefill_tokens=c.new_prefill_tokens,
                      decode_blocks=c.decode_blocks, queue=c.queue, cost=c.cost,
                      chosen=c.chosen, evicted_blocks=c.evicted_blocks,
                      pressure_cost=c.pressure_cost, pending_blocks=c.pending_blocks)
            for c in r.candidates),
        affinity=r.affinity)


def to_workers(resp: router_pb2.ListWorkersResponse) -> list[WorkerState]:
    return [
        WorkerState(
            name=w.name, model=w.model, role=_ROLE_NAMES.get(w.role, str(w.role)),
            address=w.address, status=w.status, status_reason=w.status_reason,
            routable=w.routable, last_seen_age_s=w.last_seen_age_s,
            cached_blocks=w.cached_blocks,
            reserved_prefill_tokens=w.load.reserved_prefill_tokens,
            reserved_decode_blocks=w.load.reserved_decode_blocks,
            reserved_requests=w.load.reserved_requests, prefill_tokens=w.load.prefill_tokens,
            decode_blocks=w.load.decode_blocks, queue=w.load.queue,
            reported_running=w.load.reported.running, reported_queued=w.load.reported.queued,
            metadata=dict(w.metadata), kv_mode=w.kv_mode or "exact",
            kv_capacity_blocks=w.load.reported.kv_capacity_blocks)
        for w in resp.workers
    ]


def to_models(resp: router_pb2.ListModelsResponse) -> list[ModelSummary]:
    return [ModelSummary(name=m.name, block_size=m.block_size, vocab_size=m.vocab_size or None,
                         policy=m.policy, workers=m.workers, indexed_blocks=m.indexed_blocks)
            for m in resp.models]


def load_report(running: int = 0, queued: int = 0, kv_used_blocks: int = 0,
                kv_free_blocks: int = 0, queued_prefill_tokens: int = 0,
                kv_capacity_blocks: int = 0, kv_cached_blocks: int = 0,
                ) -> common_pb2.LoadReport:
    return common_pb2.LoadReport(running=running, queued=queued, kv_used_blocks=kv_used_blocks,
                                 kv_free_blocks=kv_free_blocks,
                                 queued_prefill_tokens=queued_prefill_tokens,
                                 kv_capacity_blocks=kv_capacity_blocks,
                                 kv_cached_blocks=kv_cached_blocks)


def _register_request(model: str, worker: str, role: str, address: str, block_size: int,
                      metadata: Mapping[str, str] | None) -> router_pb2.RegisterWorkerRequest:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    return router_pb2.RegisterWorkerRequest(
        model=model, worker=worker, role=ROLES[role], address=address, block_size=block_size,
        metadata=dict(metadata or {}))


def _heartbeat_request(model: str, worker: str, load: common_pb2.LoadReport | None,
                       epoch: str, last_seq: int | None) -> router_pb2.HeartbeatRequest:
    req = router_pb2.HeartbeatRequest(model=model, worker=worker, load=load, epoch=epoch)
    if last_seq is not None:
        req.last_seq = last_seq
    return req


def _merge_page(merged: router_pb2.ListWorkersResponse, page: router_pb2.ListWorkersResponse,
                token: str) -> str:
    """Add one ListWorkers page to `merged`; the next page's token ("" when done)."""
    merged.workers.extend(page.workers)
    merged.admission.extend(page.admission)
    if page.next_page_token and page.next_page_token == token:  # would page forever
        raise RuntimeError("ListWorkers returned the same page token twice")
    return page.next_page_token


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


# ---------------------------------------------------------------------- blocking client
class RouterClient:
    """Blocking client. Thread-safe (one gRPC channel)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 10.0,
                 max_message_bytes: int = 64 << 20, channel: grpc.Channel | None = None,
                 security: ClientSecurity | None = None) -> None:
        """`security`: TLS and token (default: KVROUTER_TLS_* / KVROUTER_TOKEN* from the
        environment, kvrouter.security.channels)."""
        self._own = channel is None
        self.channel = channel or sync_channel(
            target, _channel_options(max_message_bytes), security)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def route(self, tokens: TokenLike, model: str = "", **kw: Any) -> RouteResult:
        """Pick a worker and reserve load (unless dry_run=True). Keywords: request_id,
        extra_key, expected_output_tokens, candidates, role, policy, explain, dry_run,
        session_id."""
        return to_result(self.stub.Route(route_request(tokens, model, **kw),
                                         timeout=self.timeout))

    def explain(self, tokens: TokenLike, model: str = "", **kw: Any) -> RouteResult:
        req = router_pb2.ExplainRequest(route=route_request(tokens, model, **kw))
        return to_result(self.stub.Explain(req, timeout=self.timeout))

    def release(self, request_id: str, model: str = "", worker: str = "") -> bool:
        req = router_pb2.ReleaseRequest(model=model, request_id=request_id, worker=worker)
        return bool(self.stub.Release(req, timeout=self.timeout).released)

    def mark_prefill_done(self, request_id: str, model: str = "", worker: str = "") -> bool:
        req = router_pb2.MarkPrefillDoneRequest(model=model, request_id=request_id, worker=worker)
        return bool(self.stub.MarkPrefillDone(req, timeout=self.timeout).found)

    def list_workers(self, model: str = "", page_size: int = 0) -> list[WorkerState]:
        """Every worker (of `model`), fetched page by page (page_size 0: the router's)."""
        return to_workers(self.list_workers_pb(model, page_size))

    def list_workers_pb(self, model: str = "", page_size: int = 0,
                        ) -> router_pb2.ListWorkersResponse:
        """Every page of ListWorkers merged into one reply (workers and admission states)."""
        merged, token = router_pb2.ListWorkersResponse(), ""
        while True:
            resp = self.stub.ListWorkers(router_pb2.ListWorkersRequest(
                model=model, page_size=page_size, page_token=token), timeout=self.timeout)
            token = _merge_page(merged, resp, token)
            if not token:
                return merged

    def list_models(self) -> list[ModelSummary]:
        return to_models(self.stub.ListModels(router_pb2.ListModelsRequest(),
                                              timeout=self.timeout))

    # worker side -----------------------------------------------------------
    def register_worker(self, model: str, worker: str, *, role: str = "aggregated",
                        address: str = "", block_size: int = 0,
                        metadata: Mapping[str, str] | None = None,
                        ) -> router_pb2.RegisterWorkerResponse:
        req = _register_request(model, worker, role, address, block_size, metadata)
        return self.stub.RegisterWorker(req, timeout=self.timeout)

    def heartbeat(self, model: str, worker: str, load: common_pb2.LoadReport | None = None,
                  epoch: str = "", last_seq: int | None = None) -> str:
        """Proof of life (NOT_FOUND: register again); epoch/last_seq: the last batch sent
        with publish_events, so the router can detect batches it missed."""
        req = _heartbeat_request(model, worker, load, epoch, last_seq)
        return str(self.stub.Heartbeat(req, timeout=self.timeout).status)

    def drain_worker(self, model: str, worker: str) -> int:
        req = router_pb2.DrainWorkerRequest(model=model, worker=worker)
        return int(self.stub.DrainWorker(req, timeout=self.timeout).reserved_requests)

    def deregister_worker(self, model: str, worker: str) -> int:
        req = router_pb2.DeregisterWorkerRequest(model=model, worker=worker)
        return int(self.stub.DeregisterWorker(req, timeout=self.timeout).dropped_reservations)

    def publish_events(self, model: str, worker: str, epoch: str, seq: int,
                       payload: bytes) -> None:
        """payload: kvrouter.events.codec.encode_payload(events)."""
        req = router_pb2.PublishEventsRequest(model=model, worker=worker, epoch=epoch, seq=seq,
                                              payload=payload)
        self.stub.PublishEvents(req, timeout=self.timeout)


# ---------------------------------------------------------------------- asyncio client
class AsyncRouterClient:
    """asyncio client; use inside one event loop."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 10.0,
                 max_message_bytes: int = 64 << 20,
                 channel: grpc.aio.Channel | None = None,
                 security: ClientSecurity | None = None) -> None:
        self._own = channel is None
        self.channel = channel or aio_channel(
            target, _channel_options(max_message_bytes), security)
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own:
            await self.channel.close()

    async def route(self, tokens: TokenLike, model: str = "", **kw: Any) -> RouteResult:
        return to_result(await self.stub.Route(route_request(tokens, model, **kw),
                                               timeout=self.timeout))

    async def explain(self, tokens: TokenLike, model: str = "", **kw: Any) -> RouteResult:
        req = router_pb2.ExplainRequest(route=route_request(tokens, model, **kw))
        return to_result(await self.stub.Explain(req, timeout=self.timeout))

    async def release(self, request_id: str, model: str = "", worker: str = "") -> bool:
        req = router_pb2.ReleaseRequest(model=model, request_id=request_id, worker=worker)
        return bool((await self.stub.Release(req, timeout=self.timeout)).released)

    async def mark_prefill_done(self, request_id: str, model: str = "", worker: str = "") -> bool:
        req = router_pb2.MarkPrefillDoneRequest(model=model, request_id=request_id, worker=worker)
        return bool((await self.stub.MarkPrefillDone(req, timeout=self.timeout)).found)

    async def list_workers(self, model: str = "", page_size: int = 0) -> list[WorkerState]:
        return to_workers(await self.list_workers_pb(model, page_size))

    async def list_workers_pb(self, model: str = "", page_size: int = 0,
                              ) -> router_pb2.ListWorkersResponse:
        merged, token = router_pb2.ListWorkersResponse(), ""
        while True:
            resp = await self.stub.ListWorkers(router_pb2.ListWorkersRequest(
                model=model, page_size=page_size, page_token=token), timeout=self.timeout)
            token = _merge_page(merged, resp, token)
            if not token:
                return merged

    async def list_models(self) -> list[ModelSummary]:
        return to_models(await self.stub.ListModels(router_pb2.ListModelsRequest(),
                                                    timeout=self.timeout))

    async def register_worker(self, model: str, worker: str, *, role: str = "aggregated",
                              address: str = "", block_size: int = 0,
                              metadata: Mapping[str, str] | None = None,
                              ) -> router_pb2.RegisterWorkerResponse:
        req = _register_request(model, worker, role, address, block_size, metadata)
        return await self.stub.RegisterWorker(req, timeout=self.timeout)

    async def heartbeat(self, model: str, worker: str,
                        load: common_pb2.LoadReport | None = None, epoch: str = "",
                        last_seq: int | None = None) -> str:
        req = _heartbeat_request(model, worker, load, epoch, last_seq)
        return str((await self.stub.Heartbeat(req, timeout=self.timeout)).status)

    async def drain_worker(self, model: str, worker: str) -> int:
        req = router_pb2.DrainWorkerRequest(model=model, worker=worker)
        return int((await self.stub.DrainWorker(req, timeout=self.timeout)).reserved_requests)

    async def deregister_worker(self, model: str, worker: str) -> int:
        req = router_pb2.DeregisterWorkerRequest(model=model, worker=worker)
        resp = await self.stub.DeregisterWorker(req, timeout=self.timeout)
        return int(resp.dropped_reservations)

    async def publish_events(self, model: str, worker: str, epoch: str, seq: int,
                             payload: bytes) -> None:
        req = router_pb2.PublishEventsRequest(model=model, worker=worker, epoch=epoch, seq=seq,
                                              payload=payload)
        await self.stub.PublishEvents(req, timeout=self.timeout)

    def stream(self) -> RouteStreamSession:
        """`async with client.stream() as s: d = await s.route(tokens, model)`."""
        return RouteStreamSession(self.stub)


class RouteStreamSession:
    """One RouteStream call shared by many concurrent coroutines: each message is tagged with
    a sequence number and its reply resolves the matching future."""

    def __init__(self, stub: router_pb2_grpc.RouterStub) -> None:
        self._stub = stub
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[router_pb2.RouteStreamResponse]] = {}
        self._seq = itertools.count(1)
        self._write_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        self._call = self._stub.RouteStream()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._call is not None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await self._reader
            self._reader = None
        self._fail_pending(ConnectionError("RouteStream closed"))

    def _fail_pending(self, exc: BaseException) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _read(self) -> None:
        try:
            async for resp in self._call:
                fut = self._pending.pop(resp.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(resp)
        except grpc.RpcError as e:
            self._fail_pending(e)
            raise

    async def send(self, items: Sequence[router_pb2.RouteStreamItem],
                   ) -> list[router_pb2.RouteStreamResult]:
        """Send one message with these items; their results in the same order."""
        seq = next(self._seq)
        fut: asyncio.Future[router_pb2.RouteStreamResponse] = (
            asyncio.get_running_loop().create_future())
        self._pending[seq] = fut
        try:
            async with self._write_lock:
                await self._call.write(router_pb2.RouteStreamRequest(seq=seq, items=items))
        except (grpc.RpcError, asyncio.InvalidStateError) as e:
            self._pending.pop(seq, None)
            raise await self._ended_because(e) from None
        resp = await fut
        return list(resp.results)

    async def _ended_because(self, write_error: BaseException) -> BaseException:
        """A write failed because the call had ended (the router refused it, say): grpc.aio
        then reports INTERNAL for the write, while the call's own status, which the reader
        receives, says why. That status, else the write's error."""
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=5.0)
            except grpc.RpcError as status:
                return status
            except (TimeoutError, asyncio.CancelledError):
                pass
        return write_error

    @staticmethod
    def _unwrap(r: router_pb2.RouteStreamResult) -> RouteResult | bool | StreamItemError:
        kind = r.WhichOneof("result")
        if kind == "route":
            return to_result(r.route)
        if kind == "release":
            return bool(r.release.released)
        if kind == "prefill_done":
            return bool(r.prefill_done.found)
        err = r.error
        return StreamItemError(_CODES.get(err.code, grpc.StatusCode.UNKNOWN), err.message)

    async def route(self, tokens: TokenLike, model: str = "", **kw: Any) -> RouteResult:
        item = router_pb2.RouteStreamItem(route=route_request(tokens, model, **kw))
        out = self._unwrap((await self.send([item]))[0])
        if isinstance(out, StreamItemError):
            raise out
        assert isinstance(out, RouteResult)
        return out

    async def route_many(self, requests: Iterable[router_pb2.RouteRequest],
                         ) -> list[RouteResult | StreamItemError]:
        """Route a batch in one message (see route_request); failed items are returned as
        StreamItemError values, not raised."""
        items = [router_pb2.RouteStreamItem(route=r) for r in requests]
        out: list[RouteResult | StreamItemError] = []
        for r in await self.send(items):
            v = self._unwrap(r)
            assert not isinstance(v, bool)
            out.append(v)
        return out

    async def release(self, request_id: str, model: str = "", worker: str = "") -> bool:
        item = router_pb2.RouteStreamItem(release=router_pb2.ReleaseRequest(
            model=model, request_id=request_id, worker=worker))
        out = self._unwrap((await self.send([item]))[0])
        if isinstance(out, StreamItemError):
            raise out
        return bool(out)

    async def release_many(self, request_ids: Iterable[str], model: str = "",
                           ) -> list[bool | StreamItemError]:
        items = [router_pb2.RouteStreamItem(release=router_pb2.ReleaseRequest(
            model=model, request_id=rid)) for rid in request_ids]
        out: list[bool | StreamItemError] = []
        for r in await self.send(items):
            v = self._unwrap(r)
            assert not isinstance(v, RouteResult)
            out.append(v)
        return out
