"""A worker's link to a router over gRPC, for engines that publish without Redis.

`RouterGrpcTransport` is an EventPublisher transport over the router's worker RPCs
(RegisterWorker, PublishEvents with per-worker epoch and seq, Heartbeat with load,
DeregisterWorker); `register_with_retry` waits for a router that is still starting.
Any engine adapter can use it; the simulated engine does (kvrouter.engines.sim).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc

from kvrouter.events.model import LoadReport
from kvrouter.events.publisher import OutEntry, PublisherTransport, TransportUnavailable
from kvrouter.events.wire import DumpRequest, parse_heartbeat
from kvrouter.protocol import load_report_pb
from kvrouter.retry import Backoff

log = logging.getLogger("kvrouter.engines.router_link")

# Router answers that mean "the router is not there right now": keep the data, retry.
TRANSIENT_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.ABORTED,
})


class RegistrationRefused(RuntimeError):
    """The router did not accept the worker, or could not be reached in time."""


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
        """RegisterWorker; RegistrationRefused if the router refuses the worker (block size
        mismatch), grpc.aio.AioRpcError if it cannot be asked."""
        resp = await self.client.register_worker(
            self.model, self.worker, role=self.role, address=self.address,
            block_size=self.block_size, metadata=self.metadata)
        self.registrations += 1
        if resp.status != "up":
            raise RegistrationRefused(f"router {self.target} did not accept worker {self.worker!r}: "
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
            except (grpc.aio.AioRpcError, RegistrationRefused) as again:
                raise TransportUnavailable(f"re-registration failed: {again}") from again
            self._want_dump("re-registered")
            raise TransportUnavailable("re-registered with the router; resyncing")
        if code in TRANSIENT_CODES:
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
        try:
            await self.client.heartbeat(model, worker, load=load_report_pb(self._last_load))
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


async def register_with_retry(transport: RouterGrpcTransport, deadline_s: float) -> Any:
    """RegisterWorker, retrying transient answers (the router may still be starting) for
    at most `deadline_s`; RegistrationRefused when it refuses or never answers."""
    delays = Backoff(0.05, 1.0, deadline_s=deadline_s)
    while True:
        try:
            return await transport.register()
        except grpc.aio.AioRpcError as e:
            if e.code() not in TRANSIENT_CODES or not await delays.wait():
                raise RegistrationRefused(f"cannot register with router {transport.target}: "
                                          f"{e.code().name}: {e.details()}") from None
