"""The event plane: how a router learns what every worker caches and how loaded it is.

`make_event_plane(registry, redis_url, **opts)` returns
- `InProcessPlane` when redis_url is None: the embedded default for one process
  (demo, simulator, pure-logic tests). Publishers in the same process and the gRPC
  PublishEvents RPC (through `submit`) deliver straight into it.
- `RedisPlane` otherwise: XREAD ingest of every shard stream, heartbeat liveness,
  gap repair (stream re-read or full dump), periodic snapshots with stream
  trimming, and reservations shared with the other router replicas.
See docs/event-plane.md for the protocol and the consistency model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from redis.exceptions import RedisError

from kvrouter.events import metrics as m
from kvrouter.events import reservations as resv
from kvrouter.events import snapshots as snaps
from kvrouter.events.ingest import IngestCore
from kvrouter.events.keys import Keys, check_name, shard_of
from kvrouter.events.model import LoadReport
from kvrouter.events.publisher import (
    EventPublisher,
    InProcessTransport,
    RedisTransport,
)
from kvrouter.events.redis_conn import RedisClient, RedisConfig, make_client, raw_stream_client
from kvrouter.events.tasks import cancel_and_wait
from kvrouter.events.wire import (
    H_BEAT,
    H_LOAD,
    H_META,
    H_STATE,
    MAX_EPOCH_LEN,
    MAX_SEQ,
    STATE_LEAVING,
    STATE_UP,
    DumpRequest,
    Entry,
    encode_load,
    encode_meta,
    entry_fields,
    parse_entry,
    parse_heartbeat,
)
from kvrouter.registry import Registry

log = logging.getLogger("kvrouter.events.plane")


@dataclasses.dataclass
class PlaneOptions:
    namespace: str = "kvrouter"
    replica_id: str | None = None
    num_shards: int = 1
    heartbeat_ttl_s: float = 3.0
    liveness_interval_s: float | None = None
    """Default: a sixth of the TTL, at most 0.5 s."""
    dump_timeout_s: float = 5.0
    max_payload_bytes: int = 64 << 20
    xread_count: int = 4096
    xread_block_ms: int = 500
    max_repair_scan: int = 1_000_000
    snapshot_interval_s: float = 30.0
    """0 disables snapshots (and trimming)."""
    snapshot_ttl_s: float | None = None
    """Default: max(3 intervals, 60 s)."""
    snapshot_min_retention_s: float = 10.0
    load_snapshot: bool = True
    reservation_interval_s: float = 0.2
    reservation_ttl_s: float | None = None
    """Default: 10 intervals, at least 1 s."""
    max_stream_len: int | None = 1_000_000
    max_submit_backlog: int = 100_000
    start_timeout_s: float = 5.0
    lag_sink: list[float] | None = None

    def __post_init__(self) -> None:
        check_name("namespace", self.namespace)
        if self.replica_id is None:
            self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        check_name("replica", self.replica_id)
        if not 1 <= self.num_shards <= 1024:
            raise ValueError(f"num_shards must be 1..1024, got {self.num_shards}")
        if self.heartbeat_ttl_s <= 0:
            raise ValueError("heartbeat_ttl_s must be > 0")
        if self.liveness_interval_s is None:
            self.liveness_interval_s = min(0.5, self.heartbeat_ttl_s / 6)
        if self.snapshot_ttl_s is None:
            self.snapshot_ttl_s = max(3 * self.snapshot_interval_s, 60.0)
        if self.reservation_ttl_s is None:
            self.reservation_ttl_s = max(10 * self.reservation_interval_s, 1.0)


class EventPlane(ABC):
    """Common interface of the in-process and Redis planes."""

    def __init__(self, registry: Registry, opts: PlaneOptions) -> None:
        self.registry = registry
        self.opts = opts
        self.replica_id: str = opts.replica_id or ""
        self.core = IngestCore(registry, None, liveness_ttl_s=opts.heartbeat_ttl_s,
                               events_confirm_liveness=isinstance(self, InProcessPlane),
                               dump_timeout_s=opts.dump_timeout_s,
                               max_payload_bytes=opts.max_payload_bytes, lag_sink=opts.lag_sink)
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._beats: dict[tuple[str, str], int] = {}

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def submit(self, model: str, worker: str, epoch: str, seq: int, payload: bytes, *,
               t: float | None = None, kind: str = "") -> None:
        """Accept one batch of a worker's events (the PublishEvents RPC calls this).
        Raises UnknownModel or ValueError on bad input, changing nothing."""

    @abstractmethod
    def submit_heartbeat_fields(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None: ...

    @abstractmethod
    def publisher(self, model: str, worker: str, **opts: Any) -> EventPublisher:
        """A publisher for a worker living in this process."""

    def submit_load(self, model: str, worker: str, report: LoadReport) -> None:
        """A worker's own load report (also proof that it is alive)."""
        self._check(model, worker)
        for v in (report.running, report.queued, report.kv_used_blocks, report.kv_free_blocks,
                  report.queued_prefill_tokens):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"load report fields must be non-negative ints, got {report!r}")
        self.submit_heartbeat_fields(model, worker, {H_LOAD: encode_load(report)})

    def submit_heartbeat(self, model: str, worker: str, *, role: str = "aggregated",
                         address: str = "", block_size: int = 0, epoch: str = "", seq: int = -1,
                         load: LoadReport | None = None, leaving: bool = False) -> None:
        """Heartbeat of a worker that talks to the router over gRPC instead of Redis."""
        self._check(model, worker)
        meta = {"role": role, "address": address, "block_size": block_size, "epoch": epoch, "seq": seq}
        fields = {H_META: encode_meta(meta), H_STATE: (STATE_LEAVING if leaving else STATE_UP).encode()}
        if load is not None:
            fields[H_LOAD] = encode_load(load)
        self.submit_heartbeat_fields(model, worker, fields)

    def _check(self, model: str, worker: str) -> None:
        self.registry.model(model)  # UnknownModel
        check_name("worker", worker)

    def _check_submit(self, model: str, worker: str, epoch: str, seq: int, payload: bytes) -> None:
        self._check(model, worker)
        if not isinstance(epoch, str) or not epoch or len(epoch.encode()) > MAX_EPOCH_LEN:
            raise ValueError(f"epoch must be a non-empty string of at most {MAX_EPOCH_LEN} bytes")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
            raise ValueError(f"seq must be an integer in 0..2^63-1, got {seq!r}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValueError("payload must be bytes")
        if len(payload) > self.opts.max_payload_bytes:
            raise ValueError(f"payload of {len(payload)} bytes exceeds the limit of "
                             f"{self.opts.max_payload_bytes}")

    def stats(self) -> dict[str, Any]:
        d = self.core.stats.as_dict()
        d["workers_tracked"] = len(self.core.tracks)
        return d


# ------------------------------------------------------------------------------------
# In-process plane


class _InProcessRepair:
    def __init__(self, plane: InProcessPlane) -> None:
        self.plane = plane

    async def read_range(self, model: str, stream: str, after: bytes | None,
                         before: bytes | None) -> list[Entry] | None:
        return None  # no history kept: a gap always asks for a dump

    async def request_dump(self, model: str, worker: str, epoch: str, reason: str) -> None:
        self.plane._dump_queue(model, worker).put_nowait(
            DumpRequest(self.plane.replica_id, epoch, reason, time.time()))


class InProcessPlane(EventPlane):
    def __init__(self, registry: Registry, opts: PlaneOptions) -> None:
        super().__init__(registry, opts)
        self.core.repairer = _InProcessRepair(self)
        self._queue: deque[tuple[str, Any]] = deque()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dumps: dict[tuple[str, str], asyncio.Queue[DumpRequest]] = {}
        self._last_fields: dict[tuple[str, str], dict[bytes, bytes]] = {}

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._apply_loop(), name="kv-inprocess-apply"),
                       asyncio.create_task(self._liveness_loop(), name="kv-inprocess-liveness")]

    async def stop(self) -> None:
        self._running = False
        await cancel_and_wait(self._tasks)
        self._tasks = []

    def _enqueue(self, model: str, item: Any) -> None:
        self._queue.append((model, item))
        if self._wake is not None and self._loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._loop:
                self._wake.set()
            else:
                self._loop.call_soon_threadsafe(self._wake.set)

    def submit(self, model: str, worker: str, epoch: str, seq: int, payload: bytes, *,
               t: float | None = None, kind: str = "") -> None:
        self._check_submit(model, worker, epoch, seq, payload)
        self._enqueue(model, Entry(model, "", b"", worker, epoch, seq, bytes(payload),
                                   time.time() if t is None else t, kind))

    def submit_heartbeat_fields(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None:
        self._check(model, worker)
        key = (model, worker)
        self._beats[key] = self._beats.get(key, 0) + 1
        merged = dict(fields)
        merged[H_BEAT] = str(self._beats[key]).encode()
        self._enqueue(model, (worker, merged))

    async def _apply_loop(self) -> None:
        assert self._wake is not None
        while self._running:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                model, item = self._queue.popleft()
                if isinstance(item, Entry):
                    entries = [item]
                    # Group consecutive entries of one model into one batched apply.
                    while self._queue and self._queue[0][0] == model and isinstance(self._queue[0][1], Entry):
                        entries.append(self._queue.popleft()[1])
                        if len(entries) >= 4096:
                            break
                    try:
                        await self.core.ingest_entries(model, entries)
                    except Exception:
                        log.exception("in-process apply failed: model=%s", model)
                else:
                    worker, fields = item
                    await self._observe(model, worker, fields)
            self.core.read_generation += 1

    async def _observe(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None:
        prev = self._last_fields.get((model, worker), {})
        merged = {**prev, **fields}
        self._last_fields[(model, worker)] = merged
        try:
            hb = parse_heartbeat(worker, merged)
        except ValueError as exc:
            log.warning("%s", exc)
            return
        try:
            await self.core.observe_heartbeat(model, hb)
        except Exception:
            log.exception("heartbeat handling failed: model=%s worker=%s", model, worker)
        if hb.state == STATE_LEAVING:
            self._last_fields.pop((model, worker), None)

    async def _liveness_loop(self) -> None:
        interval = self.opts.liveness_interval_s or 0.5
        while self._running:
            await asyncio.sleep(interval)
            try:
                for name in await self.core.remove_lapsed():
                    log.info("worker lapsed: worker=%s", name)
                    for key in [k for k in self._last_fields if k[1] == name]:
                        self._last_fields.pop(key, None)
                await self.core.retry_dumps()
            except Exception:
                log.exception("in-process liveness round failed")

    def _dump_queue(self, model: str, worker: str) -> asyncio.Queue[DumpRequest]:
        q = self._dumps.get((model, worker))
        if q is None:
            q = self._dumps[(model, worker)] = asyncio.Queue()
        return q

    async def wait_dump_requests(self, model: str, worker: str, timeout_s: float) -> list[DumpRequest]:
        q = self._dump_queue(model, worker)
        try:
            first = await asyncio.wait_for(q.get(), timeout_s)
        except TimeoutError:
            return []
        out = [first]
        while not q.empty():
            out.append(q.get_nowait())
        return out

    def take_dump_requests(self, model: str, worker: str) -> list[DumpRequest]:
        """Pending dump requests for a worker that is not attached by a publisher
        (the gRPC server can return them in its PublishEvents reply)."""
        q = self._dumps.get((model, worker))
        out: list[DumpRequest] = []
        while q is not None and not q.empty():
            out.append(q.get_nowait())
        return out

    def publisher(self, model: str, worker: str, **opts: Any) -> EventPublisher:
        return EventPublisher(InProcessTransport(self), model, worker, **opts)


# ------------------------------------------------------------------------------------
# Redis plane

_REDIS_DOWN = (RedisError, OSError, asyncio.TimeoutError)


class _RedisRepair:
    def __init__(self, plane: RedisPlane) -> None:
        self.plane = plane

    async def read_range(self, model: str, stream: str, after: bytes | None,
                         before: bytes | None) -> list[Entry] | None:
        p = self.plane
        start = b"(" + after if after else b"-"
        end = b"(" + before if before else b"+"
        out: list[Entry] = []
        page = 2000
        scanned = 0
        while True:
            raw = await p.stream_client.execute_command("XRANGE", stream, start, end, "COUNT", page)
            for eid, fields in raw or ():
                e = parse_entry(model, stream, eid, fields, p.opts.max_payload_bytes)
                if isinstance(e, Entry):
                    out.append(e)
            scanned += len(raw or ())
            if not raw or len(raw) < page:
                return out
            if scanned >= p.opts.max_repair_scan:
                return None
            start = b"(" + bytes(raw[-1][0])

    async def request_dump(self, model: str, worker: str, epoch: str, reason: str) -> None:
        p = self.plane
        key = p.keys.dump_requests(model, worker)
        req = DumpRequest(p.replica_id, epoch, reason, time.time())
        pipe = p.client.pipeline(transaction=False)
        pipe.rpush(key, req.encode())
        pipe.pexpire(key, 60_000)
        await pipe.execute()


class RedisPlane(EventPlane):
    def __init__(self, registry: Registry, config: RedisConfig, opts: PlaneOptions) -> None:
        super().__init__(registry, opts)
        self.config = config
        self.keys = Keys(opts.namespace)
        self.core.repairer = _RedisRepair(self)
        self.core.stream_for = lambda model, w: self.keys.stream(model, shard_of(w, opts.num_shards))
        self.client: RedisClient = None  # type: ignore[assignment]
        self.stream_client: RedisClient = None  # type: ignore[assignment]
        self.markers: dict[str, bytes] = {}
        self.snapshot_loaded: dict[str, str] = {}
        self._down = False
        self._missing_hb: dict[tuple[str, str], float] = {}
        self._submits: deque[tuple[str, str, dict[bytes, bytes]]] = deque()
        self._submit_wake: asyncio.Event | None = None
        self._hb_writes: set[asyncio.Task[None]] = set()
        self.snapshots_written = 0

    # streams ----------------------------------------------------------------------
    def streams(self) -> dict[str, str]:
        """stream key -> model, for every registered model."""
        out = {}
        for model in list(self.registry.models):
            for s in self.keys.streams(model, self.opts.num_shards):
                out[s] = model
        return out

    async def check_markers(self) -> None:
        """Detect Redis data loss: each stream has a marker key holding a random token;
        a missing or different token means the stream's history is gone."""
        streams = list(self.streams())
        if not streams:
            return
        markers = {s: self._marker_key(s) for s in streams}
        pipe = self.client.pipeline(transaction=False)
        for s in streams:
            pipe.set(markers[s], uuid.uuid4().hex.encode(), nx=True)
            pipe.get(markers[s])
        res = await pipe.execute()
        for i, s in enumerate(streams):
            tok = res[2 * i + 1]
            if tok is None:
                continue
            known = self.markers.get(s)
            if known is not None and known != tok:
                log.warning("Redis lost the stream's data (marker changed); re-reading it and "
                            "resyncing workers whose events are missing: stream=%s", s)
                async with self.core.lock:
                    self.core.stream_lost(s)
            self.markers[s] = tok

    def _marker_key(self, stream: str) -> str:
        # stream = ns:kv:model:{tag}  -> ns:kvgen:model:{tag}
        head, _, rest = stream.partition(":kv:")
        return f"{head}:kvgen:{rest}"

    # lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        self.client = make_client(self.config)
        self.stream_client = raw_stream_client(self.config)
        self._running = True
        self._submit_wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._initial_sync(), self.opts.start_timeout_s)
        except (*_REDIS_DOWN, TimeoutError) as exc:
            self._down = True
            log.error("Redis not reachable at start, continuing and retrying: url=%s error=%r",
                      self.config.redacted_url(), exc)
        self._tasks = [
            asyncio.create_task(self._reader_supervisor(), name="kv-redis-readers"),
            asyncio.create_task(self._liveness_loop(), name="kv-redis-liveness"),
            asyncio.create_task(self._submit_loop(), name="kv-redis-submit"),
            asyncio.create_task(self._reservation_loop(), name="kv-redis-reservations"),
        ]
        if self.opts.snapshot_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="kv-redis-snapshots"))

    async def _initial_sync(self) -> None:
        await self.check_markers()
        if self.opts.load_snapshot:
            self.snapshot_loaded = await snaps.load_newest(
                self.client, self.keys, self.core, list(self.registry.models), self.markers)
        await self._liveness_round()

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        await cancel_and_wait(self._tasks)
        self._tasks = []
        with contextlib.suppress(*_REDIS_DOWN):
            await asyncio.wait_for(self._drain_submits(), 2.0)
        with contextlib.suppress(*_REDIS_DOWN):
            await resv.withdraw(self.client, self.keys, list(self.registry.models), self.replica_id)
        for c in (self.client, self.stream_client):
            with contextlib.suppress(Exception):
                await c.aclose()

    # reading ------------------------------------------------------------------------
    async def _reader_supervisor(self) -> None:
        if not self.config.is_cluster:
            await self._reader(None)
            return
        # Cluster: XREAD cannot span slots, so one reader per stream.
        readers: dict[str, asyncio.Task[None]] = {}
        try:
            while self._running:
                for s in self.streams():
                    if s not in readers:
                        readers[s] = asyncio.create_task(self._reader(s), name=f"kv-reader-{s}")
                await asyncio.sleep(1.0)
        finally:
            for t in readers.values():
                t.cancel()

    async def _reader(self, only: str | None) -> None:
        backoff = 0.05
        core = self.core
        while self._running:
            streams = self.streams()
            if only is not None:
                streams = {only: streams[only]} if only in streams else {}
            if not streams:
                await asyncio.sleep(0.2)
                continue
            keys = list(streams)
            ids = [core.positions.get(s, b"0") for s in keys]
            try:
                resp = await self.stream_client.execute_command(
                    "XREAD", "COUNT", self.opts.xread_count, "BLOCK", self.opts.xread_block_ms,
                    "STREAMS", *keys, *ids)
            except asyncio.CancelledError:
                raise
            except _REDIS_DOWN as exc:
                m.REDIS_ERRORS.labels("reader").inc()
                await self._outage("reader", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                await self._recover()
                continue
            backoff = 0.05
            full = False
            for stream, entries in _xread_items(resp):
                name = stream.decode() if isinstance(stream, bytes) else str(stream)
                if len(entries) >= self.opts.xread_count:
                    full = True
                try:
                    await core.ingest_raw(streams.get(name, ""), name, entries)
                except Exception:
                    log.exception("ingest of a stream batch failed: stream=%s", name)
                    if entries:
                        core.positions[name] = bytes(entries[-1][0])
            if not full:
                core.read_generation += 1

    async def _outage(self, component: str, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            log.warning("Redis unreachable, retrying: component=%s error=%r", component, exc)

    async def _recover(self) -> None:
        """After an outage: check for data loss, then resume (liveness gets a grace)."""
        try:
            await self.check_markers()
        except _REDIS_DOWN:
            return
        if self._down:
            self._down = False
            self.core.grace()
            log.warning("Redis reachable again")

    # liveness ---------------------------------------------------------------------------
    async def _liveness_round(self) -> None:
        now = time.monotonic()
        for model in list(self.registry.models):
            members: Any = await self.client.smembers(self.keys.workers(model))
            names = sorted(x.decode() for x in members)
            if not names:
                continue
            pipe = self.client.pipeline(transaction=False)
            for w in names:
                pipe.hgetall(self.keys.heartbeat(model, w))
            hashes = await pipe.execute()
            prune = []
            for w, h in zip(names, hashes, strict=True):
                if not h:
                    since = self._missing_hb.setdefault((model, w), now)
                    if now - since > 10 * self.opts.heartbeat_ttl_s:
                        prune.append(w)
                    continue
                self._missing_hb.pop((model, w), None)
                try:
                    hb = parse_heartbeat(w, h)
                except ValueError as exc:
                    log.debug("%s", exc)
                    continue
                await self.core.observe_heartbeat(model, hb)
            if prune:
                await self.client.srem(self.keys.workers(model), *prune)
                for w in prune:
                    self._missing_hb.pop((model, w), None)

    async def _liveness_loop(self) -> None:
        interval = self.opts.liveness_interval_s or 0.5
        while self._running:
            await asyncio.sleep(interval)
            try:
                await self.check_markers()
                if self._down:
                    await self._recover()
                await self._liveness_round()
            except asyncio.CancelledError:
                raise
            except _REDIS_DOWN as exc:
                m.REDIS_ERRORS.labels("liveness").inc()
                await self._outage("liveness", exc)
                continue  # no news from Redis is no news about workers: nobody lapses
            except Exception:
                log.exception("liveness round failed")
                continue
            try:
                for name in await self.core.remove_lapsed():
                    log.info("worker lapsed: worker=%s", name)
                await self.core.retry_dumps()
            except Exception:
                log.exception("lapse handling failed")
            for model, n in self.core.live_counts().items():
                m.WORKERS_LIVE.labels(model).set(n)

    # snapshots ---------------------------------------------------------------------------
    async def write_snapshots(self) -> int:
        """Snapshot every model now and trim the streams; returns bytes written."""
        total = 0
        ttl = self.opts.snapshot_ttl_s or 60.0
        for model in list(self.registry.models):
            streams = self.keys.streams(model, self.opts.num_shards)
            data, info = await snaps.capture(self.core, model, self.replica_id, streams, self.markers)
            await snaps.write(self.client, self.keys, data, info, ttl)
            total += len(data)
            await snaps.trim(self.client, self.keys, model, streams, self.markers,
                             self.opts.snapshot_min_retention_s)
        self.snapshots_written += 1
        return total

    async def _snapshot_loop(self) -> None:
        while self._running:
            await asyncio.sleep(self.opts.snapshot_interval_s)
            try:
                await self.write_snapshots()
            except asyncio.CancelledError:
                raise
            except _REDIS_DOWN as exc:
                m.REDIS_ERRORS.labels("snapshot").inc()
                log.debug("snapshot write failed: error=%r", exc)
            except Exception:
                log.exception("snapshot failed")

    # reservations ------------------------------------------------------------------------
    async def _reservation_loop(self) -> None:
        ttl = self.opts.reservation_ttl_s or 2.0
        while self._running:
            await asyncio.sleep(self.opts.reservation_interval_s)
            for model in list(self.registry.models):
                try:
                    await resv.sync_model(self.client, self.keys, self.registry, model,
                                          self.replica_id, ttl)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    m.RESERVATION_SYNC_ERRORS.inc()
                    log.debug("reservation sync failed: model=%s error=%r", model, exc)

    # submissions from gRPC ------------------------------------------------------------
    def submit(self, model: str, worker: str, epoch: str, seq: int, payload: bytes, *,
               t: float | None = None, kind: str = "") -> None:
        """Write a gRPC-delivered batch to the worker's stream, so every replica sees it."""
        self._check_submit(model, worker, epoch, seq, payload)
        if len(self._submits) >= self.opts.max_submit_backlog:
            raise ValueError("event backlog to Redis is full; retry later")
        stream = self.keys.stream(model, shard_of(worker, self.opts.num_shards))
        self._submits.append((stream, worker, entry_fields(worker, epoch, seq, bytes(payload), t, kind)))
        if self._submit_wake is not None:
            self._submit_wake.set()

    async def _drain_submits(self) -> None:
        while self._submits:
            batch = [self._submits[i] for i in range(min(len(self._submits), 512))]
            pipe = self.client.pipeline(transaction=False)
            for stream, _, fields in batch:
                pipe.xadd(stream, fields, maxlen=self.opts.max_stream_len,  # type: ignore[arg-type]
                          approximate=True)
            await pipe.execute()
            for _ in batch:
                self._submits.popleft()

    async def _submit_loop(self) -> None:
        assert self._submit_wake is not None
        backoff = 0.05
        while self._running:
            await self._submit_wake.wait()
            self._submit_wake.clear()
            try:
                await self._drain_submits()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except _REDIS_DOWN as exc:
                m.REDIS_ERRORS.labels("submit").inc()
                log.debug("submit write failed: error=%r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._submit_wake.set()

    def submit_heartbeat_fields(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None:
        self._check(model, worker)
        if H_LOAD in fields:
            # Our own scheduler sees the report at once; other replicas through Redis.
            try:
                hb = parse_heartbeat(worker, {H_LOAD: fields[H_LOAD]})
                info = self.registry.model(model).workers.get(worker)
                if info is None:
                    info = self.registry.upsert_worker(model, worker)
                if hb.load is not None:
                    self.registry.model(model).scheduler.report_load(
                        info.wid, hb.load.running, hb.load.queued, hb.load.kv_used_blocks,
                        hb.load.kv_free_blocks, hb.load.queued_prefill_tokens)
                self.core.touch(model, worker)
            except ValueError as exc:
                raise ValueError(f"bad load report: {exc}") from exc
        task = asyncio.get_running_loop().create_task(self._write_heartbeat(model, worker, fields))
        self._hb_writes.add(task)
        task.add_done_callback(self._hb_writes.discard)

    async def _write_heartbeat(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None:
        transport = RedisTransport(self.client, self.keys, self.opts.num_shards)
        try:
            await transport.beat(model, worker, fields, self.opts.heartbeat_ttl_s)
        except Exception as exc:
            log.debug("heartbeat write failed: worker=%s error=%r", worker, exc)

    def publisher(self, model: str, worker: str, **opts: Any) -> EventPublisher:
        """A publisher sharing this plane's Redis client (same-process workers)."""
        opts.setdefault("heartbeat_ttl_s", self.opts.heartbeat_ttl_s)
        transport = RedisTransport(self.client or make_client(self.config), self.keys,
                                   self.opts.num_shards, self.opts.max_stream_len,
                                   owns_client=self.client is None)
        return EventPublisher(transport, model, worker, **opts)

    def stats(self) -> dict[str, Any]:
        d = super().stats()
        d["snapshot_loaded"] = dict(self.snapshot_loaded)
        d["snapshots_written"] = self.snapshots_written
        d["redis_down"] = self._down
        return d


def _xread_items(resp: Any) -> list[tuple[Any, list[Any]]]:
    """XREAD reply as (stream, entries) pairs for RESP2 (list) and RESP3 (map)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        return list(resp.items())
    return [(item[0], item[1]) for item in resp]


# ------------------------------------------------------------------------------------

_REDIS_OPTION_NAMES = {f.name for f in dataclasses.fields(RedisConfig)} - {"url"}
_PLANE_OPTION_NAMES = {f.name for f in dataclasses.fields(PlaneOptions)}


def make_event_plane(registry: Registry, redis_url: str | None, **opts: Any) -> EventPlane:
    """The in-process plane (redis_url None) or the Redis plane.

    Keyword options are PlaneOptions fields (namespace, replica_id, num_shards,
    heartbeat_ttl_s, snapshot_interval_s, ...) and, with a URL, RedisConfig fields
    (username, password, tls_ca_file, sentinels, cluster, ...); `redis_config=`
    passes a whole RedisConfig. Unknown options raise ValueError.
    """
    redis_config = opts.pop("redis_config", None)
    unknown = sorted(set(opts) - _REDIS_OPTION_NAMES - _PLANE_OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown event plane option(s): {', '.join(unknown)}")
    plane_opts = PlaneOptions(**{k: v for k, v in opts.items() if k in _PLANE_OPTION_NAMES})
    redis_opts = {k: v for k, v in opts.items() if k in _REDIS_OPTION_NAMES}
    if redis_url is None and redis_config is None:
        if redis_opts:
            raise ValueError(f"Redis option(s) given without a Redis URL: {', '.join(sorted(redis_opts))}")
        return InProcessPlane(registry, plane_opts)
    if redis_config is None:
        assert redis_url is not None
        redis_config = RedisConfig.from_options(redis_url, **redis_opts)
    return RedisPlane(registry, redis_config, plane_opts)


async def state_summary(plane: EventPlane) -> dict[str, Any]:
    """Per worker: block count and a digest of its router hashes, plus plane stats.
    Used to compare indexes across processes (tests, ingest entry point)."""
    out: dict[str, Any] = {"replica": plane.replica_id, "stats": plane.stats(), "models": {}}
    async with plane.core.lock:
        for model, state in list(plane.registry.models.items()):
            workers = {}
            for w in list(state.workers.values()):
                hashes = await asyncio.to_thread(state.index.worker_router_hashes, w.wid)
                tr = plane.core.tracks.get((model, w.name))
                workers[w.name] = {
                    "wid": w.wid, "status": w.status.value, "blocks": len(hashes),
                    "digest": digest_router_hashes(h for h, _ in hashes),
                    "epoch": tr.epoch if tr else None, "seq": tr.seq if tr else None,
                }
            out["models"][model] = workers
    return out


def digest_router_hashes(hashes: Any) -> str:
    """Order-independent digest of a set of router hashes."""
    h = hashlib.blake2b(digest_size=16)
    for x in sorted(set(hashes)):
        h.update(int(x).to_bytes(8, "little"))
    return h.hexdigest()
