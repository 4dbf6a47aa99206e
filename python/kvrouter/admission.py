"""Admission control: a router-side queue in front of the scheduler (docs/admission.md).

When every eligible worker of a model is past a saturation point
(`AdmissionConfig`: prompt tokens waiting for prefill, KV usage from load reports,
requests in flight), a request waits here instead of being routed into an
engine's queue, where it could no longer be reordered or shed. The queue:

* serves priority classes strictly in order (the first class of
  `AdmissionConfig.classes` first); a request naming no class or an unknown one
  gets `default_class` (unknown names are counted);
* shares each class among tenants by weight with deficit round robin (quantum =
  the tenant's weight, one unit per request), so a tenant sending more cannot
  crowd out one sending less beyond their weights;
* answers every request it takes: dispatched when capacity frees, `Refused`
  (deadline, `reason="expired"`) when its deadline passes first, `Refused`
  (`"queue_full"`, with a retry-after hint) when the queue is full — a full queue
  sheds its newest request of the lowest class below the arriving one's, if any;
* never dispatches while the head's eligible workers are still saturated.

This module is synchronous and clock-agnostic (`now` is the caller's: monotonic
seconds in the service, simulated time in the fleet simulator), so the router
service (kvrouter.server.service) and the admission benchmark (bench/admission.py,
through the fleet simulator's gate hook) run the very same queue and saturation rule.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

from kvrouter.config import AdmissionConfig
from kvrouter.counters import Counters
from kvrouter.protocol import ProtocolError, check_name, excerpt

if TYPE_CHECKING:
    from kvrouter._core import Scheduler, WorkerLoad

T = TypeVar("T")

# Where a client names its class and tenant besides the request fields (gRPC metadata
# keys; the HTTP front reads the same names as headers). A field that is set wins.
PRIORITY_HEADER = "x-kvrouter-priority"
TENANT_HEADER = "x-kvrouter-tenant"
DEFAULT_TENANT = "default"
# Bounds of the retry-after hint a refused request gets (seconds).
RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 60.0
_EWMA = 0.1  # weight of the newest interval between dispatches in the drain-rate estimate

RefusalReason = Literal["queue_full", "deadline_passed", "expired"]


class Refused(Exception):
    """The queue will not serve this request. `queue_full`: RESOURCE_EXHAUSTED with
    `retry_after_s`; `deadline_passed` (on arrival) and `expired` (while waiting):
    DEADLINE_EXCEEDED."""

    def __init__(self, reason: RefusalReason, message: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(eq=False, slots=True)
class Ticket(Generic[T]):
    """One queued request. `done` once it left the queue (dispatched, expired, shed,
    cancelled): lazily skipped wherever it is still referenced."""

    item: T
    cls: int  # index into the classes, 0 = highest
    tenant: str
    enqueued_at: float
    deadline: float  # math.inf: none
    eligible: Collection[int] | None  # worker ids the request may go to; None: any
    seq: int
    done: bool = False


@dataclass
class AdmissionCounts(Counters):
    """Running tallies of one model's admission (ListWorkers, metrics, benches)."""

    admitted: int = 0  # routed at once: the fleet was not saturated and nobody waited
    queued: int = 0  # entered the queue
    dispatched: int = 0  # left the queue to be routed
    expired: int = 0  # deadline passed while waiting (DEADLINE_EXCEEDED)
    deadline_passed: int = 0  # deadline already past on arrival (DEADLINE_EXCEEDED)
    rejected: int = 0  # queue full on arrival (RESOURCE_EXHAUSTED)
    shed: int = 0  # pushed out of a full queue by a higher class (RESOURCE_EXHAUSTED)
    cancelled: int = 0  # the client went away while waiting
    unknown_class: int = 0  # named a class that does not exist: default class used


@dataclass(frozen=True, slots=True)
class ClassState:
    name: str
    queued: int
    oldest_wait_s: float


@dataclass(frozen=True, slots=True)
class AdmissionState:
    """A snapshot for ListWorkers / ListModels / `kvrouter workers` / metrics."""

    enabled: bool
    saturated: bool
    queued: int
    max_queue: int
    classes: tuple[ClassState, ...]
    counts: AdmissionCounts
    retry_after_s: float


class _ClassQueue(Generic[T]):
    """One priority class: per-tenant FIFOs served by deficit round robin. Invariant: a
    tenant has a FIFO exactly while it is in the round (`active`)."""

    def __init__(self) -> None:
        self.fifo: dict[str, deque[Ticket[T]]] = {}
        self.live: dict[str, int] = {}  # tickets of the tenant still waiting
        self.active: deque[str] = deque()  # tenants in turn order
        self.deficit: dict[str, float] = {}
        self.charged = False  # the head tenant got its quantum for this turn
        self.order: deque[Ticket[T]] = deque()  # push order (newest right), for shedding
        self.count = 0

    def push(self, t: Ticket[T]) -> None:
        q = self.fifo.get(t.tenant)
        if q is None:
            q = self.fifo[t.tenant] = deque()
            self.active.append(t.tenant)
            self.deficit[t.tenant] = 0.0
        q.append(t)
        self.live[t.tenant] = self.live.get(t.tenant, 0) + 1
        self.order.append(t)
        self.count += 1

    def leave(self, t: Ticket[T]) -> None:
        self.count -= 1
        n = self.live[t.tenant] - 1
        if n:
            self.live[t.tenant] = n
        else:
            del self.live[t.tenant]

    def _drop(self, tenant: str) -> None:
        """The tenant has nothing waiting: it leaves the round and keeps no credit (DRR)."""
        self.fifo.pop(tenant, None)
        self.deficit.pop(tenant, None)
        if self.active and self.active[0] == tenant:
            self.active.popleft()
            self.charged = False
        else:
            self.active.remove(tenant)

    def head(self, quantum: dict[str, float], default_quantum: float) -> Ticket[T] | None:
        """The ticket deficit round robin serves next (not removed); None when empty."""
        while self.active:
            tenant = self.active[0]
            q = self.fifo[tenant]
            while q and q[0].done:
                q.popleft()
            if not q:
                self._drop(tenant)
                continue
            if not self.charged:
                self.deficit[tenant] += quantum.get(tenant, default_quantum)
                self.charged = True
            if self.deficit[tenant] >= 1.0:
                return q[0]
            self.active.rotate(-1)
            self.charged = False
        return None

    def take(self, t: Ticket[T]) -> None:
        """Remove `t`, the ticket `head` returned, charging its tenant one unit (the
        caller marks it done and calls `leave`)."""
        q = self.fifo[t.tenant]
        q.popleft()
        self.deficit[t.tenant] -= 1.0
        if self.live.get(t.tenant, 0) <= 1:  # `t` was its last waiting ticket
            self._drop(t.tenant)

    def newest(self) -> Ticket[T] | None:
        while self.order and self.order[-1].done:
            self.order.pop()
        return self.order[-1] if self.order else None

    def backlogged(self) -> set[str]:
        return set(self.live)

    def oldest_enqueued(self) -> float:
        while self.order and self.order[0].done:
            self.order.popleft()
        return self.order[0].enqueued_at if self.order else math.inf


class AdmissionQueue(Generic[T]):
    """The bounded queue of one model: priority classes, tenant shares, deadlines."""

    def __init__(self, cfg: AdmissionConfig) -> None:
        self.cfg = cfg
        self.classes = list(cfg.classes)
        self._class_index = {name: i for i, name in enumerate(self.classes)}
        self.default_class = self._class_index[cfg.default_class]
        # Quanta normalised so that the lightest tenant gets one request per visit: a
        # weight below 1 would otherwise cost idle rounds.
        weights = [*cfg.tenant_weights.values(), cfg.default_tenant_weight]
        unit = min(weights)
        self._quantum = {t: w / unit for t, w in cfg.tenant_weights.items()}
        self._default_quantum = cfg.default_tenant_weight / unit
        self._queues: list[_ClassQueue[T]] = [_ClassQueue() for _ in self.classes]
        self._deadlines: list[tuple[float, int, Ticket[T]]] = []
        self._seq = 0
        self._count = 0
        self._last_dispatch: float | None = None
        self._interval_s: float | None = None  # EWMA of the time between dispatches
        self.counts = AdmissionCounts()

    def __len__(self) -> int:
        return self._count

    # -- requests' class and tenant -------------------------------------------------------
    def resolve_class(self, name: str) -> int:
        """The class index for `name`; empty or unknown names get the default class (an
        unknown one is counted: a client's typo should show up somewhere)."""
        if not name:
            return self.default_class
        i = self._class_index.get(name)
        if i is None:
            self.counts.unknown_class += 1
            return self.default_class
        return i

    def class_of(self, name: str) -> str:
        """The class name a request's priority maps to, without counting anything."""
        i = self._class_index.get(name) if name else None
        return self.classes[self.default_class if i is None else i]

    def is_unknown_class(self, name: str) -> bool:
        return bool(name) and name not in self._class_index

    @staticmethod
    def check_tenant(name: str) -> str:
        """The tenant name to queue under (empty: DEFAULT_TENANT); ValueError if invalid.
        Tenants not in `tenant_weights` get `default_tenant_weight`."""
        if not name:
            return DEFAULT_TENANT
        try:
            return check_name("tenant", name)
        except ProtocolError as e:
            raise ValueError(str(e)) from None

    @staticmethod
    def check_priority(name: str) -> str:
        """A priority name must be printable and short; an unknown one is not an error."""
        if name and (len(name) > 64 or not name.isprintable()):
            raise ValueError(f"priority {excerpt(name)} is invalid: 1-64 printable characters")
        return name

    # -- queue operations ------------------------------------------------------------------
    def push(self, item: T, cls: int, tenant: str, now: float, deadline: float = math.inf,
             eligible: Collection[int] | None = None) -> tuple[Ticket[T], Ticket[T] | None]:
        """Queue a request. Returns its ticket and the ticket it shed from a full queue
        (whose owner must be answered RESOURCE_EXHAUSTED), if any. Raises Refused when
        the deadline has passed or the queue is full of requests of its class or above."""
        if deadline <= now:
            self.counts.deadline_passed += 1
            raise Refused("deadline_passed",
                          f"the request's deadline passed {now - deadline:.3f} s before it "
                          "arrived")
        shed: Ticket[T] | None = None
        if self._count >= self.cfg.max_queue:
            shed = self._victim(cls)
            if shed is None:
                self.counts.rejected += 1
                raise Refused("queue_full",
                              f"admission queue full ({self._count} of {self.cfg.max_queue} "
                              f"requests waiting at class {self.classes[cls]!r} or above)",
                              self.retry_after_s())
            self.remove(shed)
            self.counts.shed += 1
        self._seq += 1
        t = Ticket(item=item, cls=cls, tenant=tenant, enqueued_at=now, deadline=deadline,
                   eligible=eligible, seq=self._seq)
        self._queues[cls].push(t)
        self._count += 1
        self.counts.queued += 1
        if deadline < math.inf:
            heapq.heappush(self._deadlines, (deadline, t.seq, t))
        return t, shed

    def _victim(self, cls: int) -> Ticket[T] | None:
        """The newest ticket of the lowest class below `cls`, or None."""
        for c in range(len(self._queues) - 1, cls, -1):
            if self._queues[c].count:
                v = self._queues[c].newest()
                if v is not None:
                    return v
        return None

    def peek(self) -> Ticket[T] | None:
        """The ticket to dispatch next: highest class first, tenants by weight."""
        for q in self._queues:
            if q.count:
                t = q.head(self._quantum, self._default_quantum)
                if t is not None:
                    return t
        return None

    def pop(self, now: float) -> Ticket[T] | None:
        t = self.peek()
        if t is None:
            return None
        self._queues[t.cls].take(t)
        self._leave(t)
        self.counts.dispatched += 1
        if self._last_dispatch is not None:
            dt = max(0.0, now - self._last_dispatch)
            self._interval_s = dt if self._interval_s is None else (
                (1 - _EWMA) * self._interval_s + _EWMA * dt)
        self._last_dispatch = now
        return t

    def _leave(self, t: Ticket[T]) -> None:
        t.done = True
        self._count -= 1
        self._queues[t.cls].leave(t)

    def remove(self, t: Ticket[T]) -> bool:
        """Take a waiting ticket out (shed, cancelled); False if it already left."""
        if t.done:
            return False
        self._leave(t)
        return True

    def cancel(self, t: Ticket[T]) -> bool:
        """The client went away while waiting."""
        if self.remove(t):
            self.counts.cancelled += 1
            return True
        return False

    def expire(self, now: float) -> list[Ticket[T]]:
        """Take out every waiting ticket whose deadline is at or before `now`."""
        out = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _d, _s, t = heapq.heappop(heap)
            if self.remove(t):
                self.counts.expired += 1
                out.append(t)
        return out

    def next_deadline(self) -> float:
        heap = self._deadlines
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    # -- introspection ---------------------------------------------------------------------
    def retry_after_s(self) -> float:
        """About how long until the queue has room: its length times the recent time
        between dispatches, within [RETRY_AFTER_MIN_S, RETRY_AFTER_MAX_S]."""
        per = self._interval_s if self._interval_s is not None else 0.0
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, self._count * per))

    def backlogged(self, cls: int) -> set[str]:
        """Tenants with requests waiting in class `cls`."""
        return self._queues[cls].backlogged()

    def class_states(self, now: float) -> tuple[ClassState, ...]:
        out = []
        for name, q in zip(self.classes, self._queues, strict=True):
            oldest = q.oldest_enqueued()
            out.append(ClassState(name=name, queued=q.count,
                                  oldest_wait_s=max(0.0, now - oldest) if q.count else 0.0))
        return tuple(out)


def kv_usage(load: WorkerLoad) -> float | None:
    """Share of the worker's KV blocks in use by its requests, from its load report;
    None when the report carries no capacity (used + free = 0)."""
    used, free = load.reported_kv_used_blocks, load.reported_kv_free_blocks
    total = used + free
    return used / total if total > 0 else None


def worker_saturated(load: WorkerLoad, cfg: AdmissionConfig) -> bool:
    """Past any of the saturation points. Prefill tokens are the scorer's view
    (reservations + report drift + other replicas); requests in flight are this
    router's reservations plus other replicas'; KV usage needs a capacity report."""
    if load.prefill_tokens >= cfg.max_queued_prefill_tokens:
        return True
    if load.reserved_requests + load.external_requests >= cfg.max_running_requests:
        return True
    usage = kv_usage(load)
    return usage is not None and usage >= cfg.max_kv_usage


@dataclass
class AdmissionController(Generic[T]):
    """The queue of one model plus the saturation rule over its scheduler's loads."""

    scheduler: Scheduler
    cfg: AdmissionConfig
    queue: AdmissionQueue[T] = field(init=False)

    def __post_init__(self) -> None:
        self.queue = AdmissionQueue(self.cfg)

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def saturated(self, eligible: Collection[int] | None = None,
                  now: float | None = None) -> bool:
        """Every routable eligible worker is past a saturation point. False when none is
        routable: routing then fails with its own clear error instead of waiting."""
        cfg = self.cfg
        sched = self.scheduler
        seen = False
        # One worker's load at a time: below saturation the first routable worker usually
        # answers, so the check costs O(1) instead of building every worker's load.
        for w in (eligible if eligible is not None else sched.workers()):
            try:
                load = sched.load(w, now)
            except KeyError:  # left the scheduler meanwhile
                continue
            if not load.routable:
                continue
            if not worker_saturated(load, cfg):
                return False
            seen = True
        return seen

    def offer(self, item: T, priority: str, tenant: str, now: float,
              deadline: float = math.inf, eligible: Collection[int] | None = None,
              sched_now: float | None = None) -> tuple[Ticket[T] | None, Ticket[T] | None]:
        """Admit or queue a request. Returns (None, None) when it may be routed now, else
        (its ticket, a ticket shed to make room or None). Raises Refused (deadline already
        passed, queue full) and ValueError (bad tenant or priority name). `sched_now` is
        the scheduler's clock when it differs from the queue's (simulated time)."""
        self.queue.check_priority(priority)
        tenant = self.queue.check_tenant(tenant)
        cls = self.queue.resolve_class(priority)
        if deadline <= now:
            self.queue.counts.deadline_passed += 1
            raise Refused("deadline_passed",
                          f"the request's deadline passed {now - deadline:.3f} s before it "
                          "arrived")
        if not self.cfg.enabled:
            self.queue.counts.admitted += 1
            return None, None
        if not len(self.queue) and not self.saturated(eligible, sched_now):
            self.queue.counts.admitted += 1
            return None, None
        # Nothing waits for ever: a request without a (nearer) deadline gets max_wait_s.
        deadline = min(deadline, now + self.cfg.max_wait_s)
        return self.queue.push(item, cls, tenant, now, deadline, eligible)

    def ready(self, now: float, sched_now: float | None = None) -> Iterator[Ticket[T]]:
        """Tickets to dispatch now, one at a time: the caller routes (reserves) each before
        asking for the next, so every check sees the load the previous one added. Stops
        at the first head whose eligible workers are all saturated (head of line)."""
        q = self.queue
        while len(q):
            head = q.peek()
            if head is None or self.saturated(head.eligible, sched_now):
                return
            t = q.pop(now)
            if t is not None:
                yield t

    def state(self, now: float, sched_now: float | None = None) -> AdmissionState:
        return AdmissionState(
            enabled=self.cfg.enabled,
            saturated=self.cfg.enabled and self.saturated(None, sched_now),
            queued=len(self.queue), max_queue=self.cfg.max_queue,
            classes=self.queue.class_states(now), counts=self.queue.counts,
            retry_after_s=self.queue.retry_after_s())
