"""Admission control in the router process: kvrouter.admission's queue on the event loop.

`AdmissionGate` (one per model) puts a Route / Generate request that finds every
eligible worker saturated on the model's `AdmissionController` queue and awaits
its turn. One request is let go at a time: the gate grants the queue's head,
the request routes (reserves its load) and calls `settled`, and only then is the
next head considered, so every saturation check sees the load of the requests
let go before it. The queue is looked at again when load is released (Release,
MarkPrefillDone, a Generate ending), when a heartbeat brings a load report, and
every POLL_S while requests wait (lease expiry, report ageing). A waiter whose
deadline passes is answered DEADLINE_EXCEEDED; one refused or shed from a full
queue RESOURCE_EXHAUSTED with a retry-after hint (`AdmissionRefused`, which the
service raises as a RequestError carrying `retry_after_s`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import grpc

from kvrouter._proto.v1 import router_pb2
from kvrouter.admission import (
    PRIORITY_HEADER,
    TENANT_HEADER,
    AdmissionController,
    AdmissionState,
    Refused,
    Ticket,
)
from kvrouter.config import AdmissionConfig

if TYPE_CHECKING:
    from kvrouter._core import Scheduler
    from kvrouter.server.metrics import RouterMetrics

POLL_S = 0.05  # how often a non-empty queue re-checks saturation without a prompt
GRANT_POLL_S = 0.001  # how often a grant waiting for its reservation to appear is looked at
GRANT_TIMEOUT_S = 1.0  # a granted request that never says it routed stops blocking after this

__all__ = ["PRIORITY_HEADER", "TENANT_HEADER", "AdmissionGate", "AdmissionRefused",
           "admission_pb", "deadline_from"]


class AdmissionRefused(Exception):
    """A request admission control answers with a gRPC status (and maybe a retry hint)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @classmethod
    def from_refused(cls, e: Refused, model: str) -> AdmissionRefused:
        if e.reason == "queue_full":
            return cls(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"model {model!r} is saturated: {e.message}; retry after "
                       f"{e.retry_after_s:.0f} s", e.retry_after_s)
        return cls(grpc.StatusCode.DEADLINE_EXCEEDED, f"model {model!r}: {e.message}")


def deadline_from(deadline_unix_ms: int, time_remaining: float | None = None) -> float:
    """The request's deadline on the monotonic clock (math.inf: none) from its Unix
    milliseconds field and the gRPC deadline's remaining seconds; ValueError if negative."""
    if deadline_unix_ms < 0:
        raise ValueError(f"deadline_unix_ms must be >= 0 (0: none), got {deadline_unix_ms}")
    now = time.monotonic()
    out = math.inf
    if deadline_unix_ms:
        out = now + (deadline_unix_ms / 1e3 - time.time())
    if time_remaining is not None:
        out = min(out, now + time_remaining)
    return out


class AdmissionGate:
    """One model's admission control on the event loop (see the module docstring)."""

    def __init__(self, model: str, scheduler: Scheduler, cfg: AdmissionConfig,
                 metrics: RouterMetrics | None = None) -> None:
        self.model = model
        self.ctl: AdmissionController[asyncio.Future[None]] = AdmissionController(scheduler, cfg)
        self.metrics = metrics
        self._granted: Ticket[asyncio.Future[None]] | None = None
        self._granted_at = 0.0
        self._granted_rid: str | None = None  # settled once this id holds a reservation
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self.ctl.enabled

    # -- requests --------------------------------------------------------------------------
    async def enter(self, priority: str, tenant: str, deadline: float = math.inf,
                    eligible: Collection[int] | None = None,
                    ) -> Ticket[asyncio.Future[None]] | None:
        """Wait until the request may be routed. Returns None when it may go at once, else
        its ticket, to pass to `settled` once it has routed (or failed to). Raises
        AdmissionRefused (deadline passed, queue full, shed, expired while waiting) and
        ValueError (bad priority or tenant name)."""
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        q = self.ctl.queue
        cls_name = q.class_of(priority)
        if q.is_unknown_class(priority):
            self._count(cls_name, "unknown_class")
        try:
            ticket, shed = self.ctl.offer(fut, priority, tenant, now, deadline, eligible)
        except Refused as e:
            self._count(cls_name, e.reason)
            raise AdmissionRefused.from_refused(e, self.model) from None
        if shed is not None:
            self._count(q.classes[shed.cls], "shed")
            shed.item.set_exception(Refused(
                "queue_full", "shed from a full admission queue by a request of a higher "
                "class", q.retry_after_s()))
        if ticket is None:
            self._count(cls_name, "admitted")
            return None
        self._count(cls_name, "queued")
        self._publish()
        self._arm()
        try:
            await fut
        except Refused as e:
            raise AdmissionRefused.from_refused(e, self.model) from None
        except asyncio.CancelledError:
            if q.cancel(ticket):
                self._count(cls_name, "cancelled")
                self._publish()
            else:
                self.settled(ticket)  # granted, but the client left before routing
            raise
        if self.metrics is not None:
            self.metrics.admission_wait.labels(self.model, cls_name).observe(
                time.monotonic() - ticket.enqueued_at)
        return ticket

    def try_now(self, priority: str, tenant: str, deadline: float = math.inf) -> None:
        """For callers that cannot wait (RouteStream): return if the request may be routed
        now, else raise AdmissionRefused (RESOURCE_EXHAUSTED with a retry hint, or
        DEADLINE_EXCEEDED). Nothing is queued."""
        q = self.ctl.queue
        q.check_priority(priority)
        q.check_tenant(tenant)
        cls_name = q.class_of(priority)
        if deadline <= time.monotonic():
            q.counts.deadline_passed += 1
            self._count(cls_name, "deadline_passed")
            raise AdmissionRefused(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"model {self.model!r}: the request's deadline has passed")
        if not self.enabled:
            return
        if len(q) or self._granted is not None or self.ctl.saturated():
            q.counts.rejected += 1
            self._count(cls_name, "stream_refused")
            after = q.retry_after_s()
            raise AdmissionRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"model {self.model!r} is saturated ({len(q)} requests waiting); RouteStream "
                f"items do not wait: retry after {after:.0f} s or use Route", after)
        q.counts.admitted += 1

    def settled(self, ticket: Ticket[asyncio.Future[None]] | None) -> None:
        """The granted request has routed (reserved) or given up: the next may go."""
        if ticket is not None and self._granted is ticket:
            self._granted = self._granted_rid = None
            asyncio.get_running_loop().call_soon(self.pump)

    def settle_on_reserve(self, ticket: Ticket[asyncio.Future[None]] | None, rid: str) -> None:
        """For a caller that routes later, after other awaits (Generate: affinity, sessions,
        then the proxy's plan): the grant is settled once `rid` holds a reservation (or
        `settled` is called, or GRANT_TIMEOUT_S passes)."""
        if ticket is not None and self._granted is ticket:
            self._granted_rid = rid
            asyncio.get_running_loop().call_soon(self.pump)

    # -- the queue -------------------------------------------------------------------------
    def kick(self) -> None:
        """Load was released or reported: maybe someone can go now."""
        if len(self.ctl.queue):
            self.pump()

    def pump(self) -> None:
        now = time.monotonic()
        q = self.ctl.queue
        for t in q.expire(now):
            self._count(q.classes[t.cls], "expired")
            t.item.set_exception(Refused(
                "expired", f"deadline passed after {now - t.enqueued_at:.3f} s waiting for "
                "capacity in the admission queue"))
        if self._granted is not None:
            rid = self._granted_rid
            if rid is not None and self.ctl.scheduler.has_reservation(rid):
                self._granted = self._granted_rid = None
            elif now - self._granted_at < GRANT_TIMEOUT_S:
                self._publish()
                self._arm(GRANT_POLL_S if rid is not None else POLL_S)
                return
            else:
                self._granted = self._granted_rid = None
        for t in self.ctl.ready(now):
            if t.item.done():  # cancelled in the same loop turn: not a grant
                continue
            self._granted, self._granted_at, self._granted_rid = t, now, None
            self._count(q.classes[t.cls], "dispatched")
            t.item.set_result(None)
            break
        self._publish()
        if len(q):
            self._arm()

    def _arm(self, poll_s: float = POLL_S) -> None:
        """Wake up at the next deadline or after `poll_s`, whichever comes first."""
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = min(poll_s, max(0.0, self.ctl.queue.next_deadline() - time.monotonic()))
        self._timer = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.pump()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- state -----------------------------------------------------------------------------
    def state(self) -> AdmissionState:
        return self.ctl.state(time.monotonic())

    def _count(self, cls_name: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.admission_outcome(self.model, cls_name, outcome)

    def _publish(self) -> None:
        if self.metrics is not None:
            for c in self.ctl.queue.class_states(time.monotonic()):
                self.metrics.admission_queued.labels(self.model, c.name).set(c.queued)


def admission_pb(model: str, s: AdmissionState) -> router_pb2.AdmissionState:
    c = s.counts
    return router_pb2.AdmissionState(
        model=model, enabled=s.enabled, saturated=s.saturated, queued=s.queued,
        max_queue=s.max_queue,
        classes=[router_pb2.AdmissionClassState(name=k.name, queued=k.queued,
                                                oldest_wait_s=k.oldest_wait_s)
                 for k in s.classes],
        admitted=c.admitted, dispatched=c.dispatched, rejected=c.rejected + c.shed,
        expired=c.expired + c.deadline_passed, retry_after_s=s.retry_after_s)
