"""The Redis event plane: XREAD ingest of every shard stream, heartbeat liveness,
gap repair (stream re-read or full dump), periodic snapshots with stream trimming,
and reservations shared with the other router replicas. See docs/event-plane.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from typing import Any

from redis.exceptions import RedisError

from kvrouter.events import metrics as m
from kvrouter.events import reservations as resv
from kvrouter.events import snapshots as snaps
from kvrouter.events.keys import Keys, shard_of
from kvrouter.events.plane_base import EventPlane, PlaneOptions
from kvrouter.events.publisher import EventPublisher, RedisTransport
from kvrouter.events.redis_conn import RedisClient, RedisConfig, make_client, raw_stream_client
from kvrouter.events.tasks import cancel_and_wait
from kvrouter.events.wire import (
    F_SIG,
    H_LOAD,
    DumpRequest,
    Entry,
    entry_fields,
    entry_signed_parts,
    parse_entry,
    parse_heartbeat,
    verify_heartbeat,
)
from kvrouter.registry import Registry
from kvrouter.retry import Backoff
from kvrouter.security.signing import SigningError, WorkerKeys

log = logging.getLogger("kvrouter.events.redis_plane")

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
                e = parse_entry(model, stream, eid, fields, p.opts.max_payload_bytes,
                                p.core.entry_verifier)
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
        # Signed events: entries and heartbeats are checked against the worker's key; what
        # this router writes for gRPC-authenticated workers it signs with the same key.
        self.worker_keys: WorkerKeys | None = None
        if opts.signing_secret_file:
            try:
                self.worker_keys = WorkerKeys.from_file(opts.signing_secret_file,
                                                        require=opts.require_signed)
            except SigningError as e:
                raise ValueError(str(e)) from None
            self.core.entry_verifier = self.worker_keys.check
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
        markers = {self.keys.stream(model, shard): self.keys.stream_marker(model, shard)
                   for model in list(self.registry.models) for shard in range(self.opts.num_shards)}
        if not markers:
            return
        streams = list(markers)
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
        delays = Backoff(0.05, 2.0)
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
                await delays.wait()
                await self._recover()
                continue
            delays.reset()
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
                    if self.worker_keys is not None:
                        checked = verify_heartbeat(h, model, w, self.worker_keys.check)
                        if isinstance(checked, str):
                            raise ValueError(f"heartbeat of worker {w!r} rejected: {checked}")
                        h = checked
                    hb = parse_heartbeat(w, h)
                    # The registry refuses what breaks its limits (name, metadata): one such
                    # hash must not end the round for the workers after it.
                    await self.core.observe_heartbeat(model, hb)
                except ValueError as exc:
                    log.debug("%s", exc)
                    continue
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
        fields = entry_fields(worker, epoch, seq, bytes(payload), t, kind)
        if self.worker_keys is not None:  # the worker authenticated over gRPC
            fields[F_SIG] = self.worker_keys.sign(model, worker, entry_signed_parts(model, fields))
        self._submits.append((stream, worker, fields))
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
        delays = Backoff(0.05, 2.0)
        while self._running:
            await self._submit_wake.wait()
            self._submit_wake.clear()
            try:
                await self._drain_submits()
                delays.reset()
            except asyncio.CancelledError:
                raise
            except _REDIS_DOWN as exc:
                m.REDIS_ERRORS.labels("submit").inc()
                log.debug("submit write failed: error=%r", exc)
                await delays.wait()
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
                        hb.load.kv_free_blocks, hb.load.queued_prefill_tokens,
                        kv_capacity_blocks=hb.load.kv_capacity_blocks,
                        kv_cached_blocks=hb.load.kv_cached_blocks)
                self.core.touch(model, worker)
            except ValueError as exc:
                raise ValueError(f"bad load report: {exc}") from exc
        task = asyncio.get_running_loop().create_task(self._write_heartbeat(model, worker, fields))
        self._hb_writes.add(task)
        task.add_done_callback(self._hb_writes.discard)

    async def _write_heartbeat(self, model: str, worker: str, fields: dict[bytes, bytes]) -> None:
        transport = RedisTransport(self.client, self.keys, self.opts.num_shards,
                                   sign=self.worker_keys.sign if self.worker_keys else None)
        try:
            await transport.beat(model, worker, fields, self.opts.heartbeat_ttl_s)
        except Exception as exc:
            log.debug("heartbeat write failed: worker=%s error=%r", worker, exc)

    def publisher(self, model: str, worker: str, **opts: Any) -> EventPublisher:
        """A publisher sharing this plane's Redis client (same-process workers)."""
        opts.setdefault("heartbeat_ttl_s", self.opts.heartbeat_ttl_s)
        transport = RedisTransport(self.client or make_client(self.config), self.keys,
                                   self.opts.num_shards, self.opts.max_stream_len,
                                   owns_client=self.client is None,
                                   sign=self.worker_keys.sign if self.worker_keys else None)
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
