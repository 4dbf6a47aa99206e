"""Worker side of the event plane: the library every engine adapter uses.

An `EventPublisher` turns a worker's KV events into ordered stream entries
(worker, epoch, seq, msgpack payload; docs/design.md §3.2), heartbeats with the worker's
metadata and latest load report, and answers full-dump requests from routers.

Delivery: events are batched (whatever accumulated while the previous write was
in flight goes into the next one), entries are pipelined, and on a Redis error
they stay buffered and are retried in order. The buffer is bounded: past the
bound the publisher drops it and marks itself for a full resync, which it runs
once Redis answers again: a new epoch whose first entries are the engine's
whole current block set (from the adapter's `dump()` callback), or just
AllCleared without one. Routers therefore never silently miss events: they
either get every entry of an epoch in order, or a new epoch that replaces the state.

Two transports share this logic: Redis (`RedisTransport`) and the in-process
bus (`InProcessTransport`, for single-process use), which delivers into an
`EventSink` (kvrouter.events.sink) that the in-process plane implements.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvrouter.counters import Counters
from kvrouter.events import metrics as m
from kvrouter.events.codec import encode_payload
from kvrouter.events.keys import Keys, shard_of
from kvrouter.events.model import AllCleared, BlockRemoved, BlockStored, KvEvent, LoadReport
from kvrouter.events.redis_conn import OPTION_NAMES as REDIS_OPTION_NAMES
from kvrouter.events.redis_conn import RedisClient, RedisConfig, make_client
from kvrouter.events.sink import EventSink
from kvrouter.events.tasks import cancel_and_wait
from kvrouter.events.wire import (
    F_SIG,
    H_BEAT,
    H_LOAD,
    H_META,
    H_STATE,
    KIND_DUMP,
    STATE_LEAVING,
    STATE_UP,
    DumpRequest,
    encode_load,
    encode_meta,
    entry_fields,
    entry_signed_parts,
    sign_heartbeat,
)
from kvrouter.protocol import check_name
from kvrouter.retry import Backoff
from kvrouter.security.signing import Signer

log = logging.getLogger("kvrouter.events.publisher")

DumpCallback = Callable[[], list[KvEvent]] | Callable[[], Awaitable[list[KvEvent]]]


class TransportUnavailable(Exception):
    """The bus could not take the write now; retry later."""


@dataclass(slots=True)
class OutEntry:
    epoch: str
    seq: int
    payload: bytes
    t: float
    kind: str = ""
    events: int = 0


@dataclass
class PublisherStats(Counters):
    """A publisher's running tallies (the process-wide metrics are kvrouter_publisher_*)."""

    events: int = 0
    entries: int = 0
    dropped_events: int = 0
    resyncs: int = 0
    dumps: int = 0
    send_errors: int = 0


class PublisherTransport(ABC):
    @abstractmethod
    async def send(self, model: str, worker: str, entries: list[OutEntry]) -> None:
        """Append entries in order; raise TransportUnavailable if not all were written."""

    @abstractmethod
    async def beat(self, model: str, worker: str, fields: dict[bytes, bytes], ttl_s: float) -> None: ...

    @abstractmethod
    async def leave(self, model: str, worker: str, ttl_s: float) -> None: ...

    @abstractmethod
    async def dump_requests(self, model: str, worker: str, timeout_s: float) -> list[DumpRequest]: ...

    async def close(self) -> None:
        return None


_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


# (model, worker, signed parts) -> the worker's tag (kvrouter.security.signing)
SignFn = Callable[[str, str, list[bytes]], bytes]


def worker_sign_fn(signer: Signer | None) -> SignFn | None:
    """A SignFn from one worker's key (a worker process knows only its own)."""
    if signer is None:
        return None
    return lambda _model, _worker, parts: signer.sign(parts)


class RedisTransport(PublisherTransport):
    def __init__(self, client: RedisClient, keys: Keys, num_shards: int = 1,
                 max_stream_len: int | None = 1_000_000, owns_client: bool = False,
                 sign: SignFn | None = None) -> None:
        self.client = client
        self.keys = keys
        self.num_shards = num_shards
        self.max_stream_len = max_stream_len
        self.owns_client = owns_client
        self.sign = sign  # entries and heartbeat fields carry the worker's HMAC

    def _fields(self, model: str, worker: str, e: OutEntry) -> dict[bytes, bytes]:
        fields = entry_fields(worker, e.epoch, e.seq, e.payload, e.t, e.kind)
        if self.sign is not None:
            fields[F_SIG] = self.sign(model, worker, entry_signed_parts(model, fields))
        return fields

    async def send(self, model: str, worker: str, entries: list[OutEntry]) -> None:
        stream = self.keys.stream(model, shard_of(worker, self.num_shards))
        pipe = self.client.pipeline(transaction=False)
        for e in entries:
            pipe.xadd(stream, self._fields(model, worker, e),  # type: ignore[arg-type,unused-ignore]
                      maxlen=self.max_stream_len, approximate=True)
        try:
            await pipe.execute()
        except _REDIS_DOWN as exc:
            raise TransportUnavailable(str(exc)) from exc
        except RedisError as exc:  # e.g. OOM, READONLY replica after a failover
            raise TransportUnavailable(str(exc)) from exc

    async def beat(self, model: str, worker: str, fields: dict[bytes, bytes], ttl_s: float) -> None:
        key = self.keys.heartbeat(model, worker)
        if self.sign is not None:
            sign = self.sign
            fields = sign_heartbeat(fields, model, worker, lambda parts: sign(model, worker, parts))
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type,unused-ignore]
        pipe.hincrby(key, H_BEAT, 1)  # type: ignore[arg-type,unused-ignore]
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        pipe.sadd(self.keys.workers(model), worker)
        try:
            await pipe.execute()
        except (*_REDIS_DOWN, RedisError) as exc:
            raise TransportUnavailable(str(exc)) from exc

    async def leave(self, model: str, worker: str, ttl_s: float) -> None:
        await self.beat(model, worker, {H_STATE: STATE_LEAVING.encode()}, ttl_s)

    async def dump_requests(self, model: str, worker: str, timeout_s: float) -> list[DumpRequest]:
        key = self.keys.dump_requests(model, worker)
        try:
            first: Any = await self.client.blpop([key], timeout=max(0.01, timeout_s))  # type: ignore[arg-type,unused-ignore]
            if not first:
                return []
            raw: list[Any] = [first[1]]
            more: Any = await self.client.lpop(key, 100)
            raw.extend(more or [])
        except (*_REDIS_DOWN, RedisError) as exc:
            raise TransportUnavailable(str(exc)) from exc
        out = []
        for item in raw:
            try:
                out.append(DumpRequest.decode(item))
            except ValueError as exc:
                log.warning("ignoring bad dump request: worker=%s error=%s", worker, exc)
        return out

    async def close(self) -> None:
        if self.owns_client:
            await self.client.aclose()


class InProcessTransport(PublisherTransport):
    """Delivers straight into a sink in this process (the in-process plane, the
    embedded default)."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink

    async def send(self, model: str, worker: str, entries: list[OutEntry]) -> None:
        for e in entries:
            self.sink.submit(model, worker, e.epoch, e.seq, e.payload, t=e.t, kind=e.kind)

    async def beat(self, model: str, worker: str, fields: dict[bytes, bytes], ttl_s: float) -> None:
        self.sink.submit_heartbeat_fields(model, worker, fields)

    async def leave(self, model: str, worker: str, ttl_s: float) -> None:
        self.sink.submit_heartbeat_fields(model, worker, {H_STATE: STATE_LEAVING.encode()})

    async def dump_requests(self, model: str, worker: str, timeout_s: float) -> list[DumpRequest]:
        return await self.sink.wait_dump_requests(model, worker, timeout_s)


def _blocks_of(ev: KvEvent) -> int:
    if isinstance(ev, BlockStored | BlockRemoved):
        return len(ev.hashes)
    return 1


class EventPublisher:
    """Publishes one worker's KV events, heartbeats and load reports.

    `publish()` and `report_load()` may be called from any thread; everything else
    runs on the event loop `start()` was awaited on. `dump` is the adapter's
    callback returning the engine's current block set as events (BlockStored with
    parents before children); it is called on the event loop.
    """

    def __init__(
        self,
        transport: PublisherTransport,
        model: str,
        worker: str,
        *,
        block_size: int = 0,
        role: str = "aggregated",
        address: str = "",
        dump: DumpCallback | None = None,
        max_blocks_per_entry: int = 1024,
        max_entries_per_write: int = 256,
        max_buffer_events: int = 200_000,
        heartbeat_ttl_s: float = 3.0,
        heartbeat_interval_s: float | None = None,
        load_interval_s: float = 0.25,
        retry_backoff_max_s: float = 1.0,
        extra_meta: dict[str, str] | None = None,
    ) -> None:
        check_name("model", model)
        check_name("worker", worker)
        if max_buffer_events <= 0 or max_blocks_per_entry <= 0 or max_entries_per_write <= 0:
            raise ValueError("publisher bounds must be > 0")
        if heartbeat_ttl_s <= 0:
            raise ValueError("heartbeat_ttl_s must be > 0")
        self.transport = transport
        self.model = model
        self.worker = worker
        self.block_size = block_size
        self.role = role
        self.address = address
        self.dump = dump
        self.max_blocks_per_entry = max_blocks_per_entry
        self.max_entries_per_write = max_entries_per_write
        self.max_buffer_events = max_buffer_events
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.heartbeat_interval_s = heartbeat_interval_s or heartbeat_ttl_s / 3
        self.load_interval_s = load_interval_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.extra_meta = dict(extra_meta or {})

        self._lock = threading.Lock()
        self._pending: list[KvEvent] = []
        self._pending_t = 0.0
        self._outbox: deque[OutEntry] = deque()
        self._outbox_events = 0
        self._outbox_gen = 0  # bumped whenever the outbox is discarded
        self._resync_reason: str | None = "start"
        self.epoch = ""
        self._next_seq = 0
        self.acked_epoch = ""
        self.acked_seq = -1
        self._load: LoadReport | None = None
        self._load_dirty = False
        self._last_load_sent = 0.0
        self._next_beat = 0.0
        self._suspended = False
        self._left = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake: asyncio.Event | None = None
        self._beat_now: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._down_since: float | None = None
        self.stats = PublisherStats()

    # any thread --------------------------------------------------------------------
    def publish(self, events: Iterable[KvEvent]) -> None:
        evs = list(events)
        if not evs:
            return
        with self._lock:
            if self._resync_reason is not None and self._resync_reason != "start":
                # A resync is due: its dump will contain the effect of these events.
                self.stats.dropped_events += len(evs)
                m.PUB_DROPPED.inc(len(evs))
                return
            if not self._pending:
                self._pending_t = time.time()
            self._pending.extend(evs)
            self.stats.events += len(evs)
            if len(self._pending) + self._outbox_events > self.max_buffer_events:
                self._overflow_locked()
        m.PUB_EVENTS.inc(len(evs))
        self._signal()

    def report_load(self, report: LoadReport) -> None:
        """Send this load report with the next heartbeat, early: as soon as the rate cap
        (`load_interval_s` since the last report sent) allows."""
        with self._lock:
            self._load = report
            self._load_dirty = True
        self._signal(beat=True)

    def request_resync(self, reason: str) -> None:
        """Start a new epoch whose first entries are the adapter's dump (or just
        AllCleared without one): for adapters that can no longer vouch for the
        events published so far (engine restart, engine events lost)."""
        with self._lock:
            self._resync_reason = reason or "requested"
        self._signal()

    def suspend(self) -> None:
        """The engine behind this worker is down: tell routers it is leaving (they drop
        it and its blocks at once) and stop heartbeating until `resume()`. Events
        still flow; an adapter resuming after a suspension should `request_resync`."""
        self._suspended = True
        self._signal(beat=True)

    def resume(self) -> None:
        """Heartbeat again (at once) after `suspend()`."""
        self._suspended = False
        self._next_beat = 0.0
        self._signal(beat=True)

    @property
    def suspended(self) -> bool:
        return self._suspended

    def _overflow_locked(self) -> None:
        dropped = len(self._pending) + self._outbox_events
        self._pending = []
        self._outbox.clear()
        self._outbox_gen += 1
        self._outbox_events = 0
        self._resync_reason = "overflow"
        self.stats.dropped_events += dropped
        m.PUB_DROPPED.inc(dropped)
        log.warning("publisher buffer overflow, dropping and resyncing: model=%s worker=%s "
                    "dropped_events=%d", self.model, self.worker, dropped)

    def _signal(self, beat: bool = False) -> None:
        loop = self._loop
        if loop is None:
            return
        ev = self._beat_now if beat else self._wake
        if ev is None:
            return
        if threading.get_ident() == self._loop_thread:
            ev.set()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(ev.set)

    @property
    def buffered_events(self) -> int:
        return len(self._pending) + self._outbox_events

    # lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._running = True
        self._wake.set()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name=f"kv-publish-{self.worker}"),
            asyncio.create_task(self._beat_loop(), name=f"kv-heartbeat-{self.worker}"),
            asyncio.create_task(self._dump_loop(), name=f"kv-dumps-{self.worker}"),
        ]

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything published so far is written (True) or the timeout."""
        deadline = time.monotonic() + timeout_s
        self._signal()
        while time.monotonic() < deadline:
            if not self._pending and not self._outbox and self._resync_reason is None:
                return True
            await asyncio.sleep(0.002)
        return False

    async def stop(self, leave: bool = True, flush_timeout_s: float = 2.0) -> None:
        """Flush, tell routers this worker is leaving (they drop it at once), stop."""
        if not self._running:
            return
        await self.flush(flush_timeout_s)
        self._running = False
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if leave:
            with contextlib.suppress(TransportUnavailable):
                await self.transport.leave(self.model, self.worker, self.heartbeat_ttl_s)
        await self.transport.close()

    async def kill(self) -> None:
        """Stop without flushing or leaving, as a crashed worker would (tests)."""
        self._running = False
        await cancel_and_wait(self._tasks)
        self._tasks = []
        await self.transport.close()

    # loops -------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        assert self._wake is not None
        delays = Backoff(0.01, self.retry_backoff_max_s)
        while self._running:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self._resync_reason is not None:
                    await self._resync()
                self._encode_pending()
                while self._outbox:
                    n = min(len(self._outbox), self.max_entries_per_write)
                    chunk = [self._outbox[i] for i in range(n)]
                    gen = self._outbox_gen
                    await self.transport.send(self.model, self.worker, chunk)
                    with self._lock:
                        if gen == self._outbox_gen:
                            for _ in chunk:
                                e = self._outbox.popleft()
                                self._outbox_events -= e.events
                    self.acked_epoch, self.acked_seq = chunk[-1].epoch, chunk[-1].seq
                    self.stats.entries += len(chunk)
                    m.PUB_ENTRIES.inc(len(chunk))
                    self._encode_pending()
                if self._down_since is not None:
                    log.info("publisher reconnected: model=%s worker=%s down_s=%.1f", self.model,
                             self.worker, time.monotonic() - self._down_since)
                    self._down_since = None
                delays.reset()
            except TransportUnavailable as exc:
                self.stats.send_errors += 1
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("publisher cannot write, buffering: model=%s worker=%s error=%s",
                                self.model, self.worker, exc)
                await delays.wait()
                self._wake.set()
            m.PUB_BUFFERED.set(self.buffered_events)

    def _encode_pending(self) -> None:
        with self._lock:
            if not self._pending:
                return
            events, t = self._pending, self._pending_t
            self._pending = []
        chunks = _chunk(events, self.max_blocks_per_entry)
        out = []
        for chunk in chunks:
            out.append(OutEntry(self.epoch, self._next_seq, encode_payload(chunk), t, "", len(chunk)))
            self._next_seq += 1
        with self._lock:
            if self._resync_reason is not None and self._resync_reason != "start":
                return  # overflowed meanwhile: these are covered by the resync
            self._outbox.extend(out)
            self._outbox_events += len(events)

    async def _resync(self) -> None:
        """Start a new epoch whose first entries carry the engine's whole block set."""
        reason = self._resync_reason or "requested"
        events: list[KvEvent] = []
        if self.dump is not None:
            result = self.dump()
            if inspect.isawaitable(result):
                result = await result
            events = list(result)
        new_epoch = uuid.uuid4().hex[:16]
        entries = []
        seq = 0
        kind = KIND_DUMP if self.dump is not None else ""
        chunks = _chunk(events, self.max_blocks_per_entry) or [[]]
        now = time.time()
        for i, chunk in enumerate(chunks):
            body: list[KvEvent] = [AllCleared(), *chunk] if i == 0 else chunk
            entries.append(OutEntry(new_epoch, seq, encode_payload(body), now, kind, 0))
            seq += 1
        with self._lock:
            # The dump reflects every event published before it was taken (the adapter
            # publishes on this loop), so the old buffer is obsolete. Without a dump the
            # events published before start() follow the epoch's AllCleared.
            if self.dump is not None or reason != "start":
                self._pending = []
            self._outbox.clear()
            self._outbox_gen += 1
            self._outbox_events = 0
            self._outbox.extend(entries)
            self.epoch = new_epoch
            self._next_seq = seq
            self._resync_reason = None
        if reason != "start":
            self.stats.resyncs += 1
            m.PUB_RESYNCS.labels(reason).inc()
        if self.dump is not None:
            self.stats.dumps += 1
        log.debug("publisher new epoch: model=%s worker=%s epoch=%s reason=%s dump_events=%d",
                  self.model, self.worker, new_epoch, reason, len(events))

    def _heartbeat_fields(self) -> dict[bytes, bytes]:
        meta: dict[str, Any] = {
            "role": self.role, "address": self.address, "block_size": self.block_size,
            "epoch": self.acked_epoch, "seq": self.acked_seq,
            "host": socket.gethostname(), "pid": os.getpid(),
        }
        if self.extra_meta:
            meta["extra"] = self.extra_meta
        fields = {H_META: encode_meta(meta), H_STATE: STATE_UP.encode()}
        with self._lock:
            load, self._load_dirty = self._load, False
        if load is not None:
            fields[H_LOAD] = encode_load(load)
        return fields

    async def _beat_loop(self) -> None:
        assert self._beat_now is not None
        while self._running:
            # Cleared before the state is read: a signal from now on wakes the wait below.
            self._beat_now.clear()
            now = time.monotonic()
            if self._suspended:
                if not self._left:
                    try:
                        await self.transport.leave(self.model, self.worker, self.heartbeat_ttl_s)
                        self._left = True
                        log.debug("publisher suspended, left: worker=%s", self.worker)
                    except TransportUnavailable as exc:  # retried; the heartbeat lapses anyway
                        log.debug("leave failed: worker=%s error=%s", self.worker, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._beat_now.wait(), self.heartbeat_interval_s)
                continue
            self._left = False
            # A load report waiting for the rate cap goes out when the cap allows, not
            # a whole heartbeat interval later (the engine may be idle by then).
            load_due = self._last_load_sent + self.load_interval_s
            if now >= self._next_beat or (self._load_dirty and now >= load_due):
                try:
                    await self.transport.beat(self.model, self.worker, self._heartbeat_fields(),
                                              self.heartbeat_ttl_s)
                except TransportUnavailable as exc:
                    log.debug("heartbeat failed: worker=%s error=%s", self.worker, exc)
                # Attempts, failed ones too, count against the rate cap: no hot retry loop.
                self._last_load_sent = time.monotonic()
                self._next_beat = self._last_load_sent + self.heartbeat_interval_s
                continue
            wake = min(self._next_beat, load_due) if self._load_dirty else self._next_beat
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), max(0.0, wake - now))

    async def _dump_loop(self) -> None:
        while self._running:
            try:
                reqs = await self.transport.dump_requests(self.model, self.worker,
                                                          self.heartbeat_interval_s)
            except TransportUnavailable:
                await asyncio.sleep(self.heartbeat_interval_s)
                continue
            # Coalesce: one dump answers every request for the current epoch; a request
            # for an older epoch is already answered by the epoch that replaced it.
            if any(not r.epoch or r.epoch == self.epoch for r in reqs):
                with self._lock:
                    if self._resync_reason is None:
                        self._resync_reason = "dump requested"
                self._signal()
                log.debug("dump requested: worker=%s by=%s", self.worker,
                          ",".join(sorted({r.replica for r in reqs})))


def _chunk(events: list[KvEvent], max_blocks: int) -> list[list[KvEvent]]:
    """Split events into entries of about max_blocks blocks, keeping their order."""
    out: list[list[KvEvent]] = []
    cur: list[KvEvent] = []
    n = 0
    for ev in events:
        b = _blocks_of(ev)
        if cur and n + b > max_blocks:
            out.append(cur)
            cur, n = [], 0
        cur.append(ev)
        n += b
    if cur:
        out.append(cur)
    return out


def redis_publisher(
    redis: str | RedisConfig,
    model: str,
    worker: str,
    *,
    namespace: str = "kvrouter",
    num_shards: int = 1,
    max_stream_len: int | None = 1_000_000,
    client: RedisClient | None = None,
    **opts: Any,
) -> EventPublisher:
    """A publisher writing to Redis (owning its client unless one is given); options
    named like RedisConfig fields configure the connection, the rest the publisher."""
    owns = client is None
    redis_opts = {k: opts.pop(k) for k in list(opts) if k in REDIS_OPTION_NAMES}
    if client is None:
        cfg = redis if isinstance(redis, RedisConfig) else RedisConfig.from_options(redis, **redis_opts)
        client = make_client(cfg)
    # The worker's event key from KVROUTER_EVENT_KEY(_FILE) unless given (signing.py).
    signer = opts.pop("signer", None) or Signer.from_env()
    transport = RedisTransport(client, Keys(namespace), num_shards, max_stream_len, owns_client=owns,
                               sign=worker_sign_fn(signer))
    return EventPublisher(transport, model, worker, **opts)
